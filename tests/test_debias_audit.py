"""The re-audit table of debiased backbones: counts and deltas against the baseline, by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sbssl.debias.audit import (
    AUDIT_COLUMNS,
    DebiasRun,
    audit_summary,
    audit_table,
    debiased_model_name,
    debiased_zoo_entry,
)
from sbssl.summary import summarize

RUNS = {debiased_model_name(r): r for r in (DebiasRun("colored-digits", m, s) for s in (0, 1) for m in ("erm", "adversarial"))}


def _tests(p_by_model: dict[str, list[float]], d_by_model: dict[str, list[float]]) -> pd.DataFrame:
    """A per-test table: 3 tests at layer pool, one seed; the given p and d per model."""
    rows = []
    for model, ps in p_by_model.items():
        for i, (p, d) in enumerate(zip(ps, d_by_model[model])):
            rows.append({"model": model, "family": "supervised", "layer": "pool", "test": f"t{i}", "title": f"T{i}",
                         "group": "core", "seed": 0, "d": d, "p": p, "alternative": "greater", "flags": ""})
    return pd.DataFrame(rows)


def test_names_and_zoo_entries_of_debiased_backbones(tmp_path):
    run = DebiasRun("colored-digits", "clusterfix", 2)
    assert debiased_model_name(run) == "debias_colored_digits_clusterfix_2"
    entry = debiased_zoo_entry(run, tmp_path / "model.pt", "small_cnn")
    assert (entry.source, entry.architecture, entry.weights.format) == ("sbssl", "small_cnn", "state_dict")
    assert entry.weights.url == (tmp_path / "model.pt").resolve().as_uri() and entry.family == "supervised"
    resnet = debiased_zoo_entry(DebiasRun("waterbirds", "erm", 0), tmp_path / "m.pt", "resnet50")
    assert (resnet.source, resnet.architecture, resnet.weights.format) == ("torchvision", "resnet50", "torchvision")
    with pytest.raises(ValueError, match="debiased backbone 'vgg' unknown"):
        debiased_zoo_entry(run, tmp_path / "m.pt", "vgg")


def test_counts_and_deltas_against_the_baseline_of_the_same_seed():
    names = list(RUNS)  # erm_0, adversarial_0, erm_1, adversarial_1
    p = {names[0]: [0.01, 0.02, 0.5], names[1]: [0.01, 0.3, 0.6], names[2]: [0.01, 0.02, 0.03], names[3]: [0.2, 0.3, 0.4]}
    d = {names[0]: [1.0, 0.8, 0.1], names[1]: [0.9, 0.2, 0.1], names[2]: [1.2, 1.0, 0.8], names[3]: [0.3, 0.2, 0.1]}
    leakage = pd.DataFrame({"model": names, "layer": "pool", "attribute": "tone", "accuracy_mean": [0.9, 0.7, 0.95, 0.6]})
    table = audit_table(summarize(_tests(p, d)), RUNS, threshold=0.05, leakage=leakage)
    assert list(table.columns) == list(AUDIT_COLUMNS)
    assert table["model"].tolist() == names  # the runs' order
    assert table["n_tests"].tolist() == [3, 3, 3, 3]
    assert table["n_biases"].tolist() == [2, 1, 3, 0]
    assert table["baseline_n_biases"].tolist() == [2, 2, 3, 3]
    assert table["delta_n_biases"].tolist() == [0, -1, 0, -3]
    np.testing.assert_allclose(table["mean_d"], [19 / 30, 0.4, 1.0, 0.2])
    np.testing.assert_allclose(table["delta_mean_d"], [0, 0.4 - 19 / 30, 0, -0.8])
    np.testing.assert_allclose(table["delta_attribute_accuracy"], [0, -0.2, 0, -0.35])
    assert set(table["attribute"]) == {"tone"} and set(table["baseline"]) == {"erm"}
    over_seeds = audit_summary(table).set_index("method")
    assert over_seeds.loc["adversarial", "n_biases_mean"] == 0.5 and over_seeds.loc["adversarial", "delta_n_biases_mean"] == -2
    assert over_seeds.loc["erm", "n_seeds"] == 2


def test_without_probes_or_baseline_the_columns_are_nan_and_unknown_models_are_refused():
    names = list(RUNS)
    p = {n: [0.01, 0.5, 0.5] for n in names[1::2]}  # adversarial only: no ERM run to compare with
    table = audit_table(summarize(_tests(p, {n: [1.0, 0.0, 0.0] for n in p})), RUNS, threshold=0.05)
    assert table["attribute_accuracy"].isna().all() and table["baseline_n_biases"].isna().all()
    assert table["n_biases"].tolist() == [1, 1]
    with pytest.raises(ValueError, match=r"models \['other'\] of the audit's summary are not debiased runs"):
        audit_table(summarize(_tests({"other": [0.1]}, {"other": [0.2]})), RUNS, threshold=0.05)
