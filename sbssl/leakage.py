"""Dataset leakage, model leakage and bias amplification (Wang et al., "Balanced Datasets Are Not Enough", ICCV 2019).

An attacker is trained to predict a binary protected attribute (gender) of an image from a vector that
describes the image; its folded test accuracy ``0.5 + |acc - 0.5|`` is the leakage of that description.

- λ_D (dataset leakage): the attacker reads the ground-truth multi-hot label vector.
- λ_D(a) (natural leakage at task performance a): each label entry is flipped with probability p (train,
  val and test alike, as their ``natural_leakage.py``), over a grid of p; each p gives the macro-F1 of
  the flipped test labels against the truth and the attacker's accuracy on the flipped labels. λ_D at
  the model's F1 is read off this curve by linear interpolation (means over rounds).
- λ_M (model leakage): the attacker reads the model's pre-sigmoid outputs (logits).
- Model macro-F1: labels predicted as sigmoid(logit) > 0.5, i.e. logit > 0, on the test split, against
  the annotations; labels absent from both count 0 (scikit-learn's ``zero_division=0``, their setting).
- Amplification Δ = mean λ_M − λ_D(model F1).

Rounds: every figure is the mean and std (ddof 0, as their ``np.std``) over ``rounds``; each round draws
a fresh subsample balanced in the attribute, per split (:data:`DEFAULT_SIZES` images PER attribute value:
their COCO sizes 3000 + 3000 train, 1500 + 1500 val and test), capped at what each split holds (the
smaller value's count). Round r uses the same subsample for λ_D, every p of the curve and λ_M when the
predictions cover the same images, so Δ compares like with like. The attacker is trained on the train
subsample, selected on the val subsample (best validation accuracy) and scored on the test subsample.

Attackers (:data:`ATTACKERS`):

- ``mlp`` (faithful): BN(d) → Linear(d, 300) → [BN, LeakyReLU, Linear(300, 300)] × 2 → BN, LeakyReLU,
  Linear(300, 2); cross-entropy, Adam lr 5e-5, weight decay 1e-5, batch 128, ``epochs`` epochs (their
  100), the epoch with the best validation accuracy kept (first best on ties). CUDA when present.
- ``logistic`` (fast, the default): scikit-learn standardisation + L2 logistic regression, C chosen
  among :data:`LOGISTIC_CS` by validation accuracy (the validation split's role for the MLP).

Input tables (:func:`read_annotations`, :func:`read_predictions`):

- annotations: ``image_id``, ``split`` (train/val/test), the attribute column (exactly two values) and
  one 0/1 column per label named ``label_<name>``;
- predictions: ``image_id`` and the same ``label_<name>`` columns holding the model's logits.

Balanced subsets (:func:`balanced_subset`) restrict the annotations so that no label's ratio between the
two attribute values exceeds α (their α = 1, 2, 3 subsets ship only as id lists; our procedure is in the
function's docstring). Closed-form checks: :func:`synthetic_annotations` and :func:`bayes_accuracy`.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: DAG jobs and CI have no display

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from sbssl.io import atomic_path, write_json_atomic

SPLITS = ("train", "val", "test")
LABEL_PREFIX = "label_"
ATTACKERS = ("logistic", "mlp")
#: Attacker subsample size per attribute value and split (Wang et al.'s COCO sizes).
DEFAULT_SIZES: Mapping[str, int] = {"train": 3000, "val": 1500, "test": 1500}
#: Flip probabilities of the natural-leakage curve: 0 (λ_D itself) to 0.5 (labels carry no information).
DEFAULT_FLIP_GRID = (0.0, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
#: Inverse L2 penalties tried by the logistic attacker (chosen by validation accuracy).
LOGISTIC_CS = (0.01, 0.1, 1.0, 10.0)
#: The MLP attacker of Wang et al.
MLP_HIDDEN = 300
MLP_LR = 5e-5
MLP_WEIGHT_DECAY = 1e-5
MLP_BATCH = 128
MLP_EPOCHS = 100
#: Largest label count :func:`bayes_accuracy` enumerates (2**n patterns).
MAX_BAYES_LABELS = 20


# ----------------------------------------------------------------------------------------------------
# Input tables


def label_columns(table: pd.DataFrame) -> list[str]:
    """The ``label_<name>`` columns of a table, in table order."""
    return [c for c in table.columns if isinstance(c, str) and c.startswith(LABEL_PREFIX)]


def _examples(values: Sequence[Any], k: int = 3) -> str:
    shown = ", ".join(repr(v) for v in list(values)[:k])
    return shown + (", ..." if len(values) > k else "")


def validate_annotations(table: pd.DataFrame, attribute: str = "gender", source: str = "annotations") -> pd.DataFrame:
    """Check an annotations table; return a copy with ``image_id`` as str and the labels as int8.

    Contract: columns ``image_id`` (unique), ``split`` (every row one of train/val/test, each split present),
    ``attribute`` (exactly two distinct values, none missing) and at least one ``label_<name>`` column holding
    only 0/1. Raises ValueError naming ``source``, the column and what to fix.
    """
    required = ["image_id", "split", attribute]
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise ValueError(
            f"{source}: column(s) {missing} missing; expected image_id, split (train/val/test), {attribute} "
            f"and one 0/1 column per label named {LABEL_PREFIX}<name>"
        )
    labels = label_columns(table)
    if not labels:
        raise ValueError(f"{source}: no label columns; name each 0/1 label column {LABEL_PREFIX}<name>")
    out = table.copy()
    if out["image_id"].isna().any():
        raise ValueError(f"{source}: {int(out['image_id'].isna().sum())} row(s) without image_id")
    out["image_id"] = out["image_id"].astype(str)
    dupes = out.loc[out["image_id"].duplicated(), "image_id"].unique()
    if len(dupes):
        raise ValueError(f"{source}: image_id repeated ({len(dupes)} ids, e.g. {_examples(dupes)}); one row per image")
    split = out["split"]
    bad = split.isna() | ~split.isin(SPLITS)
    if bad.any():
        shown = _examples(sorted({str(v) for v in split[bad]}))
        raise ValueError(
            f"{source}: {int(bad.sum())} row(s) with a missing or unknown split ({shown}); "
            f"every row needs split = {' / '.join(SPLITS)}"
        )
    absent = [s for s in SPLITS if not (split == s).any()]
    if absent:
        raise ValueError(f"{source}: no images in split(s) {absent}; the attacker trains, validates and tests on {SPLITS}")
    if out[attribute].isna().any():
        raise ValueError(f"{source}: {int(out[attribute].isna().sum())} row(s) without a value in column {attribute!r}")
    values = sorted(out[attribute].astype(str).unique())
    if len(values) != 2:
        kind = "one value only" if len(values) == 1 else f"{len(values)} values"
        raise ValueError(
            f"{source}: attribute {attribute!r} has {kind} ({_examples(values)}); leakage needs exactly two "
            "values (e.g. man/woman): drop or merge the others"
        )
    out[attribute] = out[attribute].astype(str)
    for column in labels:
        col = pd.to_numeric(out[column], errors="coerce")
        bad = col.isna() | ~col.isin([0, 1])
        if bad.any():
            raise ValueError(
                f"{source}: label column {column!r} is not binary ({int(bad.sum())} value(s) other than 0/1, "
                f"e.g. {_examples(out.loc[bad, column].tolist())}); annotations hold 0/1, logits go in the predictions"
            )
        out[column] = col.astype(np.int8)
    return out


def read_annotations(path: str | os.PathLike[str], attribute: str = "gender") -> pd.DataFrame:
    """Read and check an annotations CSV (:func:`validate_annotations`); errors name the file."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"annotations file {file} not found")
    return validate_annotations(pd.read_csv(file, dtype={"image_id": str}), attribute, source=str(file))


