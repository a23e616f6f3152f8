"""The re-audit of debiased backbones: each trained network becomes a zoo model, the iEAT tests (and the
per-layer probes, where enabled) run on it as on any other model, and :func:`audit_table` sets its bias counts
beside those of the baseline trained on the same data with the same seed (by default ERM: the network
before debiasing).

A debiased model's name is :func:`debiased_model_name` (``debias_<data set>_<method>_<seed>``); its zoo entry
(:func:`debiased_zoo_entry`) names the run's ``model.pt`` as its weights, verified against the lock the
training job writes beside it (``weights.lock``, :func:`sbssl.models.write_weights_lock`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sbssl.models import ModelSpec, WeightsSpec
from sbssl.summary import bias_counts, included

#: Columns of :func:`audit_table`.
AUDIT_COLUMNS = (
    "dataset", "method", "train_seed", "model", "layer", "threshold", "n_tests", "n_biases", "mean_d",
    "attribute", "attribute_accuracy", "baseline", "baseline_n_biases", "baseline_mean_d",
    "baseline_attribute_accuracy", "delta_n_biases", "delta_mean_d", "delta_attribute_accuracy",
)


@dataclass(frozen=True)
class DebiasRun:
    """One training run: data set, method and training seed."""

    dataset: str
    method: str
    seed: int


def debiased_model_name(run: DebiasRun) -> str:
    """The zoo slug of a run's backbone: ``debias_<data set with _ for ->_<method>_<seed>``."""
    return f"debias_{run.dataset.replace('-', '_')}_{run.method}_{run.seed}"


def debiased_zoo_entry(run: DebiasRun, weights_file: str | os.PathLike[str], backbone: str) -> ModelSpec:
    """The zoo entry of a run's trained backbone (``model.pt``, weights only).

    ``backbone``: the run's ``DebiasConfig.backbone``: ``small_cnn`` (source ``sbssl``, format ``state_dict``)
    or ``resnet50`` (torchvision keys without ``fc``: source ``torchvision``, format ``torchvision``). The URL
    is the file's absolute ``file://`` address (an identity checked against the run's weights lock, never
    downloaded). Family ``supervised`` (the network was trained on labels); layers, pooling and
    preprocessing are the architecture's defaults.
    """
    url = Path(weights_file).resolve().as_uri()
    if backbone == "small_cnn":
        source, architecture, fmt = "sbssl", "small_cnn", "state_dict"
    elif backbone == "resnet50":
        source, architecture, fmt = "torchvision", "resnet50", "torchvision"
    else:
        raise ValueError(f"debiased backbone {backbone!r} unknown; expected small_cnn or resnet50")
    return ModelSpec(
        name=debiased_model_name(run), title=f"{run.method} ({run.dataset}, seed {run.seed})", family="supervised",
        meta_group=None, imagenet_top1=None, architecture=architecture, weights=WeightsSpec(url, fmt),
        init_seed=None, source=source,
    )  # fmt: skip


