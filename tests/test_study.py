from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sbssl.figures import bias_count_data, intersectional_data, strength_data
from sbssl.meta import meta_test
from sbssl.models import load_zoo
from sbssl.published import published_zoo, read_published
from sbssl.study import read_results, write_study_summary
from sbssl.summary import EXCLUDING_FLAGS, read_summary
from test_published import PAPER_GAP_COUNTS

CONTRASTIVE = ["c1", "c2", "c3", "c4", "c5"]
NON_CONTRASTIVE = ["n1", "n2", "n3", "n4", "n5"]
GROUPS = {**{m: "contrastive" for m in CONTRASTIVE}, **{m: "non_contrastive" for m in NON_CONTRASTIVE}}


def _rows(model: str, family: str, test: str, ps: list[float], *, layer: str = "avgpool", d: float = 0.5,
          alternative: str = "greater", flags: str = "") -> list[dict]:
    return [
        {"model": model, "family": family, "layer": layer, "test": test, "title": test.upper(),
         "group": "intersectional" if test.startswith("i") else "core", "seed": seed, "d": d, "p": p,
         "alternative": alternative, "flags": flags}
        for seed, p in enumerate(ps)
    ]


def _groups_study(alternative: str = "greater") -> pd.DataFrame:
    """Five contrastive models with a bias on t1 and i1, five non-contrastive without; i2 degenerate everywhere."""
    rows = []
    for m in CONTRASTIVE + NON_CONTRASTIVE:
        family = "contrastive" if m in CONTRASTIVE else "geometric"
        p = 0.001 if m in CONTRASTIVE else 0.5
        rows += _rows(m, family, "t1", [p, p], alternative=alternative)
        rows += _rows(m, family, "i1", [2 * p, 2 * p], alternative=alternative)
        rows += _rows(m, family, "i2", [1e-4, 1e-4], d=np.nan, alternative=alternative, flags="degenerate")
    return pd.DataFrame(rows)


def test_study_summary_of_random_models_only_like_the_demo(tmp_path, repo_dir):
    tests = pd.DataFrame(
        _rows("random_1", "random", "t1", [0.01, 0.02]) + _rows("random_2", "random", "t1", [0.5, 0.4])
        + _rows("random_1", "random", "i1", [0.001, 0.002]) + _rows("random_2", "random", "i1", [0.003, 0.004])
        + _rows("random_1", "random", "t1", [0.7, 0.9], layer="layer1")
        + _rows("random_2", "random", "t1", [0.7, 0.9], layer="layer1")
    )
    paths = write_study_summary(tests, load_zoo(repo_dir / "config" / "models.yaml"), tmp_path / "out")
    meta = json.loads(paths["meta_test"].read_text())
    assert meta["p_value"] is None and "both meta groups" in meta["not_applicable"]
    assert meta["alternative"] == "greater"
    counts = pd.read_csv(paths["counts"])
    rnd = counts[(counts["model"] == "random") & (counts["layer"] == "avgpool")]
    # random at GAP: t1 mean p = ((0.01 + 0.5) / 2 + (0.02 + 0.4) / 2) / 2 = 0.2325; i1 = 0.0025
    assert list(rnd["n_biases"]) == [1, 1, 1]
    assert list(counts["model"].unique()) == ["random_1", "random_2", "random"]
    assert sorted(paths) == sorted(["summary", "counts", "meta_test"] + [
        f"{name}_{kind}" for name in ("bias_counts", "intersectional", "strength", "heatmap_avgpool")
        for kind in ("png", "pdf", "caption")])
    assert not list(tmp_path.rglob(".*tmp*"))  # atomic writes left no temporaries


def test_a_degenerate_test_does_not_stop_the_study(tmp_path):
    paths = write_study_summary(_groups_study(), GROUPS, tmp_path, heatmap_layer="avgpool")
    summary = read_summary(paths["summary"])
    i2 = summary[summary["test"] == "i2"]
    assert len(i2) == 10 and (i2["excluded"] == EXCLUDING_FLAGS["degenerate"]).all() and i2["d"].isna().all()
    counts = pd.read_csv(paths["counts"])
    c1 = counts[counts["model"] == "c1"]
    assert c1[["n_biases", "n_tests", "n_excluded"]].values.tolist() == [[2, 2, 1]] * 3
    meta = json.loads(paths["meta_test"].read_text())
    # thresholds {0.001, 0.002} (without the exclusion i2's 1e-4 would be one too): nothing is below 0.001 (all splits
    # tie, p = 1); below 0.002 contrastive 1 each vs 0, which only the observed split of 252 reaches
    assert meta["n_thresholds"] == 2 and meta["p_value"] == pytest.approx((1 + 1 / 252) / 2)
    assert (meta["n_excluded"], meta["alternative"]) == (10, "greater")
    caption = paths["bias_counts_caption"].read_text()
    assert "10 test result(s) excluded" in caption


def test_the_study_follows_a_two_sided_alternative(tmp_path):
    paths = write_study_summary(_groups_study("two-sided"), GROUPS, tmp_path)
    assert set(pd.read_csv(paths["counts"])["alternative"]) == {"two-sided"}
    meta = json.loads(paths["meta_test"].read_text())
    assert meta["alternative"] == "two-sided" and "either direction" in meta["bias_definition"]
    assert "Alternative two-sided" in paths["strength_caption"].read_text()


