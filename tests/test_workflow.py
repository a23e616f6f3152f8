"""The Snakemake DAG: lint, the full study's shape, partial reruns, resuming a killed run, the demo.

Every run happens in a scratch copy of the workflow (tests/workflow_copy.py), never in the checkout.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
    "catalogue": "config/demo_tests.yaml",
    "models": ["random_1", "tv_a"],
    "layers": ["layer4", "avgpool"],
    "seeds": [0, 1],
    "permutations": 500,
    "embedding": {"batch_size": 8},
    "control": {"models": []},
}
TARGET = "results/tables/tests.csv"


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    """A finished small study (a random and a 'pretrained' model downloaded from file://)."""
    work = copy_workflow(tmp_path_factory.mktemp("small_study"))
    checkpoints = tmp_path_factory.mktemp("checkpoints")
    _add_pretrained(work / "config/models.yaml", "tv_a", checkpoints / "a.pth", _checkpoint(checkpoints / "a.pth", 1))
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
    assert counts["association_test"] == 15 * 6 * 39 * 3
    assert counts["embed_layers"] == 15
    assert counts["cosine_similarities"] == 15 * 6
    assert counts["fetch_weights"] == 12  # the three random initialisations need no download
    assert counts["fetch_stimuli"] == 1
    assert counts["control_association_test"] == 3 * 6 * 39 * 3
    # one job per (model, layer, test, seed), each exactly once
    keys = {tuple(sorted(w.items())) for rule, w in jobs if rule == "association_test"}
    assert len(keys) == counts["association_test"]


def test_local_stimuli_copy_is_one_override(tmp_path):
    work = copy_workflow(tmp_path)
    out = snakemake(work, "-n", "stimuli_manifest", "--config", f"stimuli={tmp_path / 'copy'}", "models=[random_1]")
    rules = {rule for rule, _ in planned_jobs(out.stdout)}
    assert rules == {"stimuli_manifest"}  # no download: the local copy is used in place


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
    assert len(tests) == 2 * 4 * 2  # layers x tests x seeds of the new model
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
    assert {"fetch_weights", "embed_layers", "cosine_similarities", "association_test"} <= rules
    for rule, wildcards in jobs:
        assert rule in AGGREGATES or wildcards.get("model") == "tv_a", (rule, wildcards)


def test_killed_run_resumes_with_identical_results(small_study, tmp_path):
    finished, _, checkpoints = small_study
    work = copy_workflow(tmp_path / "work")
    (work / "config/models.yaml").write_text((finished / "config/models.yaml").read_text())
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
    assert len(jsons) == 2 * 2 * 4 * 2
    for rel in jsons:
        assert (work / rel).read_bytes() == (finished / rel).read_bytes(), rel


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    """`make demo`'s workflow in a copy: planted biases found, controls not, figures, report."""
    work = copy_workflow(tmp_path)
    snakemake(work, "--configfile", "config/demo.yaml", "--cores", "2", timeout=900)
    snakemake(work, "--configfile", "config/demo.yaml", "--report", "results/demo/report.html")
    results = work / "results/demo"
    tests = pd.read_csv(results / "tables/tests.csv")
    assert len(tests) == 2 * 6 * 4 * 3
    p = tests.groupby(["test", "model", "layer"])["p"].mean()
    assert (p["colour_valence"] < 0.01).all()
    assert (p["intersectional_dots_valence"] < 0.01).all()
    assert (p["colour_valence_reversed"] > 0.9).all()
    assert (p["null_control"] > 0.1).all()
    counts = pd.read_csv(results / "tables/counts.csv")
    assert set(counts.columns) >= {"model", "layer", "threshold", "n_biases"}
    meta = json.loads((results / "meta_test.json").read_text())
    assert "p_value" in meta
    control = pd.read_csv(results / "tables/control.csv")
    assert control.loc[control["test"] == "colour_valence", "survives"].all()
    assert not control.loc[control["test"] == "null_control", "significant"].any()
    for png in (results / "figures").glob("*.png"):
        assert png.stat().st_size > 1000
    assert len(list((results / "figures").glob("*.png"))) == 4
    assert (results / "report.html").stat().st_size > 10_000
