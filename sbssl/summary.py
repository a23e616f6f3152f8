"""Per-test results -> seed-averaged summary, adjusted p-values and bias counts (the tables of the paper).

The per-test table (``results/tables/tests.csv``, columns :data:`sbssl.runner.TESTS_TABLE_COLUMNS`, or
the SB-SSL authors' rows through :mod:`sbssl.published`) has one row per (model, layer, test, seed).
:func:`summarize` averages it over seeds the way the authors' numpy code did, adds the model ``random``
(the mean over the random family's instances), carries each test's flags and marks the rows that leave
the analysis (``excluded``), and adjusts the p-values. :func:`bias_counts` counts biases.

Leaf module of the results side: :mod:`sbssl.meta`, :mod:`sbssl.figures` and :mod:`sbssl.study` build on it,
it imports none of them.

A "bias" at threshold t is a test with seed-averaged p < t for the table's ``alternative``: "greater"
(X closer to A than Y is, the iEAT upper tail, the paper's), "less" (the reverse) or "two-sided" (either).
Counts, the meta-test and figures need one alternative per study (:func:`study_alternative`).
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sbssl.layers import LAYERS
from sbssl.stats import ALTERNATIVES, adjust_p_values

#: Name of the model that stands for the mean over the random family's instances (as in the paper).
RANDOM_MODEL = "random"
RANDOM_FAMILY = "random"
#: The bias-count thresholds the paper reports (p < 0.1, 0.05, 0.01).
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.1, 0.05, 0.01)

#: Columns of the per-test table that :func:`summarize` needs.
REQUIRED_COLUMNS: tuple[str, ...] = (
    "model", "family", "layer", "test", "title", "group", "seed", "d", "p", "alternative",
)  # fmt: skip
#: Columns it uses when present (NaN / no flags otherwise).
OPTIONAL_COLUMNS: tuple[str, ...] = ("p_floor", "d_ci_low", "d_ci_high", "flags")

#: Flags that take a test out of counts, the meta-test and figures, with the reason recorded in ``excluded``.
EXCLUDING_FLAGS: dict[str, str] = {
    "degenerate": "degenerate: every s(w) equal within rounding, d undefined",
}
#: Flags that keep the test in but are reported (summary ``flags``, captions, meta_test.json).
OVERLAP_FLAG = "target_attribute_overlap"

#: What "bias at threshold t" means for each alternative (captions, meta_test.json, counts).
ALTERNATIVE_MEANING: dict[str, str] = {
    "greater": "p < t for the tested direction, X associated with A and Y with B (one-sided)",
    "less": "p < t for the reverse direction, X associated with B and Y with A (one-sided)",
    "two-sided": "p < t in either direction (two-sided)",
}

SUMMARY_COLUMNS: tuple[str, ...] = (
    "model", "family", "layer", "test", "title", "group", "alternative", "d", "d_std", "d_ci_low", "d_ci_high",
    "p", "p_std", "p_min", "p_max", "n_seeds", "n_instances", "p_floor", "p_holm_model_layer", "p_bh_model_layer",
    "p_holm_study", "p_bh_study", "flags", "excluded",
)  # fmt: skip
COUNTS_COLUMNS: tuple[str, ...] = ("model", "layer", "alternative", "threshold", "n_biases", "n_tests", "n_excluded")


def _missing_columns_error(columns: Sequence[str], required: Sequence[str], where: str, remedy: str) -> None:
    missing = [c for c in required if c not in columns]
    if missing:
        raise ValueError(
            f"{where}: missing column(s) {', '.join(missing)}; found {', '.join(map(str, columns))}. {remedy}"
        )


def flag_set(value: Any) -> frozenset[str]:
    """The flags of a ``;``-joined flags cell ("" or NaN: none)."""
    if not isinstance(value, str):
        return frozenset()
    return frozenset(f for f in value.split(";") if f)


def _join_flags(flags: frozenset[str] | set[str]) -> str:
    return ";".join(sorted(flags))


def exclusion_reason(flags: Any) -> str:
    """The recorded reason a row with these flags leaves the analysis ("" when it stays)."""
    present = flag_set(flags)
    return "; ".join(reason for flag, reason in EXCLUDING_FLAGS.items() if flag in present)


def catalogue_titles(catalogue: Any) -> dict[str, tuple[str, str]]:
    """title -> (id, group) from a catalogue file path or a sequence of AssociationTestSpec-like objects."""
    if isinstance(catalogue, (str, Path)):
        from sbssl.catalogue import load_catalogue

        catalogue = load_catalogue(catalogue)
    return {spec.title: (spec.id, spec.group) for spec in catalogue}


def _first_bad_row(table: pd.DataFrame, bad: pd.Series) -> int:
    """Line number in a CSV file (header = line 1) of the first bad row, for positional indexes."""
    return int(np.flatnonzero(bad.to_numpy())[0]) + 2


def check_tests_table(table: pd.DataFrame, where: str) -> None:
    """Validate a per-test table; errors name ``where`` (the file), the line and the remedy.

    Checks: required columns, alternative in greater | less | two-sided, one alternative per (model,
    layer, test), p a number in [0, 1] and d a number (both may be NaN only where ``flags`` holds an
    excluding flag such as ``degenerate``), one row per (model, layer, test, seed), and no model named
    ``random`` (reserved for the mean over the random family).
    """
    _missing_columns_error(
        list(table.columns), REQUIRED_COLUMNS, where,
        "Rebuild it with this version of sbssl (the workflow's tests_table rule)"
        + (" or, for the SB-SSL authors' rows, use the sbssl-published format" if "run" in table.columns else ""),
    )  # fmt: skip
    if (table["model"] == RANDOM_MODEL).any():
        raise ValueError(f"{where}: model name {RANDOM_MODEL!r} is reserved for the mean of the random family; "
                         "rename that model in the zoo")
    bad_alt = ~table["alternative"].isin(ALTERNATIVES)
    if bad_alt.any():
        line = _first_bad_row(table, bad_alt)
        raise ValueError(f"{where}: line {line}: alternative {table['alternative'].iloc[line - 2]!r} is not one of "
                         f"{', '.join(ALTERNATIVES)}")
    mixed = table.groupby(["model", "layer", "test"], sort=False)["alternative"].nunique() > 1
    if mixed.any():
        model, layer, test = mixed[mixed].index[0]
        raise ValueError(f"{where}: model={model} layer={layer} test={test} has seeds run with different "
                         "alternatives; rerun them with one")
    flags = table["flags"] if "flags" in table else pd.Series("", index=table.index)
    excluded = flags.map(exclusion_reason).astype(bool)
    p = pd.to_numeric(table["p"], errors="coerce")
    d = pd.to_numeric(table["d"], errors="coerce")
    bad = ((p.isna() | d.isna()) & ~excluded) | (p < 0) | (p > 1)
    if bad.any():
        line = _first_bad_row(table, bad)
        raise ValueError(
            f"{where}: line {line}: p must be a number in [0, 1] and d a number (p={table['p'].iloc[line - 2]}, "
            f"d={table['d'].iloc[line - 2]}); only rows flagged degenerate may lack them. Rerun that test"
        )
    dupes = table.duplicated(["model", "layer", "test", "seed"])
    if dupes.any():
        row = table.loc[dupes].iloc[0]
        raise ValueError(f"{where}: line {_first_bad_row(table, dupes)}: duplicate rows for model={row.model} "
                         f"layer={row.layer} test={row.test} seed={row.seed}; keep one row per seed")


def read_tests_table(path: str | Path, catalogue: str | Path | Sequence[Any] | None = None) -> pd.DataFrame:
    """Read our per-test table (``results/tables/tests.csv``), validated by :func:`check_tests_table`.

    Optional columns absent from an older file are added as NaN. With ``catalogue`` (tests.yaml path or
    AssociationTestSpec list), every test id must be in it. The SB-SSL authors' rows are read by
    :func:`sbssl.published.read_published`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"per-test table not found: {path}")
    table = pd.read_csv(path)
    check_tests_table(table, str(path))
    for column in OPTIONAL_COLUMNS:
        if column not in table.columns:
            table[column] = np.nan
    if catalogue is not None:
        known = {ident for ident, _ in catalogue_titles(catalogue).values()}
        unknown = sorted(set(table["test"]) - known)
        if unknown:
            raise ValueError(f"{path}: test id(s) not in the catalogue: {', '.join(unknown)}; "
                             "use the catalogue the tests were run with")
    return table


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
        warnings.simplefilter("ignore", RuntimeWarning)  # one seed (or all NaN): NaN is the answer
        return np.nanstd(values, axis=0, ddof=1), np.nanmin(values, axis=0), np.nanmax(values, axis=0)


