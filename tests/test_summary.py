from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sbssl.summary import (
    COUNTS_COLUMNS,
    EXCLUDING_FLAGS,
    SUMMARY_COLUMNS,
    bias_counts,
    exclusion_counts,
    figure_models,
    read_summary,
    read_tests_table,
    study_alternative,
    summarize,
)

DEGENERATE = EXCLUDING_FLAGS["degenerate"]


def _rows(model: str, family: str, test: str, ps: list[float], ds: list[float] | None = None,
          layer: str = "avgpool", alternative: str = "greater", flags: list[str] | None = None,
          ci: list[tuple[float, float]] | None = None) -> list[dict]:
    ds = ds if ds is not None else [0.5] * len(ps)
    flags = flags if flags is not None else [""] * len(ps)
    ci = ci if ci is not None else [(np.nan, np.nan)] * len(ps)
    return [
        {"model": model, "family": family, "layer": layer, "test": test, "title": test.upper(),
         "group": "intersectional" if test.startswith("i") else "core", "seed": seed, "d": d, "p": p,
         "alternative": alternative, "flags": flag, "d_ci_low": lo, "d_ci_high": hi}
        for seed, (p, d, flag, (lo, hi)) in enumerate(zip(ps, ds, flags, ci))
    ]


def test_seed_average_is_numpy_order_not_compensated():
    # (0.1 + 0.2) + 0.3 = 0.6000000000000001 in float64; a compensated sum gives 0.6 -> different means.
    tests = pd.DataFrame(_rows("a", "contrastive", "t1", [0.1, 0.2, 0.3], ds=[1.0, 2.0, 4.0],
                               ci=[(0.1, 0.2), (0.2, 0.4), (0.3, 0.6)]))
    row = summarize(tests).iloc[0]
    assert row["p"] == ((0.1 + 0.2) + 0.3) / 3 == 0.20000000000000004
    assert row["p"] != tests["p"].astype(float).groupby(tests["model"]).mean().iloc[0]
    assert row["p_std"] == pytest.approx(0.1)
    assert (row["p_min"], row["p_max"], row["n_seeds"], row["n_instances"]) == (0.1, 0.3, 3, 1)
    assert row["d"] == pytest.approx(7 / 3)
    assert row["d_std"] == pytest.approx(np.std([1.0, 2.0, 4.0], ddof=1))
    # the CI bounds are averaged over seeds like p, in seed order
    assert row["d_ci_low"] == ((0.1 + 0.2) + 0.3) / 3 and row["d_ci_high"] == pytest.approx(0.4)
    assert (row["alternative"], row["flags"], row["excluded"]) == ("greater", "", "")
    assert list(summarize(tests).columns) == list(SUMMARY_COLUMNS)


def test_random_model_is_mean_over_instances_then_seeds_and_instances_are_kept():
    tests = pd.DataFrame(
        _rows("random_1", "random", "t1", [0.2, 0.4], ds=[1.0, 1.0], ci=[(0.0, 2.0), (0.0, 2.0)])
        + _rows("random_2", "random", "t1", [0.6, 0.0], ds=[3.0, 3.0], ci=[(2.0, 4.0), (2.0, 4.0)])
        + _rows("a", "geometric", "t1", [0.5, 0.5])
    )
    summary = summarize(tests).set_index("model")
    assert list(summary.index) == ["a", "random_1", "random_2", "random"]  # no zoo: by name, mean last
    rnd = summary.loc["random"]
    # per seed: (0.2 + 0.6) / 2 = 0.4 and (0.4 + 0.0) / 2 = 0.2; then over seeds 0.3
    assert rnd["p"] == pytest.approx(0.3)
    assert (rnd["p_min"], rnd["p_max"]) == pytest.approx((0.2, 0.4))
    assert (rnd["d"], rnd["family"], rnd["n_instances"], rnd["n_seeds"]) == (2.0, "random", 2, 2)
    assert (rnd["d_ci_low"], rnd["d_ci_high"], rnd["alternative"]) == (1.0, 3.0, "greater")
    assert summary.loc["random_1", "p"] == pytest.approx(0.3)
    assert summary.loc["random_2", "n_instances"] == 1


def test_zoo_orders_models_and_random_follows_its_instances():
    tests = pd.DataFrame(
        _rows("random_1", "random", "t1", [0.2]) + _rows("b", "clustering", "t1", [0.3])
        + _rows("a", "geometric", "t1", [0.5]) + _rows("extra", "contrastive", "t1", [0.5])
    )
    zoo = {"b": None, "random_1": None, "a": None}
    summary = summarize(tests, zoo)
    assert list(summary["model"]) == ["b", "random_1", "random", "a", "extra"]
    assert figure_models(summary, zoo) == ["b", "random", "a"]
    assert figure_models(summary) == ["b", "random", "a", "extra"]


