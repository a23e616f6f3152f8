"""Shared by the benchmarks: run the measuring part in a child process and read its peak memory; time a bare
forward pass."""

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


def bare_forward_seconds(model, group: list, transform, batch_size: int, device) -> float:
    """Seconds spent in ``model`` calls alone on the images of ``group`` ((sha256, path) pairs), in batches of
    ``batch_size``: each batch is decoded and preprocessed with ``transform`` before its timer starts; on CUDA
    the timer waits for the kernels."""
    import time

    import torch

    from sbssl.stimuli import load_image

    seconds = 0.0
    with torch.inference_mode():
        for b0 in range(0, len(group), batch_size):
            batch = torch.stack([transform(load_image(p)) for _, p in group[b0 : b0 + batch_size]])
            t0 = time.perf_counter()
            model(batch.to(device))
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds += time.perf_counter() - t0
    return seconds