def validate_predictions(table: pd.DataFrame, annotations: pd.DataFrame, source: str = "predictions") -> pd.DataFrame:
    """Check a predictions table against (checked) annotations; return a copy, ``image_id`` str, logits float64.

    Contract: ``image_id`` unique and every id in the annotations; exactly the annotations' ``label_<name>``
    columns, each finite numbers (logits). Raises ValueError naming ``source`` and what to fix.
    """
    if "image_id" not in table.columns:
        raise ValueError(f"{source}: column 'image_id' missing; expected image_id and the annotations' label columns")
    out = table.copy()
    out["image_id"] = out["image_id"].astype(str)
    dupes = out.loc[out["image_id"].duplicated(), "image_id"].unique()
    if len(dupes):
        raise ValueError(f"{source}: image_id repeated ({len(dupes)} ids, e.g. {_examples(dupes)}); one row per image")
    unknown = sorted(set(out["image_id"]) - set(annotations["image_id"].astype(str)))
    if unknown:
        raise ValueError(
            f"{source}: {len(unknown)} image id(s) not in the annotations (e.g. {_examples(unknown)}); "
            "predictions must be for annotated images"
        )
    wanted, have = label_columns(annotations), label_columns(out)
    missing = [c for c in wanted if c not in have]
    if missing:
        raise ValueError(f"{source}: label column(s) {missing} missing; give a logit for every annotated label")
    extra = [c for c in have if c not in wanted]
    if extra:
        raise ValueError(f"{source}: label column(s) {extra} not in the annotations; drop them or annotate them")
    for column in wanted:
        col = pd.to_numeric(out[column], errors="coerce")
        bad = ~np.isfinite(col.to_numpy(dtype=np.float64))
        if bad.any():
            raise ValueError(
                f"{source}: column {column!r} has {int(bad.sum())} missing, non-numeric or infinite value(s) "
                f"(e.g. {_examples(out.loc[bad, column].tolist())}); expected finite logits"
            )
        out[column] = col.astype(np.float64)
    return out[["image_id", *wanted]]


