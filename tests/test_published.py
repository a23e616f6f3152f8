"""The published fixtures (data/published/) and the SB-SSL adapter: the paper's numbers on any clone."""

from __future__ import annotations

import csv
import gzip
import math
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from sbssl.catalogue import load_catalogue
from sbssl.meta import area_meta_test, meta_test
from sbssl.published import (
    IEAT_PUBLISHED_TABLE,
    LAYER_PROBE_ACCURACIES,
    PUBLISHED_COLUMNS,
    SBSSL_PUBLISHED_ROWS,
    compact_published_rows,
    published_zoo,
    read_ieat_published,
    read_layer_probe_accuracies,
    read_published,
)
from sbssl.runner import TESTS_TABLE_COLUMNS
from sbssl.summary import bias_counts, summarize

# Paper (../shared/sbssl/README.md): tests with p < 0.1 / 0.05 / 0.01 at GAP; simclr_vissl_200 is our simclr.
PAPER_GAP_COUNTS = {
    "relative_loc": (19, 15, 12), "byol": (18, 15, 10), "swav": (17, 15, 6), "random": (16, 13, 10),
    "moco_v2": (15, 15, 10), "simclr": (15, 13, 9), "moco_v1": (14, 14, 12), "npid": (13, 13, 11),
    "supervised": (13, 11, 8), "jigsaw": (11, 10, 5), "cluster_fit": (11, 7, 6), "odc": (9, 9, 2),
    "rotation": (6, 4, 0),
}  # fmt: skip


def test_shipped_fixtures_are_in_the_checkout_not_ignored(repo_dir):
    assert SBSSL_PUBLISHED_ROWS == repo_dir / "data" / "published" / "sbssl_published_results.csv.gz"
    assert IEAT_PUBLISHED_TABLE.parent == SBSSL_PUBLISHED_ROWS.parent
    readme = (SBSSL_PUBLISHED_ROWS.parent / "README.md").read_text()
    assert "Sirotkin" in readme and "Steed" in readme
    if (repo_dir / ".git").exists():
        ignored = subprocess.run(["git", "-C", str(repo_dir), "check-ignore", "-q", str(SBSSL_PUBLISHED_ROWS)])
        assert ignored.returncode == 1, "data/published/ must not be git-ignored"


@pytest.fixture(scope="module")
def rows() -> pd.DataFrame:
    return read_published()


def test_read_published_fixture_is_the_whole_study(rows):
    assert list(rows.columns) == list(TESTS_TABLE_COLUMNS)
    assert len(rows) == 11_232 == 3 * 6 * 16 * 39
    assert rows.groupby(["model", "layer", "test"]).size().eq(3).all()
    assert set(rows["model"]) == set(published_zoo()) | {"simclr_openselfsup"}
    assert set(rows["alternative"]) == {"greater"} and set(rows["flags"]) == {""}
    assert rows["p_floor"].isna().all() and rows["d_ci_low"].isna().all()
    # d is the same for every run (only sampled p varies), as the source README says
    assert rows.groupby(["model", "layer", "test"])["d"].nunique().eq(1).all()


def test_published_zoo_has_the_papers_meta_groups():
    zoo = published_zoo()
    assert len(zoo) == 15 and "simclr_openselfsup" not in zoo
    groups = {g: sorted(m for m, spec in zoo.items() if spec.meta_group == g) for g in ("contrastive", "non_contrastive")}
    assert groups == {"contrastive": sorted(["npid", "moco_v1", "moco_v2", "simclr", "byol"]),
                      "non_contrastive": sorted(["jigsaw", "rotation", "odc", "relative_loc", "cluster_fit"])}
    assert {spec.family for spec in zoo.values()} == {"geometric", "clustering", "contrastive", "supervised", "random"}


