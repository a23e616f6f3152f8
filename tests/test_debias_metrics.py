"""Worst-group accuracy (empty groups reported, not NaN), the seed table and the figure of debiasing runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from sbssl.debias.metrics import TABLE_COLUMNS, debias_runs, debias_table, group_accuracy, plot_debias

NAMES = ("a/x", "a/y", "b/x", "b/y")


def test_group_accuracy_by_hand() -> None:
    groups = np.array([0, 0, 1, 1, 1, 2, 3, 3])
    target = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    predicted = np.array([0, 1, 0, 0, 0, 1, 0, 0])
    acc = group_accuracy(predicted, target, groups, NAMES)
    assert acc.as_dict() == {"a/x": 0.5, "a/y": 1.0, "b/x": 1.0, "b/y": 0.0}
    assert acc.worst == 0.0
    assert acc.average == pytest.approx((0.5 + 1 + 1 + 0) / 4)
    assert acc.count.tolist() == [2, 3, 1, 2]
    assert acc.empty == ()


def test_empty_group_is_reported_not_a_silent_nan() -> None:
    groups = np.array([0, 0, 1, 3])
    acc = group_accuracy(np.array([0, 1, 0, 1]), np.array([0, 0, 0, 1]), groups, NAMES)
    assert acc.empty == ("b/x",)
    assert acc.as_dict()["b/x"] is None
    assert acc.worst == 0.5  # min over the groups that have samples
    assert acc.average == pytest.approx((0.5 + 1 + 1) / 3)
    assert not math.isnan(acc.worst) and not math.isnan(acc.average)
    json.dumps(acc.as_dict())  # None -> null, valid JSON


def test_group_accuracy_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="no samples in any group"):
        group_accuracy(np.array([], int), np.array([], int), np.array([], int), NAMES, split="val")
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        group_accuracy(np.array([0]), np.array([0]), np.array([4]), NAMES)
    with pytest.raises(ValueError, match="shapes"):
        group_accuracy(np.array([0, 1]), np.array([0]), np.array([0]), NAMES)


def _write(tmp: Path, method: str, seed: int, wga: float, avg: float, group_acc: dict | None = None) -> Path:
    path = tmp / f"{method}-{seed}.json"
    path.write_text(json.dumps({
        "dataset": "colored-digits", "method": method, "seed": seed, "worst_group_acc": wga, "avg_acc": avg,
        "group_acc": group_acc or {"a/x": avg, "a/y": wga}, "best_epoch": 3 + seed, "epochs": 10,
        "val_worst_group_acc": wga, "empty_groups": [],
    }))
    return path


def test_debias_table_means_and_sample_stds_over_seeds(tmp_path: Path) -> None:
    paths = [_write(tmp_path, "erm", s, w, 0.8) for s, w in enumerate([0.1, 0.2, 0.6])]
    paths += [_write(tmp_path, "clusterfix", 0, 0.5, 0.7, {"a/x": 0.7, "a/y": None})]
    table = debias_table(debias_runs(paths))
    assert list(table.columns) == list(TABLE_COLUMNS)
    erm = table.set_index("method").loc["erm"]
    assert erm["n_seeds"] == 3 and erm["seeds"] == "0;1;2"
    assert erm["worst_group_acc_mean"] == pytest.approx(0.3)
    assert erm["worst_group_acc_std"] == pytest.approx(np.std([0.1, 0.2, 0.6], ddof=1))
    assert erm["avg_acc_std"] == pytest.approx(0.0)
    assert erm["best_epoch_mean"] == pytest.approx(4.0)
    assert math.isnan(table.set_index("method").loc["clusterfix", "worst_group_acc_std"])  # one seed
    runs = debias_runs(paths)
    assert list(runs["method"]) == ["clusterfix", "erm", "erm", "erm"]
    assert math.isnan(runs.loc[0, "acc[a/y]"])  # the empty group stays visible as NaN in the run table


def test_debias_runs_refuses_duplicates_and_incomplete_files(tmp_path: Path) -> None:
    a = _write(tmp_path, "erm", 0, 0.1, 0.8)
    (tmp_path / "copy").mkdir()
    b = _write(tmp_path / "copy", "erm", 0, 0.2, 0.8)
    with pytest.raises(ValueError, match="appears twice"):
        debias_runs([a, b])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"method": "erm"}))
    with pytest.raises(ValueError, match="missing keys"):
        debias_runs([bad])
    with pytest.raises(FileNotFoundError, match="training job"):
        debias_runs([tmp_path / "absent.json"])


def test_plot_debias_draws_every_method_with_seed_dots(tmp_path: Path) -> None:
    paths = [_write(tmp_path, m, s, 0.1 * (s + 1), 0.8) for m in ("clusterfix", "erm", "groupdro") for s in range(3)]
    fig, caption = plot_debias(debias_runs(paths))
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["erm", "groupdro", "clusterfix"]  # METHODS order
    dots = [c for c in ax.collections if len(c.get_offsets()) == 3]
    assert len(dots) == 2 * 3  # worst-group and average dots per method
    bars = [p.get_height() for p in ax.patches]
    assert bars[0] == pytest.approx(0.2)  # erm's mean worst-group accuracy
    assert "(3 seeds per method)" in caption
