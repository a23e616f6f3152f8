"""Time and peak memory of sbssl.similarity.cosine_similarities on a layer1-sized embeddings file, against one
float64 Gram matrix product of the same size.

The input is SYNTHETIC: ``--images`` x ``--dim`` (default 664 x 802,816, the iEAT images at layer1 flattened)
ReLU-like float32 values (max(0, N(0, 1)), about half zeros, as after a ReLU), written in sbssl's embeddings
format (sbssl.storage.create_embeddings: a row's column tiles, LZ4) to a temporary folder; ``--lzf`` writes the
format of sbssl before 2026-11-30 instead (same chunks, LZF), which sbssl still reads. Each measurement runs in its
own child process; its peak RSS is the child's ru_maxrss (wait4):

- ``cosine_similarities``: the similarity job's work on that file (read, decompress, blockwise float64
  products, normalise, write);
- reference: the values already in memory as one float64 (n, dim) array and ONE product ``E @ E.T`` (numpy,
  BLAS; the time of the product alone, so the ratio charges all reading and conversion to sbssl);
- the two alternate ``--repeat`` times (so both see the same load on shared cores); printed: every pair's ratio
  and the ratio of the best times (target <= 2), the largest |difference| between the two cosine matrices, and
  the peak RSS of both (target for the job: <= 3000 MB);
- once, the job's two halves alone: reading (decompression) of every band, and its float64 products.

BLAS uses all cores for both unless OPENBLAS_NUM_THREADS is set.

    .venv/bin/python benchmarks/bench_similarity.py [--images 664] [--dim 802816] [--repeat 3] [--lzf] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_input(path: Path, n: int, dim: int, *, lzf: bool = False, seed: int = 0) -> None:
    """Synthetic ReLU-like float32 embeddings in sbssl's format (or its LZF predecessor), a few rows at a time."""
    import h5py

    from sbssl.storage import create_embeddings, write_sha256

    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        dataset = create_embeddings(f, n, dim, np.float32)
        if lzf:
            del f["embeddings"]
            shape, chunks = dataset.shape, dataset.chunks
            dataset = f.create_dataset("embeddings", shape, np.float32, chunks=chunks, compression="lzf")
        step = max(1, (64 << 20) // (dim * 4))
        for r0 in range(0, n, step):
            rows = rng.standard_normal((min(step, n - r0), dim), dtype=np.float32)
            np.maximum(rows, 0, out=rows)
            dataset[r0 : r0 + len(rows)] = rows
        write_sha256(f, [f"{i:064x}" for i in range(n)])
        f.attrs.update({"model": "synthetic", "layer": "layer1", "pooling": "flatten", "dtype": "float32"})


def _child(mode: str, work: Path) -> dict:
    from sbssl.storage import open_embeddings  # also registers the LZ4 filter for h5py

    if mode == "sbssl":
        from sbssl.similarity import cosine_similarities, read_similarity

        start = time.perf_counter()
        cosine_similarities(work / "embeddings.h5", work / "similarity.h5")
        seconds = time.perf_counter() - start
        np.save(work / "sbssl.npy", read_similarity(work / "similarity.h5").matrix)
        return {"seconds": seconds}
    if mode == "parts":
        return _parts(work / "embeddings.h5")
    start = time.perf_counter()
    with open_embeddings(work / "embeddings.h5") as (emb, _):
        values = emb[()].astype(np.float64)
    read_seconds = time.perf_counter() - start
    start = time.perf_counter()
    gram = values @ values.T
    seconds = time.perf_counter() - start
    norms = np.sqrt(np.diagonal(gram))
    np.save(work / "reference.npy", gram / np.outer(norms, norms))
    return {"seconds": seconds, "read_seconds": read_seconds}


def _parts(path: Path) -> dict[str, float]:
    """The two halves of cosine_similarities alone: reading (decompression) of every band, and the float64
    slice products of one band repeated as often as there are bands (same shapes, same work)."""
    import h5py

    import sbssl.similarity as similarity

    with h5py.File(path, "r") as f:
        emb = f["embeddings"]
        n, dim = emb.shape
        columns = similarity._default_band(n, dim, emb.dtype.itemsize, emb.chunks[1])
        band = np.empty((n, columns), dtype=emb.dtype)
        start = time.perf_counter()
        for b0 in range(0, dim, columns):
            width = min(columns, dim - b0)
            emb.read_direct(band, np.s_[:, b0 : b0 + width], np.s_[:, :width])
        read_seconds = time.perf_counter() - start
    width = max(1, min(columns, similarity._SLICE_BYTES // (8 * n)))
    part, product = np.empty((n, width)), np.empty((n, n))
    start = time.perf_counter()
    for _ in range(0, dim, columns):
        for c0 in range(0, columns, width):
            w = min(width, columns - c0)
            np.copyto(part[:, :w], band[:, c0 : c0 + w])
            np.matmul(part[:, :w], part[:, :w].T, out=product)
    return {"read_seconds": read_seconds, "product_seconds": time.perf_counter() - start}


def _run_child(mode: str, work: Path) -> tuple[dict, float]:
    proc = subprocess.Popen([sys.executable, __file__, "--child", mode, "--work", str(work)], stdout=subprocess.PIPE, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child {mode!r} failed with status {proc.returncode}")
    return json.loads(output.strip().splitlines()[-1]), usage.ru_maxrss / 1024  # Linux reports KiB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=664)
    parser.add_argument("--dim", type=int, default=802_816)
    parser.add_argument("--repeat", type=int, default=3, help="alternations of the job and the reference")
    parser.add_argument("--lzf", action="store_true", help="input in the LZF format of sbssl before 2026-11-30")
    parser.add_argument("--work", type=Path, help="folder for the temporary files (default: the system's)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.work)))
        return 0

    with tempfile.TemporaryDirectory(prefix="bench_similarity.", dir=args.work) as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        write_input(work / "embeddings.h5", args.images, args.dim, lzf=args.lzf)
        made = time.perf_counter() - start
        size = (work / "embeddings.h5").stat().st_size
        parts, _ = _run_child("parts", work)
        pairs = [(_run_child("sbssl", work), _run_child("reference", work)) for _ in range(args.repeat)]
        diff = float(np.abs(np.load(work / "sbssl.npy") - np.load(work / "reference.npy")).max())

    ours = min(pair[0][0]["seconds"] for pair in pairs)
    ref = min(pair[1][0]["seconds"] for pair in pairs)
    ours_rss = max(pair[0][1] for pair in pairs)
    ref_rss = max(pair[1][1] for pair in pairs)
    ratios = ", ".join(f"{o['seconds']:.1f}/{r['seconds']:.1f} s = {o['seconds'] / r['seconds']:.2f}"
                       for (o, _), (r, _) in pairs)  # fmt: skip
    threads = os.environ.get("OPENBLAS_NUM_THREADS", f"all {os.cpu_count()} cores")
    codec = "LZF" if args.lzf else "LZ4"
    print(f"input: SYNTHETIC ReLU-like float32, {args.images} images x {args.dim:,} dims "
          f"({args.images * args.dim * 4 / 2**30:.2f} GiB raw, {size / 2**30:.2f} GiB {codec}, "
          f"{size / args.images / 1e6:.2f} MB per image; written in {made:.0f} s)")  # fmt: skip
    print(f"BLAS threads: {threads}")
    print(f"cosine_similarities : {ours:7.1f} s, peak RSS {ours_rss:6.0f} MB (read, decompress, blockwise "
          "float64 products, write)")  # fmt: skip
    print(f"  of which, alone   : reading and {codec} decompression {parts['read_seconds']:.1f} s (one thread), "
          f"float64 slice products {parts['product_seconds']:.1f} s; they overlap as far as the cores allow")  # fmt: skip
    print(f"one float64 E @ E.T : {ref:7.1f} s, peak RSS {ref_rss:6.0f} MB (product only; reading and "
          f"converting took {pairs[0][1][0]['read_seconds']:.1f} s more)")  # fmt: skip
    print(f"ratio               : {ours / ref:7.2f} (best of {args.repeat} each; target <= 2); per pair: {ratios}")
    print(f"max |difference|    : {diff:.1e} between the two cosine matrices")
    print(f"peak RSS target     : similarity job {ours_rss:.0f} MB <= 3000 MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
