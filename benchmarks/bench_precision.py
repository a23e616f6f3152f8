"""Measure what storing embeddings as float16 instead of float32 does to the results, and what it saves on disk.

1. Results: synthetic association tests (``--tests`` tests of ``--per-set`` images per set X, Y, A, B;
   ``--dim``-d non-negative, ReLU-like features with a planted association of growing strength, so p spans
   the range). Each test's embeddings are written in both dtypes through :mod:`sbssl.storage`, reduced with
   :func:`sbssl.similarity.cosine_similarities`, and tested with
   :func:`sbssl.stats.association_test_from_similarity` (same seed, ``--permutations`` splits), for
   ``--replicates`` independent data sets. Prints how many p-values and significance calls change, and the
   largest |delta p| and |delta d|.
2. Disk: bytes per image at the six flattened ResNet-50 layers, uncompressed (from the layer sizes) and as
   written by :func:`sbssl.embed.embed_layers` (LZ4) for ``--images`` images with a randomly initialised
   ResNet-50 (``random_1`` of the zoo): real iEAT stimuli from ../shared when present, else generated images.

    .venv/bin/python benchmarks/bench_precision.py
    .venv/bin/python benchmarks/bench_precision.py --images 0      # results part only (no torch)
"""

from __future__ import annotations

import argparse
import tempfile
from math import comb
from pathlib import Path

import h5py
import numpy as np

from sbssl.layers import RESNET50_SHAPES

REPO = Path(__file__).resolve().parents[1]
DEFAULT_STIMULI = REPO.parent / "shared" / "ieat" / "stimuli"


def _write_embeddings(path: Path, values: np.ndarray, dtype: str) -> None:
    from sbssl.storage import create_embeddings, write_sha256

    with h5py.File(path, "w") as f:
        create_embeddings(f, len(values), values.shape[1], np.dtype(dtype))[...] = values.astype(dtype)
        write_sha256(f, [f"{i:064x}" for i in range(len(values))])
        f.attrs.update({"model": "synthetic", "layer": "synthetic", "dtype": dtype})


def _synthetic_sets(rng: np.random.Generator, n: int, dim: int, strength: float) -> np.ndarray:
    """(4n, dim) float32 rows: X, Y, A, B. Post-ReLU-like (a shared non-negative profile plus noise, clipped at
    0); A and B carry a direction each, and X leans towards A's, Y towards B's, by ``strength``."""
    shared = rng.gamma(2.0, 1.0, size=dim)
    dir_a, dir_b = rng.normal(0, 1, size=dim), rng.normal(0, 1, size=dim)
    shifts = (strength * dir_a, strength * dir_b, dir_a, dir_b)
    rows = [np.maximum(shared + shift + rng.normal(0, 2.0, size=(n, dim)), 0) for shift in shifts]
    return np.concatenate(rows).astype(np.float32)


def _compare(args: argparse.Namespace, work: Path, data_seed: int) -> dict[str, np.ndarray]:
    """p and d of ``args.tests`` synthetic tests with float32 and with float16 storage (same permutation seed)."""
    from sbssl.similarity import cosine_similarities, read_similarity
    from sbssl.stats import association_test_from_similarity

    n = args.per_set
    x, y, a, b = (np.arange(k * n, (k + 1) * n) for k in range(4))
    rng = np.random.default_rng(data_seed)
    out: dict[str, list[float]] = {"p32": [], "p16": [], "d32": [], "d16": []}
    for t, strength in enumerate(np.linspace(0.0, args.max_strength, args.tests)):
        values = _synthetic_sets(rng, n, args.dim, strength)
        for dtype, key in (("float32", "32"), ("float16", "16")):
            emb, sim = work / f"t{t}_{dtype}_emb.h5", work / f"t{t}_{dtype}_sim.h5"
            _write_embeddings(emb, values, dtype)
            matrix = read_similarity(cosine_similarities(emb, sim)).matrix
            result = association_test_from_similarity(matrix, x, y, a, b, permutations=args.permutations, seed=args.seed)
            out[f"p{key}"].append(result.p_value)
            out[f"d{key}"].append(result.effect_size)
    return {k: np.array(v) for k, v in out.items()}


