"""Do contrastive models show more biases than non-contrastive ones? The paper's meta-test and an area test.

:func:`meta_test` is the procedure of Sirotkin et al. (CVPR 2022, section 4.1): sweep thresholds p_t over
the distinct seed-averaged p-values below ``max_p`` at one layer, count each model's tests with p < p_t,
run an exact permutation test of the group difference in mean count at each threshold, and average the
p-values. The average of dependent p-values over data-chosen thresholds is a descriptive score, not a
p-value with a known error rate, and the threshold set depends on floating-point ties (``mode``).

:func:`area_meta_test` is a test fixed in advance instead: one exact permutation test over the same
splits on each model's area under its count curve over log10 thresholds in a fixed range.

Both work on a :func:`sbssl.summary.summarize` table: a bias is a test with p < p_t for the summary's one
``alternative`` (a table mixing alternatives is refused), and rows marked ``excluded`` (e.g. degenerate
tests) take no part; the results say how many were left out.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from sbssl.models import META_GROUPS
from sbssl.summary import ALTERNATIVE_MEANING, exclusion_counts, figure_models, included, study_alternative

MODES = ("paper", "robust")
#: Decimals p is rounded to in ``mode="robust"``: far below any permutation p-value's resolution.
ROBUST_DECIMALS = 12


class MetaTestNotApplicable(ValueError):
    """The study lacks what the meta-test needs (a model in each group, or any p below ``max_p``)."""


def meta_groups(zoo: Mapping[str, Any]) -> dict[str, str | None]:
    """``{model: meta_group}`` from a zoo (``{name: ModelSpec}``) or a ready ``{model: group-or-None}`` dict."""
    groups = {name: spec if spec is None or isinstance(spec, str) else spec.meta_group for name, spec in zoo.items()}
    bad = {name: g for name, g in groups.items() if g is not None and g not in META_GROUPS}
    if bad:
        raise ValueError(f"meta_group must be one of {', '.join(META_GROUPS)} or absent; got {bad}")
    return groups


def _split_p_values(scores: np.ndarray, in_first: np.ndarray, tolerance: float = 0.0) -> tuple[np.ndarray, int]:
    """Exact permutation p of "mean score of group 1 - mean score of group 2" over all splits.

    scores: (n_statistics, n_models); in_first: (n_models,) bool, the observed group 1. Every split of the
    models into groups of the observed sizes is enumerated (C(10, 5) = 252 for 5 vs 5); p is the share
    of splits whose difference is >= the observed one (the observed split included). Differences are
    compared as n2 * sum1 - n1 * sum2, exact for integer scores; ``tolerance`` absorbs rounding otherwise.
    """
    n_models, n_first = in_first.size, int(in_first.sum())
    combos = list(itertools.combinations(range(n_models), n_first))
    splits = np.zeros((len(combos), n_models), dtype=bool)
    for row, combo in enumerate(combos):
        splits[row, list(combo)] = True
    first = scores @ splits.T  # (n_statistics, n_splits)
    total = scores.sum(axis=1, keepdims=True)
    stat = (n_models - n_first) * first - n_first * (total - first)
    observed = stat[:, [int(np.flatnonzero((splits == in_first).all(axis=1))[0])]]
    return (stat >= observed - tolerance).mean(axis=1), len(combos)


def _layer_table(summary: pd.DataFrame, zoo: Mapping[str, Any], layer: str) -> tuple[pd.DataFrame, list[str], list[str]]:
    """Rows at ``layer`` that take part (not ``excluded``) and the zoo's contrastive / non-contrastive
    models that have results there.

    A study that ran only some of the zoo's models is tested on those (the result lists them). A summary
    mixing alternatives is refused (:func:`sbssl.summary.study_alternative`).
    """
    study_alternative(summary)
    groups = meta_groups(zoo)
    at_layer = included(summary[summary["layer"] == layer])
    present = set(at_layer["model"])
    contrastive = [m for m, g in groups.items() if g == "contrastive" and m in present]
    non_contrastive = [m for m, g in groups.items() if g == "non_contrastive" and m in present]
    if not contrastive or not non_contrastive:
        raise MetaTestNotApplicable(
            f"meta-test needs results at layer {layer!r} for models of both meta groups (contrastive and "
            f"non_contrastive in the zoo); found contrastive {contrastive}, non_contrastive {non_contrastive}"
        )
    return at_layer, contrastive, non_contrastive


def _count_matrix(at_layer: pd.DataFrame, models: list[str], thresholds: np.ndarray, p: pd.Series) -> np.ndarray:
    """(n_thresholds, n_models) number of tests with p < threshold."""
    counts = np.empty((thresholds.size, len(models)), dtype=np.int64)
    for j, model in enumerate(models):
        counts[:, j] = np.searchsorted(np.sort(p[at_layer["model"] == model].to_numpy()), thresholds, side="left")
    return counts


@dataclass(frozen=True)
class MetaTestResult:
    """The paper's threshold-sweep meta-test.

    p_value: mean of ``threshold_p_values``. thresholds: the sorted distinct p < max_p at ``layer`` over
    ``threshold_models``; threshold_p_values: exact permutation p at each; observed_differences: contrastive
    mean count - non-contrastive mean count at each. n_splits: splits enumerated (252 for 5 vs 5).
    mode: "paper" (p as averaged, distinct in float64: reproduces the paper) or "robust" (p rounded to
    ``ROBUST_DECIMALS`` first, so values equal but for the last bits form one threshold).
    alternative: the direction every p tests (a "bias" is p < p_t in it). n_excluded: rows at ``layer`` of
    the threshold and group models left out (``excluded`` in the summary, e.g. degenerate tests);
    n_flagged_overlap: rows kept although flagged target_attribute_overlap.
    """

    p_value: float
    n_thresholds: int
    thresholds: tuple[float, ...]
    threshold_p_values: tuple[float, ...]
    observed_differences: tuple[float, ...]
    contrastive: tuple[str, ...]
    non_contrastive: tuple[str, ...]
    threshold_models: tuple[str, ...]
    n_splits: int
    mode: str
    layer: str
    max_p: float
    alternative: str
    n_excluded: int
    n_flagged_overlap: int

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def meta_test(
    summary: pd.DataFrame,
    zoo: Mapping[str, Any],
    *,
    layer: str = "avgpool",
    max_p: float = 0.1,
    mode: str = "paper",
) -> MetaTestResult:
    """The paper's contrastive vs non-contrastive meta-test (section 4.1) on a :func:`summarize` table.

    zoo: ``{name: ModelSpec}`` or ``{name: "contrastive" | "non_contrastive" | None}``; the groups are the
    models whose meta_group is set. Thresholds come from the models of the paper's figures
    (:func:`sbssl.summary.figure_models`: every zoo model at ``layer`` and the mean ``random``, not the
    single random instances nor models outside the zoo). See :class:`MetaTestResult` for ``mode``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    at_layer, contrastive, non_contrastive = _layer_table(summary, zoo, layer)
    p = at_layer["p"].round(ROBUST_DECIMALS) if mode == "robust" else at_layer["p"]
    threshold_models = [m for m in figure_models(summary, zoo) if m in set(at_layer["model"])]
    used = summary[(summary["layer"] == layer) & summary["model"].isin({*threshold_models, *contrastive,
                                                                        *non_contrastive})]
    pool = p[at_layer["model"].isin(threshold_models)].to_numpy()
    thresholds = np.unique(pool[pool < max_p])
    if thresholds.size == 0:
        raise MetaTestNotApplicable(f"meta-test: no p-value below {max_p} at layer {layer!r}")
    models = contrastive + non_contrastive
    counts = _count_matrix(at_layer, models, thresholds, p)
    in_first = np.array([m in contrastive for m in models])
    p_values, n_splits = _split_p_values(counts, in_first)
    differences = counts[:, in_first].mean(axis=1) - counts[:, ~in_first].mean(axis=1)
    return MetaTestResult(
        p_value=float(np.mean(p_values)),
        n_thresholds=int(thresholds.size),
        thresholds=tuple(map(float, thresholds)),
        threshold_p_values=tuple(map(float, p_values)),
        observed_differences=tuple(map(float, differences)),
        contrastive=tuple(contrastive),
        non_contrastive=tuple(non_contrastive),
        threshold_models=tuple(threshold_models),
        n_splits=n_splits,
        mode=mode,
        layer=layer,
        max_p=max_p,
        alternative=study_alternative(summary),
        **exclusion_counts(used),
    )


