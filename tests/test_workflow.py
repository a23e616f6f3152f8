"""The Snakemake DAG: lint, the full study's shape, partial reruns, resuming a killed run, the demo.

Every run happens in a scratch copy of the workflow (tests/workflow_copy.py), never in the checkout.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from workflow_copy import copy_workflow, planned_jobs, snakemake, write_config

AGGREGATES = {"tests_table", "summarize", "meta_test", "figures", "all"}


def _checkpoint(path: Path, seed: int) -> str:
    """A torchvision-layout ResNet-50 checkpoint from random weights; returns its sha256."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _add_pretrained(zoo_path: Path, name: str, checkpoint: Path, sha256: str) -> None:
    zoo = yaml.safe_load(zoo_path.read_text())
    zoo["models"][name] = {
        "title": name,
        "family": "supervised",
        "imagenet_top1": 76.1,
        "architecture": "resnet50",
        "weights": {"url": checkpoint.as_uri(), "sha256": sha256, "format": "torchvision"},
    }
    zoo_path.write_text(yaml.safe_dump(zoo, sort_keys=False))


SMALL = {
    "results": "results",
    "stimuli": "demo",
    "demo_images_per_concept": 3,
    "catalogue": "config/small_tests.yaml",
    "models": ["random_1", "tv_a"],
    "layers": ["layer4", "avgpool"],
    "seeds": [0, 1],
    "permutations": 500,
    # keep_embeddings false is the harder case for partial reruns: the embeddings are gone afterwards
    "embedding": {"batch_size": 8, "keep_embeddings": False},
    "control": {"models": []},
}
TARGET = "results/tables/counts.csv"
N_TESTS = 5  # the demo's four tests and one degenerate test (A == B)


def _small_catalogue(work: Path) -> None:
    """The demo catalogue plus a degenerate test: A == B gives s(w) = 0 for every target, d undefined."""
    catalogue = yaml.safe_load((work / "config/demo_tests.yaml").read_text())
    catalogue["tests"].append({
        "id": "same_attributes", "title": "Same attributes", "group": "core",
        "x": "targets/warm", "y": "targets/cool", "a": "attributes/pleasant", "b": "attributes/pleasant",
    })
    (work / "config/small_tests.yaml").write_text(yaml.safe_dump(catalogue, sort_keys=False))


def _jobs(work: Path, config: Path, *args: str) -> list[tuple[str, dict[str, str]]]:
    return planned_jobs(snakemake(work, "--configfile", str(config), "-n", *args, TARGET).stdout)


def _outputs(work: Path, pattern: str) -> dict[Path, tuple[int, bytes]]:
    """mtime and bytes of every file matching ``pattern`` under ``work`` (to show nothing was rewritten)."""
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(work.glob(pattern))}


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    """A finished small study (a random and a 'pretrained' model downloaded from file://)."""
    work = copy_workflow(tmp_path_factory.mktemp("small_study"))
    checkpoints = tmp_path_factory.mktemp("checkpoints")
    _add_pretrained(work / "config/models.yaml", "tv_a", checkpoints / "a.pth", _checkpoint(checkpoints / "a.pth", 1))
    _small_catalogue(work)
    config = write_config(work, "small.yaml", SMALL)
    snakemake(work, "--configfile", str(config), "--cores", "2", TARGET)
    return work, config, checkpoints


def test_lint_is_clean(tmp_path):
    work = copy_workflow(tmp_path)
    out = snakemake(work, "--configfile", "config/demo.yaml", "--lint")
    assert "Congratulations, your workflow is in a good condition!" in out.stdout + out.stderr


def test_full_study_dag_has_the_papers_shape(tmp_path):
    work = copy_workflow(tmp_path)
    jobs = planned_jobs(snakemake(work, "-n").stdout)
    counts = pd.Series([rule for rule, _ in jobs]).value_counts()
    assert counts["association_test"] == 15 * 6 * 39  # each job runs the 3 seeds
    assert counts["embed_layers"] == 15
    assert counts["fetch_weights"] == 12  # the three random initialisations need no download
    assert counts["fetch_stimuli"] == 1
    assert counts["control_association_test"] == 3 * 6 * 39
    # one job per (model, layer, test), each exactly once
    keys = {tuple(sorted(w.items())) for rule, w in jobs if rule == "association_test"}
    assert len(keys) == counts["association_test"]


