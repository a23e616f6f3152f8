"""Per-test results -> per-model summaries, adjusted p-values and bias counts (the tables of the paper).

The per-test table (``results/tables/tests.csv``, or the SB-SSL authors' published rows) has one row per
(model, layer, test, seed). :func:`summarize` averages it over seeds the way the authors' numpy code did,
adds the model ``random`` (the mean over the random family's instances), and adjusts the p-values.
:func:`write_study_summary` is the one code path behind both ``sbssl summarize`` and the DAG.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sbssl.io import atomic_path, write_json_atomic
from sbssl.layers import LAYERS
from sbssl.stats import adjust_p_values

#: Name of the model that stands for the mean over the random family's instances (as in the paper).
RANDOM_MODEL = "random"
RANDOM_FAMILY = "random"
#: The bias-count thresholds the paper reports (p < 0.1, 0.05, 0.01).
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.1, 0.05, 0.01)
FORMATS = ("sbssl", "sbssl-published")

#: Columns of the per-test table (contract); the first nine are required, the others filled with NA.
TESTS_COLUMNS: tuple[str, ...] = (
    "model", "family", "layer", "test", "title", "group", "seed", "d", "p",
    "statistic", "exact", "n_permutations", "p_floor", "preprocessing", "n_x", "n_y", "n_a", "n_b",
)
_REQUIRED = TESTS_COLUMNS[:9]
_PUBLISHED_REQUIRED = ("run", "layer", "model", "test", "d", "p")

# Names in the SB-SSL result files (../shared/sbssl/README.md) -> ours.
PUBLISHED_LAYERS: dict[str, str] = {
    "layer_0": "maxpool", "layer_1": "layer1", "layer_2": "layer2",
    "layer_3": "layer3", "layer_4": "layer4", "avg_pool": "avgpool",
}
PUBLISHED_MODELS: dict[str, str] = {
    "simclr_vissl_200": "simclr", "random_torch_1": "random_1",
    "random_torch_2": "random_2", "random_torch_3": "random_3",
}
# Families of the published models as the SB-SSL README groups them; the file itself has no family column.
PUBLISHED_FAMILIES: dict[str, str] = {
    "rotation": "geometric", "relative_loc": "geometric", "jigsaw": "geometric",
    "cluster_fit": "clustering", "odc": "clustering", "swav": "clustering",
    "npid": "contrastive", "moco_v1": "contrastive", "moco_v2": "contrastive", "simclr": "contrastive",
    "byol": "contrastive", "simclr_openselfsup": "contrastive", "supervised": "supervised",
    "random_1": "random", "random_2": "random", "random_3": "random",
}


def _missing_columns_error(df: pd.DataFrame, required: Sequence[str], where: str) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(
            f"{where}: missing column(s) {', '.join(missing)}; found {', '.join(map(str, df.columns))}"
        )


def _catalogue_titles(catalogue: Any) -> dict[str, tuple[str, str]]:
    """title -> (id, group) from a catalogue file path or a sequence of AssociationTestSpec-like objects."""
    if isinstance(catalogue, (str, Path)):
        from sbssl.catalogue import load_catalogue

        catalogue = load_catalogue(catalogue)
    return {spec.title: (spec.id, spec.group) for spec in catalogue}


def read_tests_table(
    path: str | Path, fmt: str = "sbssl", catalogue: str | Path | Sequence[Any] | None = None
) -> pd.DataFrame:
    """Read a per-test table into the contract's columns (``TESTS_COLUMNS``), one row per (model, layer, test, seed).

    ``fmt="sbssl"``: our ``results/tables/tests.csv``. ``fmt="sbssl-published"``: the SB-SSL authors' rows
    (columns run, layer, model, test, d, p, ...): run -> seed, their layer and model names -> ours
    (``PUBLISHED_LAYERS``, ``PUBLISHED_MODELS``; others kept, e.g. simclr_openselfsup), family from
    ``PUBLISHED_FAMILIES``, and each test title -> catalogue id and group via ``catalogue`` (a tests.yaml path
    or AssociationTestSpec list; required for this format). The published file has no p-floor: it is NaN.
    For ``fmt="sbssl"`` a catalogue, when given, checks that every test id is in it.
    """
    path = Path(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown results format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise FileNotFoundError(f"results table not found: {path}")
    raw = pd.read_csv(path)
    if fmt == "sbssl":
        hint = " (published SB-SSL rows? use the sbssl-published format)" if "run" in raw.columns else ""
        _missing_columns_error(raw, _REQUIRED, f"{path}{hint}")
        table = raw.copy()
        if catalogue is not None:
            known = {ident for ident, _ in _catalogue_titles(catalogue).values()}
            unknown = sorted(set(table["test"]) - known)
            if unknown:
                raise ValueError(f"{path}: test id(s) not in the catalogue: {', '.join(unknown)}")
    else:
        _missing_columns_error(raw, _PUBLISHED_REQUIRED, str(path))
        unknown_layers = sorted(set(raw["layer"]) - set(PUBLISHED_LAYERS))
        if unknown_layers:
            raise ValueError(f"{path}: unknown layer name(s) {', '.join(unknown_layers)}; "
                             f"expected {', '.join(PUBLISHED_LAYERS)}")
        table = pd.DataFrame({
            "model": raw["model"].map(lambda m: PUBLISHED_MODELS.get(m, m)),
            "layer": raw["layer"].map(PUBLISHED_LAYERS),
            "title": raw["test"],
            "seed": raw["run"],
            "d": raw["d"],
            "p": raw["p"],
            "preprocessing": "sbssl-published",
        })
        if catalogue is None:
            raise ValueError(f"{path}: the published format names tests by title; pass the test catalogue "
                             "(config/tests.yaml) to map titles to ids")
        by_title = _catalogue_titles(catalogue)
        unknown = sorted(set(table["title"]) - set(by_title))
        if unknown:
            raise ValueError(f"{path}: test title(s) not in the catalogue: {', '.join(unknown)}")
        table["test"] = table["title"].map(lambda t: by_title[t][0])
        table["group"] = table["title"].map(lambda t: by_title[t][1])
        table["family"] = table["model"].map(lambda m: PUBLISHED_FAMILIES.get(m, "unknown"))
        # The published file records one size per target pair (n_t) and per attribute pair (n_a).
        for ours, theirs in (("n_x", "n_t"), ("n_y", "n_t"), ("n_a", "n_a"), ("n_b", "n_a")):
            if theirs in raw.columns:
                table[ours] = raw[theirs]
    for column in TESTS_COLUMNS:
        if column not in table.columns:
            table[column] = np.nan
    table = table[list(TESTS_COLUMNS) + [c for c in table.columns if c not in TESTS_COLUMNS]]
    bad = table["p"].isna() | (table["p"] < 0) | (table["p"] > 1) | table["d"].isna()
    if bad.any():
        row = table.index[bad][0]
        raise ValueError(f"{path}: row {row + 2}: p must be in [0, 1] and d a number "
                         f"(p={table.at[row, 'p']}, d={table.at[row, 'd']})")
    dupes = table.duplicated(["model", "layer", "test", "seed"])
    if dupes.any():
        row = table.loc[dupes].iloc[0]
        raise ValueError(f"{path}: duplicate rows for model={row.model} layer={row.layer} "
                         f"test={row.test} seed={row.seed}")
    return table.reset_index(drop=True)


def _mean_axis0(values: np.ndarray) -> np.ndarray:
    """Mean over axis 0 ignoring NaN, summing rows in order like ``numpy.mean(axis=0)`` does.

    Why not pandas: the paper's thresholds are "distinct p-values", which depend on the last bit of the
    averages; pandas' compensated summation differs there from the authors' numpy code.
    """
    present = ~np.isnan(values)
    total = np.where(present, values, 0.0).sum(axis=0)  # row by row: ((a0 + a1) + a2) ...
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / present.sum(axis=0)


def _spread(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # one seed: std is NaN, that is the answer
        return np.nanstd(values, axis=0, ddof=1), np.nanmin(values, axis=0), np.nanmax(values, axis=0)


def _wide(table: pd.DataFrame, index: list[str], column: str, value: str) -> tuple[pd.Index, np.ndarray]:
    """Pivot ``value`` to an array (n_columns, n_rows) with ``column`` sorted along axis 0."""
    wide = table.pivot(index=index, columns=column, values=value).sort_index(axis=1)
    return wide.index, wide.to_numpy(dtype=float).T


def _average_instances(random_rows: pd.DataFrame) -> pd.DataFrame:
    """Per seed, the mean over the random family's instances (instances in name order), as model ``random``."""
    index = ["layer", "test", "seed"]
    keys, p = _wide(random_rows, index, "model", "p")
    frame = keys.to_frame(index=False)
    frame["p"] = _mean_axis0(p)
    frame["d"] = _mean_axis0(_wide(random_rows, index, "model", "d")[1])
    frame["p_floor"] = _mean_axis0(_wide(random_rows, index, "model", "p_floor")[1])
    frame["n_instances"] = (~np.isnan(p)).sum(axis=0)
    frame["model"] = RANDOM_MODEL
    frame["family"] = RANDOM_FAMILY
    return frame