def test_read_published_maps_names(tmp_path, repo_dir):
    path = tmp_path / "published.csv"
    pd.DataFrame({
        "run": [0, 1, 0], "layer": ["avg_pool", "layer_0", "layer_3"],
        "model": ["simclr_vissl_200", "random_torch_2", "simclr_openselfsup"],
        "test": ["Weapon (Modern)", "Intersectional-Valence-WMBF", "President - Kennedy vs. Trump"],
        "d": [0.1, 0.2, 0.3], "p": [0.01, 0.5, 0.9], "n_t": [6, 20, 6], "n_a": [9, 55, 55],
    }).to_csv(path, index=False)
    table = read_published(path, catalogue=repo_dir / "config" / "tests.yaml")
    assert list(table["model"]) == ["simclr", "random_2", "simclr_openselfsup"]
    assert list(table["family"]) == ["contrastive", "random", "contrastive"]
    assert list(table["layer"]) == ["avgpool", "maxpool", "layer3"]
    assert list(table["test"]) == ["weapon_modern", "intersectional_valence_wmbf", "president_kennedy_trump"]
    assert list(table["group"]) == ["core", "intersectional", "president"]
    assert list(table["seed"]) == [0, 1, 0] and list(table["n_x"]) == [6, 20, 6] and list(table["n_b"]) == [9, 55, 55]
    pd.read_csv(path).assign(layer="fc").to_csv(path, index=False)
    with pytest.raises(ValueError, match="unknown layer name"):
        read_published(path)
    pd.read_csv(path).assign(layer="avg_pool", test="Nope").to_csv(path, index=False)
    with pytest.raises(ValueError, match="test title.* not in the catalogue .*: Nope"):
        read_published(path)
    pd.read_csv(path).drop(columns=["run"]).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"missing column\(s\) run; .* use the sbssl format"):
        read_published(path)
    with pytest.raises(FileNotFoundError, match="pass the file explicitly"):
        read_published(tmp_path / "none.csv.gz")


def test_compact_keeps_value_strings_and_is_byte_stable(tmp_path):
    source = tmp_path / "src.csv"
    source.write_text(
        "run,layer,model,test,X,Y,A,B,d,p,n_t,n_a\n"
        "0,avg_pool,byol,Weapon,w/x,w/y,w/a,w/b,0.10000000000000001,0.1000,6,7\n"
        "1,avg_pool,byol,Weapon,w/x,w/y,w/a,w/b,-1e-05,1.0,6,7\n"
    )
    assert compact_published_rows(source, tmp_path / "a.csv.gz") == 2
    text = gzip.decompress((tmp_path / "a.csv.gz").read_bytes()).decode()
    # the strings themselves, not re-printed floats ("0.1000" would become "0.1")
    assert text == ("run,layer,model,test,d,p,n_t,n_a\n0,avg_pool,byol,Weapon,0.10000000000000001,0.1000,6,7\n"
                    "1,avg_pool,byol,Weapon,-1e-05,1.0,6,7\n")
    compact_published_rows(source, tmp_path / "b.csv.gz")
    assert (tmp_path / "a.csv.gz").read_bytes() == (tmp_path / "b.csv.gz").read_bytes()
    source.write_text(source.read_text().replace("1,avg_pool,byol,Weapon,w/x", "1,avg_pool,byol,Weapon,w/z"))
    with pytest.raises(ValueError, match="test 'Weapon' has two sets of folders"):
        compact_published_rows(source, tmp_path / "c.csv.gz")


def test_shipped_rows_are_the_source_rows(shared_dir, tmp_path):
    # Where the reference copy is present: the shipped file is exactly what compact makes of it.
    source = shared_dir / "sbssl" / "published_results.csv"
    compact_published_rows(source, tmp_path / "rows.csv.gz")
    assert (tmp_path / "rows.csv.gz").read_bytes() == SBSSL_PUBLISHED_ROWS.read_bytes()
    with open(source, newline="") as fh:
        src = [[r[c] for c in PUBLISHED_COLUMNS] for r in csv.DictReader(fh)]
    with gzip.open(SBSSL_PUBLISHED_ROWS, "rt", newline="") as fh:
        assert list(csv.reader(fh))[1:] == src


@pytest.fixture(scope="module")
def paper_summary(rows) -> pd.DataFrame:
    return summarize(rows, published_zoo())