def test_local_stimuli_copy_is_one_override(tmp_path):
    from sbssl.demo import generate_demo_stimuli

    work = copy_workflow(tmp_path / "work")
    generate_demo_stimuli(tmp_path / "copy", images_per_concept=2)
    out = snakemake(
        work, "-n", "stimuli_manifest", "--config", f"stimuli={tmp_path / 'copy'}", "models=[random_1]",
        "catalogue=config/demo_tests.yaml",
    )
    rules = {rule for rule, _ in planned_jobs(out.stdout)}
    assert rules == {"stimuli_manifest"}  # no download: the local copy is used in place


def test_a_catalogue_folder_missing_from_a_local_copy_fails_before_any_job(tmp_path):
    from sbssl.demo import generate_demo_stimuli

    work = copy_workflow(tmp_path / "work")
    generate_demo_stimuli(tmp_path / "copy", images_per_concept=2)
    shutil.rmtree(tmp_path / "copy/control/second")
    out = snakemake(
        work, "-n", "--config", f"stimuli={tmp_path / 'copy'}", "models=[random_1]",
        "catalogue=config/demo_tests.yaml", check=False,
    )
    assert out.returncode != 0
    assert "control/second" in out.stdout + out.stderr


def test_unknown_model_is_a_clear_error(tmp_path):
    work = copy_workflow(tmp_path)
    out = snakemake(work, "-n", "--config", "models=[random_1,no_such_model]", check=False)
    assert out.returncode != 0
    message = out.stdout + out.stderr
    assert "no_such_model" in message and "config/models.yaml" in message


def test_adding_a_model_runs_only_its_jobs(small_study):
    work, _, _ = small_study
    config = write_config(work, "plus_one.yaml", {**SMALL, "models": [*SMALL["models"], "random_2"]})
    jobs = planned_jobs(snakemake(work, "--configfile", str(config), "-n", TARGET).stdout)
    assert jobs, "the new model must be scheduled"
    for rule, wildcards in jobs:
        assert rule in AGGREGATES or wildcards.get("model") == "random_2", (rule, wildcards)
    tests = [w for rule, w in jobs if rule == "association_test"]
    assert len(tests) == 2 * N_TESTS  # layers x tests of the new model (a job runs both seeds)
    assert sum(rule == "embed_layers" for rule, _ in jobs) == 1


def test_adding_a_timm_model_runs_only_its_jobs(small_study):
    work, _, _ = small_study
    config = write_config(work, "plus_vit.yaml", {
        **SMALL, "models": [*SMALL["models"], "vit_random"], "layers": [*SMALL["layers"], "final"],
    })
    jobs = planned_jobs(snakemake(work, "--configfile", str(config), "-n", TARGET).stdout)
    for rule, wildcards in jobs:
        assert rule in AGGREGATES or wildcards.get("model") == "vit_random", (rule, wildcards)
    tests = [w for rule, w in jobs if rule == "association_test"]
    assert {w["layer"] for w in tests} == {"final"} and len(tests) == N_TESTS
    assert sum(rule == "embed_layers" for rule, _ in jobs) == 1


def test_changing_one_models_weights_reruns_only_that_model(small_study):
    work, config, checkpoints = small_study
    zoo_path = work / "config/models.yaml"
    original = zoo_path.read_text()
    try:
        new = checkpoints / "a2.pth"
        _add_pretrained(zoo_path, "tv_a", new, _checkpoint(new, 2))
        jobs = planned_jobs(snakemake(work, "--configfile", str(config), "-n", TARGET).stdout)
    finally:
        zoo_path.write_text(original)
    rules = {rule for rule, _ in jobs}
    assert {"fetch_weights", "embed_layers", "association_test"} <= rules
    for rule, wildcards in jobs:
        assert rule in AGGREGATES or wildcards.get("model") == "tv_a", (rule, wildcards)