def _wide(table: pd.DataFrame, index: list[str], column: str, value: str) -> tuple[pd.Index, np.ndarray]:
    """Pivot ``value`` to an array (n_columns, n_rows) with ``column`` sorted along axis 0."""
    wide = table.pivot(index=index, columns=column, values=value).sort_index(axis=1)
    return wide.index, wide.to_numpy(dtype=float).T


def _union_flags(table: pd.DataFrame, index: list[str]) -> pd.Series:
    return table.groupby(index, sort=False)["flags"].agg(
        lambda cells: _join_flags(frozenset().union(*map(flag_set, cells)))
    )


_AVERAGED = ("p", "d", "p_floor", "d_ci_low", "d_ci_high")


def averaged_random_instances(table: pd.DataFrame) -> list[str]:
    """The random-family models that the model ``random`` averages, sorted: those that share the most
    common set of layers among the random instances (the paper's three random ResNet-50s). A random model of
    another architecture (e.g. a random ViT beside them) has other layers: it stays a model of its own in
    the tables and figures instead of being mixed into the mean. Ties: the layer set of the first instance
    in name order. ``table``: a per-test table or a summary (columns model, family, layer)."""
    rows = table[(table["family"] == RANDOM_FAMILY) & (table["model"] != RANDOM_MODEL)]
    layer_sets = {model: frozenset(layers) for model, layers in rows.groupby("model", sort=True)["layer"]}
    if not layer_sets:
        return []
    sizes: dict[frozenset[str], int] = {}
    for layers in layer_sets.values():
        sizes[layers] = sizes.get(layers, 0) + 1
    common = max(sizes, key=lambda layers: (sizes[layers], -list(layer_sets.values()).index(layers)))
    return [model for model, layers in layer_sets.items() if layers == common]