@dataclass(frozen=True)
class AreaTestResult:
    """One exact permutation test on each model's area under its bias-count curve.

    areas: ``{model: area}`` with area = integral of count(p < t) d(log10 t) for t in ``p_range``
    (= sum over tests of log10(p_hi / max(p, p_lo)) for p < p_hi), in decades x tests.
    observed_difference: contrastive mean area - non-contrastive mean area; p_value: share of the
    n_splits splits with a difference >= observed.
    """

    p_value: float
    observed_difference: float
    areas: dict[str, float]
    contrastive: tuple[str, ...]
    non_contrastive: tuple[str, ...]
    n_splits: int
    p_range: tuple[float, float]
    layer: str

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def area_meta_test(
    summary: pd.DataFrame,
    zoo: Mapping[str, Any],
    *,
    layer: str = "avgpool",
    p_range: tuple[float, float] = (1e-4, 0.1),
) -> AreaTestResult:
    """Alternative to :func:`meta_test`, fixed before looking at the data: one exact permutation test.

    Why: the paper averages 100+ strongly dependent p-values over thresholds chosen from the data; the
    average has no known null distribution (it is not a p-value) and it moves with floating-point ties.
    Summarising each model's whole count curve over the fixed range of Figure 3 (log-spaced, as the
    figure is drawn) by its area gives one statistic per model, whose exact permutation distribution over
    the same splits yields a p-value valid under exchangeability of the models. Its smallest possible
    value is 1/n_splits (1/252).
    """
    p_lo, p_hi = p_range
    if not 0 < p_lo < p_hi <= 1:
        raise ValueError(f"p_range must satisfy 0 < low < high <= 1, got {p_range}")
    at_layer, contrastive, non_contrastive = _layer_table(summary, zoo, layer)
    models = contrastive + non_contrastive
    areas = np.array([
        np.clip(np.log10(p_hi) - np.log10(np.maximum(at_layer.loc[at_layer["model"] == m, "p"].to_numpy(), p_lo)),
                0.0, None).sum()
        for m in models
    ])
    in_first = np.array([m in contrastive for m in models])
    p_values, n_splits = _split_p_values(areas[None, :], in_first, tolerance=1e-9 * max(1.0, areas.sum()))
    return AreaTestResult(
        p_value=float(p_values[0]),
        observed_difference=float(areas[in_first].mean() - areas[~in_first].mean()),
        areas={m: float(a) for m, a in zip(models, areas)},
        contrastive=tuple(contrastive),
        non_contrastive=tuple(non_contrastive),
        n_splits=n_splits,
        p_range=(float(p_lo), float(p_hi)),
        layer=layer,
    )