def test_published_counts_at_gap_equal_the_paper(paper_summary):
    counts = bias_counts(paper_summary)
    assert set(counts["alternative"]) == {"greater"} and counts["n_excluded"].eq(0).all()
    gap = counts[counts["layer"] == "avgpool"].pivot(index="model", columns="threshold", values="n_biases")
    got = {m: tuple(int(gap.at[m, t]) for t in (0.1, 0.05, 0.01)) for m in PAPER_GAP_COUNTS}
    assert got == PAPER_GAP_COUNTS


def test_published_rows_give_the_papers_meta_test(paper_summary):
    zoo = published_zoo()
    paper = meta_test(paper_summary, zoo)
    assert (round(paper.p_value, 4), paper.n_thresholds) == (0.0493, 142)
    assert paper.p_value == pytest.approx(0.04926782919740666, abs=1e-15)
    assert sorted(paper.threshold_models) == sorted(
        ["rotation", "relative_loc", "jigsaw", "cluster_fit", "odc", "swav", "npid", "moco_v1", "moco_v2",
         "simclr", "byol", "supervised", "random"])
    assert (paper.alternative, paper.n_excluded, paper.n_flagged_overlap) == ("greater", 0, 0)
    robust = meta_test(paper_summary, zoo, mode="robust")
    assert (round(robust.p_value, 4), robust.n_thresholds) == (0.0472, 137)
    # measured once and pinned: contrastive areas sit in the top of all 252 splits (6 of them)
    assert area_meta_test(paper_summary, zoo).p_value == pytest.approx(6 / 252)


def test_pandas_averaging_would_not_reproduce_the_paper(paper_summary):
    # Why summary.py averages like numpy: pandas' compensated mean changes the distinct-p threshold set.
    raw = pd.read_csv(SBSSL_PUBLISHED_ROWS)
    gap = raw[raw["layer"] == "avg_pool"]
    rnd = gap[gap["model"].str.startswith("random_torch")].groupby(["run", "test"])["p"].mean()
    pandas_random = rnd.groupby("test").mean()
    ours = paper_summary[(paper_summary["model"] == "random") & (paper_summary["layer"] == "avgpool")]
    ours = ours.set_index("title")["p"]
    assert (ours.reindex(pandas_random.index) != pandas_random).any()


# --- the iEAT published table: what can be checked without the authors' embeddings -----------------


@pytest.fixture(scope="module")
def ieat() -> pd.DataFrame:
    return read_ieat_published()


def test_ieat_table_maps_onto_the_catalogue(ieat, repo_dir):
    assert len(ieat) == 117 and set(ieat["Model"]) == {"igpt", "igpt-logit", "simclr"}
    catalogue = {spec.title: spec for spec in load_catalogue(repo_dir / "config" / "tests.yaml")}
    assert set(ieat["Test"]) == set(catalogue)
    for row in ieat.itertuples():
        folders = catalogue[row.Test].folders()
        assert tuple(Path(folders[k]).name for k in "XYAB") == (row.X, row.Y, row.A, row.B), row.Test


def test_ieat_set_sizes_agree_with_the_sbssl_rows(ieat, rows):
    sizes = rows.drop_duplicates("title").set_index("title")[["n_x", "n_a"]]
    ours = ieat.drop_duplicates("Test").set_index("Test")[["n_t", "n_a"]].rename(columns={"n_t": "n_x"})
    pd.testing.assert_frame_equal(ours.sort_index(), sizes.loc[ours.index].sort_index(), check_names=False)


def test_ieat_exact_p_values_are_counts_of_splits(ieat):
    # Exact where C(2 n_t, n_t) <= 10,000: p = k / C(2 n_t, n_t) with k a whole number of splits;
    # sampled otherwise: p = (1 + hits) / 10,000.
    splits = ieat["n_t"].map(lambda n: math.comb(2 * n, n))
    exact = splits <= 10_000
    assert exact.sum() == 36 == 12 * 3
    for denominator, rows in ((splits[exact], ieat[exact]), (10_000, ieat[~exact])):
        k = rows["p"] * denominator
        assert ((k - k.round()).abs() < 1e-9).all() and (k.round() >= 1).all()
    assert ieat["p"].between(0, 1).all()
    # sig marks the paper's thresholds: *** p < 0.01, ** p < 0.05, * p < 0.1
    marks = ieat["p"].map(lambda p: "***" if p < 0.01 else "**" if p < 0.05 else "*" if p < 0.1 else "")
    assert (marks == ieat["sig"].fillna("")).all()