def test_adjusted_p_values_within_model_layer_and_study():
    tests = pd.DataFrame(
        _rows("a", "geometric", "t1", [0.01]) + _rows("a", "geometric", "t2", [0.02])
        + _rows("a", "geometric", "t3", [0.04]) + _rows("a", "geometric", "t1", [0.5], layer="layer4")
    )
    summary = summarize(tests)
    gap = summary[summary["layer"] == "avgpool"]
    assert list(gap["p_holm_model_layer"]) == pytest.approx([0.03, 0.04, 0.04])
    assert list(gap["p_bh_model_layer"]) == pytest.approx([0.03, 0.03, 0.04])
    assert summary[summary["layer"] == "layer4"]["p_holm_model_layer"].item() == 0.5
    # the study family holds all 4 rows: Holm multiplies the smallest p by 4
    assert list(summary["p_holm_study"]) == pytest.approx([0.5, 0.04, 0.06, 0.08])
    assert list(summary["p_bh_study"]) == pytest.approx([0.5, 4 * 0.01, 4 * 0.02 / 2, 4 * 0.04 / 3])


def test_bias_counts_are_strictly_below_threshold_and_name_the_alternative():
    tests = pd.DataFrame(
        _rows("a", "geometric", "t1", [0.05], alternative="less") + _rows("a", "geometric", "t2", [0.0099], alternative="less")
        + _rows("a", "geometric", "t3", [0.2], alternative="less")
    )
    counts = bias_counts(summarize(tests))
    assert counts.to_dict("list") == {
        "model": ["a"] * 3, "layer": ["avgpool"] * 3, "alternative": ["less"] * 3,
        "threshold": [0.1, 0.05, 0.01], "n_biases": [2, 1, 1], "n_tests": [3] * 3, "n_excluded": [0] * 3,
    }
    assert list(counts.columns) == list(COUNTS_COLUMNS)


def test_degenerate_test_stays_in_the_summary_and_leaves_counts_and_adjustments():
    tests = pd.DataFrame(
        _rows("a", "geometric", "t1", [0.01, 0.01]) + _rows("a", "geometric", "t2", [0.02, 0.02])
        # d undefined (NaN) on both seeds; one seed also has overlapping target and attribute images
        + _rows("a", "geometric", "t3", [1.0, 1.0], ds=[np.nan, np.nan],
                flags=["degenerate;target_attribute_overlap", "degenerate"])
        + _rows("a", "geometric", "t4", [0.03, 0.03], flags=["", "target_attribute_overlap"])
    )
    summary = summarize(tests).set_index("test")
    assert len(summary) == 4
    assert summary.loc["t3", "flags"] == "degenerate;target_attribute_overlap"  # union over seeds, sorted
    assert summary.loc["t3", "excluded"] == DEGENERATE == "degenerate: every s(w) equal within rounding, d undefined"
    assert np.isnan(summary.loc["t3", "d"]) and summary.loc["t3", "p"] == 1.0
    assert (summary.loc["t4", "flags"], summary.loc["t4", "excluded"]) == ("target_attribute_overlap", "")
    # Holm over the 3 rows left: 3 x 0.01, 2 x 0.02, 1 x 0.03 (4 x 0.01 with the degenerate row in)
    assert summary["p_holm_model_layer"].tolist()[:2] == pytest.approx([0.03, 0.04])
    assert np.isnan(summary.loc["t3", "p_holm_model_layer"]) and np.isnan(summary.loc["t3", "p_bh_study"])
    counts = bias_counts(summary.reset_index())
    assert counts[["n_biases", "n_tests", "n_excluded"]].values.tolist() == [[3, 3, 1], [3, 3, 1], [0, 3, 1]]
    assert exclusion_counts(summary) == {"n_excluded": 1, "n_flagged_overlap": 1}


def test_one_degenerate_random_instance_excludes_the_random_mean():
    tests = pd.DataFrame(
        _rows("random_1", "random", "t1", [0.02], ds=[np.nan], flags=["degenerate"])
        + _rows("random_2", "random", "t1", [0.04], ds=[0.5])
    )
    summary = summarize(tests).set_index("model")
    assert summary.loc["random", "excluded"] == DEGENERATE and summary.loc["random_2", "excluded"] == ""
    assert summary.loc["random", "p"] == pytest.approx(0.03)


def test_mixed_alternatives_are_refused_where_p_values_are_compared():
    mixed = pd.DataFrame(_rows("a", "geometric", "t1", [0.01]) + _rows("a", "geometric", "t2", [0.02],
                                                                        alternative="two-sided"))
    summary = summarize(mixed)  # one alternative per row is fine in the summary itself
    assert list(summary["alternative"]) == ["greater", "two-sided"]
    with pytest.raises(ValueError, match=r"mixes alternatives \(greater: 1 rows, two-sided: 1 rows\)"):
        bias_counts(summary)
    assert study_alternative(summary.iloc[:1]) == "greater"
    seeds = pd.DataFrame(_rows("a", "geometric", "t1", [0.01, 0.02]))
    seeds.loc[1, "alternative"] = "less"
    with pytest.raises(ValueError, match="model=a layer=avgpool test=t1 has seeds run with different alternatives"):
        summarize(seeds)
    with pytest.raises(ValueError, match="alternative 'upper' is not one of greater, less, two-sided"):
        summarize(pd.DataFrame(_rows("a", "geometric", "t1", [0.01], alternative="upper")))