def meta_test_report(summary: pd.DataFrame, zoo: Mapping[str, Any], *, layer: str = "avgpool") -> dict[str, Any]:
    """The JSON of ``meta_test.json``: the paper-compatible result at top level, robust and area test beside.

    Top-level keys p_value, n_thresholds, contrastive, non_contrastive, ... are the paper-compatible
    meta-test (:class:`MetaTestResult`); ``alternative`` is the direction every p tests and
    ``bias_definition`` what counts as a bias in it; ``robust`` and ``area_test`` hold the other two
    tests, each with a ``description``. n_excluded / n_flagged_overlap say how many rows at ``layer``
    were left out (e.g. degenerate tests) or kept although flagged. A study where the test does not
    apply (e.g. the demo's random models only) gets p_value null, n_thresholds 0 and the reason under
    ``not_applicable``. A summary mixing alternatives is refused (ValueError).
    """
    alternative = study_alternative(summary)
    common = {"alternative": alternative, "bias_definition": ALTERNATIVE_MEANING[alternative]}
    try:
        paper = meta_test(summary, zoo, layer=layer, mode="paper")
    except MetaTestNotApplicable as exc:
        groups = meta_groups(zoo)
        at_layer = summary[summary["layer"] == layer]
        present = set(at_layer["model"])
        return {
            "p_value": None, "n_thresholds": 0, "layer": layer, "not_applicable": str(exc), **common,
            **exclusion_counts(at_layer),
            "contrastive": [m for m, g in groups.items() if g == "contrastive" and m in present],
            "non_contrastive": [m for m, g in groups.items() if g == "non_contrastive" and m in present],
        }  # fmt: skip
    robust = meta_test(summary, zoo, layer=layer, mode="robust")
    area = area_meta_test(summary, zoo, layer=layer)
    return {
        **paper.as_dict(),
        **common,
        "description": (
            "Paper-compatible meta-test (Sirotkin et al. 2022, sec. 4.1): mean over thresholds (distinct "
            "seed-averaged p < max_p in float64, so values equal but for the last bits count separately) of "
            "the exact permutation p of contrastive minus non-contrastive mean bias count (a bias: "
            f"{ALTERNATIVE_MEANING[alternative]}). Reproduces the published value; a descriptive score rather "
            f"than a calibrated p-value. {paper.n_excluded} test result(s) at this layer excluded (e.g. "
            f"degenerate), {paper.n_flagged_overlap} kept although their targets overlap an attribute set."
        ),
        "robust": {
            **{k: v for k, v in robust.as_dict().items()
               if k not in ("contrastive", "non_contrastive", "alternative", "n_excluded", "n_flagged_overlap")},
            "description": (
                f"Same procedure with p rounded to {ROBUST_DECIMALS} decimals before forming thresholds, so "
                "mathematically equal p-values form one threshold (the honest version of the paper's number)."
            ),
        },
        "area_test": {
            **{k: v for k, v in area.as_dict().items() if k not in ("contrastive", "non_contrastive")},
            "name": "area_under_count_curve",
            "description": (
                "One exact permutation test (all splits) of contrastive minus non-contrastive mean area under "
                "the bias-count curve over log10 thresholds in p_range. Unlike the paper's mean of dependent "
                "per-threshold p-values, this is a single valid p-value and does not depend on float ties."
            ),
        },
    }