def audit_table(
    summary: pd.DataFrame,
    runs: Mapping[str, DebiasRun],
    *,
    threshold: float,
    baseline: str = "erm",
    leakage: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Bias counts of every debiased backbone per layer, beside its baseline's.

    ``summary``: :func:`sbssl.summary.summarize` of the debiased models' per-test results; ``runs``: model
    name -> :class:`DebiasRun` for every model of ``summary``; ``threshold``: the p threshold of the counts;
    ``baseline``: the method whose run with the same data set and seed is the "before" (absent: the baseline
    columns are NaN); ``leakage``: :func:`sbssl.probes.probe_table` rows (model, layer, attribute,
    accuracy_mean) of the attribute probes, or None.

    One row per (data set, method, training seed, layer), in the order of ``runs``, layers as in the summary;
    columns :data:`AUDIT_COLUMNS`: ``n_tests`` (tests
    counted; excluded ones left out), ``n_biases`` (p < threshold), ``mean_d`` (mean effect size over the
    counted tests), ``attribute`` and ``attribute_accuracy`` (the probe's balanced accuracy; NaN without
    probes), the baseline's ``n_biases``, ``mean_d`` and ``attribute_accuracy``, and ``delta_*`` = this run's
    value minus the baseline's (0 for the baseline's own rows). Raises ValueError for a summary model
    without a run.
    """
    unknown = sorted(set(summary["model"]) - set(runs))
    if unknown:
        raise ValueError(f"models {unknown} of the audit's summary are not debiased runs; expected one of {sorted(runs)}")
    counts = bias_counts(summary, [threshold])
    kept = included(summary)
    mean_d = kept.groupby(["model", "layer"], sort=False)["d"].mean().rename("mean_d")
    table = counts[["model", "layer", "threshold", "n_tests", "n_biases"]].join(mean_d, on=["model", "layer"])
    table.insert(0, "train_seed", table["model"].map(lambda m: runs[m].seed))
    table.insert(0, "method", table["model"].map(lambda m: runs[m].method))
    table.insert(0, "dataset", table["model"].map(lambda m: runs[m].dataset))
    if leakage is not None and len(leakage):
        probe = leakage[["model", "layer", "attribute", "accuracy_mean"]].rename(
            columns={"accuracy_mean": "attribute_accuracy"})
        table = table.merge(probe, on=["model", "layer"], how="left", validate="one_to_one")
    else:
        table["attribute"], table["attribute_accuracy"] = None, np.nan
    table["baseline"] = baseline
    keys = ["dataset", "train_seed", "layer"]
    base = table.loc[table["method"] == baseline, [*keys, "n_biases", "mean_d", "attribute_accuracy"]]
    table = table.merge(base.add_prefix("baseline_").rename(columns={f"baseline_{k}": k for k in keys}),
                        on=keys, how="left", validate="many_to_one")
    for value in ("n_biases", "mean_d", "attribute_accuracy"):
        table[f"delta_{value}"] = table[value] - table[f"baseline_{value}"]
    order = {model: i for i, model in enumerate(runs)}
    table = table.assign(_run=table["model"].map(order))
    table = table.sort_values(["_run"], kind="stable")  # runs' order; layers stay in forward order
    return table[list(AUDIT_COLUMNS)].reset_index(drop=True)


def audit_summary(audit: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample std over training seeds of :func:`audit_table`'s counts, per (data set, method, layer):
    columns dataset, method, layer, n_seeds, n_biases_mean, n_biases_std, delta_n_biases_mean, mean_d_mean,
    delta_mean_d_mean, attribute_accuracy_mean, delta_attribute_accuracy_mean (layers in the table's order)."""
    grouped = audit.groupby(["dataset", "method", "layer"], sort=False)
    out = grouped.agg(
        n_seeds=("train_seed", "nunique"), n_biases_mean=("n_biases", "mean"), n_biases_std=("n_biases", "std"),
        delta_n_biases_mean=("delta_n_biases", "mean"), mean_d_mean=("mean_d", "mean"),
        delta_mean_d_mean=("delta_mean_d", "mean"), attribute_accuracy_mean=("attribute_accuracy", "mean"),
        delta_attribute_accuracy_mean=("delta_attribute_accuracy", "mean"),
    )  # fmt: skip
    return out.reset_index()


@dataclass(frozen=True)
class _Labels:
    family: str


def audit_from_results(
    result_paths: Sequence[str | os.PathLike[str]],
    probe_paths: Sequence[str | os.PathLike[str]],
    runs: Mapping[str, Mapping[str, Any]],
    catalogue: str | os.PathLike[str],
    *,
    threshold: float,
    baseline: str = "erm",
) -> pd.DataFrame:
    """:func:`audit_table` from the workflow's files: the debiased models' per-test result files (validated by
    :func:`sbssl.per_test_table.tests_table`), their probe files (:func:`sbssl.probes.layer_probes` JSON with
    ``model`` and ``layer``; none without probes), ``runs`` (model -> {"dataset", "method", "seed"}) and the test
    catalogue file (titles and groups)."""
    from sbssl.catalogue import load_catalogue
    from sbssl.per_test_table import tests_table
    from sbssl.probes import probe_table
    from sbssl.summary import summarize

    debias_runs = {model: DebiasRun(str(r["dataset"]), str(r["method"]), int(r["seed"])) for model, r in runs.items()}
    tests = tests_table(result_paths, {m: _Labels("supervised") for m in debias_runs}, load_catalogue(catalogue))
    leakage = None
    probes = {}
    for path in probe_paths:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
        if record.get("leakage"):
            probes[(record["model"], record["layer"])] = record
    if probes:
        attribute = next(iter(probes.values()))["attribute"]
        leakage = probe_table({key: r["leakage"] for key, r in probes.items()}, attribute)
    return audit_table(summarize(tests), debias_runs, threshold=threshold, baseline=baseline, leakage=leakage)