def test_mixed_alternatives_are_refused_before_anything_is_written(tmp_path):
    mixed = pd.concat([_groups_study(), _groups_study("less").assign(layer="layer4")])
    with pytest.raises(ValueError, match=r"mixes alternatives \(greater: 30 rows, less: 30 rows\)"):
        write_study_summary(mixed, GROUPS, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_read_results_formats(tmp_path):
    with pytest.raises(ValueError, match="unknown results format 'csv'"):
        read_results(tmp_path / "x.csv", "csv")
    assert len(read_results(Path(__file__).parents[1] / "data/published/sbssl_published_results.csv.gz",
                            "sbssl-published")) == 11_232


# --- the paper's own study from the shipped published rows (the demo's results/demo/paper/) ---------


@pytest.fixture(scope="module")
def paper_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("paper")
    write_study_summary(read_published(), published_zoo(), out)
    return out


def test_paper_study_counts_and_meta_test(paper_dir):
    counts = pd.read_csv(paper_dir / "counts.csv")
    gap = counts[counts["layer"] == "avgpool"].pivot(index="model", columns="threshold", values="n_biases")
    assert {m: tuple(int(gap.at[m, t]) for t in (0.1, 0.05, 0.01)) for m in PAPER_GAP_COUNTS} == PAPER_GAP_COUNTS
    meta = json.loads((paper_dir / "meta_test.json").read_text())
    assert (round(meta["p_value"], 4), meta["n_thresholds"], meta["mode"]) == (0.0493, 142, "paper")
    assert meta["contrastive"] == ["npid", "moco_v1", "moco_v2", "simclr", "byol"]
    assert meta["non_contrastive"] == ["rotation", "relative_loc", "jigsaw", "cluster_fit", "odc"]
    assert (round(meta["robust"]["p_value"], 4), meta["robust"]["n_thresholds"]) == (0.0472, 137)
    assert meta["area_test"]["p_value"] == pytest.approx(6 / 252)
    assert (meta["alternative"], meta["n_excluded"], meta["layer"]) == ("greater", 0, "avgpool")


def test_paper_summary_csv_round_trips_bit_for_bit(paper_dir):
    # The DAG runs the meta-test on summary.csv read back: it must give the same thresholds.
    summary = read_summary(paper_dir / "summary.csv")
    # 16 published models + the mean `random`, 6 layers, 39 tests
    assert len(summary) == 17 * 6 * 39 and set(summary["n_seeds"]) == {3}
    result = meta_test(summary, published_zoo())
    assert (result.p_value, result.n_thresholds) == (pytest.approx(0.04926782919740666, abs=1e-15), 142)


def test_paper_figure_data_equal_the_counts(paper_dir):
    summary = read_summary(paper_dir / "summary.csv")
    zoo = published_zoo()
    counts = pd.read_csv(paper_dir / "counts.csv").set_index(["model", "layer", "threshold"])["n_biases"]
    # Figure 3: 13 models (simclr_openselfsup and the random instances are not drawn), 6 panels, and at
    # the paper's thresholds each curve is the counts.csv number
    fig3 = bias_count_data(summary, zoo)
    assert fig3["model"].nunique() == 13 and fig3["layer"].nunique() == 6
    at = fig3[fig3["threshold"].isin([0.1, 0.05, 0.01])].set_index(["model", "layer", "threshold"])["n_biases"]
    assert len(at) == 13 * 6 * 3 and (at == counts.reindex(at.index)).all()
    gap = {m: tuple(int(at[(m, "avgpool", t)]) for t in (0.1, 0.05, 0.01)) for m in PAPER_GAP_COUNTS}
    assert gap == PAPER_GAP_COUNTS
    # Figure 5: number of biases at p < 0.01 per model and layer = counts.csv; strength = sum of d there
    fig5 = strength_data(summary, zoo).set_index(["model", "layer"])
    assert (fig5["n_biases"] == counts.xs(0.01, level="threshold").reindex(fig5.index)).all()
    strong = summary[(summary["p"] < 0.01)].groupby(["model", "layer"])["d"].sum()
    assert np.allclose(fig5["strength"], strong.reindex(fig5.index, fill_value=0.0), rtol=0, atol=1e-12)
    assert fig5.index.get_level_values("model")[0] == "random"  # no ImageNet accuracy: first
    assert list(dict.fromkeys(fig5.index.get_level_values("model")))[-1] == "supervised"  # 76.13 %
    # Figure 4: intersectional biases at p < 0.01 at GAP per family (measured once from these rows)
    fig4 = intersectional_data(summary, zoo)
    assert len(fig4) == 13 * 20
    per_family = fig4.groupby("family")["strong"].sum().to_dict()
    per_model = fig4.groupby("model")["strong"].sum()
    direct = summary[(summary["layer"] == "avgpool") & (summary["group"] == "intersectional")
                     & (summary["p"] < 0.01)].groupby("model").size()
    assert (per_model == direct.reindex(per_model.index, fill_value=0)).all()
    assert per_family == PAPER_FIGURE4_PER_FAMILY
    assert list(dict.fromkeys(fig4["family"])) == ["geometric", "clustering", "contrastive", "supervised", "random"]


# Figure 4 of the published rows: intersectional tests with p < 0.01 at GAP, summed per family (measured
# once from the shipped rows; per model: rotation 0, relative_loc 10, jigsaw 3, cluster_fit 4, odc 1,
# swav 3, npid 9, moco_v1 10, moco_v2 9, simclr 7, byol 8, supervised 6, random 7).
PAPER_FIGURE4_PER_FAMILY = {"geometric": 13, "clustering": 8, "contrastive": 43, "supervised": 6, "random": 7}


def test_runner_table_with_a_degenerate_and_an_overlapping_test_runs_the_whole_study(tmp_path):
    # The contract with sbssl.runner: tests.csv as tests_table writes it, read back, summarised end to end.
    import h5py
    from PIL import Image

    from sbssl.catalogue import AssociationTestSpec
    from sbssl.models import ModelSpec
    from sbssl.per_test_table import tests_table
    from sbssl.runner import TESTS_TABLE_COLUMNS, record_association_tests
    from sbssl.storage import write_sha256
    from sbssl.stimuli import build_manifest, distinct_images, write_manifest
    from sbssl.summary import read_tests_table

    rng = np.random.default_rng(0)
    for folder, n in (("c/x", 4), ("c/y", 4), ("c/a", 3), ("c/b", 3), ("c/b2", 3)):
        for i in range(n):
            path = tmp_path / "stimuli" / folder / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)).save(path)
    (tmp_path / "stimuli/c/a/shared.png").write_bytes((tmp_path / "stimuli/c/x/0.png").read_bytes())  # overlap
    for folder in ("c/same1", "c/same2"):  # one image repeated on both sides: every s(w) equal
        (tmp_path / "stimuli" / folder).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "stimuli" / folder / f"{i}.png").write_bytes((tmp_path / "stimuli/c/y/0.png").read_bytes())
    manifest = build_manifest(tmp_path / "stimuli")
    write_manifest(manifest, tmp_path / "manifest.csv")
    hashes = distinct_images(manifest)["sha256"].tolist()
    catalogue = [AssociationTestSpec("t_ok", "OK", "core", "c/x", "c/y", "c/b", "c/b2"),
                 AssociationTestSpec("i_overlap", "Overlap", "intersectional", "c/x", "c/y", "c/a", "c/b"),
                 AssociationTestSpec("i_flat", "Flat", "intersectional", "c/same1", "c/same2", "c/a", "c/b")]
    zoo = {}
    paths = []
    for m, (name, group) in enumerate([(f"c{i}", "contrastive") for i in range(1, 3)]
                                      + [(f"n{i}", "non_contrastive") for i in range(1, 3)]):
        zoo[name] = ModelSpec(name=name, title=name.upper(), family="contrastive" if group == "contrastive" else
                              "geometric", meta_group=group, imagenet_top1=None, architecture="resnet50",
                              weights=None, init_seed=m)
        vectors = rng.standard_normal((len(hashes), 8))
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        with h5py.File(tmp_path / f"{name}.h5", "w") as f:
            f.create_dataset("similarity", data=unit @ unit.T)
            write_sha256(f, hashes)
            f.attrs.update({"model": name, "layer": "avgpool", "preprocessing": "sbssl", "pooling": "flatten"})
        for spec in catalogue:
            outputs = {seed: tmp_path / "out" / f"{name}_{spec.id}_{seed}.json" for seed in (0, 1)}
            record_association_tests(tmp_path / f"{name}.h5", tmp_path / "manifest.csv", spec, outputs,
                                     tmp_path / "log" / f"{name}_{spec.id}.log", model=name, layer="avgpool",
                                     permutations=50, n_boot=50)  # fmt: skip
            paths += outputs.values()
    table = tests_table(paths, zoo, catalogue)
    assert list(table.columns) == list(TESTS_TABLE_COLUMNS)
    table.to_csv(tmp_path / "tests.csv", index=False)
    tests = read_tests_table(tmp_path / "tests.csv", catalogue=catalogue)
    result = write_study_summary(tests, zoo, tmp_path / "study")
    summary = read_summary(result["summary"]).set_index(["model", "test"])
    assert (summary.xs("i_flat", level="test")["excluded"] == EXCLUDING_FLAGS["degenerate"]).all()
    assert (summary.xs("i_overlap", level="test")["flags"] == "target_attribute_overlap").all()
    assert (summary.xs("i_overlap", level="test")["excluded"] == "").all()
    ok = summary.loc[("c1", "t_ok")]
    assert ok["d_ci_low"] < ok["d"] < ok["d_ci_high"]
    counts = pd.read_csv(result["counts"])
    assert (counts["n_tests"] == 2).all() and (counts["n_excluded"] == 1).all()
    meta = json.loads(result["meta_test"].read_text())
    assert (meta["n_excluded"], meta["n_flagged_overlap"]) == (4, 4)
