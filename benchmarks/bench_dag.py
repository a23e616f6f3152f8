"""Throughput of the permutation stage of the full study against trivial jobs of the same DAG shape, and the
dry-run time of the full study's DAG.

Builds a scratch copy of the workflow with the full study's shape (15 models x 6 layers x 39 tests =
3,510 association_test jobs of 3 seeds each, 10,530 tests of 10,000 permutations) over small random
similarity files, so
only the DAG, the scheduler and the permutation jobs are measured (no model is run). A second copy is
identical except that the `run:` body of rule association_test only writes a tiny JSON per seed (same rules,
wildcards, params, inputs, outputs and log; the same profile: threads, greedy scheduler). Both run the
association_test jobs only (``--until association_test``), one after the other, in this one run; the
script prints both rates, their ratio (target >= 0.8) and the peak RSS of the Snakemake process (every
test job is a thread of it, whose tests run in a worker process; ``wait4`` reports the larger of the two;
target <= 3000 MB).

It also times ``snakemake -n`` of the full study in another scratch copy, with and without printing the jobs
(benchmarks/bench_dryrun.py, which runs that part alone).

    .venv/bin/python benchmarks/bench_dag.py [--models N] [--images-per-folder K] [--keep DIR]
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_dryrun import full_study_dry_runs, report, timed_snakemake  # noqa: E402
from workflow_copy import copy_workflow, planned_jobs, snakemake, write_config  # noqa: E402

from sbssl.catalogue import load_catalogue  # noqa: E402
from sbssl.layers import LAYERS  # noqa: E402
from sbssl.models import load_zoo  # noqa: E402
from sbssl.storage import write_sha256  # noqa: E402
from sbssl.stimuli import distinct_images, read_manifest  # noqa: E402

TARGET = "results/tables/tests.csv"
# The trivial body: what Snakemake itself needs a job to do (its outputs, one per seed), nothing of ours.
TRIVIAL_BODY = """    run:
        import json

        for seed, out in zip(SEEDS, output):
            with open(out, "w") as handle:
                json.dump({"test": wildcards.test, "seed": seed}, handle)

"""


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


def trivialise(workdir: Path) -> None:
    """Replace the `run:` body of rule association_test in ``workdir``'s copy by :data:`TRIVIAL_BODY`."""
    rules = workdir / "rules" / "tests.smk"
    text = rules.read_text(encoding="utf-8")
    pattern = re.compile(r"(rule association_test:\n(?:.*\n)*?)    run:\n(?:.*\n)*?(?=\n\nrule |\Z)")
    new, count = pattern.subn(lambda m: m.group(1) + TRIVIAL_BODY.rstrip("\n") + "\n", text)
    if count != 1:
        raise SystemExit(f"{rules}: could not find the run: body of rule association_test")
    rules.write_text(new, encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=15, help="how many of the zoo's models (default all 15)")
    parser.add_argument("--images-per-folder", type=int, default=8)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temp folder)")
    parser.add_argument("--skip-dry-run", action="store_true", help="do not time the full study's dry run")
    parser.add_argument("--dry-run-repeats", type=int, default=3, help="dry runs of the full study, each form")
    args = parser.parse_args()

    base = args.keep or Path(tempfile.mkdtemp(prefix="sbssl-bench-dag-"))
    real, trivial = base / "real", base / "trivial"
    copy_workflow(real)
    rng = np.random.default_rng(0)
    catalogue = load_catalogue(real / "config/tests.yaml")
    models = list(load_zoo(real / "config/models.yaml"))[: args.models]
    stimuli = base / "stimuli"
    make_stimuli(stimuli, {getattr(t, k) for t in catalogue for k in "xyab"}, args.images_per_folder, rng)
    config = {
        "results": "results",
        "stimuli": str(stimuli),
        "models": models,
        "seeds": [0, 1, 2],
        "permutations": 10_000,
        "embedding": {"keep_embeddings": False},
        "control": {"models": []},
    }
    write_config(real, "bench.yaml", config)
    snakemake(real, "--configfile", "bench.yaml", "--cores", "1", "results/stimuli/manifest.csv")
    hashes = distinct_images(read_manifest(real / "results/stimuli/manifest.csv"))["sha256"].tolist()
    for model in models:
        for layer in LAYERS:
            make_similarity(real / f"results/similarity/{model}/{layer}.h5", hashes, model, layer, rng)
    shutil.copytree(real, trivial, symlinks=True)
    trivialise(trivial)

    start = time.perf_counter()
    dry = snakemake(real, "--configfile", "bench.yaml", "-n", TARGET, "--until", "association_test")
    dry_seconds = time.perf_counter() - start
    jobs = planned_jobs(dry.stdout)
    n_jobs = sum(rule == "association_test" for rule, _ in jobs)
    n_tests = n_jobs * len(config["seeds"])
    if {rule for rule, _ in jobs} != {"association_test"}:
        raise SystemExit(f"unexpected jobs planned: {sorted({rule for rule, _ in jobs})}")

    run_args = ("--configfile", "bench.yaml", "--cores", str(args.cores), TARGET, "--until", "association_test")
    trivial_run = timed_snakemake(trivial, *run_args)
    real_run = timed_snakemake(real, *run_args)
    trivial_s, real_s = trivial_run.seconds, real_run.seconds
    done = sum(1 for _ in (real / "results/tests").rglob("*.json"))
    if done != n_tests:
        raise SystemExit(f"{done} result files for {n_jobs} jobs of {len(config['seeds'])} seeds")

    print(f"workdir: {base}")
    print(f"models x layers x tests: {len(models)} x {len(LAYERS)} x {len(catalogue)} = {n_jobs} jobs, "
          f"x 3 seeds = {n_tests} tests")  # fmt: skip
    print(f"distinct images per similarity matrix: {len(hashes)}; {args.cores} cores; profile: profiles/default")
    print(f"dry run of these {n_jobs} jobs: {dry_seconds:.1f} s")
    print(f"trivial jobs (same DAG, body writes a tiny JSON per seed): {trivial_s:.1f} s, {n_jobs / trivial_s:.1f} jobs/s")
    print(f"association_test jobs (10,000 permutations, bootstrap 2,000): {real_s:.1f} s, {n_jobs / real_s:.1f} jobs/s, "
          f"{n_tests / real_s:.1f} tests/s")  # fmt: skip
    print(f"ratio permutation stage / trivial: {trivial_s / real_s:.2f} (target >= 0.8)")
    print(f"peak RSS of the Snakemake process: {real_run.peak_rss_mb:.0f} MB with the test jobs, "
          f"{trivial_run.peak_rss_mb:.0f} MB trivial "
          "(target <= 3000 MB)")  # fmt: skip
    if not args.skip_dry_run:
        print(report(full_study_dry_runs(base / "full", args.dry_run_repeats)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