def _average_instances(random_rows: pd.DataFrame) -> pd.DataFrame:
    """Per seed, the mean over the averaged random instances (:func:`averaged_random_instances`, in name order), as model ``random``.

    Flags are the union over the instances: one degenerate instance excludes the mean too.
    """
    index = ["layer", "test", "seed"]
    keys, p = _wide(random_rows, index, "model", "p")
    frame = keys.to_frame(index=False)
    for value in _AVERAGED:
        frame[value] = _mean_axis0(_wide(random_rows, index, "model", value)[1])
    frame["n_instances"] = (~np.isnan(p)).sum(axis=0)
    frame = frame.merge(_union_flags(random_rows, index).rename("flags").reset_index(), on=index)
    alternatives = random_rows.groupby(["layer", "test"])["alternative"].agg(set)
    if (alternatives.map(len) > 1).any():
        layer, test = alternatives[alternatives.map(len) > 1].index[0]
        raise ValueError(f"per-test table: the random instances of layer={layer} test={test} were run with "
                         "different alternatives; rerun them with one")
    frame["alternative"] = [next(iter(alternatives[(layer, test)])) for layer, test in zip(frame["layer"], frame["test"])]
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
    """Average a per-test table over seeds; add the model ``random``; mark excluded rows; adjust the p-values.

    ``tests``: per-test table (:func:`read_tests_table`, :func:`sbssl.published.read_published`), checked
    with :func:`check_tests_table`. ``zoo``: ``{name: ModelSpec-like}`` (only its order is used here: rows
    follow the zoo's model order).

    Returns one row per (model, layer, test), ordered by model (zoo order), layer (``LAYERS``), test
    (first appearance in ``tests``), with the columns :data:`SUMMARY_COLUMNS`:

    - model, family, layer, test, title, group, alternative: as in ``tests``; model ``random`` (family
      random) is the mean over the random instances of one architecture (:func:`averaged_random_instances`), which are kept as their own rows too.
    - d, p: means over seeds. Computed like the authors' numpy code (float64, values summed in seed order
      then divided; for ``random`` first per seed over the instances in name order), so the last bits and
      hence the paper's set of distinct p-values are reproduced exactly.
    - d_std, p_std (sample std over seeds, ddof=1; NaN for one seed), p_min, p_max: spread over seeds (for
      ``random``: of the per-seed instance means).
    - d_ci_low, d_ci_high: mean over seeds of each seed's bootstrap confidence bounds of d (averaged like
      d). A summary of the per-seed intervals, not an interval for the seed-averaged d itself; since d is
      the same for every seed, it is close to each seed's own interval. NaN when the table has none.
    - n_seeds: seeds averaged; n_instances: random instances averaged (1 for ordinary models).
    - p_floor: mean over seeds of each test's smallest attainable p (NaN when unknown, e.g. published rows).
    - flags: union over seeds (and instances) of the per-test flags, ``;``-joined ("" when none).
    - excluded: why the row leaves counts, meta-test and figures (:data:`EXCLUDING_FLAGS`, e.g. a
      degenerate test whose d is undefined), "" for rows that stay. Rows flagged
      ``target_attribute_overlap`` stay in and are reported.
    - p_holm_model_layer, p_bh_model_layer: Holm and Benjamini-Hochberg adjusted p within each (model, layer).
    - p_holm_study, p_bh_study: the same across every row of the summary (all models, ``random`` and its
      instances included, all layers) -- conservative, as it counts the aggregate and its parts.
      Excluded rows take no part in any adjustment (their adjusted p is NaN).
    """
    check_tests_table(tests.reset_index(drop=True), "per-test table")
    columns = ["model", "family", "layer", "test", "seed", "alternative", "flags", *_AVERAGED]
    per_seed = tests.reindex(columns=columns).assign(n_instances=1)
    for value in _AVERAGED:
        per_seed[value] = pd.to_numeric(per_seed[value], errors="coerce").astype(float)
    random_rows = per_seed[per_seed["model"].isin(averaged_random_instances(per_seed))]
    if len(random_rows):
        per_seed = pd.concat([per_seed, _average_instances(random_rows)], ignore_index=True)

    index = ["model", "layer", "test"]
    keys, p = _wide(per_seed, index, "seed", "p")
    summary = keys.to_frame(index=False)
    d = _wide(per_seed, index, "seed", "d")[1]
    summary["d"] = _mean_axis0(d)
    summary["d_std"] = _spread(d)[0]
    for bound in ("d_ci_low", "d_ci_high"):
        summary[bound] = _mean_axis0(_wide(per_seed, index, "seed", bound)[1])
    summary["p"] = _mean_axis0(p)
    summary["p_std"], summary["p_min"], summary["p_max"] = _spread(p)
    summary["n_seeds"] = (~np.isnan(p) | ~np.isnan(d)).sum(axis=0)
    summary["p_floor"] = _mean_axis0(_wide(per_seed, index, "seed", "p_floor")[1])
    firsts = per_seed.groupby(["model"], sort=False)[["family"]].first()
    summary["family"] = summary["model"].map(firsts["family"])
    summary["n_instances"] = summary["model"].map(per_seed.groupby("model")["n_instances"].max())
    titles = tests.drop_duplicates("test").set_index("test")
    summary["title"] = summary["test"].map(titles["title"])
    summary["group"] = summary["test"].map(titles["group"])
    by_key = summary.set_index(index).index
    summary["alternative"] = by_key.map(per_seed.groupby(index)["alternative"].first())
    summary["flags"] = by_key.map(_union_flags(per_seed, index))
    summary["excluded"] = summary["flags"].map(exclusion_reason)

    model_rank = {m: i for i, m in enumerate(_model_order(summary["model"].unique(), zoo))}
    layer_rank = {layer: i for i, layer in enumerate(LAYERS)}
    test_rank = {t: i for i, t in enumerate(titles.index)}
    summary = summary.sort_values(
        ["model", "layer", "test"],
        key=lambda s: s.map({"model": model_rank, "layer": layer_rank, "test": test_rank}[s.name]).fillna(1e9),
    ).reset_index(drop=True)

    kept = summary["excluded"] == ""
    # statsmodels' Holm calls gc.collect() each time (~50 ms with pandas loaded, x 100+ groups); frozen
    # objects are skipped by the collector, and nothing here creates reference cycles.
    gc.freeze()
    try:
        for method in ("holm", "bh"):
            summary[f"p_{method}_model_layer"] = summary["p"].where(kept).groupby(
                [summary["model"], summary["layer"]], sort=False
            ).transform(lambda s, m=method: _adjust(s, m))
            summary[f"p_{method}_study"] = _adjust(summary["p"].where(kept), method)
    finally:
        gc.unfreeze()
    return summary[list(SUMMARY_COLUMNS)]


