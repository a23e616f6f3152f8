from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from sbssl.meta import MetaTestNotApplicable, area_meta_test, meta_groups, meta_test, meta_test_report
from sbssl.summary import EXCLUDING_FLAGS, summarize

CONTRASTIVE = ["c1", "c2", "c3", "c4", "c5"]
NON_CONTRASTIVE = ["n1", "n2", "n3", "n4", "n5"]
GROUPS = {
    **{m: "contrastive" for m in CONTRASTIVE},
    **{m: "non_contrastive" for m in NON_CONTRASTIVE},
    "swav": None, "random_1": None, "random_2": None,
}


def _summary(p_by_model: dict[str, list[float]], families: dict[str, str] | None = None,
             alternative: str = "greater", flags: dict[tuple[str, int], str] | None = None) -> pd.DataFrame:
    """Summary of a one-seed table: model -> p of its tests t0, t1, ... at avgpool; flags by (model, test)."""
    rows = [
        {"model": model, "family": (families or {}).get(model, "x"), "layer": "avgpool", "test": f"t{i}",
         "title": f"T{i}", "group": "core", "seed": 0, "d": 0.5, "p": p, "p_floor": np.nan,
         "alternative": alternative, "flags": (flags or {}).get((model, i), "")}
        for model, ps in p_by_model.items() for i, p in enumerate(ps)
    ]
    return summarize(pd.DataFrame(rows))


def test_hand_computed_sweep_ignores_random_instances_and_models_outside_the_zoo():
    # Binary fractions keep every mean exact. Thresholds: distinct p < 0.1 over the zoo models and the
    # mean `random` = {1/128, 1/64 (swav and random's (3/256 + 5/256) / 2), 1/32}; the instances' own
    # 3/256, 5/256 and `outside` (not in the zoo) add none.
    p = {**{m: [1 / 128] for m in CONTRASTIVE}, **{m: [1 / 32] for m in NON_CONTRASTIVE},
         "swav": [1 / 64], "random_1": [3 / 256], "random_2": [5 / 256], "outside": [1 / 100]}
    summary = _summary(p, {"random_1": "random", "random_2": "random"})
    result = meta_test(summary, GROUPS)
    assert result.thresholds == (1 / 128, 1 / 64, 1 / 32)
    # p < 1/128: every count 0, all 252 splits tie -> 1. Then contrastive 1 each vs 0: only the observed
    # split reaches a difference of 1 -> 1/252, twice.
    assert result.threshold_p_values == pytest.approx((1.0, 1 / 252, 1 / 252), abs=1e-15)
    assert result.p_value == pytest.approx((1 + 2 / 252) / 3, abs=1e-15)
    assert result.observed_differences == (0.0, 1.0, 1.0)
    assert (result.n_thresholds, result.n_splits, result.mode) == (3, 252, "paper")
    assert "random" in result.threshold_models and "random_1" not in result.threshold_models
    assert "outside" not in result.threshold_models
    assert result.as_dict()["contrastive"] == CONTRASTIVE


def test_hand_computed_split_count():
    # At p_t = 1/64: counts contrastive [1, 1, 1, 1, 0], non-contrastive [1, 0, 0, 0, 0]; observed sum 4.
    # Splits of these five 1s and five 0s giving group one >= 4 ones: C(5,4) C(5,1) + C(5,5) = 26.
    p = {**{m: [1 / 128] for m in CONTRASTIVE[:4]}, "c5": [0.5], "n1": [1 / 128],
         **{m: [0.5] for m in NON_CONTRASTIVE[1:]}, "swav": [1 / 64]}
    result = meta_test(_summary(p), GROUPS)
    assert result.threshold_p_values == pytest.approx((1.0, 26 / 252), abs=1e-15)
    assert result.p_value == pytest.approx((1 + 26 / 252) / 2, abs=1e-15)
    assert result.observed_differences == pytest.approx((0.0, 0.6))


def test_robust_mode_merges_p_values_equal_but_for_the_last_bits():
    p = {**{m: [0.1 + 0.2] for m in CONTRASTIVE}, **{m: [0.3] for m in NON_CONTRASTIVE}}
    summary = _summary(p)
    assert 0.1 + 0.2 != 0.3
    paper = meta_test(summary, GROUPS, max_p=0.5)
    robust = meta_test(summary, GROUPS, max_p=0.5, mode="robust")
    # paper: thresholds 0.3 and 0.30000000000000004; at the latter the non-contrastive 0.3 counts
    assert paper.n_thresholds == 2 and paper.threshold_p_values == pytest.approx((1.0, 1.0))
    assert robust.n_thresholds == 1 and robust.thresholds == (0.3,)


def test_area_alternative_is_one_exact_permutation_test():
    # areas over log10 p in [1e-4, 0.1]: p = 1e-3 -> 2 decades, p = 1e-5 -> clipped to 3, p >= 0.1 -> 0
    p = {**{m: [1e-3, 0.5] for m in CONTRASTIVE}, **{m: [0.2, 0.5] for m in NON_CONTRASTIVE[:4]},
         "n5": [1e-5, 0.5]}
    result = area_meta_test(_summary(p), GROUPS)
    assert result.areas["c1"] == pytest.approx(2.0) and result.areas["n5"] == pytest.approx(3.0)
    assert result.areas["n1"] == 0.0
    assert result.observed_difference == pytest.approx(2.0 - 3.0 / 5)
    # group one's sum >= 10 needs all five 2s (sum 10) or four 2s and the 3 (sum 11): 1 + 5 = 6 splits
    assert result.p_value == pytest.approx(6 / 252)
    assert result.n_splits == 252