def test_reserved_random_name_and_missing_columns_are_errors(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        summarize(pd.DataFrame(_rows("random", "random", "t1", [0.1])))
    path = tmp_path / "tests.csv"
    pd.DataFrame(_rows("a", "geometric", "t1", [0.1])).drop(columns=["p", "seed"]).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"tests\.csv: missing column\(s\) seed, p; .* Rebuild it with this version"):
        read_tests_table(path)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_tests_table(tmp_path / "nope.csv")
    pd.DataFrame({"run": [0], "layer": ["avg_pool"]}).to_csv(path, index=False)
    with pytest.raises(ValueError, match="use the sbssl-published format"):
        read_tests_table(path)


def test_read_our_format_validates_p_d_duplicates_and_catalogue_ids(tmp_path):
    path = tmp_path / "tests.csv"
    table = pd.DataFrame(_rows("a", "geometric", "t1", [0.1, 0.2]))
    table.drop(columns=["d_ci_low", "d_ci_high", "flags"]).to_csv(path, index=False)  # an older table
    read = read_tests_table(path)
    assert len(read) == 2 and read["d_ci_low"].isna().all() and read["flags"].isna().all()
    Spec = type("Spec", (), {})
    spec = Spec()
    spec.id, spec.title, spec.group = "t2", "T2", "core"
    with pytest.raises(ValueError, match="not in the catalogue: t1"):
        read_tests_table(path, catalogue=[spec])
    table.assign(p=[0.1, 1.5]).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"tests\.csv: line 3: p must be a number in \[0, 1\]"):
        read_tests_table(path)
    table.assign(d=[0.1, np.nan]).to_csv(path, index=False)
    with pytest.raises(ValueError, match="line 3: .* only rows flagged degenerate may lack them"):
        read_tests_table(path)
    table.assign(d=[0.1, np.nan], flags=["", "degenerate"]).to_csv(path, index=False)
    assert read_tests_table(path)["flags"].tolist()[1] == "degenerate"
    table.assign(seed=0).to_csv(path, index=False)
    with pytest.raises(ValueError, match="line 3: duplicate rows for model=a layer=avgpool test=t1 seed=0"):
        read_tests_table(path)


def test_summary_csv_round_trips_and_read_summary_validates(tmp_path):
    tests = pd.DataFrame(_rows("a", "geometric", "t1", [0.1, 0.2, 0.3 + 1e-17 * 3])
                         + _rows("a", "geometric", "t2", [1.0], ds=[np.nan], flags=["degenerate"]))
    summary = summarize(tests)
    path = tmp_path / "summary.csv"
    summary.to_csv(path, index=False)
    back = read_summary(path)
    assert back["p"].tolist()[0] == summary["p"].tolist()[0]  # bit for bit
    assert back["flags"].tolist() == ["", "degenerate"] and back["excluded"].tolist() == ["", DEGENERATE]
    summary.drop(columns=["d_std"]).to_csv(tmp_path / "x.csv", index=False)
    with pytest.raises(ValueError, match=r"x\.csv: missing column\(s\) d_std; .* rerun the summary"):
        read_summary(tmp_path / "x.csv")
    summary.assign(p=[1.2, 0.5]).to_csv(tmp_path / "x.csv", index=False)
    with pytest.raises(ValueError, match=r"x\.csv: line 2: p=1\.2 is not in \[0, 1\]"):
        read_summary(tmp_path / "x.csv")
    pd.concat([summary, summary.iloc[:1]]).to_csv(tmp_path / "x.csv", index=False)
    with pytest.raises(ValueError, match="line 4: duplicate rows for model=a layer=avgpool test=t1"):
        read_summary(tmp_path / "x.csv")
    summary.assign(alternative="one-sided").to_csv(tmp_path / "x.csv", index=False)
    with pytest.raises(ValueError, match="alternative 'one-sided' is not one of"):
        read_summary(tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError, match="summary table not found"):
        read_summary(tmp_path / "none.csv")


def test_random_mean_covers_the_instances_of_one_architecture():
    """A random ViT beside the random ResNets keeps its own rows; "random" averages the ResNets only."""
    from sbssl.summary import averaged_random_instances, figure_models

    rows = [(m, "random", layer) for m in ("random_1", "random_2") for layer in ("layer4", "avgpool")]
    rows += [("vit_random", "random", layer) for layer in ("block12", "final")]
    rows += [("moco", "contrastive", "avgpool")]
    table = pd.DataFrame(rows, columns=["model", "family", "layer"])
    assert averaged_random_instances(table) == ["random_1", "random_2"]
    with_mean = pd.concat([table, pd.DataFrame([("random", "random", "avgpool")], columns=table.columns)])
    assert figure_models(with_mean) == ["vit_random", "moco", "random"]