def test_killed_run_resumes_with_identical_results(small_study, tmp_path):
    finished, _, checkpoints = small_study
    work = copy_workflow(tmp_path / "work")
    (work / "config/models.yaml").write_text((finished / "config/models.yaml").read_text())
    _small_catalogue(work)
    config = write_config(work, "small.yaml", SMALL)
    proc = subprocess.Popen(
        [sys.executable, "-m", "snakemake", "--configfile", str(config), "--cores", "2", TARGET],
        cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        # Kill the whole run (Snakemake and its job processes) while the first model is being embedded.
        deadline = time.monotonic() + 300
        while not any((work / "results/logs/embeddings").glob("*.log")):
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "the embedding job never started"
            time.sleep(0.2)
        time.sleep(2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (work / TARGET).exists()
    snakemake(work, "--unlock")
    snakemake(work, "--configfile", str(config), "--cores", "2", "--rerun-incomplete", TARGET)
    assert (work / TARGET).read_bytes() == (finished / TARGET).read_bytes()
    jsons = sorted(p.relative_to(finished) for p in (finished / "results/tests").rglob("*.json"))
    assert len(jsons) == 2 * 2 * N_TESTS * 2
    for rel in jsons:
        assert (work / rel).read_bytes() == (finished / rel).read_bytes(), rel


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    """`make demo`'s workflow in a copy: planted biases found, controls not, the paper's study, report."""
    work = copy_workflow(tmp_path)
    snakemake(work, "--configfile", "config/demo.yaml", "--cores", "2", timeout=900)
    snakemake(work, "--configfile", "config/demo.yaml", "--report", "results/demo/report.html")
    results = work / "results/demo"
    tests = pd.read_csv(results / "tables/tests.csv")
    assert len(tests) == 3 * 6 * 4 * 3  # two ResNets and a ViT, six layers each, 4 tests, 3 seeds
    assert set(tests.loc[tests["model"] == "vit_random", "layer"]) == {"embed", "block3", "block6", "block9", "block12", "final"}
    by_test = tests.groupby(["test", "model", "layer"])
    p, d = by_test["p"].mean(), by_test["d"].mean()
    # the planted association: large d, p at the floor of 10,000 permutations, at every layer of the
    # ResNets and of the ViT
    assert (p["colour_valence"] < 0.01).all() and (d["colour_valence"] > 1.0).all()
    assert (p["intersectional_dots_valence"] < 0.01).all() and (d["intersectional_dots_valence"] > 1.0).all()
    assert (p["colour_valence_reversed"] > 0.9).all()
    assert (d["colour_valence_reversed"] == -d["colour_valence"]).all()
    assert (p["null_control"] > 0.1).all()
    summary = pd.read_csv(results / "tables/summary.csv")
    counts = pd.read_csv(results / "tables/counts.csv")
    for row in counts.itertuples():
        rows = summary[(summary["model"] == row.model) & (summary["layer"] == row.layer)]
        assert row.n_biases == int((rows["p"] < row.threshold).sum())
    control = pd.read_csv(results / "tables/control.csv")
    assert control.loc[control["test"] == "colour_valence", "survives"].all()
    assert not control.loc[control["test"] == "null_control", "significant"].any()
    # the headline result of the paper, recomputed from its published rows
    meta = json.loads((results / "paper/meta_test.json").read_text())
    assert round(meta["p_value"], 4) == 0.0493 and meta["n_thresholds"] == 142
    paper = pd.read_csv(results / "paper/counts.csv")
    at_gap = paper[paper["layer"] == "avgpool"].set_index(["model", "threshold"])["n_biases"]
    assert [at_gap[("relative_loc", t)] for t in (0.1, 0.05, 0.01)] == [19, 15, 12]
    assert [at_gap[("rotation", t)] for t in (0.1, 0.05, 0.01)] == [6, 4, 0]
    # the planted tone is decodable at every layer of both models; the trade-off table has every layer
    leakage = pd.read_csv(results / "tables/leakage.csv")
    assert len(leakage) == 3 * 6 and (leakage["attribute"] == "tone").all()
    assert (leakage["accuracy_mean"] > 0.9).all() and (leakage["p_value"] < 0.05).all()
    merged = leakage.merge(counts[counts["threshold"] == 0.05], on=["model", "layer"], suffixes=("", "_counts"))
    assert (merged["n_biases"] == merged["n_biases_counts"]).all()
    assert len(pd.read_csv(results / "tables/tradeoff.csv")) == 3 * 6
    report_html = (results / "report.html").read_text(errors="replace")
    assert "Paper (published rows)" in report_html
    _check_demo_debiasing(results)


def _check_demo_debiasing(results: Path) -> None:
    """The demo's debiasing branch: 4 methods x 3 seeds on colored-digits, and the audit of the 12 networks."""
    runs = pd.read_csv(results / "tables/debias_runs.csv")
    assert len(runs) == 12 and set(runs["method"]) == {"erm", "groupdro", "adversarial", "clusterfix"}
    for run in runs.itertuples():
        metrics = json.loads((results / f"debias/colored-digits/{run.method}/{run.seed}/metrics.json").read_text())
        assert run.worst_group_acc == pytest.approx(min(v for v in metrics["group_acc"].values() if v is not None))
    table = pd.read_csv(results / "tables/debias.csv").set_index("method")
    # the spurious tint makes ERM fail on the minority groups; GroupDRO with the true groups repairs much of it
    assert table.loc["erm", "avg_acc_mean"] - table.loc["erm", "worst_group_acc_mean"] > 0.2
    assert table.loc["groupdro", "worst_group_acc_mean"] > table.loc["erm", "worst_group_acc_mean"] + 0.2
    audit = pd.read_csv(results / "tables/debias_audit.csv")
    assert len(audit) == 12 * 3 and set(audit["layer"]) == {"conv1", "conv2", "pool"} and (audit["n_tests"] == 4).all()
    assert (audit.loc[audit["method"] == "erm", "delta_n_biases"] == 0).all()
    # each count is the number of the network's tests with seed-averaged p < 0.05, from its result files
    for row in audit.itertuples():
        p = [np.mean([json.loads(f.read_text())["p"] for f in (results / f"tests/{row.model}/{row.layer}/{test}").glob("*.json")])
             for test in ("colour_valence", "colour_valence_reversed", "null_control", "intersectional_dots_valence")]
        assert row.n_biases == sum(v < 0.05 for v in p)
        baseline = audit[(audit["method"] == "erm") & (audit["train_seed"] == row.train_seed) & (audit["layer"] == row.layer)]
        assert row.delta_n_biases == row.n_biases - baseline["n_biases"].item()
    assert audit["attribute_accuracy"].between(0, 1).all() and (audit["attribute"] == "tone").all()


def test_relabelling_a_model_and_a_test_reruns_only_the_aggregates(small_study):
    work, config, _ = small_study
    zoo_path, catalogue_path = work / "config/models.yaml", work / "config/small_tests.yaml"
    originals = {path: path.read_text() for path in (zoo_path, catalogue_path)}
    try:
        zoo = yaml.safe_load(zoo_path.read_text())
        zoo["models"]["tv_a"].update(title="Renamed", family="contrastive", meta_group="contrastive", imagenet_top1=1.0)
        zoo["models"]["random_1"]["title"] = "Another title"
        zoo_path.write_text(yaml.safe_dump(zoo, sort_keys=False))
        catalogue = yaml.safe_load(catalogue_path.read_text())
        catalogue["tests"][0].update(title="Renamed test", group="intersectional")
        catalogue_path.write_text(yaml.safe_dump(catalogue, sort_keys=False))
        jobs = _jobs(work, config)
    finally:
        for path, text in originals.items():
            path.write_text(text)
    rules = {rule for rule, _ in jobs}
    assert rules and rules <= AGGREGATES, rules


def test_changing_only_execution_settings_reruns_nothing(small_study):
    work, _, _ = small_study
    config = write_config(work, "execution.yaml", {
        **SMALL, "embedding": {"batch_size": 3, "device": "cpu", "keep_embeddings": True},
    })
    out = snakemake(work, "--configfile", str(config), "-n", TARGET)
    assert planned_jobs(out.stdout) == [], out.stdout[-2000:]


def test_seeds_share_a_test_job_removing_one_reruns_no_test_and_adding_one_reruns_them_all(small_study):
    # One job per (model, layer, test) runs every seed (rules/tests.smk): the seeds are its outputs, not a
    # param, so a finished job with a seed fewer is still complete; a new seed is a missing output of
    # every test job (the finished seeds come back with the same bytes: tests/test_runner.py).
    work, _, _ = small_study
    fewer = _jobs(work, write_config(work, "one_seed.yaml", {**SMALL, "seeds": [0]}))
    assert fewer and {rule for rule, _ in fewer} <= AGGREGATES, fewer
    more = _jobs(work, write_config(work, "three_seeds.yaml", {**SMALL, "seeds": [0, 1, 2]}))
    assert "association_test" in {rule for rule, _ in more} and {rule for rule, _ in more} <= AGGREGATES | {"association_test"}
    assert sum(rule == "association_test" for rule, _ in more) == 2 * 2 * N_TESTS  # models x layers x tests


def test_adding_a_layer_reruns_no_finished_test(small_study):
    work, _, _ = small_study
    before = _outputs(work, "results/tests/**/*.json")
    config = write_config(work, "plus_layer.yaml", {**SMALL, "layers": ["layer3", *SMALL["layers"]]})
    jobs = _jobs(work, config)
    tests = [w for rule, w in jobs if rule == "association_test"]
    assert {w["layer"] for w in tests} == {"layer3"}
    assert len(tests) == 2 * N_TESTS  # models x tests at the new layer
    # Really run it (the embeddings were deleted: keep_embeddings is false), then check the old results.
    snakemake(work, "--configfile", str(config), "--cores", "2", TARGET)
    after = _outputs(work, "results/tests/**/*.json")
    assert {p: v for p, v in after.items() if p in before} == before
    assert planned_jobs(snakemake(work, "--configfile", str(config), "-n", TARGET).stdout) == []


def test_degenerate_test_is_kept_flagged_and_left_out_of_counts(small_study):
    work, config, _ = small_study
    tests = pd.read_csv(work / "results/tables/tests.csv", keep_default_na=False, na_values=[""])
    same = tests[tests["test"] == "same_attributes"]
    assert len(same) == 2 * tests["layer"].nunique() * 2 and same["d"].isna().all()  # models x layers x seeds
    assert same["flags"].str.contains("degenerate").all()
    assert (same["p"] == 1.0).all()  # every split ties: s(w) = 0 for all targets
    summary = pd.read_csv(work / "results/tables/summary.csv", keep_default_na=False, na_values=[""])
    excluded = summary[summary["test"] == "same_attributes"]
    assert excluded["excluded"].str.contains("degenerate").all()
    assert not summary.loc[summary["test"] != "same_attributes", "excluded"].fillna("").astype(bool).any()
    counts = pd.read_csv(work / "results/tables/counts.csv")
    significant = summary[summary["excluded"].fillna("") == ""]
    for row in counts.itertuples():
        rows = significant[(significant["model"] == row.model) & (significant["layer"] == row.layer)]
        assert row.n_biases == int((rows["p"] < row.threshold).sum())
    # the meta-test and the figures of the whole study still run, and say what they left out
    snakemake(work, "--configfile", str(config), "--cores", "2", "results/meta_test.json", "results/figures/bias_counts.png")
    meta = json.loads((work / "results/meta_test.json").read_text())
    assert meta["n_excluded"] == int((excluded["layer"] == "avgpool").sum())  # at the meta-test layer
    caption = (work / "results/figures/bias_counts.rst").read_text()
    assert "excluded" in caption


def test_results_record_the_code_that_computed_them(small_study):
    from sbssl.provenance import code_digest

    work, _, _ = small_study
    record = json.loads(next((work / "results/tests").rglob("*.json")).read_text())
    assert record["code_digest"] == code_digest("test")
    assert "title" not in record and "group" not in record  # labels are joined at table time
    import h5py

    with h5py.File(next((work / "results/similarity").rglob("*.h5")), "r") as f:
        assert f.attrs["code_digest"] == code_digest("similarity")
        assert f.attrs["dtype"] == "float32"  # the paper's precision is the default


def test_config_with_a_repeated_key_is_refused(tmp_path):
    work = copy_workflow(tmp_path)
    config = work / "twice.yaml"
    config.write_text("models: [random_1]\npermutations: 100\npermutations: 1000\n")
    out = snakemake(work, "--configfile", str(config), "-n", check=False)
    assert out.returncode != 0
    message = out.stdout + out.stderr
    assert "twice.yaml" in message and "permutations" in message and "second time" in message


def test_local_stimuli_changes_rerun_the_manifest(small_study, tmp_path):
    finished, _, _ = small_study
    work = copy_workflow(tmp_path / "work")
    stimuli = tmp_path / "stimuli"
    shutil.copytree(finished / "results/stimuli/demo", stimuli)
    _small_catalogue(work)
    config = write_config(work, "local.yaml", {**SMALL, "stimuli": str(stimuli), "models": ["random_1"]})
    manifest = "results/stimuli/manifest.csv"

    def planned() -> set[str]:
        return {r for r, _ in planned_jobs(snakemake(work, "--configfile", str(config), "-n", manifest).stdout)}

    snakemake(work, "--configfile", str(config), "--cores", "1", manifest)
    assert planned() == set()
    image = next(stimuli.glob("targets/warm/*"))
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))  # touched, same bytes
    assert planned() == set()
    shutil.copyfile(next(stimuli.glob("targets/cool/*")), image)  # content changed
    assert planned() == {"stimuli_manifest"}
    snakemake(work, "--configfile", str(config), "--cores", "1", manifest)
    assert planned() == set()
    (stimuli / "targets/warm/extra.png").write_bytes((stimuli / "targets/cool").iterdir().__next__().read_bytes())
    assert planned() == {"stimuli_manifest"}