def read_predictions(path: str | os.PathLike[str], annotations: pd.DataFrame) -> pd.DataFrame:
    """Read and check a predictions CSV against annotations (:func:`validate_predictions`); errors name the file."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"predictions file {file} not found")
    return validate_predictions(pd.read_csv(file, dtype={"image_id": str}), annotations, source=str(file))


# ----------------------------------------------------------------------------------------------------
# Attackers


def _round_seed(seed: int, *keys: int) -> int:
    """A 32-bit seed for one (seed, round, purpose, ...) stream, independent of the others."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


def balanced_sample(
    codes: np.ndarray, splits: np.ndarray, sizes: Mapping[str, int], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Row indices per split, ``min(sizes[split], rows of each value in the split)`` rows of EACH value (0 and 1).

    ``codes`` (n,) 0/1 attribute codes, ``splits`` (n,) split names. Drawn without replacement.
    """
    out = {}
    for split in SPLITS:
        pools = [np.flatnonzero((splits == split) & (codes == value)) for value in (0, 1)]
        size = min(int(sizes[split]), *(len(p) for p in pools))
        if size == 0:
            raise ValueError(f"split {split!r} lacks images of one attribute value; the attacker needs both in every split")
        out[split] = np.concatenate([rng.choice(p, size=size, replace=False) for p in pools])
    return out


def _folded(accuracy: float) -> float:
    return 0.5 + abs(accuracy - 0.5)


def _logistic_accuracy(data: Mapping[str, tuple[np.ndarray, np.ndarray]], seed: int) -> float:
    best, best_val = None, -1.0
    for c in LOGISTIC_CS:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000, random_state=seed))
        model.fit(*data["train"])
        val = model.score(*data["val"])
        if val > best_val:
            best, best_val = model, val
    return float(best.score(*data["test"]))


def mlp_attacker(n_features: int, hidden: int = MLP_HIDDEN) -> Any:
    """Wang et al.'s attacker network (torch ``nn.Sequential``, outputs 2 logits); see the module doc."""
    from torch import nn

    layers: list[Any] = [nn.BatchNorm1d(n_features), nn.Linear(n_features, hidden)]
    for _ in range(2):
        layers += [nn.BatchNorm1d(hidden), nn.LeakyReLU(), nn.Linear(hidden, hidden)]
    layers += [nn.BatchNorm1d(hidden), nn.LeakyReLU(), nn.Linear(hidden, 2)]
    return nn.Sequential(*layers)


def _mlp_accuracy(
    data: Mapping[str, tuple[np.ndarray, np.ndarray]], seed: int, epochs: int, device: str | None
) -> float:
    import torch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        # Intra-op threads do not pay on 128 x 300 batches, and they stall badly on busy cores when
        # scikit-learn's own OpenMP runtime is loaded too (a round took 6x longer on 2 cores).
        torch.set_num_threads(1)
    try:
        return _train_mlp(data, seed, epochs, dev)
    finally:
        torch.set_num_threads(threads)


def _train_mlp(data: Mapping[str, tuple[np.ndarray, np.ndarray]], seed: int, epochs: int, dev: Any) -> float:
    import torch
    import torch.nn.functional as F

    tensors = {
        split: (torch.as_tensor(x, dtype=torch.float32, device=dev), torch.as_tensor(y, dtype=torch.long, device=dev))
        for split, (x, y) in data.items()
    }
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's global RNG
        torch.manual_seed(seed)
        model = mlp_attacker(tensors["train"][0].shape[1]).to(dev)
    optimiser = torch.optim.Adam(model.parameters(), lr=MLP_LR, weight_decay=MLP_WEIGHT_DECAY)
    order_rng = torch.Generator().manual_seed(seed)

    def accuracy(split: str) -> float:
        model.eval()
        with torch.no_grad():
            x, y = tensors[split]
            return float((model(x).argmax(dim=1) == y).float().mean())

    x_train, y_train = tensors["train"]
    n = len(y_train)
    best_state, best_val = None, -1.0
    for _ in range(epochs):
        model.train()
        order = torch.randperm(n, generator=order_rng).to(dev)
        for start in range(0, n, MLP_BATCH):
            batch = order[start:start + MLP_BATCH]
            if len(batch) < 2:  # batch norm cannot train on one row
                continue
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        val = accuracy("val")
        if val > best_val:
            best_val = val
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return accuracy("test")


def _check_attacker_name(attacker: str) -> None:
    if attacker not in ATTACKERS:
        raise ValueError(f"unknown attacker {attacker!r}; choose one of {ATTACKERS}")


def _check_options(attacker: str, rounds: int, epochs: int, sizes: Mapping[str, int]) -> None:
    _check_sizes(sizes)
    _check_attacker_name(attacker)
    for name, value in (("rounds", rounds), ("epochs", epochs)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def attacker_accuracy(
    features: np.ndarray,
    codes: np.ndarray,
    sample: Mapping[str, np.ndarray],
    *,
    attacker: str = "logistic",
    epochs: int = MLP_EPOCHS,
    seed: int = 0,
    device: str | None = None,
) -> float:
    """Folded test accuracy ``0.5 + |acc - 0.5|`` of one attacker trained on one subsample.

    ``features`` (n, d) what the attacker reads, ``codes`` (n,) 0/1 attribute, ``sample`` row indices per
    split (:func:`balanced_sample`). ``epochs`` and ``device`` (default: CUDA when present) apply to the MLP.
    """
    _check_attacker_name(attacker)
    data = {split: (features[rows], codes[rows]) for split, rows in sample.items()}
    if attacker == "logistic":
        return _folded(_logistic_accuracy(data, seed))
    return _folded(_mlp_accuracy(data, seed, epochs, device))


@dataclass(frozen=True)
class Estimate:
    """A leakage over rounds: mean, std (ddof 0) and the value of each round."""

    mean: float
    std: float
    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float]) -> Estimate:
        arr = np.asarray(values, dtype=np.float64)
        return cls(float(arr.mean()), float(arr.std()), tuple(float(v) for v in arr))

    def as_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "rounds": list(self.values)}


