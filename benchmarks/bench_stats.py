"""Time sbssl.stats.association_test against a reference-style per-permutation loop and scipy's permutation_test.

Run: ``.venv/bin/python benchmarks/bench_stats.py [--repeat N] [--baseline REV]``. Cases (random Gaussian
embeddings, X pulled slightly towards A and Y towards B):

- sampled: |X| = |Y| = 20, |A| = |B| = 25, dim 2048, 10,000 permutations (the issue's case);
- exact:   |X| = |Y| = 8 (12,870 splits, all enumerated), and |X| = |Y| = 11 (705,432 splits, asked for with
  10^6 permutations), same A, B and dim.

Every variant starts from the raw embeddings (cosines included) and gets a new seed on every call: nothing
computed in one call is reused by the next. Variants are timed in turns (one call of each per round, best of
``--repeat`` rounds), so the load of other processes on a shared machine hits all alike:

- "python loop": one Python iteration per split over the very splits association_test uses
  (``itertools.combinations``, or per split the documented draw of ``sbssl.stats.random_splits``: at these
  sizes the mask draw, raw 64-bit outputs until one has n_x of its low n bits set), so p must be identical:
  the script exits 1 otherwise. Targets: >= 20x (sampled).
- "numpy shuffle loop": the reference's loop (``rng.permutation`` per split): other splits, so p differs by
  Monte Carlo error.
- "scipy permutation_test": ``scipy.stats.permutation_test`` on the same scores, vectorised, independent
  samples, 9,999 resamples, upper tail. Target: >= 30x (sampled).
- with ``--baseline REV``: sbssl/stats.py of git revision REV (e.g. the code before a change), loaded from
  git into a module of its own, on the same inputs and seeds: its p must be identical (so REV must draw the
  same splits: the sampled case took the Fisher-Yates draw before 2026-11-30, whose p differs).

Also printed: where the sampled test's time goes (cosines, drawing the splits as masks, summing them with
the byte tables, building the tables included). The workflow runs one test per job and so shares no splits
between tests; a caller running several tests of the same sizes with one seed could draw the splits once,
which would save the "drawing" part only.
BLAS runs single-threaded unless OPENBLAS_NUM_THREADS is set: the cosine products here are tiny, and on a
busy machine threaded BLAS stalls on them (all variants alike), which only adds noise.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads BLAS

import numpy as np  # noqa: E402
from scipy import stats as scipy_stats  # noqa: E402

from sbssl import stats  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _scores(X, Y, A, B) -> np.ndarray:
    unit = [m / np.linalg.norm(m, axis=1, keepdims=True) for m in (X, Y, A, B)]
    targets = np.concatenate(unit[:2])
    return (targets @ unit[2].T).mean(axis=1) - (targets @ unit[3].T).mean(axis=1)


def loop_same_splits(X, Y, A, B, permutations: int, seed: int) -> float:
    """Upper-tail p with one Python iteration per split, over the splits association_test uses."""
    s = _scores(X, Y, A, B)
    n_x, n = len(X), len(X) + len(Y)
    observed = s[np.arange(n_x)].sum()
    if math.comb(n, n_x) <= permutations:
        hits = total = 0
        for split in itertools.combinations(range(n), n_x):
            hits += s[np.array(split)].sum() >= observed
            total += 1
        return hits / total
    assert stats._uses_masks(n, n_x), "the sampled cases here take the mask draw"
    bitgen = np.random.default_rng(seed).bit_generator
    keep = (1 << n) - 1
    hits = 1  # the observed split
    for _ in range(permutations - 1):
        while (w := int(bitgen.random_raw()) & keep).bit_count() != n_x:
            pass
        hits += s[[i for i in range(n) if w >> i & 1]].sum() >= observed
    return hits / permutations


def loop_numpy_shuffle(X, Y, A, B, permutations: int, seed: int) -> float:
    """The reference's sampled loop: a fresh numpy shuffle per split (other splits than association_test)."""
    s = _scores(X, Y, A, B)
    n_x, n = len(X), len(X) + len(Y)
    observed = s[np.arange(n_x)].sum()
    rng = np.random.default_rng(seed)
    hits = 1
    for _ in range(permutations - 1):
        hits += s[rng.permutation(n)[:n_x]].sum() >= observed
    return hits / permutations


def scipy_permutation_test(X, Y, A, B, permutations: int, seed: int) -> float:
    """scipy.stats.permutation_test on the same scores: sum_X s - sum_Y s, vectorised, upper tail."""
    s = _scores(X, Y, A, B)
    n_x = len(X)
    result = scipy_stats.permutation_test(
        (s[:n_x], s[n_x:]), lambda x, y, axis: x.sum(axis=axis) - y.sum(axis=axis), vectorized=True,
        n_resamples=permutations - 1, permutation_type="independent", alternative="greater", rng=seed,
    )  # fmt: skip
    return float(result.pvalue)