def test_a_replaced_checkpoint_fails_and_keeps_finished_results(small_study):
    """A different valid checkpoint at pretrains/<model>.pth is refused when the model is used again; the
    failed job restores the similarity matrices and leaves the finished tests as they were."""
    work, config, _ = small_study
    weights = work / "pretrains/tv_a.pth"
    saved, stat = weights.read_bytes(), weights.stat()
    similarities = {p: p.read_bytes() for p in sorted((work / "results/similarity/tv_a").glob("*.h5"))}
    tests = _outputs(work, "results/tests/tv_a/**/*.json")
    assert len(similarities) == 6 and tests
    try:
        _checkpoint(weights, 7)  # another valid ResNet-50
        out = snakemake(
            work, "--configfile", str(config), "--cores", "2", "--forcerun", "results/similarity/tv_a",
            TARGET, check=False,
        )
    finally:
        weights.write_bytes(saved)
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert out.returncode != 0
    log = (work / "results/logs/embeddings/tv_a.log").read_text()
    assert "tv_a.pth" in log and "sha256" in log
    assert {p: p.read_bytes() for p in similarities} == similarities  # restored, not deleted
    assert _outputs(work, "results/tests/tv_a/**/*.json") == tests


def test_coco_branch_from_a_local_annotation_folder(tmp_path):
    """The opt-in COCO leakage branch end to end on a small synthetic COCO (gender from the captions)."""
    from test_coco import write_coco

    rng = np.random.default_rng(0)
    folder = tmp_path / "coco"
    folder.mkdir()
    for split, first, n in (("train2014", 1, 120), ("val2014", 1001, 120)):
        images = {}
        for i in range(first, first + n):
            man = bool(i % 2)
            # bicycles (2) mostly with men, teddy bears (88) mostly with women: the labels leak gender
            cats = [2] if rng.random() < (0.8 if man else 0.2) else [88]
            images[i] = ([f"A {'man' if man else 'woman'} in the park"], cats)
        write_coco(folder, split, images)
    work = copy_workflow(tmp_path / "work")
    config = write_config(work, "coco.yaml", {
        "models": ["random_1"],
        "coco": {"enabled": True, "annotations": str(folder), "attacker": "logistic", "rounds": 2, "alphas": [1]},
    })
    targets = [f"results/leakage/datasets/coco/{s}/leakage.json" for s in ("all", "alpha1")]
    jobs = {rule for rule, _ in planned_jobs(snakemake(work, "--configfile", str(config), "-n", *targets).stdout)}
    assert jobs == {"coco_annotations", "coco_balanced_subset", "coco_leakage"}  # nothing to download
    snakemake(work, "--configfile", str(config), "--cores", "2", *targets)
    everything = json.loads((work / targets[0]).read_text())
    balanced = json.loads((work / targets[1]).read_text())
    assert 0.65 < everything["lambda_D"]["mean"] <= 1.0  # the Bayes accuracy is 0.8
    assert balanced["lambda_D"]["mean"] < everything["lambda_D"]["mean"]  # alpha = 1 removes the leak
    subset = pd.read_csv(work / "results/leakage/datasets/coco/alpha1/annotations.csv")
    for label in ("label_bicycle", "label_teddy_bear"):
        per_gender = subset[subset[label] == 1].groupby(["split", "gender"]).size().unstack(fill_value=0)
        assert (per_gender["man"] == per_gender["woman"]).all()


