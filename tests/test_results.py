from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sbssl.cli import main
from sbssl.meta import meta_test
from sbssl.models import load_zoo
from sbssl.results import (
    TESTS_COLUMNS,
    bias_counts,
    figure_models,
    read_summary,
    read_tests_table,
    summarize,
    write_study_summary,
)

# Paper (../shared/sbssl/README.md): tests with p < 0.1 / 0.05 / 0.01 at GAP; simclr_vissl_200 is our simclr.
PAPER_GAP_COUNTS = {
    "relative_loc": (19, 15, 12), "byol": (18, 15, 10), "swav": (17, 15, 6), "random": (16, 13, 10),
    "moco_v2": (15, 15, 10), "simclr": (15, 13, 9), "moco_v1": (14, 14, 12), "npid": (13, 13, 11),
    "supervised": (13, 11, 8), "jigsaw": (11, 10, 5), "cluster_fit": (11, 7, 6), "odc": (9, 9, 2),
    "rotation": (6, 4, 0),
}


def _rows(model: str, family: str, test: str, ps: list[float], ds: list[float] | None = None,
          layer: str = "avgpool") -> list[dict]:
    ds = ds if ds is not None else [0.5] * len(ps)
    return [
        {"model": model, "family": family, "layer": layer, "test": test, "title": test.upper(),
         "group": "intersectional" if test.startswith("i") else "core", "seed": seed, "d": d, "p": p}
        for seed, (p, d) in enumerate(zip(ps, ds))
    ]