def _arrays(annotations: pd.DataFrame, attribute: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(labels (n, L) float32, codes (n,) 0/1 for the sorted attribute values, splits (n,), values)."""
    values = sorted(annotations[attribute].unique())
    codes = (annotations[attribute].to_numpy() == values[1]).astype(np.int64)
    labels = annotations[label_columns(annotations)].to_numpy(dtype=np.float32)
    return labels, codes, annotations["split"].to_numpy(dtype=str), values


def _macro_f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    return float(f1_score(truth, predicted, average="macro", zero_division=0))


def _curve_rounds(
    labels: np.ndarray,
    codes: np.ndarray,
    splits: np.ndarray,
    flip_grid: Sequence[float],
    *,
    attacker: str,
    rounds: int,
    sizes: Mapping[str, int],
    epochs: int,
    seed: int,
    device: str | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(f1, leakage), each (len(flip_grid), rounds): the natural-leakage curve of every round."""
    f1 = np.empty((len(flip_grid), rounds))
    acc = np.empty((len(flip_grid), rounds))
    for r in range(rounds):
        sample = balanced_sample(codes, splits, sizes, np.random.default_rng(_round_seed(seed, r, 0)))
        rows = np.concatenate([sample[s] for s in SPLITS])
        bounds = np.cumsum([0] + [len(sample[s]) for s in SPLITS])
        local = {s: np.arange(bounds[i], bounds[i + 1]) for i, s in enumerate(SPLITS)}  # positions within rows
        truth = labels[rows]
        for k, p in enumerate(flip_grid):
            flip = np.random.default_rng(_round_seed(seed, r, 1, k)).random(truth.shape) < p
            noisy = np.where(flip, 1.0 - truth, truth).astype(np.float32)
            test = local["test"]
            f1[k, r] = _macro_f1(truth[test], noisy[test])
            acc[k, r] = attacker_accuracy(noisy, codes[rows], local, attacker=attacker, epochs=epochs,
                                          seed=_round_seed(seed, r, 2), device=device)
    return f1, acc


def _check_grid(flip_grid: Sequence[float]) -> tuple[float, ...]:
    """Sorted flip probabilities with 0 added. Above 0.5 a flip becomes informative again (p = 1 inverts the
    labels, a bijection that leaks as much as the truth), so the grid stops at 0.5."""
    grid = sorted({float(p) for p in flip_grid} | {0.0})
    if any(not 0.0 <= p <= 0.5 for p in grid):
        raise ValueError(f"flip probabilities must lie in [0, 0.5]; got {list(flip_grid)}")
    return tuple(grid)


def _check_sizes(sizes: Mapping[str, int]) -> None:
    for split in SPLITS:
        value = sizes.get(split) if isinstance(sizes, Mapping) else None
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"sizes must give an integer >= 1 (images per attribute value) for each of {SPLITS}; "
                             f"got {sizes!r}")


