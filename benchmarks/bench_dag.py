"""Throughput of the permutation stage of the full study, and the dry-run time of its DAG.

Builds a scratch copy of the workflow with the full study's shape (15 models x 6 layers x 39 tests x
3 seeds = 10,530 association_test jobs, 10,000 permutations) over small random similarity files, so
only the DAG, the scheduler and the permutation jobs are measured (no model is run). Prints jobs/s.

    .venv/bin/python benchmarks/bench_dag.py [--models N] [--images-per-folder K] [--keep DIR]
Targets (issue 4): >= 50 jobs/s on 2 cores, dry run <= 15 s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workflow_copy import copy_workflow, planned_jobs, snakemake, write_config  # noqa: E402

from sbssl.catalogue import load_catalogue  # noqa: E402
from sbssl.layers import LAYERS  # noqa: E402
from sbssl.models import load_zoo  # noqa: E402
from sbssl.storage import write_sha256  # noqa: E402
from sbssl.stimuli import distinct_images, read_manifest  # noqa: E402


def make_stimuli(root: Path, folders: set[str], per_folder: int, rng: np.random.Generator) -> None:
    """Tiny distinct PNGs in every catalogue folder (only their hashes matter here)."""
    for folder in sorted(folders):
        for i in range(per_folder):
            pixels = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            path = root / folder / f"{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels, mode="RGB").save(path)


def make_similarity(path: Path, hashes: list[str], model: str, layer: str, rng: np.random.Generator) -> None:
    """A valid random cosine-similarity file: Gram matrix of random unit vectors."""
    vectors = rng.standard_normal((len(hashes), 64))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("similarity", data=vectors @ vectors.T)
        write_sha256(f, hashes)
        f.attrs.update({"model": model, "layer": layer, "preprocessing": "sbssl", "pooling": "flatten"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=15, help="how many of the zoo's models (default all 15)")
    parser.add_argument("--images-per-folder", type=int, default=8)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temp folder)")
    args = parser.parse_args()

    workdir = args.keep or Path(tempfile.mkdtemp(prefix="sbssl-bench-dag-"))
    copy_workflow(workdir)
    rng = np.random.default_rng(0)
    catalogue = load_catalogue(workdir / "config/tests.yaml")
    models = list(load_zoo(workdir / "config/models.yaml"))[: args.models]
    stimuli = workdir / "stimuli"
    make_stimuli(stimuli, {getattr(t, k) for t in catalogue for k in "xyab"}, args.images_per_folder, rng)
    config = write_config(
        workdir,
        "bench.yaml",
        {
            "results": "results",
            "stimuli": str(stimuli),
            "models": models,
            "seeds": [0, 1, 2],
            "permutations": 10_000,
            "embedding": {"keep_embeddings": False},
            "control": {"models": []},
        },
    )
    target = "results/tables/tests.csv"
    snakemake(workdir, "--configfile", str(config), "--cores", "1", "results/stimuli/manifest.csv")
    hashes = distinct_images(read_manifest(workdir / "results/stimuli/manifest.csv"))["sha256"].tolist()
    for model in models:
        for layer in LAYERS:
            make_similarity(workdir / f"results/similarity/{model}/{layer}.h5", hashes, model, layer, rng)

    start = time.perf_counter()
    dry = snakemake(workdir, "--configfile", str(config), "-n", target)
    dry_seconds = time.perf_counter() - start
    jobs = planned_jobs(dry.stdout)
    rules = {rule for rule, _ in jobs}
    n_tests = sum(rule == "association_test" for rule, _ in jobs)
    if rules - {"association_test", "tests_table"}:
        raise SystemExit(f"unexpected jobs planned: {sorted(rules)}")

    start = time.perf_counter()
    snakemake(workdir, "--configfile", str(config), "--cores", str(args.cores), target, timeout=3600)
    run_seconds = time.perf_counter() - start

    print(f"workdir: {workdir}")
    print(f"models x layers x tests x seeds: {len(models)} x {len(LAYERS)} x {len(catalogue)} x 3")
    print(f"distinct images per similarity matrix: {len(hashes)}")
    print(f"dry run ({len(jobs)} jobs): {dry_seconds:.1f} s")
    print(f"run: {n_tests} association_test jobs + tests_table in {run_seconds:.1f} s on {args.cores} cores")
    print(f"throughput: {(n_tests + 1) / run_seconds:.1f} jobs/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