def _adjust(p: pd.Series, method: str) -> pd.Series:
    """Adjusted p over the non-NaN entries of ``p`` (NaN: not part of the family)."""
    out = pd.Series(np.nan, index=p.index)
    present = p.notna()
    out[present] = adjust_p_values(p[present].to_numpy(), method)
    return out


def read_summary(path: str | Path) -> pd.DataFrame:
    """Read a ``summary.csv`` written from :func:`summarize`, validated; errors name the file and the remedy.

    pandas writes floats as shortest round-trip reprs and parses them exactly, so the p-values come back
    bit for bit, as the meta-test's distinct-p thresholds need (tests/test_summary.py checks it).
    Checks: every column of :data:`SUMMARY_COLUMNS`, p in [0, 1] for rows not excluded, alternatives
    known, one row per (model, layer, test). Empty flags / excluded cells read back as "".
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"summary table not found: {path}")
    summary = pd.read_csv(path, dtype={"flags": str, "excluded": str})
    _missing_columns_error(list(summary.columns), SUMMARY_COLUMNS, str(path),
                           "It was written by another version of sbssl: rerun the summary (sbssl summarize "
                           "or the workflow's summarize rule)")
    for column in ("flags", "excluded"):
        summary[column] = summary[column].fillna("")
    bad_alt = ~summary["alternative"].isin(ALTERNATIVES)
    if bad_alt.any():
        raise ValueError(f"{path}: line {_first_bad_row(summary, bad_alt)}: alternative "
                         f"{summary.loc[bad_alt, 'alternative'].iloc[0]!r} is not one of {', '.join(ALTERNATIVES)}")
    kept = summary["excluded"] == ""
    bad = kept & ~summary["p"].between(0, 1)
    if bad.any():
        raise ValueError(f"{path}: line {_first_bad_row(summary, bad)}: p={summary.loc[bad, 'p'].iloc[0]} is not "
                         "in [0, 1]; the file was edited or damaged: rerun the summary")
    dupes = summary.duplicated(["model", "layer", "test"])
    if dupes.any():
        row = summary.loc[dupes].iloc[0]
        raise ValueError(f"{path}: line {_first_bad_row(summary, dupes)}: duplicate rows for model={row.model} "
                         f"layer={row.layer} test={row.test}; rerun the summary")
    return summary


def study_alternative(summary: pd.DataFrame) -> str:
    """The one alternative of a summary's rows; ValueError naming the mix when there are several.

    Counts, the meta-test and figures compare p-values across tests and models, which only means
    something when every p tests the same direction.
    """
    found = summary["alternative"].value_counts().sort_index()
    if len(found) != 1:
        mix = ", ".join(f"{alt}: {n} rows" for alt, n in found.items()) or "no rows"
        raise ValueError(
            f"summary mixes alternatives ({mix}); counts, the meta-test and the figures need every p-value "
            "to test the same direction: rerun the tests with one `alternative` or summarise each separately"
        )
    return str(found.index[0])


def included(summary: pd.DataFrame) -> pd.DataFrame:
    """The rows that take part in counts, the meta-test and figures (``excluded`` empty)."""
    return summary[summary["excluded"] == ""]


def exclusion_counts(summary: pd.DataFrame) -> dict[str, int]:
    """``{"n_excluded": rows left out, "n_flagged_overlap": rows kept but flagged target_attribute_overlap}``."""
    overlap = np.array([OVERLAP_FLAG in flag_set(f) for f in summary["flags"]], dtype=bool)
    kept = (summary["excluded"] == "").to_numpy(dtype=bool)
    return {"n_excluded": int((~kept).sum()), "n_flagged_overlap": int((overlap & kept).sum())}


def figure_models(summary: pd.DataFrame, zoo: Mapping[str, Any] | None = None) -> list[str]:
    """The models of the paper's figures and meta-test thresholds, in summary order.

    Every model of the summary except the random instances averaged into ``random``
    (:func:`averaged_random_instances`) when that mean is present, and (when ``zoo`` is given) except
    models outside the zoo (e.g. simclr_openselfsup).
    """
    models = list(dict.fromkeys(summary["model"]))
    averaged = set(averaged_random_instances(summary)) if RANDOM_MODEL in models else set()
    keep = []
    for model in models:
        if model == RANDOM_MODEL:
            keep.append(model)
        elif model in averaged:
            continue
        elif zoo is None or model in zoo:
            keep.append(model)
    return keep


def bias_counts(summary: pd.DataFrame, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> pd.DataFrame:
    """Number of tests with seed-averaged p < threshold (for the study's alternative), per model, layer, threshold.

    Columns :data:`COUNTS_COLUMNS`: model, layer, alternative, threshold, n_biases, n_tests (tests
    counted, excluded ones left out), n_excluded; rows in summary order, thresholds in the given order.
    A summary mixing alternatives is refused (:func:`study_alternative`).
    """
    alternative = study_alternative(summary)
    rows = []
    for (model, layer), group in summary.groupby(["model", "layer"], sort=False):
        kept = group["excluded"] == ""
        p = group.loc[kept, "p"].to_numpy()
        rows += [(model, layer, alternative, float(t), int((p < t).sum()), int(kept.sum()), int((~kept).sum()))
                 for t in thresholds]
    return pd.DataFrame(rows, columns=list(COUNTS_COLUMNS))
