"""Group accuracies, worst-group accuracy, the seed-aggregated table and the figure of the debiasing runs.

A *group* is a pair (target class, bias attribute value); group index ``g = y * n_bias + a``. For one split:

- group accuracy: the fraction of the group's samples whose predicted class is the target;
- worst-group accuracy (WGA): the minimum group accuracy over the groups that have samples;
- average accuracy: the unweighted mean of the group accuracies over the groups that have samples.

A group without samples has no accuracy: it is reported (``None`` in JSON, listed in ``empty_groups``),
never folded silently into a NaN minimum; a split where every group is empty is an error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: DAG jobs and CI have no display

import numpy as np
import pandas as pd
from matplotlib.figure import Figure


@dataclass(frozen=True)
class GroupAccuracy:
    """Per-group accuracy of one split.

    ``names``: group names (length G); ``accuracy``: float array (G,), NaN for an empty group;
    ``count``: int array (G,), samples per group. ``worst`` and ``average`` are over the non-empty groups.
    """

    names: tuple[str, ...]
    accuracy: np.ndarray
    count: np.ndarray

    @property
    def empty(self) -> tuple[str, ...]:
        """Names of the groups without samples."""
        return tuple(name for name, n in zip(self.names, self.count) if n == 0)

    @property
    def worst(self) -> float:
        """Worst-group accuracy: minimum over the non-empty groups."""
        return float(np.min(self.accuracy[self.count > 0]))

    @property
    def average(self) -> float:
        """Unweighted mean of the non-empty groups' accuracies."""
        return float(np.mean(self.accuracy[self.count > 0]))

    def as_dict(self) -> dict[str, float | None]:
        """``{group name: accuracy}``, ``None`` for an empty group (JSON null)."""
        return {name: (None if n == 0 else float(acc)) for name, acc, n in zip(self.names, self.accuracy, self.count)}


def group_accuracy(
    predicted: np.ndarray, target: np.ndarray, groups: np.ndarray, names: Sequence[str], *, split: str = "split"
) -> GroupAccuracy:
    """Accuracy of ``predicted`` against ``target`` in each group (all int arrays of shape (N,)).

    ``groups`` holds group indices in ``[0, len(names))``. Raises ValueError for mismatched shapes, a group
    index out of range, or a split in which every group is empty (``split`` names it in the message).
    """
    predicted, target, groups = (np.asarray(v) for v in (predicted, target, groups))
    if not predicted.shape == target.shape == groups.shape or predicted.ndim != 1:
        raise ValueError(
            f"{split}: predicted, target and groups must be 1-d arrays of one length, got shapes "
            f"{predicted.shape}, {target.shape}, {groups.shape}"
        )
    n_groups = len(names)
    if groups.size and (groups.min() < 0 or groups.max() >= n_groups):
        raise ValueError(f"{split}: group indices must lie in [0, {n_groups}), got [{groups.min()}, {groups.max()}]")
    count = np.bincount(groups, minlength=n_groups)
    correct = np.bincount(groups, weights=(predicted == target).astype(float), minlength=n_groups)
    if not count.any():
        raise ValueError(f"{split}: no samples in any group; worst-group accuracy is undefined")
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(count > 0, correct / np.maximum(count, 1), np.nan)
    return GroupAccuracy(tuple(names), accuracy, count)


# --- tables over runs ---------------------------------------------------------------------------------------

#: Columns of :func:`debias_runs` (then one ``acc[<group>]`` column per group of the run's data set).
RUN_COLUMNS = ("dataset", "method", "seed", "worst_group_acc", "avg_acc", "best_epoch", "epochs",
               "val_worst_group_acc", "empty_groups")
#: Columns of :func:`debias_table`.
TABLE_COLUMNS = ("dataset", "method", "n_seeds", "seeds", "worst_group_acc_mean", "worst_group_acc_std",
                 "avg_acc_mean", "avg_acc_std", "best_epoch_mean")


def _read_metrics(path: Path) -> dict:
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"debias metrics {path} not found (the training job writes it)") from None
    except ValueError as exc:
        raise ValueError(f"debias metrics {path}: not valid JSON ({exc})") from None
    missing = [key for key in ("dataset", "method", "seed", "worst_group_acc", "avg_acc", "group_acc", "best_epoch")
               if key not in metrics]
    if missing:
        raise ValueError(f"debias metrics {path}: missing keys {missing}; rerun its training job")
    return metrics