def natural_leakage(
    annotations: pd.DataFrame,
    *,
    attribute: str = "gender",
    attacker: str = "logistic",
    rounds: int = 5,
    sizes: Mapping[str, int] = DEFAULT_SIZES,
    epochs: int = MLP_EPOCHS,
    seed: int = 0,
    flip_grid: Sequence[float] = DEFAULT_FLIP_GRID,
    device: str | None = None,
) -> pd.DataFrame:
    """The natural-leakage curve λ_D(a): one row per flip probability (0 always included), ascending p.

    Columns: ``p``, ``f1`` (mean macro-F1 of the flipped test labels against the truth), ``f1_std``,
    ``leakage_mean``, ``leakage_std`` (folded attacker accuracy over rounds). The p = 0 row is λ_D.
    """
    _check_options(attacker, rounds, epochs, sizes)
    annotations = validate_annotations(annotations, attribute)
    grid = _check_grid(flip_grid)
    labels, codes, splits, _ = _arrays(annotations, attribute)
    f1, acc = _curve_rounds(labels, codes, splits, grid, attacker=attacker, rounds=rounds, sizes=sizes,
                            epochs=epochs, seed=seed, device=device)
    return _curve_table(grid, f1, acc)


def _curve_table(grid: Sequence[float], f1: np.ndarray, acc: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({
        "p": list(grid),
        "f1": f1.mean(axis=1),
        "f1_std": f1.std(axis=1),
        "leakage_mean": acc.mean(axis=1),
        "leakage_std": acc.std(axis=1),
    })


def leakage_at_f1(curve: pd.DataFrame, f1: float) -> tuple[float, bool]:
    """(λ_D at macro-F1 ``f1`` by linear interpolation of the curve's means, whether ``f1`` lies within its F1 range).

    Outside the range the nearest end's leakage is returned (and False).
    """
    ordered = curve.sort_values(["f1", "p"])
    xs, ys = ordered["f1"].to_numpy(), ordered["leakage_mean"].to_numpy()
    return float(np.interp(f1, xs, ys)), bool(xs[0] <= f1 <= xs[-1])


def model_f1(annotations: pd.DataFrame, predictions: pd.DataFrame) -> float:
    """Macro-F1 over labels of the model on the test split: predicted = logit > 0 (sigmoid > 0.5).

    Both tables checked (:func:`validate_annotations`, :func:`validate_predictions`); rows of the test split
    that have predictions. Raises ValueError when the predictions hold no test image.
    """
    merged = annotations.merge(predictions, on="image_id", suffixes=("", "_logit"))
    test = merged[merged["split"] == "test"]
    if test.empty:
        raise ValueError("the predictions hold no image of the test split; the model's F1 is measured there")
    columns = label_columns(annotations)
    truth = test[columns].to_numpy(dtype=np.int8)
    predicted = (test[[f"{c}_logit" for c in columns]].to_numpy() > 0).astype(np.int8)
    return _macro_f1(truth, predicted)


@dataclass(frozen=True)
class LeakageReport:
    """Everything :func:`leakage_report` measured. ``as_dict`` is what ``leakage.json`` holds.

    ``sizes``: images per attribute value used per split, for ``lambda_D`` and (if any) ``lambda_M``.
    The ``lambda_M`` fields are None when no predictions were given; ``model_f1_within_curve`` says
    whether the model's F1 lies inside the curve's F1 range (else λ_D(F1) is the nearest end's value).
    """

    attribute: str
    attribute_values: tuple[str, str]
    labels: tuple[str, ...]
    attacker: str
    rounds: int
    epochs: int | None
    seed: int
    sizes: dict[str, dict[str, int]]
    lambda_D: Estimate
    natural_leakage: pd.DataFrame = field(repr=False)
    lambda_M: Estimate | None = None
    model_f1: float | None = None
    lambda_D_at_model_f1: float | None = None
    amplification: float | None = None
    model_f1_within_curve: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "attribute": self.attribute,
            "attribute_values": list(self.attribute_values),
            "labels": list(self.labels),
            "attacker": self.attacker,
            "rounds": self.rounds,
            "epochs": self.epochs,
            "seed": self.seed,
            "sizes": self.sizes,
            "lambda_D": self.lambda_D.as_dict(),
            "lambda_M": None if self.lambda_M is None else self.lambda_M.as_dict(),
            "model_f1": self.model_f1,
            "lambda_D_at_model_f1": self.lambda_D_at_model_f1,
            "amplification": self.amplification,
            "model_f1_within_curve": self.model_f1_within_curve,
            "flip_grid": self.natural_leakage["p"].tolist(),
        }


