"""Stop a workflow job whose Snakemake is gone.

Snakemake runs a ``script:`` job as a child process (Snakemake -> shell -> python). Killed with SIGKILL (by
an out-of-memory killer, a scheduler, ``kill -9``), Snakemake cannot stop that child, which would keep
computing and writing outputs nobody will check (a GPU embedding job runs for many minutes).
:func:`exit_when_orphaned` makes such a job notice and exit cleanly. Linux only (it reads ``/proc``);
elsewhere it does nothing.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time in clock ticks since boot) of a process; None when it does not exist."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: the fields after it follow the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[19])


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def is_snakemake(argv: list[str]) -> bool:
    """True for the command line of a Snakemake process: an argument named ``snakemake`` (the ``snakemake``
    executable run directly or by a Python interpreter, or ``python -m snakemake``). The shell Snakemake
    starts a job with mentions only ``.snakemake/scripts/...`` and does not count."""
    return any(os.path.basename(arg) == "snakemake" for arg in argv)


def snakemake_ancestor() -> tuple[int, int] | None:
    """(pid, start time) of the nearest ancestor of this process that is Snakemake; None when there is none."""
    own = _stat(os.getpid())
    pid = own[1] if own else 0
    while pid > 1:
        stat = _stat(pid)
        if stat is None:
            return None
        if is_snakemake(_cmdline(pid)):
            return pid, stat[2]
        pid = stat[1]
    return None


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def exit_when_orphaned(poll_seconds: float = 1.0) -> int | None:
    """When this process runs under Snakemake, exit it (SIGTERM to itself) as soon as Snakemake is gone.

    Finds the nearest Snakemake ancestor (walking parent pids; none found: does nothing and returns None),
    installs a SIGTERM handler that raises SystemExit (so ``finally`` blocks and context managers run, e.g.
    :func:`sbssl.io.atomic_path` removes its temporary file), and starts a daemon thread that checks every
    ``poll_seconds`` whether that process still exists: absent, a zombie, or a new process under the same
    pid (another start time) counts as gone. Must be called from the main thread. Returns the watched pid.

    The handler runs between Python bytecodes, so a job exits after the C call it is in (one forward pass).
    """
    if poll_seconds <= 0:
        raise ValueError(f"poll_seconds must be > 0, got {poll_seconds}")
    found = snakemake_ancestor()
    if found is None:
        return None
    pid, start = found
    signal.signal(signal.SIGTERM, _terminate)

    def watch() -> None:
        while True:
            time.sleep(poll_seconds)
            stat = _stat(pid)
            if stat is None or stat[0] in ("Z", "X") or stat[2] != start:
                print(f"sbssl: Snakemake (pid {pid}) is gone; stopping this job (pid {os.getpid()})", file=sys.stderr)
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch, name="sbssl-orphan-watch", daemon=True).start()
    return pid
