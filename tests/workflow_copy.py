"""Copy the workflow (Snakefile, rules, scripts, configs, profiles) into a scratch folder and run it there.

Shared by benchmarks and the workflow tests: a run in a copy has its own .snakemake/ state and lock,
so it never disturbs (or is disturbed by) a run in the checkout.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_PARTS = ("Snakefile", "rules", "scripts", "config", "envs", "profiles/default", "data/published")


def copy_workflow(dest: Path) -> Path:
    """Copy the workflow files into ``dest`` (created) and return it."""
    dest.mkdir(parents=True, exist_ok=True)
    for part in WORKFLOW_PARTS:
        source, target = REPO / part, dest / part
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return dest


def write_config(workdir: Path, name: str, config: dict) -> Path:
    path = workdir / name
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def snakemake(
    workdir: Path, *args: str, timeout: float = 600, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m snakemake ARGS`` in ``workdir`` with this interpreter; output captured as text."""
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def planned_jobs(dry_run_output: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, wildcards) of every job a ``snakemake -n`` run printed."""
    jobs: list[tuple[str, dict[str, str]]] = []
    for line in dry_run_output.splitlines():
        stripped = line.strip()
        if (stripped.startswith("rule ") or stripped.startswith("localrule ")) and stripped.endswith(":"):
            jobs.append((stripped.split()[1].rstrip(":"), {}))
        elif stripped.startswith("wildcards:") and jobs:
            pairs = (item.split("=", 1) for item in stripped[len("wildcards:"):].split(", "))
            jobs[-1] = (jobs[-1][0], {k.strip(): v.strip() for k, v in pairs})
    return jobs
