"""Time sbssl.stats.association_test against per-permutation Python loops in the style of the iEAT reference.

Run: ``.venv/bin/python benchmarks/bench_stats.py [--repeat N]``. Two cases:
- sampled: |X| = |Y| = 20, |A| = |B| = 25, dim 2048, 10,000 permutations;
- exact:   |X| = |Y| = 8 (12,870 splits, all enumerated), same A, B and dim.
Every variant starts from raw embeddings (cosines included). "python loop" visits the same splits as
association_test, one Python iteration per split (``itertools.combinations``, or per split the documented
draw of ``sbssl.stats.random_splits`` and its Fisher-Yates swaps), so p must be identical: the script
exits 1 otherwise. For the sampled case, "numpy shuffle loop" is the literal reference loop
(``rng.permutation`` per split): same work, other random splits, so its p differs by Monte Carlo error.
BLAS runs single-threaded unless OPENBLAS_NUM_THREADS is set: the cosine products here are tiny, and
on a busy machine threaded BLAS stalls on them (both sides alike), which only adds noise.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads BLAS

import numpy as np  # noqa: E402

from sbssl.stats import association_test  # noqa: E402


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
    rng = np.random.default_rng(seed)
    lows = np.arange(n_x)
    hits = 1  # the observed split
    for _ in range(permutations - 1):
        order = list(range(n))
        for i, j in enumerate(rng.integers(lows, n).tolist()):
            order[i], order[j] = order[j], order[i]
        hits += s[order[:n_x]].sum() >= observed
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


def best_time(fn, repeat: int):
    times, value = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return min(times), value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeat", type=int, default=5, help="best of N runs for association_test (default: %(default)s)"
    )
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    dim = 2048
    A, B = rng.normal(size=(25, dim)), rng.normal(size=(25, dim))
    cases = {"sampled 20+20, 10,000 permutations": (20, 10_000), "exact 8+8, 12,870 splits": (8, 12_870)}
    ok = True
    print(f"{'case':<36} {'variant':<20} {'time':>10} {'ratio':>7}  p")
    for label, (n, permutations) in cases.items():
        X = rng.normal(size=(n, dim)) + 0.05 * A.mean(axis=0)
        Y = rng.normal(size=(n, dim)) + 0.05 * B.mean(axis=0)
        fast_s, res = best_time(lambda: association_test(X, Y, A, B, permutations=permutations, seed=1), args.repeat)
        print(
            f"{label:<36} {'association_test':<20} {fast_s * 1e3:>7.1f} ms {'1.0x':>7}  "
            f"{res.p_value:.6f} exact={res.exact}"
        )
        variants = {"python loop": loop_same_splits}
        if not res.exact:
            variants["numpy shuffle loop"] = loop_numpy_shuffle
        for name, fn in variants.items():
            slow_s, p = best_time(lambda: fn(X, Y, A, B, permutations, 1), 2)
            if fn is loop_same_splits:
                ok &= p == res.p_value
                note = "identical p" if p == res.p_value else "DIFFERENT p"
            else:
                note = f"other splits, |dp| = {abs(p - res.p_value):.4f}"
            print(f"{'':<36} {name:<20} {slow_s * 1e3:>7.1f} ms {slow_s / fast_s:>6.1f}x  {p:.6f} {note}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
