"""A long-lived Python worker process that runs functions for its parent, one call at a time.

The workflow's permutation-test jobs are threads of the Snakemake process; they hand their tests to one such
worker (:func:`sbssl.runner.record_association_tests_job`) so that the tests run on another core than
Snakemake's scheduler.

The worker is started with :mod:`subprocess` (``python -m sbssl.worker``), not :mod:`multiprocessing`: spawn
and forkserver import the parent's main script again in the child, which reruns it where it is not guarded by
``if __name__ == "__main__"`` (a script calling Snakemake's API would start the workflow a second time), and
fork is unsafe in Snakemake's multi-threaded process. Calls travel pickled over the worker's standard input,
results over a duplicate of its standard output (what the called code prints goes to standard error), each
message a length and its bytes, so that one that cannot be unpickled is refused without losing the next. The
worker ends when its standard input closes: when :meth:`WorkerProcess.close` is called, and when the parent
dies, however it dies.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
from typing import IO, Any, Callable


class WorkerGone(RuntimeError):
    """The worker process died or could not start; its calls can be run in the parent instead."""


class WorkerProcess:
    """A worker process (``python -m sbssl.worker`` with this interpreter); :meth:`call` is thread-safe."""

    def __init__(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "sbssl.worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        self._lock = threading.Lock()

    def call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``function(*args, **kwargs)`` in the worker (a module-level function; arguments and result picklable).

        Re-raises the function's exception (or a RuntimeError with its type and message where it cannot be
        pickled). Raises :class:`WorkerGone` when the worker has died.
        """
        request = pickle.dumps((function, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            try:
                _write_message(self._process.stdin, request)
                ok, value = pickle.loads(_read_message(self._process.stdout))
            except (OSError, EOFError) as exc:
                raise WorkerGone(f"the worker process (pid {self._process.pid}) is gone: {exc!r}") from exc
        if ok:
            return value
        raise value

    def close(self) -> None:
        """End the worker (its standard input closes; it exits when its current call is done) and wait for it."""
        try:
            self._process.stdin.close()
        except OSError:  # already gone
            pass
        self._process.wait()


def _write_message(stream: IO[bytes], data: bytes) -> None:
    stream.write(len(data).to_bytes(8, "little") + data)
    stream.flush()


def _read_message(stream: IO[bytes]) -> bytes:
    """One message; EOFError when the stream ends before it is whole."""
    header = stream.read(8)
    size = int.from_bytes(header, "little") if len(header) == 8 else -1
    data = stream.read(size) if size >= 0 else b""
    if size < 0 or len(data) != size:
        raise EOFError("the stream ended")
    return data


def _reply(ok: bool, value: Any) -> bytes:
    try:
        data = pickle.dumps((ok, value), protocol=pickle.HIGHEST_PROTOCOL)
        if not ok:
            pickle.loads(data)  # an exception whose class cannot be rebuilt would break the parent's read
        return data
    except Exception as exc:  # noqa: BLE001 - any failure to pickle becomes a plain error
        error = value if not ok else exc
        return pickle.dumps((False, RuntimeError(f"{type(error).__name__}: {error}")))


def main() -> int:
    """The worker's loop: read a call, run it, write its result, until standard input closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes the worker
    requests = sys.stdin.buffer
    results = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # what the called code prints must not enter the results channel
    sys.stdout = sys.stderr
    while True:
        try:
            request = _read_message(requests)
        except EOFError:
            return 0
        try:
            function, args, kwargs = pickle.loads(request)
            reply = _reply(True, function(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - every error goes back to the caller
            reply = _reply(False, exc)
        _write_message(results, reply)


if __name__ == "__main__":
    raise SystemExit(main())
