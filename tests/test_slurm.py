"""The demo workflow through the SLURM profile on a real one-node SLURM cluster (issue 6).

All tests but the first (a dry run of the users' profile) are marked slurm and slow.

tests/slurm/start-cluster.sh installs (apt) and starts slurmctld + slurmd on 127.0.0.1; the session
fixture stops them again with stop-cluster.sh. A small demo (2 layers, 1 seed, 4 images per concept,
50 sampled permutations, no control branch) runs in a scratch copy through profiles/slurm-local while
the same config runs locally in a second copy; the tests then check that

1. the embedding jobs and the bundled permutation tests went through sbatch, counted from SLURM's own
   job records (`squeue -t all`: the cluster keeps finished jobs for MinJobAge=3600 s, it has no
   accounting database) and the group jobs' logs;
2. the SLURM results equal the local ones byte for byte;
3. adding a model submits only that model's jobs plus the aggregates;
4. a job that fails (a corrupted similarity file) is reported with its log path, the run stops and
   finished outputs stay as they were.

Every Snakemake run has a timeout (several SLURM misconfigurations hang instead of failing); on a
timeout the run's SLURM jobs are cancelled.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workflow_copy import copy_workflow, write_config

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tests" / "slurm"
PROFILE = REPO / "profiles" / "slurm-local"
STATE = Path(os.environ.get("SBSSL_SLURM_STATE", "/tmp/sbssl-slurm"))

MODELS = ["random_1", "random_2"]
DEMO_TESTS = ["colour_valence", "colour_valence_reversed", "null_control", "intersectional_dots_valence"]
LAYERS = ["layer4", "avgpool"]
SEEDS = [0]
SMALL = {
    "layers": LAYERS,
    "seeds": SEEDS,
    "demo_images_per_concept": 4,
    # Fewer permutations than the C(8, 4) = 70 partitions: sampled p-values, so the seeds matter.
    "permutations": 50,
    "control": {"models": []},
    "paper_study": {"enabled": False},
    "probes": {"enabled": False},
    "debias": {"enabled": False},
}
RUN_TIMEOUT = 420  # seconds per Snakemake run; a healthy one takes 1-3 minutes on 2 cores


# --- the cluster ---------------------------------------------------------------------------------


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to start slurmctld/slurmd (tests/slurm/start-cluster.sh)"
    if shutil.which("slurmctld") and shutil.which("slurmd") and shutil.which("munged"):
        return None
    if not shutil.which("apt-get"):
        return "SLURM is not installed and there is no apt-get to install slurm-wlm"
    # No candidate in apt's lists: start-cluster.sh runs apt-get update once and, if there is still
    # none, exits with that reason (a skip below).
    return None


def test_users_profile_bundles_the_demo(tmp_path):
    """profiles/slurm, dry run (no cluster needed): the demo's 228 permutation-test jobs of 3 seeds each (72
    of its models, 144 of the 12 debiased networks, 12 of the control) in 3 bundles, one embedding job per
    model (3 + 12 + the control's 1), the layer probes in one."""
    work = copy_workflow(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--configfile", "config/demo.yaml", "--profile", str(REPO / "profiles/slurm"), "-n"],
        cwd=work, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    groups = re.findall(r"Group job (\w+) \(jobs", proc.stdout + proc.stderr)
    assert {g: groups.count(g) for g in set(groups)} == {
        "stimuli": 1, "embedding": 16, "permutation_tests": 3, "aggregates": 1, "probes": 1
    }


@pytest.fixture(scope="session")
def slurm_env():
    """Environment for SLURM clients of the test cluster; starts it (and stops it at the end)."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    env = {**os.environ, "SBSSL_SLURM_STATE": str(STATE)}
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [str(SCRIPTS / "start-cluster.sh")], env=env, capture_output=True, text=True, timeout=900
        )
    except subprocess.TimeoutExpired:
        subprocess.run([str(SCRIPTS / "stop-cluster.sh")], env=env, timeout=120)
        pytest.skip("the SLURM test cluster did not start within 15 minutes")
    if proc.returncode != 0:
        subprocess.run([str(SCRIPTS / "stop-cluster.sh")], env=env, timeout=120)
        pytest.skip(f"the SLURM test cluster could not start (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    print(f"SLURM test cluster up in {time.monotonic() - started:.1f} s")
    env["SLURM_CONF"] = str(STATE / "etc" / "slurm.conf")
    yield env
    # A cluster someone started before this session stays up for them.
    if "already running" not in proc.stderr:
        subprocess.run([str(SCRIPTS / "stop-cluster.sh")], env=env, timeout=120)


def _slurm_jobs(env: dict, workdir: Path) -> dict[int, dict[str, str]]:
    """SLURM's own records of the jobs run in ``workdir``: job id -> comment (rule or group), state."""
    out = subprocess.run(
        ["squeue", "--states=all", "--noheader", "--format=%i|%T|%Z|%k"],
        env=env, capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    jobs = {}
    for line in out.splitlines():
        job_id, state, job_dir, comment = line.strip().split("|", 3)
        if Path(job_dir) == workdir:
            jobs[int(job_id)] = {"state": state, "comment": comment}
    return jobs


# --- running Snakemake ---------------------------------------------------------------------------


def _start(workdir: Path, log: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    """Start ``python -m snakemake ARGS`` in ``workdir`` (own process group), output to ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "snakemake", *args],
            cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def _finish(proc: subprocess.Popen, log: Path, timeout: float, env: dict | None = None) -> tuple[int, str]:
    """Wait for a run (its log lies in its workdir); on timeout kill it, cancel its SLURM jobs, fail."""
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if env is not None:
            jobs = _slurm_jobs(env, log.parent)
            pending = [str(i) for i, job in jobs.items() if job["state"] in ("PENDING", "RUNNING")]
            if pending:
                subprocess.run(["scancel", *pending], env=env, timeout=30)
        pytest.fail(f"snakemake did not finish within {timeout} s (hung?); log {log}:\n{log.read_text()[-4000:]}")
    return code, log.read_text()


def _slurm_run(workdir: Path, env: dict, name: str, *args: str) -> tuple[int, str, dict[int, dict[str, str]]]:
    """One run through the SLURM profile; returns exit code, output and the SLURM jobs it submitted."""
    before = set(_slurm_jobs(env, workdir))
    log = workdir / f"{name}.log"
    proc = _start(workdir, log, "--profile", str(PROFILE), *args, env=env)
    code, output = _finish(proc, log, RUN_TIMEOUT, env)
    submitted = {i: job for i, job in _slurm_jobs(env, workdir).items() if i not in before}
    return code, output, submitted


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def _group_jobs(submitted: dict, group: str) -> list[int]:
    """SLURM job ids of one Snakemake group (the executor comments group jobs rule_<group>_<rules>)."""
    return sorted(i for i, job in submitted.items() if job["comment"].startswith(f"rule_{group}_"))


def _ran_inside(workdir: Path, job_ids, rule: str) -> list[str]:
    """Wildcards of every ``rule`` job that ran inside these SLURM group jobs, from their logs."""
    ran = []
    for job_id in job_ids:
        (log,) = workdir.glob(f".snakemake/slurm_logs/group_*/{job_id}.log")
        # Each member job runs in a Snakemake of its own inside the group job: a "localrule" there.
        ran += re.findall(rf"localrule {rule}:\n(?:.*\n)*?\s+wildcards: (.+)", log.read_text())
    return sorted(ran)


def _tests(models) -> list[str]:
    return sorted(
        f"model={m}, layer={layer}, test={t}" for m in models for layer in LAYERS for t in DEMO_TESTS
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, slurm_env):
    """The small demo through SLURM in one copy while the same config runs locally in another."""
    local = copy_workflow(tmp_path_factory.mktemp("local"))
    cluster = copy_workflow(tmp_path_factory.mktemp("slurm"))
    for work in (local, cluster):
        write_config(work, "small.yaml", SMALL)
    config = ("--configfile", "config/demo.yaml", "small.yaml")
    started = time.monotonic()
    local_proc = _start(local, local / "local.log", *config, "--cores", "2", "results/demo/tables/tests.csv")
    try:
        code, output, submitted = _slurm_run(cluster, slurm_env, "slurm", *config)
    finally:
        local_code, local_output = _finish(local_proc, local / "local.log", RUN_TIMEOUT)
    print(f"SLURM demo run and local run (concurrent): {time.monotonic() - started:.1f} s")
    assert code == 0, f"SLURM run failed:\n{output[-6000:]}"
    assert local_code == 0, f"local run failed:\n{local_output[-6000:]}"
    return {"local": local, "cluster": cluster, "config": config, "submitted": submitted, "env": slurm_env}


@pytest.mark.slurm
@pytest.mark.slow
def test_embeddings_and_bundled_permutation_tests_went_through_sbatch(runs):
    submitted, cluster = runs["submitted"], runs["cluster"]
    assert all(job["state"] == "COMPLETED" for job in submitted.values()), submitted
    # One job per model: its embedding pass (all layers), which also writes the per-layer similarities.
    embedding = _group_jobs(submitted, "embedding")
    assert len(embedding) == len(MODELS)
    assert _ran_inside(cluster, embedding, "embed_layers") == [f"model={m}" for m in MODELS]
    # Every association test ran inside a permutation bundle, and the bundles are few.
    bundles = _group_jobs(submitted, "permutation_tests")
    assert 1 <= len(bundles) <= 3
    assert _ran_inside(cluster, bundles, "association_test") == _tests(MODELS)
    # The rest: the stimuli, the per-test table and the other aggregates, one job each.
    assert len(_group_jobs(submitted, "stimuli")) == len(_group_jobs(submitted, "aggregates")) == 1
    comments = sorted(job["comment"] for job in submitted.values())
    assert comments.count("rule_tests_table") == 1
    assert len(submitted) == len(MODELS) + len(bundles) + 3, comments


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_results_equal_local_results_byte_for_byte(runs):
    local, cluster = runs["local"] / "results/demo", runs["cluster"] / "results/demo"
    assert (local / "tables/tests.csv").read_bytes() == (cluster / "tables/tests.csv").read_bytes()
    local_tests, cluster_tests = _digests(local / "tests"), _digests(cluster / "tests")
    assert len(local_tests) == len(MODELS) * len(LAYERS) * 4 * len(SEEDS)
    assert cluster_tests == local_tests
    # The aggregates of the demo ran on the cluster too.
    for name in ("tables/summary.csv", "meta_test.json", "figures/bias_counts.png"):
        assert (cluster / name).is_file(), name


@pytest.mark.slurm
@pytest.mark.slow
def test_adding_a_model_submits_only_its_jobs(runs):
    cluster = runs["cluster"]
    write_config(cluster, "three_models.yaml", {"models": [*MODELS, "random_3"]})
    code, output, submitted = _slurm_run(cluster, runs["env"], "add_model", *runs["config"], "three_models.yaml")
    assert code == 0, output[-6000:]
    embedding = _group_jobs(submitted, "embedding")
    assert _ran_inside(cluster, embedding, "embed_layers") == ["model=random_3"]
    bundles = _group_jobs(submitted, "permutation_tests")
    assert _ran_inside(cluster, bundles, "association_test") == _tests(["random_3"])
    # Plus the aggregates, which read every model; no stimuli job, nothing for the other models.
    comments = sorted(job["comment"] for job in submitted.values())
    assert comments.count("rule_tests_table") == 1
    assert len(_group_jobs(submitted, "aggregates")) == 1
    assert len(submitted) == 1 + len(bundles) + 2, comments


@pytest.mark.slurm
@pytest.mark.slow
def test_failing_job_is_reported_with_its_log_and_finished_outputs_stay(runs):
    cluster = runs["cluster"]
    results = cluster / "results/demo"
    broken = results / "similarity/random_1/layer4.h5"
    original, stat = broken.read_bytes(), broken.stat()
    before = _digests(results / "tests")
    table = (results / "tables/tests.csv").read_bytes()
    broken.write_bytes(b"not an HDF5 file\n")
    # A model's similarity matrices are one folder output of its embedding job, whose time stamp a file
    # rewritten by hand does not change: remove one finished test so that its job reads the broken file.
    redo = sorted((results / "tests/random_1/layer4").rglob("*.json"))[0]
    redo.unlink()
    try:
        started = time.monotonic()
        code, output, submitted = _slurm_run(cluster, runs["env"], "failing", *runs["config"])
        elapsed = time.monotonic() - started
    finally:
        broken.write_bytes(original)
        os.utime(broken, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert code != 0, output[-4000:]
    assert "Error in group permutation_tests" in output or "Error in rule association_test" in output, output[-4000:]
    # The error report names the failed SLURM job's log, and that log holds the job's error.
    logs = re.findall(r"log: (\S+/slurm_logs/group_permutation_tests_\S+\.log) \(check log file", output)
    assert len(logs) == 1, output[-4000:]
    assert "layer4.h5" in (cluster / logs[0]).read_text()
    # Only the bundle of the affected tests was submitted: the run stopped, the aggregates never ran.
    assert len(submitted) == len(_group_jobs(submitted, "permutation_tests")) == 1, submitted
    ran = _ran_inside(cluster, submitted, "association_test")
    assert ran and all(t.startswith("model=random_1, layer=layer4,") for t in ran), ran
    assert elapsed < RUN_TIMEOUT
    # Finished outputs are untouched; the affected tests are either gone (to be rerun) or unchanged.
    after = _digests(results / "tests")
    affected = {k for k in before if k.startswith("random_1/layer4/")}
    assert {k: v for k, v in after.items() if k not in affected} == {k: v for k, v in before.items() if k not in affected}
    assert all(after[k] == before[k] for k in affected if k in after)
    assert (results / "tables/tests.csv").read_bytes() == table