def _used_sizes(codes: np.ndarray, splits: np.ndarray, sizes: Mapping[str, int]) -> dict[str, int]:
    return {s: min(int(sizes[s]), *(int(np.sum((splits == s) & (codes == v))) for v in (0, 1))) for s in SPLITS}


def leakage_report(
    annotations: pd.DataFrame,
    predictions: pd.DataFrame | None = None,
    *,
    attribute: str = "gender",
    attacker: str = "logistic",
    rounds: int = 5,
    epochs: int = MLP_EPOCHS,
    seed: int = 0,
    sizes: Mapping[str, int] = DEFAULT_SIZES,
    flip_grid: Sequence[float] = DEFAULT_FLIP_GRID,
    device: str | None = None,
) -> LeakageReport:
    """λ_D, the natural-leakage curve and, with predictions, λ_M, the model's F1, λ_D(F1) and Δ.

    ``annotations``/``predictions``: tables as in the module doc (checked here; use :func:`read_annotations`
    and :func:`read_predictions` for files). The λ_M attacker uses the annotated images that have
    predictions, in every split (ValueError if a split or an attribute value has none there). ``sizes``:
    images per attribute value per split; ``epochs`` and ``device`` apply to the MLP attacker.
    """
    _check_options(attacker, rounds, epochs, sizes)
    annotations = validate_annotations(annotations, attribute)
    grid = _check_grid(flip_grid)
    labels, codes, splits, values = _arrays(annotations, attribute)
    options = dict(attacker=attacker, epochs=epochs, device=device)
    f1, acc = _curve_rounds(labels, codes, splits, grid, rounds=rounds, sizes=sizes, seed=seed, **options)
    curve = _curve_table(grid, f1, acc)
    report: dict[str, Any] = dict(
        attribute=attribute, attribute_values=tuple(values),
        labels=tuple(c[len(LABEL_PREFIX):] for c in label_columns(annotations)), attacker=attacker, rounds=rounds,
        epochs=epochs if attacker == "mlp" else None, seed=seed,
        sizes={"lambda_D": _used_sizes(codes, splits, sizes)}, lambda_D=Estimate.of(acc[grid.index(0.0)]),
        natural_leakage=curve,
    )  # fmt: skip
    if predictions is not None:
        predictions = validate_predictions(predictions, annotations)
        has = annotations["image_id"].isin(predictions["image_id"]).to_numpy()
        logits = (
            annotations.loc[has, ["image_id"]].merge(predictions, on="image_id", how="left")[label_columns(annotations)]
        ).to_numpy(dtype=np.float64)
        sub_codes, sub_splits = codes[has], splits[has]
        per_round = []
        for r in range(rounds):
            sample = balanced_sample(sub_codes, sub_splits, sizes, np.random.default_rng(_round_seed(seed, r, 0)))
            per_round.append(attacker_accuracy(logits, sub_codes, sample, seed=_round_seed(seed, r, 2), **options))
        f1_model = model_f1(annotations, predictions)
        at_f1, within = leakage_at_f1(curve, f1_model)
        lambda_m = Estimate.of(per_round)
        report.update(
            lambda_M=lambda_m, model_f1=f1_model, lambda_D_at_model_f1=at_f1,
            amplification=lambda_m.mean - at_f1, model_f1_within_curve=within,
        )  # fmt: skip
        report["sizes"]["lambda_M"] = _used_sizes(sub_codes, sub_splits, sizes)
    return LeakageReport(**report)


# ----------------------------------------------------------------------------------------------------
# Outputs


