"""Run a benchmark's measuring part in a child process and read its peak memory (shared by the benchmarks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run_child(script: str | os.PathLike[str], mode: str, config_path: Path) -> tuple[dict, float]:
    """Run ``python SCRIPT --child MODE --config CONFIG``; return the JSON on its last output line and its
    peak RSS in MB (ru_maxrss from wait4: the child alone, not this process)."""
    proc = subprocess.Popen(
        [sys.executable, str(script), "--child", mode, "--config", str(config_path)], stdout=subprocess.PIPE, text=True
    )
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"benchmark child {mode!r} failed with status {os.waitstatus_to_exitcode(status)}")
    return json.loads(output.strip().splitlines()[-1]), usage.ru_maxrss / 1024  # Linux reports KiB