# --- per-layer linear accuracies of the source zoos ----------------------------------------------------


@pytest.fixture(scope="module")
def layer_accuracies() -> pd.DataFrame:
    return read_layer_probe_accuracies()


def test_layer_accuracies_cover_what_the_zoos_publish(layer_accuracies):
    t = layer_accuracies
    assert LAYER_PROBE_ACCURACIES.parent == SBSSL_PUBLISHED_ROWS.parent and len(t) == 151
    paper = t[t["checkpoint_kind"] == "sbssl_paper"]
    assert set(paper["model"]) == {"rotation", "relative_loc", "odc", "npid", "moco_v1", "moco_v2", "byol", "supervised"}
    assert set(t.loc[t["checkpoint_kind"] == "zoo_recipe", "model"]) == {
        "rotation", "relative_loc", "odc", "npid", "moco_v2", "byol"}
    # VISSL publishes one accuracy per model, not per layer: no jigsaw, cluster_fit, swav, simclr rows.
    assert not set(t["model"]) & {"jigsaw", "cluster_fit", "swav", "simclr"}
    multi = paper[paper["benchmark"] == "imagenet_linear_multihead_top1"]
    rotation = multi[multi["model"] == "rotation"].set_index("layer")["value"]
    assert rotation.to_dict() == {"maxpool": 12.89, "layer1": 34.30, "layer2": 44.91, "layer3": 54.99, "layer4": 49.09}
    assert multi.groupby("model").size().eq(5).all()
    assert set(t["source_layer"]) == {"feat1", "feat2", "feat3", "feat4", "feat5", "avgpool", "feature1",
                                      "feature2", "feature3", "feature4", "feature5"}
    voc = paper[paper["benchmark"] == "voc07_svm_map"].set_index("model")
    assert voc.loc["rotation", "layer"] == "layer3" and voc.loc["rotation", "value"] == 67.38  # best layer feat4
    assert t["source"].str.fullmatch(r"open-mmlab/(OpenSelfSup|mmselfsup)@[0-9a-f]{40}:[\w/.]+\.md:\d+").all()


def test_layer_accuracies_agree_with_the_paper_zoo_labels(layer_accuracies):
    # The zoo's imagenet_top1 of the OpenSelfSup files is the "ImageNet (Last)" avgpool value (BYOL: feat5).
    paper = layer_accuracies[layer_accuracies["checkpoint_kind"] == "sbssl_paper"]
    zoo = published_zoo()
    last = paper[paper["benchmark"] == "imagenet_linear_avgpool_top1"].set_index("model")["value"]
    for name in ("rotation", "relative_loc", "odc", "npid", "moco_v1", "moco_v2"):
        assert last[name] == zoo[name].imagenet_top1
    byol = paper[(paper["model"] == "byol") & (paper["layer"] == "layer4")
                 & (paper["benchmark"] == "imagenet_linear_multihead_top1")]
    assert byol["value"].tolist() == [zoo["byol"].imagenet_top1]


@pytest.mark.parametrize("change, match", [
    (lambda t: t.assign(layer=t["layer"].replace("layer1", "conv2")), r"row \d+: layer 'conv2' is not one of"),
    (lambda t: t.assign(value=t["value"].replace("12.89", "n/a")), r"row 2: value 'n/a' is not a percentage"),
    (lambda t: pd.concat([t, t.iloc[:1]]), r"row 153: a second value for"),
    (lambda t: t.drop(columns="source"), r"columns .*; expected"),
])
def test_read_layer_accuracies_refuses_bad_rows(tmp_path, change, match):
    table = pd.read_csv(LAYER_PROBE_ACCURACIES, dtype=str, keep_default_na=False)
    bad = tmp_path / "bad.csv"
    change(table).to_csv(bad, index=False)
    with pytest.raises(ValueError, match=f"bad.csv: {match}" if "columns" not in match else match):
        read_layer_probe_accuracies(bad)
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        read_layer_probe_accuracies(tmp_path / "nowhere.csv")