def plot_natural_leakage(report: LeakageReport) -> Figure:
    """The natural-leakage curve (mean ± std over rounds against macro-F1) with λ_D and, if any, the model's point."""
    curve = report.natural_leakage.sort_values("f1")
    fig = Figure(figsize=(5.5, 4.0), layout="constrained")
    ax = fig.subplots()
    ax.fill_between(curve["f1"], curve["leakage_mean"] - curve["leakage_std"],
                    curve["leakage_mean"] + curve["leakage_std"], alpha=0.2, color="tab:blue", linewidth=0)
    ax.plot(curve["f1"], curve["leakage_mean"], "o-", color="tab:blue", ms=3,
            label="λ_D(F1): labels with entries flipped at rate p")
    if report.lambda_M is not None:
        ax.errorbar([report.model_f1], [report.lambda_M.mean], yerr=[report.lambda_M.std], fmt="*", ms=11,
                    color="tab:red", label=f"model: λ_M = {report.lambda_M.mean:.3f}")
        ax.plot([report.model_f1], [report.lambda_D_at_model_f1], "s", color="tab:blue", ms=6,
                label=f"λ_D at model F1 = {report.lambda_D_at_model_f1:.3f} (Δ = {report.amplification:+.3f})")
        ax.vlines(report.model_f1, report.lambda_D_at_model_f1, report.lambda_M.mean, colors="tab:red",
                  linestyles=":")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("macro-F1 of the labels the attacker reads")
    ax.set_ylabel(f"leakage of {report.attribute} (folded accuracy)")
    ax.set_title(f"Natural leakage ({report.attacker} attacker, {report.rounds} rounds)")
    ax.legend(fontsize=7, loc="upper left")
    return fig


