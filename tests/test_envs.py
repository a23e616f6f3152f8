"""The jobs' conda environment (envs/sbssl.yaml) against pyproject.toml, and how it installs this checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from sbssl.io import read_yaml

REPO = Path(__file__).resolve().parents[1]
ENV = REPO / "envs" / "sbssl.yaml"
POST_DEPLOY = REPO / "envs" / "sbssl.post-deploy.sh"
# They run the workflow, not its jobs: job scripts unpickle their `snakemake` object with the Snakemake that
# started them (its preamble puts that installation on sys.path), so a second copy in the env could differ.
RUNS_THE_WORKFLOW = {"snakemake", "snakemake-executor-plugin-slurm"}
TOOLS = {"python", "pip"}


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def _env_entries() -> tuple[list[str], list[str]]:
    """The conda entries (strings) and the pip entries of the env file."""
    deps = read_yaml(ENV, "conda env file")["dependencies"]
    conda = [d for d in deps if isinstance(d, str)]
    pip = [entry for d in deps if isinstance(d, dict) for entry in d["pip"]]
    return conda, pip


def _python_floor(spec: str) -> tuple[int, ...]:
    """Lowest Python version a spec allows: pip's ``>=3.11`` or conda's ``python=3.11`` / ``python>=3.11``."""
    spec = spec.removeprefix("python").strip()
    if spec.startswith("=") and not spec.startswith("=="):
        spec = ">=" + spec[1:]  # conda's fuzzy `=3.11` means 3.11.*, whose floor is 3.11
    floors = [s.version for s in SpecifierSet(spec) if s.operator in (">=", "==", "~=")]
    assert len(floors) == 1, spec
    return tuple(int(part) for part in floors[0].split("."))


def test_same_python_floor() -> None:
    conda, _ = _env_entries()
    (python,) = [c for c in conda if c.startswith("python")]
    assert _python_floor(python) == _python_floor(_pyproject()["project"]["requires-python"]) == (3, 11)


def test_every_dependency_with_the_same_constraint() -> None:
    wanted = {}
    for line in _pyproject()["project"]["dependencies"]:
        req = Requirement(line)
        wanted[canonicalize_name(req.name)] = req.specifier
    conda, pip = _env_entries()
    present: dict[str, SpecifierSet] = {}
    for line in conda + pip:
        req = Requirement(line.replace("python=", "python==", 1) if line.startswith("python=") else line)
        name = canonicalize_name(req.name)
        assert name not in present, f"{name} listed twice in {ENV}"
        present[name] = req.specifier
    deps = {name: spec for name, spec in present.items() if name not in TOOLS}
    assert set(wanted) - set(deps) == RUNS_THE_WORKFLOW
    assert set(deps) <= set(wanted), f"in {ENV} but not in pyproject.toml: {sorted(set(deps) - set(wanted))}"
    for name, spec in deps.items():
        assert spec == wanted[name], f"{name}: {ENV.name} says {spec or 'any'}, pyproject.toml {wanted[name] or 'any'}"


def test_no_install_line_depends_on_where_snakemake_copies_the_env_file() -> None:
    # Snakemake creates the env from a copy at <conda prefix>/<hash>.yaml; a path relative to envs/ breaks there.
    _, pip = _env_entries()
    local = [e for e in pip if e.startswith(("-e", ".", "/", "file:", "~")) or "/" in e or "\\" in e]
    assert local == []
    # the checkout is installed by the post-deploy script that Snakemake finds beside the env file
    assert POST_DEPLOY == ENV.with_name(ENV.stem + ".post-deploy.sh") and POST_DEPLOY.is_file()


def _run_copied_post_deploy(tmp_path: Path, root: str | None) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run the post-deploy script as Snakemake does: copied into the conda prefix, run by the interpreter its
    shebang names, from the working directory, with the env's python first on PATH (here: a recorder)."""
    prefix = tmp_path / ".snakemake" / "conda"
    prefix.mkdir(parents=True)
    script = prefix / "0123abcd.post-deploy.sh"
    shutil.copyfile(POST_DEPLOY, script)
    bin_dir, calls = tmp_path / "env" / "bin", tmp_path / "python-calls"
    bin_dir.mkdir(parents=True)
    recorder = bin_dir / "python"
    recorder.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    recorder.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("SBSSL_ROOT", None)
    if root is not None:
        env["SBSSL_ROOT"] = root
    shebang = POST_DEPLOY.read_text().splitlines()[0]
    assert shebang.startswith("#!")
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    proc = subprocess.run(
        [*shebang[2:].split(), str(script)], cwd=workdir, env=env, capture_output=True, text=True, check=False
    )
    return proc, calls


@pytest.mark.skipif(shutil.which("bash") is None, reason="the post-deploy script is a bash script")
def test_post_deploy_installs_the_checkout_from_a_copied_script(tmp_path: Path) -> None:
    proc, calls = _run_copied_post_deploy(tmp_path, str(REPO))
    assert proc.returncode == 0, proc.stderr
    assert calls.read_text().splitlines() == [f"-m pip install --no-deps --no-input -e {REPO}"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="the post-deploy script is a bash script")
@pytest.mark.parametrize("root, message", [(None, "SBSSL_ROOT: is not set"), ("/nonexistent", "not an sbssl checkout")])
def test_post_deploy_refuses_a_missing_or_wrong_checkout(tmp_path: Path, root: str | None, message: str) -> None:
    proc, calls = _run_copied_post_deploy(tmp_path, root)
    assert proc.returncode != 0 and message in proc.stderr
    assert not calls.exists()