def load_baseline(rev: str):
    """sbssl/stats.py of git revision ``rev`` as a module of its own."""
    source = subprocess.run(["git", "show", f"{rev}:sbssl/stats.py"], cwd=REPO, capture_output=True, text=True)
    if source.returncode != 0:
        raise SystemExit(f"--baseline {rev}: {source.stderr.strip()}")
    path = Path(tempfile.mkdtemp(prefix="bench_stats.")) / "baseline_stats.py"
    path.write_text(source.stdout, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("baseline_stats", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def timed_rounds(variants: dict, repeat: int) -> dict[str, tuple[float, float]]:
    """Best time and last p of each variant, timed in turns; call i of every variant gets seed i + 1."""
    best = {name: math.inf for name in variants}
    last = {}
    for i in range(repeat):
        for name, fn in variants.items():
            start = time.perf_counter()
            last[name] = fn(i + 1)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: (best[name], last[name]) for name in variants}


def breakdown(X, Y, A, B, permutations: int, repeat: int) -> dict[str, float]:
    """Best times (s) of the sampled test's parts: cosines, drawing the splits, summing them."""
    ta, tb, n_x = stats._blocks_from_embeddings(X, Y, A, B)
    s = stats._scores(ta, tb)
    masks = list(stats._split_masks(s.size, n_x, permutations - 1, 1))

    def summed():
        tables = stats._byte_tables(s)
        for chunk in masks:
            stats._mask_sums(tables, chunk)

    parts = {
        "cosines": lambda seed: stats._blocks_from_embeddings(X, Y, A, B),
        "drawing the splits": lambda seed: list(stats._split_masks(s.size, n_x, permutations - 1, seed)),
        "summing the splits": lambda seed: summed(),
    }
    return {name: t for name, (t, _) in timed_rounds(parts, repeat).items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15, help="rounds; best of them is shown (default: %(default)s)")
    parser.add_argument("--baseline", help="git revision whose sbssl/stats.py to time alongside (e.g. a1b2c3d~1)")
    args = parser.parse_args()
    baseline = load_baseline(args.baseline) if args.baseline else None
    rng = np.random.default_rng(0)
    dim = 2048
    A, B = rng.normal(size=(25, dim)), rng.normal(size=(25, dim))
    cases = {
        "sampled 20+20, 10,000 permutations": (20, 10_000, {"python loop": 20.0, "scipy permutation_test": 30.0}),
        "exact 8+8, 12,870 splits": (8, 12_870, {}),
        "exact 11+11, 705,432 splits": (11, 1_000_000, {}),
    }
    ok = True
    print(f"{'case':<36} {'variant':<24} {'best time':>10} {'ratio':>7}  p")
    for label, (n, permutations, targets) in cases.items():
        X = rng.normal(size=(n, dim)) + 0.05 * A.mean(axis=0)
        Y = rng.normal(size=(n, dim)) + 0.05 * B.mean(axis=0)
        exact = math.comb(2 * n, n) <= permutations
        variants = {"association_test": lambda seed: stats.association_test(X, Y, A, B, permutations=permutations, seed=seed).p_value}
        if baseline is not None:
            variants[f"baseline {args.baseline}"] = (
                lambda seed: baseline.association_test(X, Y, A, B, permutations=permutations, seed=seed).p_value
            )
        slow = {"python loop": lambda seed: loop_same_splits(X, Y, A, B, permutations, seed)}
        if not exact:
            slow["numpy shuffle loop"] = lambda seed: loop_numpy_shuffle(X, Y, A, B, permutations, seed)
            slow["scipy permutation_test"] = lambda seed: scipy_permutation_test(X, Y, A, B, permutations, seed)
        if n < 11:
            times = timed_rounds({**variants, **slow}, args.repeat)
        else:  # the per-split loop over 705,432 splits takes seconds: once
            times = {**timed_rounds(variants, args.repeat), **timed_rounds(slow, 1)}
        fast_s, _ = times["association_test"]
        # p of every variant at one seed (the last round's seed for the timed ones may differ between groups)
        seed = 1
        p_fast = stats.association_test(X, Y, A, B, permutations=permutations, seed=seed).p_value
        for name, (seconds, _) in times.items():
            if name == "association_test":
                p, note = p_fast, f"exact={exact}"
            elif name == "python loop" or name.startswith("baseline"):
                p = loop_same_splits(X, Y, A, B, permutations, seed) if name == "python loop" else variants[name](seed)
                ok &= p == p_fast
                note = "identical p" if p == p_fast else "DIFFERENT p"
            else:
                p = slow[name](seed)
                note = f"other splits, |dp| = {abs(p - p_fast):.4f}"
            ratio = seconds / fast_s
            if name in targets:
                note += f"; target >= {targets[name]:.0f}x: {'met' if ratio >= targets[name] else 'NOT met'}"
            shown = f"{seconds * 1e3:>7.1f} ms" if seconds < 10 else f"{seconds:>8.1f} s"
            print(f"{label if name == 'association_test' else '':<36} {name:<24} {shown:>10} {ratio:>6.1f}x  {p:.6f} {note}")
    X = rng.normal(size=(20, dim)) + 0.05 * A.mean(axis=0)
    Y = rng.normal(size=(20, dim)) + 0.05 * B.mean(axis=0)
    parts = breakdown(X, Y, A, B, 10_000, args.repeat)
    print("sampled 20+20, where the time goes: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in parts.items()))
    print("shared splits: none in the workflow (one test per job, its own seed); drawing them is the part a caller "
          "running several same-size tests with one seed could share")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
