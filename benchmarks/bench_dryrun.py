"""Dry-run time of the full study (config/config.yaml: 15 models, control branch, probes; 4,342 jobs).

Times ``snakemake -n --cores 2 --configfile config/config.yaml`` in a scratch copy of the workflow (nothing is
downloaded in a dry run), ``--repeats`` times (default 3), in two forms, alternately:

- printing included: every job's description is formatted and written to standard output, which goes to
  /dev/null (what a user waits for, minus the terminal);
- printing excluded: the same with ``--quiet rules`` (no per-job description), since printing thousands of job
  descriptions is much of a dry run and is Snakemake's own work.

Prints the median wall time and its spread (min-max) for each, and the CPU time (user + system) of the Snakemake
process, which a loaded, shared machine perturbs less than the wall time. Target: under 10 s with printing.

    .venv/bin/python benchmarks/bench_dryrun.py [--repeats N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from workflow_copy import copy_workflow  # noqa: E402

DRY_RUN = ("-n", "--cores", "2", "--configfile", "config/config.yaml")


class Timing(NamedTuple):
    seconds: float  # wall time
    cpu_seconds: float  # user + system time of the Snakemake process
    peak_rss_mb: float  # peak resident memory of the Snakemake process


def timed_snakemake(workdir: Path, *args: str, stdout: int | IO[str] = subprocess.DEVNULL) -> Timing:
    """Run ``python -m snakemake ARGS`` in ``workdir``, standard output to ``stdout``; its resource use from wait4.

    Raises SystemExit with the end of Snakemake's standard error when it fails.
    """
    with tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "snakemake", *args], cwd=workdir, stdin=subprocess.DEVNULL, stdout=stdout,
            stderr=err,
        )  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"snakemake {' '.join(args)} failed in {workdir} ({proc.returncode}):\n{err.read()[-4000:]}")
    return Timing(seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)  # Linux reports KiB


def job_count(stats: str) -> int:
    """The ``total`` row of the job stats table that ``snakemake -n`` prints."""
    found = re.search(r"^total\s+(\d+)\s*$", stats, re.MULTILINE)
    if found is None:
        raise SystemExit("no 'total' row in the job stats of the dry run")
    return int(found.group(1))


class DryRuns(NamedTuple):
    jobs: int
    printed: list[Timing]  # every job's description written to /dev/null
    quiet: list[Timing]  # --quiet rules


def full_study_dry_runs(workdir: Path, repeats: int) -> DryRuns:
    """Time the dry run of config/config.yaml ``repeats`` times with and without printing, in a copy at ``workdir``."""
    copy_workflow(workdir)
    printed, quiet = [], []
    stats = ""
    for _ in range(repeats):
        printed.append(timed_snakemake(workdir, *DRY_RUN))
        with tempfile.TemporaryFile("w+") as out:
            quiet.append(timed_snakemake(workdir, *DRY_RUN, "--quiet", "rules", stdout=out))
            out.seek(0)
            stats = out.read()
    return DryRuns(job_count(stats), printed, quiet)


def describe(timings: list[Timing]) -> str:
    """Median wall time, its spread and the median CPU time of ``timings``."""
    wall = [t.seconds for t in timings]
    cpu = statistics.median(t.cpu_seconds for t in timings)
    return f"{statistics.median(wall):.1f} s (min {min(wall):.1f}, max {max(wall):.1f}; CPU {cpu:.1f} s)"


def report(runs: DryRuns) -> str:
    """The lines this benchmark prints (also used by benchmarks/bench_dag.py)."""
    return (
        f"full study dry run (config/config.yaml, {runs.jobs} jobs, median of {len(runs.printed)}):\n"
        f"  `snakemake -n`, every job printed to /dev/null: {describe(runs.printed)} (target < 10 s)\n"
        f"  with --quiet rules (no job printed): {describe(runs.quiet)}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temp folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sbssl-bench-dryrun-") as scratch:
        workdir = args.keep or Path(scratch)
        print(report(full_study_dry_runs(workdir, args.repeats)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