def test_bad_groups_mode_and_missing_models_are_errors():
    summary = _summary({**{m: [0.01] for m in CONTRASTIVE}, **{m: [0.05] for m in NON_CONTRASTIVE}})
    with pytest.raises(ValueError, match="mode must be one of"):
        meta_test(summary, GROUPS, mode="exact")
    with pytest.raises(ValueError, match="meta_group must be one of"):
        meta_groups({"a": "contrast"})
    with pytest.raises(MetaTestNotApplicable, match="both meta groups"):
        meta_test(summary, {m: "contrastive" for m in CONTRASTIVE})
    with pytest.raises(MetaTestNotApplicable, match="at layer 'layer4'"):
        meta_test(summary, GROUPS, layer="layer4")
    with pytest.raises(MetaTestNotApplicable, match="no p-value below 0.001"):
        meta_test(summary, GROUPS, max_p=0.001)


def test_partial_study_uses_the_models_present_and_report_says_when_not_applicable():
    # 2 vs 1 models: C(3, 2) = 3 splits; at 1/64 contrastive counts [1, 1] vs [0] -> only the observed split
    summary = _summary({"c1": [1 / 128], "c2": [1 / 128], "n1": [1 / 32], "swav": [1 / 64]})
    result = meta_test(summary, GROUPS)
    assert (result.contrastive, result.non_contrastive, result.n_splits) == (("c1", "c2"), ("n1",), 3)
    assert result.threshold_p_values == pytest.approx((1.0, 1 / 3, 1 / 3))
    demo = meta_test_report(_summary({"random_1": [0.01], "random_2": [0.5]},
                                     {"random_1": "random", "random_2": "random"}), GROUPS)
    assert demo["p_value"] is None and demo["n_thresholds"] == 0 and "both meta groups" in demo["not_applicable"]
    json.dumps(demo)


def test_report_labels_paper_robust_and_alternative():
    p = {**{m: [1 / 128] for m in CONTRASTIVE}, **{m: [1 / 32] for m in NON_CONTRASTIVE}, "swav": [1 / 64]}
    report = meta_test_report(_summary(p), GROUPS)
    json.dumps(report)  # serialisable as written to meta_test.json
    assert report["mode"] == "paper" and report["robust"]["mode"] == "robust"
    assert report["area_test"]["name"] == "area_under_count_curve"
    assert all(report[k]["description"] for k in ("robust", "area_test")) and report["description"]
    assert (report["alternative"], report["n_excluded"], report["n_flagged_overlap"]) == ("greater", 0, 0)
    assert report["bias_definition"].startswith("p < t for the tested direction")


def test_excluded_rows_leave_thresholds_and_counts_and_the_report_says_how_many():
    # c1..c5 have a second test at 1/256 that is degenerate: without exclusion it would add a threshold
    # and the contrastive counts at 1/128 and above.
    p = {**{m: [1 / 128, 1 / 256] for m in CONTRASTIVE}, **{m: [1 / 32, 0.5] for m in NON_CONTRASTIVE},
         "swav": [1 / 64, 0.5]}
    flags = {(m, 1): "degenerate" for m in CONTRASTIVE} | {("n1", 0): "target_attribute_overlap"}
    summary = _summary(p, flags=flags)
    assert (summary["excluded"] == EXCLUDING_FLAGS["degenerate"]).sum() == 5
    result = meta_test(summary, GROUPS)
    assert result.thresholds == (1 / 128, 1 / 64, 1 / 32)
    assert result.observed_differences == (0.0, 1.0, 1.0)
    assert (result.n_excluded, result.n_flagged_overlap) == (5, 1)
    report = meta_test_report(summary, GROUPS)
    assert "5 test result(s) at this layer excluded" in report["description"]
    assert area_meta_test(summary, GROUPS).areas["c1"] == pytest.approx(np.log10(0.1) - np.log10(1 / 128))


def test_alternative_is_followed_and_a_mix_refused():
    p = {**{m: [1 / 128] for m in CONTRASTIVE}, **{m: [1 / 32] for m in NON_CONTRASTIVE}}
    report = meta_test_report(_summary(p, alternative="two-sided"), GROUPS)
    assert report["alternative"] == "two-sided" and "either direction" in report["bias_definition"]
    assert meta_test(_summary(p, alternative="less"), GROUPS).alternative == "less"
    mixed = pd.concat([_summary({m: p[m] for m in CONTRASTIVE}),
                       _summary({m: p[m] for m in NON_CONTRASTIVE}, alternative="two-sided")])
    for run in (meta_test, area_meta_test, meta_test_report):
        with pytest.raises(ValueError, match="mixes alternatives"):
            run(mixed, GROUPS)