def _table(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for column in TESTS_COLUMNS:
        if column not in df:
            df[column] = np.nan
    return df


def test_seed_average_is_numpy_order_not_compensated():
    # (0.1 + 0.2) + 0.3 = 0.6000000000000001 in float64; a compensated sum gives 0.6 -> different means.
    tests = _table(_rows("a", "contrastive", "t1", [0.1, 0.2, 0.3], ds=[1.0, 2.0, 4.0]))
    row = summarize(tests).iloc[0]
    assert row["p"] == ((0.1 + 0.2) + 0.3) / 3 == 0.20000000000000004
    assert row["p"] != tests["p"].astype(float).groupby(tests["model"]).mean().iloc[0]
    assert row["p_std"] == pytest.approx(0.1)
    assert (row["p_min"], row["p_max"], row["n_seeds"], row["n_instances"]) == (0.1, 0.3, 3, 1)
    assert row["d"] == pytest.approx(7 / 3)
    assert row["d_std"] == pytest.approx(np.std([1.0, 2.0, 4.0], ddof=1))


def test_random_model_is_mean_over_instances_then_seeds_and_instances_are_kept():
    tests = _table(
        _rows("random_1", "random", "t1", [0.2, 0.4], ds=[1.0, 1.0])
        + _rows("random_2", "random", "t1", [0.6, 0.0], ds=[3.0, 3.0])
        + _rows("a", "geometric", "t1", [0.5, 0.5])
    )
    summary = summarize(tests).set_index("model")
    assert list(summary.index) == ["a", "random_1", "random_2", "random"]  # no zoo: by name, mean last
    rnd = summary.loc["random"]
    # per seed: (0.2 + 0.6) / 2 = 0.4 and (0.4 + 0.0) / 2 = 0.2; then over seeds 0.3
    assert rnd["p"] == pytest.approx(0.3)
    assert (rnd["p_min"], rnd["p_max"]) == pytest.approx((0.2, 0.4))
    assert (rnd["d"], rnd["family"], rnd["n_instances"], rnd["n_seeds"]) == (2.0, "random", 2, 2)
    assert summary.loc["random_1", "p"] == pytest.approx(0.3)
    assert summary.loc["random_2", "n_instances"] == 1


def test_zoo_orders_models_and_random_follows_its_instances():
    tests = _table(
        _rows("random_1", "random", "t1", [0.2]) + _rows("b", "clustering", "t1", [0.3])
        + _rows("a", "geometric", "t1", [0.5]) + _rows("extra", "contrastive", "t1", [0.5])
    )
    zoo = {"b": None, "random_1": None, "a": None}
    summary = summarize(tests, zoo)
    assert list(summary["model"]) == ["b", "random_1", "random", "a", "extra"]
    assert figure_models(summary, zoo) == ["b", "random", "a"]
    assert figure_models(summary) == ["b", "random", "a", "extra"]


def test_adjusted_p_values_within_model_layer_and_study():
    tests = _table(
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


def test_bias_counts_are_strictly_below_threshold():
    tests = _table(
        _rows("a", "geometric", "t1", [0.05]) + _rows("a", "geometric", "t2", [0.0099])
        + _rows("a", "geometric", "t3", [0.2])
    )
    counts = bias_counts(summarize(tests))
    assert counts.to_dict("list") == {
        "model": ["a"] * 3, "layer": ["avgpool"] * 3, "threshold": [0.1, 0.05, 0.01], "n_biases": [2, 1, 1],
    }


def test_reserved_random_name_and_missing_columns_are_errors(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        summarize(_table(_rows("random", "random", "t1", [0.1])))
    path = tmp_path / "tests.csv"
    _table(_rows("a", "geometric", "t1", [0.1])).drop(columns=["p", "seed"]).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"tests\.csv: missing column\(s\) seed, p"):
        read_tests_table(path)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_tests_table(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="unknown results format"):
        read_tests_table(path, fmt="csv")


def test_read_our_format_validates_p_duplicates_and_catalogue_ids(tmp_path):
    path = tmp_path / "tests.csv"
    table = _table(_rows("a", "geometric", "t1", [0.1, 0.2]))
    table.to_csv(path, index=False)
    read = read_tests_table(path)
    assert list(read.columns) == list(TESTS_COLUMNS) and len(read) == 2
    Spec = type("Spec", (), {})
    spec = Spec()
    spec.id, spec.title, spec.group = "t2", "T2", "core"
    with pytest.raises(ValueError, match="not in the catalogue: t1"):
        read_tests_table(path, catalogue=[spec])
    table.assign(p=[0.1, 1.5]).to_csv(path, index=False)
    with pytest.raises(ValueError, match="row 3: p must be in"):
        read_tests_table(path)
    table.assign(seed=0).to_csv(path, index=False)
    with pytest.raises(ValueError, match="duplicate rows for model=a layer=avgpool test=t1 seed=0"):
        read_tests_table(path)


def test_read_published_maps_names(tmp_path, repo_dir):
    path = tmp_path / "published.csv"
    pd.DataFrame({
        "run": [0, 1, 0], "layer": ["avg_pool", "layer_0", "layer_3"],
        "model": ["simclr_vissl_200", "random_torch_2", "simclr_openselfsup"],
        "test": ["Weapon (Modern)", "Intersectional-Valence-WMBF", "President - Kennedy vs. Trump"],
        "d": [0.1, 0.2, 0.3], "p": [0.01, 0.5, 0.9], "n_t": [6, 20, 6], "n_a": [9, 55, 55],
    }).to_csv(path, index=False)
    table = read_tests_table(path, "sbssl-published", catalogue=repo_dir / "config" / "tests.yaml")
    assert list(table["model"]) == ["simclr", "random_2", "simclr_openselfsup"]
    assert list(table["family"]) == ["contrastive", "random", "contrastive"]
    assert list(table["layer"]) == ["avgpool", "maxpool", "layer3"]
    assert list(table["test"]) == ["weapon_modern", "intersectional_valence_wmbf", "president_kennedy_trump"]
    assert list(table["group"]) == ["core", "intersectional", "president"]
    assert list(table["seed"]) == [0, 1, 0] and list(table["n_x"]) == [6, 20, 6]
    with pytest.raises(ValueError, match="pass the test catalogue"):
        read_tests_table(path, "sbssl-published")
    pd.read_csv(path).assign(layer="fc").to_csv(path, index=False)
    with pytest.raises(ValueError, match="unknown layer name"):
        read_tests_table(path, "sbssl-published", catalogue=repo_dir / "config" / "tests.yaml")


def test_study_summary_of_random_models_only_like_the_demo(tmp_path, repo_dir):
    tests = _table(
        _rows("random_1", "random", "t1", [0.01, 0.02]) + _rows("random_2", "random", "t1", [0.5, 0.4])
        + _rows("random_1", "random", "i1", [0.001, 0.002]) + _rows("random_2", "random", "i1", [0.003, 0.004])
        + _rows("random_1", "random", "t1", [0.7, 0.9], layer="layer1")
        + _rows("random_2", "random", "t1", [0.7, 0.9], layer="layer1")
    )
    paths = write_study_summary(tests, load_zoo(repo_dir / "config" / "models.yaml"), tmp_path / "out")
    assert all(path.stat().st_size > 0 for path in paths.values())
    meta = json.loads(paths["meta_test"].read_text())
    assert meta["p_value"] is None and "both meta groups" in meta["not_applicable"]
    counts = pd.read_csv(paths["counts"])
    rnd = counts[(counts["model"] == "random") & (counts["layer"] == "avgpool")]
    # random at GAP: t1 mean p = ((0.01 + 0.5) / 2 + (0.02 + 0.4) / 2) / 2 = 0.2325; i1 = 0.0025
    assert list(rnd["n_biases"]) == [1, 1, 1]
    assert list(counts["model"].unique()) == ["random_1", "random_2", "random"]


@pytest.fixture(scope="module")
def published_summary_dir(shared_dir, repo_dir, tmp_path_factory) -> Path:
    """`sbssl summarize` on the SB-SSL published rows, end to end through the CLI."""
    out = tmp_path_factory.mktemp("published")
    rc = main([
        "summarize", "--results", str(shared_dir / "sbssl" / "published_results.csv"),
        "--format", "sbssl-published", "--zoo", str(repo_dir / "config" / "models.yaml"),
        "--catalogue", str(repo_dir / "config" / "tests.yaml"), "--out", str(out),
    ])
    assert rc == 0
    return out


def test_published_counts_at_gap_equal_the_paper(published_summary_dir):
    counts = pd.read_csv(published_summary_dir / "counts.csv")
    gap = counts[counts["layer"] == "avgpool"].pivot(index="model", columns="threshold", values="n_biases")
    got = {m: tuple(int(gap.at[m, t]) for t in (0.1, 0.05, 0.01)) for m in PAPER_GAP_COUNTS}
    assert got == PAPER_GAP_COUNTS


def test_summary_csv_round_trips_bit_for_bit(published_summary_dir, repo_dir, tmp_path):
    # The DAG runs the meta-test on summary.csv read back: it must give the same thresholds.
    summary = read_summary(published_summary_dir / "summary.csv")
    result = meta_test(summary, load_zoo(repo_dir / "config" / "models.yaml"))
    assert (round(result.p_value, 4), result.n_thresholds) == (0.0493, 142)
    with pytest.raises(ValueError, match=r"x\.csv: missing column\(s\) d_std"):
        summary.drop(columns=["d_std"]).to_csv(tmp_path / "x.csv", index=False)
        read_summary(tmp_path / "x.csv")


def test_cli_writes_summary_meta_test_and_figures(published_summary_dir):
    summary = read_summary(published_summary_dir / "summary.csv")
    # 16 published models + the mean `random`, 6 layers, 39 tests
    assert len(summary) == 17 * 6 * 39 and set(summary["n_seeds"]) == {3}
    meta = json.loads((published_summary_dir / "meta_test.json").read_text())
    assert (round(meta["p_value"], 4), meta["n_thresholds"], meta["mode"]) == (0.0493, 142, "paper")
    assert meta["contrastive"] == ["npid", "moco_v1", "moco_v2", "simclr", "byol"]
    assert meta["non_contrastive"] == ["rotation", "relative_loc", "jigsaw", "cluster_fit", "odc"]
    assert (round(meta["robust"]["p_value"], 4), meta["robust"]["n_thresholds"]) == (0.0472, 137)
    assert meta["alternative"]["name"] == "area_under_count_curve"
    for name in ("bias_counts", "intersectional", "strength", "heatmap_avgpool"):
        for suffix in (".png", ".pdf", ".rst"):
            assert (published_summary_dir / "figures" / f"{name}{suffix}").stat().st_size > 0
    assert not list(published_summary_dir.rglob(".*tmp*"))  # atomic writes left no temporaries