def results_part(args: argparse.Namespace, work: Path) -> None:
    n = args.per_set
    print(f"synthetic tests     : {args.replicates} replicates x {args.tests} tests, {n} images per set, {args.dim}-d "
          f"ReLU-like features, planted strength 0..{args.max_strength}, {args.permutations} permutations (sampled; "
          f"{comb(2 * n, n)} splits exist), permutation seed {args.seed}; float16 vs float32 storage")  # fmt: skip
    print(f"  {'replicate':9s} {'p range (float32)':>19s} {'p changed':>10s} {'max|dp|':>8s} {'max|dd|':>9s} "
          f"{'flips@.05':>9s} {'flips@.01':>9s}")  # fmt: skip
    every = []
    for r in range(args.replicates):
        res = _compare(args, work, data_seed=1000 + r)
        every.append(res)
        changed = int(np.sum(res["p16"] != res["p32"]))
        flips = [int(np.sum((res["p32"] < alpha) != (res["p16"] < alpha))) for alpha in (0.05, 0.01)]
        print(f"  {r:9d} {res['p32'].min():8.4f}..{res['p32'].max():<9.4f} {changed:4d} of {args.tests:<3d} "
              f"{np.abs(res['p16'] - res['p32']).max():8.2g} {np.abs(res['d16'] - res['d32']).max():9.2g} "
              f"{flips[0]:9d} {flips[1]:9d}")  # fmt: skip
    p32, p16 = np.concatenate([r["p32"] for r in every]), np.concatenate([r["p16"] for r in every])
    d32, d16 = np.concatenate([r["d32"] for r in every]), np.concatenate([r["d16"] for r in every])
    changed = p16 != p32
    print(f"all                 : {int(changed.sum())} of {len(p32)} p-values changed, max |delta p| "
          f"{np.abs(p16 - p32).max():.2g}, max |delta d| {np.abs(d16 - d32).max():.2g} (relative "
          f"{np.max(np.abs(d16 - d32) / np.abs(d32)):.2g}); Monte Carlo s.e. of p at p = 0.05: "
          f"{np.sqrt(0.05 * 0.95 / args.permutations):.2g}")  # fmt: skip


def disk_part(args: argparse.Namespace, work: Path) -> None:
    import torch
    from PIL import Image

    from sbssl.embed import embed_layers, embedding_attrs
    from sbssl.layers import LAYERS
    from sbssl.models import build_model, load_zoo
    from sbssl.stimuli import build_manifest, distinct_images

    torch.set_num_threads(args.threads)
    stimuli = Path(args.stimuli) if args.stimuli else DEFAULT_STIMULI
    if stimuli.is_dir():
        distinct = distinct_images(build_manifest(stimuli))
        picks = distinct.iloc[np.linspace(0, len(distinct) - 1, args.images).astype(int)]
        images = [(sha, stimuli / path) for sha, path in zip(picks["sha256"], picks["path"])]
        what = f"{len(images)} real iEAT images spread over {stimuli}"
    else:
        from sbssl.stimuli import sha256_file

        rng = np.random.default_rng(0)
        images = []
        for i in range(args.images):
            path = work / "images" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            yy, xx = np.mgrid[0:300, 0:400]  # smooth gradients plus noise: compresses like a photo, not like noise
            base = np.stack([(yy * (c + 1) + xx * (3 - c)) % 256 for c in range(3)], axis=-1)
            Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)).save(path)
            images.append((sha256_file(path), path))
        what = f"{len(images)} generated images ({DEFAULT_STIMULI} not found)"
    spec = load_zoo(REPO / "config" / "models.yaml")["random_1"]
    model = build_model(spec)
    print(f"disk per image      : {what}; random_1 (ResNet-50), flatten, LZ4 (MB = 1e6 bytes)")
    print(f"  {'layer':8s} {'values':>9s} {'f32 raw':>8s} {'f32 LZ4':>8s} {'f16 raw':>8s} {'f16 LZ4':>8s}")
    stored = {}
    for dtype in ("float32", "float16"):
        out = {layer: work / dtype / f"{layer}.h5" for layer in LAYERS}
        report = embed_layers(model, images, out, attrs=embedding_attrs(spec), dtype=dtype, batch_size=8, progress=False)
        stored[dtype] = {layer: size / len(images) for layer, size in report.bytes_on_disk.items()}
    totals = np.zeros(4)
    for layer in LAYERS:
        values = int(np.prod(RESNET50_SHAPES[layer]))
        row = np.array([4 * values, stored["float32"][layer], 2 * values, stored["float16"][layer]])
        totals += row
        print(f"  {layer:8s} {values:9d} " + " ".join(f"{v / 1e6:8.3f}" for v in row))
    print(f"  {'total':8s} {sum(int(np.prod(s)) for s in RESNET50_SHAPES.values()):9d} " + " ".join(f"{v / 1e6:8.3f}" for v in totals))
    print(f"664 iEAT images     : float32 {totals[1] * 664 / 1e9:.2f} GB, float16 {totals[3] * 664 / 1e9:.2f} GB per "
          f"model (LZ4, at these per-image sizes); x15 models: {totals[1] * 664 * 15 / 1e9:.0f} vs "
          f"{totals[3] * 664 * 15 / 1e9:.0f} GB")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests", type=int, default=40)
    parser.add_argument("--per-set", type=int, default=10, help="images per set X, Y, A, B (default: %(default)s)")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--permutations", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-strength", type=float, default=0.2, help="planted association of the last test")
    parser.add_argument("--replicates", type=int, default=5, help="independent synthetic data sets (default: %(default)s)")
    parser.add_argument("--images", type=int, default=4, help="images for the disk figures; 0 skips them")
    parser.add_argument("--stimuli", help=f"stimuli root for the disk figures (default: {DEFAULT_STIMULI})")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_precision.") as tmp:
        results_part(args, Path(tmp))
        if args.images:
            disk_part(args, Path(tmp))


if __name__ == "__main__":
    main()
