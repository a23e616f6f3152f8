"""Time the leakage attackers (sbssl.leakage) and the representation probe (sbssl.probes).

Run: ``.venv/bin/python benchmarks/bench_leakage.py [--labels 79] [--images 664] [--permutations 1000]``.

- logistic round: one attacker fit (all of ``LOGISTIC_CS``, selection on val, test score) on a COCO-sized
  balanced subsample (3000 + 3000 train, 1500 + 1500 val and test) of synthetic labels (79: COCO's objects);
- MLP epoch: Wang et al.'s attacker on the same subsample, (time of 4 epochs - time of 1 epoch) / 3, so
  set-up and the final test pass cancel (after a warm-up call); CUDA when present;
- representation leakage on an ``--images`` x ``--images`` cosine kernel of random 2048-d embeddings with
  the default 5 folds x 5 repeats and ``--permutations`` refits; beside it, one cross-validation of
  scikit-learn's ``SVC(kernel="precomputed")`` on the same folds, extrapolated to the same number of refits
  (what a solver-per-refit attacker would cost).

BLAS runs single-threaded unless OPENBLAS_NUM_THREADS is set (as bench_stats): the probe's matrices are
a few hundred rows, and on busy cores threaded BLAS stalled on them (54 s instead of 15 s here). Run the
DAG's probe jobs the same way, with OPENBLAS_NUM_THREADS = the job's threads. The MLP runs one torch
thread on CPU (see ``sbssl.leakage``).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads BLAS

import numpy as np  # noqa: E402

from sbssl import leakage as L  # noqa: E402
from sbssl import probes as P  # noqa: E402


def _timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, default=79)
    parser.add_argument("--images", type=int, default=664)
    parser.add_argument("--permutations", type=int, default=1000)
    args = parser.parse_args()

    table = L.synthetic_annotations(16_000, args.labels, seed=0)
    labels, codes, splits, _ = L._arrays(table, "gender")
    sample = L.balanced_sample(codes, splits, L.DEFAULT_SIZES, np.random.default_rng(0))
    sizes = {s: len(v) for s, v in sample.items()}
    t, acc = _timed(L.attacker_accuracy, labels, codes, sample, attacker="logistic")
    print(f"logistic attacker: {t:.2f} s per round ({len(L.LOGISTIC_CS)} C values; {args.labels} labels, "
          f"subsample {sizes}), folded accuracy {acc:.3f}")
    L.attacker_accuracy(labels, codes, sample, attacker="mlp", epochs=1)  # warm-up: torch import, kernels
    t1, _ = _timed(L.attacker_accuracy, labels, codes, sample, attacker="mlp", epochs=1)
    t4, acc = _timed(L.attacker_accuracy, labels, codes, sample, attacker="mlp", epochs=4)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu (1 torch thread)"
    print(f"MLP attacker: {(t4 - t1) / 3:.2f} s per epoch on {device} (a 100-epoch round ~{(t4 - t1) / 3 * 100:.0f} s), "
          f"folded accuracy after 4 epochs {acc:.3f}")

    rng = np.random.default_rng(1)
    n = args.images
    gender = np.repeat([0, 1], [n // 2, n - n // 2])
    x = rng.normal(size=(n, 2048)) + 0.5
    x[:, :8] += 0.15 * (2 * gender[:, None] - 1)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    kernel = x @ x.T
    t, result = _timed(P.representation_leakage, kernel, gender, permutations=args.permutations, seed=0)
    refits = (1 + args.permutations) * result["folds"] * result["repeats"]
    print(f"representation leakage, {n} images: {t:.2f} s for {refits} refits ({result['folds']} folds x "
          f"{result['repeats']} repeats x (1 + {args.permutations} label vectors)); accuracy "
          f"{result['accuracy_mean']:.3f} ± {result['accuracy_std']:.3f}, p = {result['p_value']:.4f}")

    from sklearn.model_selection import StratifiedKFold
    from sklearn.svm import SVC

    start = time.perf_counter()
    for train, test in StratifiedKFold(5, shuffle=True, random_state=0).split(kernel, gender):
        SVC(kernel="precomputed").fit(kernel[np.ix_(train, train)], gender[train]).predict(kernel[np.ix_(test, train)])
    per_cv = time.perf_counter() - start
    print(f"  for comparison, SVC(kernel='precomputed'): {per_cv:.2f} s per 5-fold CV, ~{per_cv * refits / 5:.0f} s "
          f"for the same {refits} refits")


if __name__ == "__main__":
    main()
