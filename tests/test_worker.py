"""The worker process of sbssl.worker: calls, errors, output hygiene, and its end with its parent."""

from __future__ import annotations

import json
import math
import operator
import os
import subprocess
import sys
import time

import pytest

from sbssl.worker import WorkerGone, WorkerProcess


@pytest.fixture()
def worker():
    process = WorkerProcess()
    yield process
    process.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as ended
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] != "Z"


def test_calls_run_in_another_process_and_return_their_results(worker):
    assert worker.call(operator.add, 2, 3) == 5
    assert worker.call(os.getpid) not in (os.getpid(), None)
    assert worker.call(sorted, [3, 1, 2], reverse=True) == [3, 2, 1]


def test_errors_come_back_with_their_type_and_message_and_the_worker_goes_on(worker):
    with pytest.raises(ValueError, match="math domain error"):
        worker.call(math.sqrt, -1)
    with pytest.raises(json.JSONDecodeError):
        worker.call(json.loads, "{")
    # a request the worker cannot unpickle (this test module is not importable there) is refused, not fatal
    with pytest.raises(ModuleNotFoundError, match="test_worker"):
        worker.call(_alive, 1)
    assert worker.call(operator.mul, 6, 7) == 42


def test_what_the_called_code_prints_does_not_break_the_channel(worker):
    assert worker.call(print, "noise on standard output") is None
    assert worker.call(operator.add, "a", "b") == "ab"


def test_a_dead_worker_is_reported_and_close_returns():
    worker = WorkerProcess()
    pid = worker.call(os.getpid)
    with pytest.raises(WorkerGone, match=str(pid)):
        worker.call(os._exit, 3)
    with pytest.raises(WorkerGone):
        worker.call(operator.add, 1, 1)
    worker.close()


def test_the_worker_ends_when_its_parent_is_killed(tmp_path):
    # SIGKILL leaves the parent no time to close the worker: the worker sees its input end and exits.
    script = tmp_path / "parent.py"
    script.write_text(
        "import os, signal\n"
        "from sbssl.worker import WorkerProcess\n"
        "worker = WorkerProcess()\n"
        "print(worker.call(os.getpid), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    parent = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert parent.returncode == -9
    pid = int(parent.stdout)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)