def debias_runs(metrics_paths: Iterable[str | os.PathLike[str]]) -> pd.DataFrame:
    """One row per training run (a ``metrics.json`` of :func:`sbssl.debias.run_debias`), sorted by dataset,
    method, seed. Columns: :data:`RUN_COLUMNS` then ``acc[<group>]`` per group (test accuracy at the selected
    epoch; NaN for an empty group or a group of another data set). ``empty_groups`` joins names with ``;``.
    Two files for the same (dataset, method, seed) are an error.
    """
    rows = []
    for path in map(Path, metrics_paths):
        m = _read_metrics(path)
        row = {
            "dataset": m["dataset"], "method": m["method"], "seed": int(m["seed"]),
            "worst_group_acc": float(m["worst_group_acc"]), "avg_acc": float(m["avg_acc"]),
            "best_epoch": int(m["best_epoch"]), "epochs": int(m.get("epochs", m["best_epoch"])),
            "val_worst_group_acc": float(m.get("val_worst_group_acc", np.nan)),
            "empty_groups": ";".join(m.get("empty_groups", [])),
        }
        row.update({f"acc[{g}]": (np.nan if v is None else float(v)) for g, v in m["group_acc"].items()})
        rows.append((path, row))
    if not rows:
        raise ValueError("debias_runs: no metrics files given")
    table = pd.DataFrame([row for _, row in rows])
    duplicated = table.duplicated(["dataset", "method", "seed"], keep=False)
    if duplicated.any():
        paths = [str(p) for (p, _), dup in zip(rows, duplicated) if dup]
        raise ValueError(f"debias_runs: the same (dataset, method, seed) appears twice: {paths}")
    return table.sort_values(["dataset", "method", "seed"], kind="stable").reset_index(drop=True)


def debias_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds of the test worst-group and average accuracy, one row per (dataset, method), from
    the per-run table of :func:`debias_runs`.

    Columns :data:`TABLE_COLUMNS`: ``seeds`` the seeds joined by ``;``; stds are sample stds (ddof 1), NaN
    with a single seed; ``best_epoch_mean`` the mean selected epoch. Rows sorted by dataset, method.
    """
    grouped = runs.groupby(["dataset", "method"], sort=True)
    table = grouped.agg(
        n_seeds=("seed", "size"),
        seeds=("seed", lambda s: ";".join(str(v) for v in sorted(s))),
        worst_group_acc_mean=("worst_group_acc", "mean"),
        worst_group_acc_std=("worst_group_acc", lambda s: s.std(ddof=1)),
        avg_acc_mean=("avg_acc", "mean"),
        avg_acc_std=("avg_acc", lambda s: s.std(ddof=1)),
        best_epoch_mean=("best_epoch", "mean"),
    ).reset_index()
    return table[list(TABLE_COLUMNS)]


def plot_debias(runs: pd.DataFrame, *, methods: Sequence[str] | None = None) -> tuple[Figure, str]:
    """Worst-group and average test accuracy per method (one panel per dataset), from :func:`debias_runs`.

    Bars are means over seeds with a ±1 std error bar (sample std; none with one seed); each seed is a dot,
    so the spread is visible. ``methods`` fixes the order (default: ERM, GroupDRO, adversarial, ClusterFix,
    then any other method alphabetically). Returns ``(Figure, caption)``.
    """
    from sbssl.debias.train import METHODS

    if runs.empty:
        raise ValueError("plot_debias: no runs")
    present = list(dict.fromkeys(runs["method"]))
    order = [m for m in (methods or METHODS) if m in present] + sorted(set(present) - set(methods or METHODS))
    datasets = sorted(runs["dataset"].unique())
    fig = Figure(figsize=(1.0 + 1.9 * len(order), 3.2 * len(datasets)), layout="constrained")
    axes = fig.subplots(len(datasets), 1, squeeze=False)[:, 0]
    width = 0.38
    for ax, dataset in zip(axes, datasets):
        sub = runs[runs["dataset"] == dataset]
        for offset, column, label, colour in (
            (-width / 2, "worst_group_acc", "worst-group", "#c44e52"), (width / 2, "avg_acc", "average", "#4c72b0")
        ):
            for i, method in enumerate(order):
                values = sub.loc[sub["method"] == method, column].to_numpy(float)
                if values.size == 0:
                    continue
                std = values.std(ddof=1) if values.size > 1 else 0.0
                ax.bar(i + offset, values.mean(), width, yerr=std, capsize=3, color=colour, alpha=0.75,
                       label=label if i == 0 else None)
                ax.scatter(np.full(values.size, i + offset), values, s=10, color="black", zorder=3)
        ax.set_xticks(range(len(order)), order)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("test accuracy")
        ax.set_title(dataset)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)  # beside the bars, never on them
    seeds = runs.groupby(["dataset", "method"])["seed"].nunique()
    span = str(seeds.min()) if seeds.min() == seeds.max() else f"{seeds.min()}-{seeds.max()}"
    caption = (
        "Test worst-group (red) and average (blue) accuracy per debiasing method, at the epoch with the best "
        "validation worst-group accuracy; bars: mean over seeds, error bars: ±1 sample std, dots: single seeds "
        f"({span} seeds per method)."
    )
    return fig, caption