def write_leakage(report: LeakageReport, out_dir: str | os.PathLike[str], extra: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write ``leakage.json`` (:meth:`LeakageReport.as_dict` plus ``extra``, e.g. provenance), ``natural_leakage.csv``
    and ``natural_leakage.png``/``.pdf`` into ``out_dir``, each atomically. Returns the paths by name."""
    out = Path(out_dir)
    paths = {
        "json": out / "leakage.json",
        "csv": out / "natural_leakage.csv",
        "png": out / "natural_leakage.png",
        "pdf": out / "natural_leakage.pdf",
    }
    write_json_atomic(paths["json"], {**report.as_dict(), **dict(extra or {})})
    with atomic_path(paths["csv"]) as tmp:
        report.natural_leakage.to_csv(tmp, index=False)
    fig = plot_natural_leakage(report)
    with atomic_path(paths["png"]) as tmp:
        fig.savefig(tmp, format="png", dpi=150)
    with atomic_path(paths["pdf"]) as tmp:
        fig.savefig(tmp, format="pdf", metadata={"CreationDate": None})
    return paths


# ----------------------------------------------------------------------------------------------------
# Balanced subsets


def balanced_subset(annotations: pd.DataFrame, alpha: float, *, attribute: str = "gender", seed: int = 0) -> pd.DataFrame:
    """The rows kept so that, within each split, no label's ratio between the two attribute values exceeds ``alpha``.

    For each label with n_a images of one value and n_b of the other (n_a >= n_b) the subset satisfies
    n_a <= alpha * n_b (a label left with no image at all satisfies it). Greedy removal, per split: while
    some label violates the bound, take the label with the largest ratio (n_b = 0 counts as infinite; ties:
    the most images to remove, then the lowest column), and remove the ``n_a - floor(alpha * n_b)`` images
    of its majority value that carry it and whose other labels lean most towards that same value (score:
    sum over the image's labels of log((n_own + 1) / (n_other + 1)); ties broken at random with ``seed``),
    so the removal helps the other labels rather than hurting them. Images without labels are always kept.
    Each step removes at least one image, so the loop ends. Returns the kept rows in their original order.
    """
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 1):
        raise ValueError(f"alpha must be a number >= 1 (the largest allowed ratio), got {alpha!r}")
    annotations = validate_annotations(annotations, attribute)
    labels, codes, splits, _ = _arrays(annotations, attribute)
    labels = labels.astype(bool)
    rng = np.random.default_rng(seed)
    keep = np.ones(len(codes), dtype=bool)
    for split in SPLITS:
        rows = np.flatnonzero(splits == split)
        x, g = labels[rows], codes[rows]
        alive = np.ones(len(rows), dtype=bool)
        jitter = rng.random(len(rows))
        while True:
            counts = np.stack([x[alive & (g == v)].sum(axis=0) for v in (0, 1)]).astype(np.float64)  # (2, L)
            high, low = counts.max(axis=0), counts.min(axis=0)
            excess = high - np.floor(alpha * low)
            violated = excess > 0
            if not violated.any():
                break
            ratio = np.where(low > 0, high / np.maximum(low, 1), np.inf)
            order = np.lexsort((np.arange(len(ratio)), -excess, -ratio))
            label = next(i for i in order if violated[i])
            major = int(counts[1, label] > counts[0, label])
            candidates = np.flatnonzero(alive & (g == major) & x[:, label])
            lean = np.log((counts[major] + 1) / (counts[1 - major] + 1))
            score = x[candidates] @ lean
            ranked = candidates[np.lexsort((jitter[candidates], -score))]
            alive[ranked[: int(excess[label])]] = False
        keep[rows[~alive]] = False
    return annotations[keep].reset_index(drop=True)


# ----------------------------------------------------------------------------------------------------
# Synthetic data with a known leakage


def synthetic_rates(n_labels: int, seed: int, *, gap: float = 0.15) -> np.ndarray:
    """Per-label rates (2, n_labels): row v = P(label = 1 | attribute value v), base rates in [0.1, 0.5]
    shifted by ±``gap``/2 with random sign per label (clipped to [0.02, 0.98])."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.1, 0.5, n_labels)
    shift = gap / 2 * rng.choice([-1.0, 1.0], n_labels)
    return np.clip(np.stack([base - shift, base + shift]), 0.02, 0.98)


def synthetic_annotations(
    n: int,
    n_labels: int = 8,
    seed: int = 0,
    *,
    rates: np.ndarray | None = None,
    attribute: str = "gender",
    values: tuple[str, str] = ("man", "woman"),
    split_shares: tuple[float, float, float] = (0.5, 0.25, 0.25),
) -> pd.DataFrame:
    """An annotations table whose labels are independent given the attribute, so λ_D is known in closed form.

    ``n`` images; attribute value v drawn with probability 1/2; label j is 1 with probability ``rates[v, j]``
    (default :func:`synthetic_rates` (n_labels, seed)), independently of the other labels given v. Splits
    are assigned at random with ``split_shares``; ids are ``img<row>``. Columns as :func:`read_annotations`.
    The attacker's best possible accuracy on balanced subsamples is :func:`bayes_accuracy` (rates).
    """
    rates = synthetic_rates(n_labels, seed) if rates is None else np.asarray(rates, dtype=np.float64)
    if rates.ndim != 2 or rates.shape[0] != 2 or np.any((rates < 0) | (rates > 1)):
        raise ValueError(f"rates must be a (2, n_labels) array of probabilities, got shape {rates.shape}")
    rng = np.random.default_rng(_round_seed(seed, 99))
    codes = rng.integers(0, 2, n)
    labels = (rng.random((n, rates.shape[1])) < rates[codes]).astype(np.int8)
    table = pd.DataFrame({
        "image_id": [f"img{i}" for i in range(n)],
        "split": rng.choice(SPLITS, size=n, p=list(split_shares)),
        attribute: np.asarray(values)[codes],
    })
    width = len(str(rates.shape[1] - 1))
    for j in range(rates.shape[1]):
        table[f"{LABEL_PREFIX}l{j:0{width}d}"] = labels[:, j]
    return table


def bayes_accuracy(rates: np.ndarray, prior: float = 0.5) -> float:
    """Exact Bayes accuracy of predicting the attribute from a label vector whose entries are independent given it.

    ``rates`` (2, L): P(label j = 1 | value v); ``prior``: P(value 1) (0.5 on the attacker's balanced
    subsamples). Sum over all 2**L label patterns of max_v P(v) P(pattern | v); L <= :data:`MAX_BAYES_LABELS`.
    """
    rates = np.asarray(rates, dtype=np.float64)
    if rates.ndim != 2 or rates.shape[0] != 2:
        raise ValueError(f"rates must have shape (2, n_labels), got {rates.shape}")
    if rates.shape[1] > MAX_BAYES_LABELS:
        raise ValueError(f"{rates.shape[1]} labels: exact enumeration is limited to {MAX_BAYES_LABELS} (2**L patterns)")
    patterns = np.array(list(itertools.product((0, 1), repeat=rates.shape[1])), dtype=np.float64)  # (2**L, L)
    likelihood = np.stack([
        np.prod(np.where(patterns == 1, rates[v], 1 - rates[v]), axis=1) for v in (0, 1)
    ])  # (2, 2**L)
    joint = np.array([1 - prior, prior])[:, None] * likelihood
    return float(joint.max(axis=0).sum())
