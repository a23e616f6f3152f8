from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sbssl.process import _stat, exit_when_orphaned, is_snakemake

# The job: watches its Snakemake, then holds a temporary output open (as an embedding job does) forever.
CHILD = """
import os, sys, time
from pathlib import Path
from sbssl.io import atomic_path
from sbssl.process import exit_when_orphaned

out = Path(sys.argv[1])
watched = exit_when_orphaned(poll_seconds=0.1)
with atomic_path(out) as tmp:
    tmp.write_text("partial")
    (out.parent / "ready").write_text(f"{watched} {os.getpid()}")
    time.sleep(120)
"""
# A stand-in for Snakemake: a process with an argument named "snakemake" that runs the job and waits.
PARENT = "import subprocess, sys; subprocess.run([sys.executable, '-c', sys.argv[1], sys.argv[2]])"


def _wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _exited(pid: int) -> bool:
    stat = _stat(pid)
    return stat is None or stat[0] in ("Z", "X")  # a zombie has exited; only its reaper is missing


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_a_job_exits_cleanly_when_its_snakemake_is_killed(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(tmp_path / "out.h5"), "snakemake"])
    child = None
    try:
        assert _wait_for(lambda: (tmp_path / "ready").is_file() and (tmp_path / "ready").read_text(), 60)
        watched, child = map(int, (tmp_path / "ready").read_text().split())
        assert watched == parent.pid
        assert len(list(tmp_path.glob(".out.h5.*"))) == 1  # the job is writing its temporary file
        time.sleep(0.5)
        assert not _exited(child)  # five polls with Snakemake alive: the job keeps running
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        assert _wait_for(lambda: _exited(child), 5), "the orphaned job is still running"
    finally:
        parent.kill()
        parent.wait()
        if child is not None and not _exited(child):
            os.kill(child, signal.SIGKILL)  # only when the test failed: leave nothing running
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ready"]  # no output, no temporary file


def test_without_snakemake_it_does_nothing():
    code = "import signal; from sbssl.process import exit_when_orphaned; " \
           "print(exit_when_orphaned(), signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)"  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["None", "True"]


def test_what_counts_as_snakemake():
    assert is_snakemake(["/venv/bin/python3.11", "/venv/bin/snakemake", "--cores", "8"])
    assert is_snakemake(["python", "-m", "snakemake", "--mode", "remote"])
    assert is_snakemake(["snakemake", "-c1"])
    # The shell Snakemake runs a script job with only mentions Snakemake's folder.
    assert not is_snakemake(["/bin/bash", "-c", "set -euo pipefail; python /w/.snakemake/scripts/tmpab.embed_layers.py"])
    assert not is_snakemake(["python", "-m", "pytest", "tests/test_snakemake_things.py"])


def test_poll_seconds_must_be_positive():
    with pytest.raises(ValueError, match="poll_seconds"):
        exit_when_orphaned(0)