def _model_order(models: Sequence[str], zoo: Mapping[str, Any] | None) -> list[str]:
    """Zoo order (``random`` right after the last random instance), then models outside the zoo by name."""
    names = list(zoo) if zoo is not None else sorted(set(models) - {RANDOM_MODEL})
    order = [m for m in names if m in set(models)]
    if RANDOM_MODEL in set(models):
        randoms = [i for i, m in enumerate(order) if m.startswith(RANDOM_MODEL + "_")]
        order.insert(randoms[-1] + 1 if randoms else len(order), RANDOM_MODEL)
    return order + sorted(set(models) - set(order))


def summarize(tests: pd.DataFrame, zoo: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Average a per-test table over seeds; add the model ``random``; adjust the p-values.

    ``tests``: per-test table as :func:`read_tests_table` returns it. ``zoo``: ``{name: ModelSpec}``
    (only its order is used here: rows follow the zoo's model order).

    Returns one row per (model, layer, test), ordered by model (zoo order), layer (``LAYERS``), test
    (first appearance in ``tests``), with columns:

    - model, family, layer, test, title, group: as in ``tests``; model ``random`` (family random) is the
      mean over the random family's instances, which are kept as their own rows too.
    - d, p: means over seeds. Computed like the authors' numpy code (float64, values summed in seed order
      then divided; for ``random`` first per seed over the instances in name order), so the last bits and
      hence the paper's set of distinct p-values are reproduced exactly.
    - d_std, p_std (sample std over seeds, ddof=1; NaN for one seed), p_min, p_max: spread over seeds (for
      ``random``: of the per-seed instance means).
    - n_seeds: seeds averaged; n_instances: random instances averaged (1 for ordinary models).
    - p_floor: mean over seeds of each test's smallest attainable p (NaN when unknown, e.g. published rows).
    - p_holm_model_layer, p_bh_model_layer: Holm and Benjamini-Hochberg adjusted p within each (model, layer).
    - p_holm_study, p_bh_study: the same across every row of the summary (all models, ``random`` and its
      instances included, all layers) -- conservative, as it counts the aggregate and its parts.
    """
    _missing_columns_error(tests, _REQUIRED, "per-test table")
    if (tests["model"] == RANDOM_MODEL).any():
        raise ValueError(f"per-test table: model name {RANDOM_MODEL!r} is reserved for the mean of the "
                         "random family; rename that model")
    columns = ["model", "family", "layer", "test", "seed", "d", "p", "p_floor"]
    per_seed = tests.reindex(columns=columns).assign(n_instances=1)  # p_floor may be absent
    per_seed["p_floor"] = per_seed["p_floor"].astype(float)
    random_rows = per_seed[per_seed["family"] == RANDOM_FAMILY]
    if len(random_rows):
        per_seed = pd.concat([per_seed, _average_instances(random_rows)], ignore_index=True)

    index = ["model", "layer", "test"]
    keys, p = _wide(per_seed, index, "seed", "p")
    summary = keys.to_frame(index=False)
    d = _wide(per_seed, index, "seed", "d")[1]
    summary["d"] = _mean_axis0(d)
    summary["d_std"] = _spread(d)[0]
    summary["p"] = _mean_axis0(p)
    summary["p_std"], summary["p_min"], summary["p_max"] = _spread(p)
    summary["n_seeds"] = (~np.isnan(p)).sum(axis=0)
    summary["p_floor"] = _mean_axis0(_wide(per_seed, index, "seed", "p_floor")[1])
    firsts = per_seed.groupby(["model"], sort=False)[["family"]].first()
    summary["family"] = summary["model"].map(firsts["family"])
    summary["n_instances"] = summary["model"].map(per_seed.groupby("model")["n_instances"].max())
    titles = tests.drop_duplicates("test").set_index("test")
    summary["title"] = summary["test"].map(titles["title"])
    summary["group"] = summary["test"].map(titles["group"])

    model_rank = {m: i for i, m in enumerate(_model_order(summary["model"].unique(), zoo))}
    layer_rank = {layer: i for i, layer in enumerate(LAYERS)}
    test_rank = {t: i for i, t in enumerate(titles.index)}
    summary = summary.sort_values(
        ["model", "layer", "test"],
        key=lambda s: s.map({"model": model_rank, "layer": layer_rank, "test": test_rank}[s.name]).fillna(1e9),
    ).reset_index(drop=True)

    # statsmodels' Holm calls gc.collect() each time (~50 ms with pandas loaded, x 100+ groups); frozen
    # objects are skipped by the collector, and nothing here creates reference cycles.
    gc.freeze()
    try:
        for method in ("holm", "bh"):
            summary[f"p_{method}_model_layer"] = summary.groupby(["model", "layer"], sort=False)["p"].transform(
                lambda s, m=method: adjust_p_values(s.to_numpy(), m)
            )
            summary[f"p_{method}_study"] = adjust_p_values(summary["p"].to_numpy(), method)
    finally:
        gc.unfreeze()
    return summary[list(SUMMARY_COLUMNS)]


SUMMARY_COLUMNS: tuple[str, ...] = (
    "model", "family", "layer", "test", "title", "group", "d", "d_std", "p", "p_std", "p_min", "p_max",
    "n_seeds", "n_instances", "p_floor", "p_holm_model_layer", "p_bh_model_layer", "p_holm_study",
    "p_bh_study",
)


def read_summary(path: str | Path) -> pd.DataFrame:
    """Read a ``summary.csv`` written from :func:`summarize`.

    pandas writes floats as shortest round-trip reprs and (since 3.0) parses them exactly, so the p-values
    come back bit for bit, as the meta-test's distinct-p thresholds need (tests/test_results.py checks it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"summary table not found: {path}")
    summary = pd.read_csv(path)
    _missing_columns_error(summary, SUMMARY_COLUMNS, str(path))
    return summary


def figure_models(summary: pd.DataFrame, zoo: Mapping[str, Any] | None = None) -> list[str]:
    """The models of the paper's figures and meta-test thresholds, in summary order.

    Every model of the summary except the individual random instances when their mean ``random`` is
    present, and (when ``zoo`` is given) except models outside the zoo (e.g. simclr_openselfsup).
    """
    models = list(dict.fromkeys(summary["model"]))
    family = summary.drop_duplicates("model").set_index("model")["family"]
    keep = []
    for model in models:
        if model == RANDOM_MODEL:
            keep.append(model)
        elif RANDOM_MODEL in models and family[model] == RANDOM_FAMILY:
            continue
        elif zoo is None or model in zoo:
            keep.append(model)
    return keep


def bias_counts(summary: pd.DataFrame, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> pd.DataFrame:
    """Number of tests with (seed-averaged) p < threshold, per model, layer and threshold.

    Columns: model, layer, threshold, n_biases; rows in summary order, thresholds in the given order.
    """
    rows = []
    for (model, layer), group in summary.groupby(["model", "layer"], sort=False):
        p = group["p"].to_numpy()
        rows += [(model, layer, float(t), int((p < t).sum())) for t in thresholds]
    return pd.DataFrame(rows, columns=["model", "layer", "threshold", "n_biases"])


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def write_study_summary(
    tests: pd.DataFrame,
    zoo: Mapping[str, Any],
    out_dir: str | Path,
    *,
    heatmap_layer: str = "avgpool",
) -> dict[str, Path]:
    """Summary, counts, meta-test and figures of a study into ``out_dir``; the path of each output by name.

    Writes ``summary.csv`` (:func:`summarize`), ``counts.csv`` (:func:`bias_counts` at 0.1, 0.05, 0.01),
    ``meta_test.json`` (:func:`sbssl.meta.meta_test_report`) and, under ``figures/``, each figure of
    :func:`sbssl.figures.write_figures` as PNG and PDF with its caption as ``.rst`` (for Snakemake's report).
    """
    from sbssl.figures import write_figures
    from sbssl.meta import meta_test_report

    out = Path(out_dir)
    summary = summarize(tests, zoo)
    paths = {"summary": out / "summary.csv", "counts": out / "counts.csv", "meta_test": out / "meta_test.json"}
    _write_csv(summary, paths["summary"])
    _write_csv(bias_counts(summary), paths["counts"])
    write_json_atomic(paths["meta_test"], meta_test_report(summary, zoo))
    for name, files in write_figures(summary, zoo, out / "figures", heatmap_layer=heatmap_layer).items():
        paths[f"{name}_png"], paths[f"{name}_pdf"], paths[f"{name}_caption"] = files.png, files.pdf, files.caption_path
    return paths