def test_debias_runs_rerun_only_for_what_defines_them(tmp_path):
    """A debiasing run reruns for its own method's settings only; adding a seed runs only its jobs."""
    work = copy_workflow(tmp_path)
    target = "results/demo/tables/debias.csv"
    base = {"enabled": True, "methods": ["erm", "clusterfix"], "seeds": [0], "epochs": 1, "audit": False}

    def planned(debias: dict) -> set[tuple[str, str, str]]:
        config = write_config(work, "debias.yaml", {"debias": debias})
        out = snakemake(work, "--configfile", "config/demo.yaml", str(config), "-n", target)
        return {(rule, w.get("method", ""), w.get("seed", "")) for rule, w in planned_jobs(out.stdout) if rule != "all"}

    config = write_config(work, "debias.yaml", {"debias": base})
    snakemake(work, "--configfile", "config/demo.yaml", str(config), "--cores", "2", target)
    assert planned(base) == set()
    assert planned({**base, "seeds": [0, 1]}) == {
        ("debias_train", "erm", "1"), ("debias_train", "clusterfix", "1"), ("debias_table", "", "")}
    # ClusterFix's beta is not an ERM setting: only the ClusterFix run reruns
    assert planned({**base, "options": {"colored-digits": {"cf_beta": 0.1}}}) == {
        ("debias_train", "clusterfix", "0"), ("debias_table", "", "")}
    assert planned({**base, "options": {"colored-digits": {"lr": 0.01}}}) == {
        ("debias_train", "erm", "0"), ("debias_train", "clusterfix", "0"), ("debias_table", "", "")}
    runs = pd.read_csv(work / "results/demo/tables/debias_runs.csv")
    assert sorted(runs["method"]) == ["clusterfix", "erm"] and (runs["epochs"] == 1).all()
    bad = write_config(work, "bad.yaml", {"debias": {**base, "options": {"colored-digits": {"adv_lamda": 2}}}})
    out = snakemake(work, "--configfile", "config/demo.yaml", str(bad), "-n", target, check=False)
    assert out.returncode != 0 and "debias.options.colored-digits" in out.stdout + out.stderr
