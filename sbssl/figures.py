"""The paper's figures (3, 4, 5) and a heat map of effect sizes, from a :func:`sbssl.summary.summarize` table.

Each figure has a ``*_data`` function returning the numbers it draws (a DataFrame; tests compare them with
counts.csv and published values) and a ``plot_*`` function returning ``(matplotlib Figure, caption)``
built from them; :func:`write_figures` saves them all as PNG and PDF (atomically) with the caption beside
as ``.rst`` for Snakemake's report. Figures are built on ``matplotlib.figure.Figure`` objects, never
pyplot's global state, so they are safe inside DAG jobs.

All figures follow the summary's one ``alternative`` (a bias is a test with p < threshold in that
direction; a summary mixing alternatives is refused) and leave out rows marked ``excluded``; captions
state the alternative and how many results were excluded or flagged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: DAG jobs and CI have no display

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from sbssl.io import atomic_path, write_text_atomic
from sbssl.layers import LAYER_TITLES, LAYERS
from sbssl.models import FAMILIES
from sbssl.summary import (
    ALTERNATIVE_MEANING,
    DEFAULT_THRESHOLDS,
    OVERLAP_FLAG,
    RANDOM_MODEL,
    exclusion_counts,
    figure_models,
    included,
    study_alternative,
)

#: Threshold of the paper's Figures 4 and 5.
STRONG_P = 0.01
#: Threshold range of Figure 3 (log axis).
SWEEP_RANGE = (1e-4, 1e-1)
#: Points of Figure 3's log-spaced threshold grid (the paper's thresholds are added to it).
SWEEP_POINTS = 400


@dataclass(frozen=True)
class FigureFiles:
    """One written figure: its PNG and PDF, the caption text and the ``.rst`` file holding it."""

    png: Path
    pdf: Path
    caption_path: Path
    caption: str


def figure_model_labels(summary: pd.DataFrame, zoo: Mapping[str, Any] | None) -> pd.DataFrame:
    """Per figure model (index, in summary order): title, family, meta_group, imagenet_top1 (from the zoo).

    ``zoo``: ``{name: label}`` with attributes title, meta_group, imagenet_top1 (ModelSpec,
    PublishedModel), or ``{name: meta_group-or-None}`` as :func:`sbssl.meta.meta_test` accepts.
    """
    families = summary.drop_duplicates("model").set_index("model")["family"]
    rows = []
    for model in figure_models(summary, zoo):
        spec = None if zoo is None else zoo.get(model)
        bare = spec is None or isinstance(spec, str)  # a bare meta group carries no other label
        title = (None if bare else spec.title) or ("Random (mean)" if model == RANDOM_MODEL else model)
        rows.append({
            "model": model,
            "title": title,
            "family": families[model],
            "meta_group": spec if bare else spec.meta_group,
            "imagenet_top1": None if bare else spec.imagenet_top1,
        })
    return pd.DataFrame(rows, columns=["model", "title", "family", "meta_group", "imagenet_top1"]).set_index("model")


def _layers(summary: pd.DataFrame) -> list[str]:
    present = set(summary["layer"])
    return [layer for layer in LAYERS if layer in present] + sorted(present - set(LAYERS))


def _study_note(
    summary: pd.DataFrame, models: Sequence[str], layer: str | None = None, group: str | None = None
) -> str:
    """Caption sentence: what a bias is, and how many of the drawn results were excluded or flagged."""
    alternative = study_alternative(summary)
    rows = summary[summary["model"].isin(models)]
    if layer is not None:
        rows = rows[rows["layer"] == layer]
    if group is not None:
        rows = rows[rows["group"] == group]
    counts = exclusion_counts(rows)
    return (
        f" Alternative {alternative}: a bias is {ALTERNATIVE_MEANING[alternative]}."
        f" {counts['n_excluded']} test result(s) excluded (e.g. degenerate: d undefined),"
        f" {counts['n_flagged_overlap']} kept but flagged {OVERLAP_FLAG}."
    )


def sweep_thresholds() -> np.ndarray:
    """Figure 3's thresholds: log-spaced over :data:`SWEEP_RANGE` plus the paper's 0.1, 0.05, 0.01, sorted."""
    grid = np.logspace(np.log10(SWEEP_RANGE[0]), np.log10(SWEEP_RANGE[1]), SWEEP_POINTS)
    return np.unique(np.concatenate([grid, DEFAULT_THRESHOLDS]))


def bias_count_data(
    summary: pd.DataFrame, zoo: Mapping[str, Any] | None = None, thresholds: Sequence[float] | None = None
) -> pd.DataFrame:
    """What Figure 3 draws: per figure model, layer and threshold t, the number of tests with p < t.

    Columns model, title, meta_group, layer, threshold, n_biases; ``thresholds`` default to
    :func:`sweep_thresholds`. Excluded rows are not counted, so at 0.1, 0.05 and 0.01 the numbers
    equal :func:`sbssl.summary.bias_counts`.
    """
    study_alternative(summary)
    info = figure_model_labels(summary, zoo)
    ts = sweep_thresholds() if thresholds is None else np.asarray(thresholds, dtype=float)
    kept = included(summary)
    frames = []
    for layer in _layers(summary):
        at_layer = kept[kept["layer"] == layer]
        for model, row in info.iterrows():
            p = np.sort(at_layer.loc[at_layer["model"] == model, "p"].to_numpy())
            frames.append(pd.DataFrame({
                "model": model, "title": row["title"], "meta_group": row["meta_group"], "layer": layer,
                "threshold": ts, "n_biases": np.searchsorted(p, ts, side="left"),
            }))
    return pd.concat(frames, ignore_index=True)


def plot_bias_counts(summary: pd.DataFrame, zoo: Mapping[str, Any] | None = None) -> tuple[Figure, str]:
    """Paper Figure 3: number of tests with p < p_t against p_t (log axis), one panel per layer."""
    data = bias_count_data(summary, zoo)
    info = figure_model_labels(summary, zoo)
    layers = _layers(summary)
    ncols = min(3, len(layers))
    nrows = -(-len(layers) // ncols)
    fig = Figure(figsize=(4.2 * ncols + 2.2, 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False).ravel()
    colors = dict(zip(info.index, sns.color_palette("tab20", len(info))))
    for ax, layer in zip(axes, layers):
        for model, row in info.iterrows():
            curve = data[(data["layer"] == layer) & (data["model"] == model)]
            contrastive = row["meta_group"] == "contrastive"
            ax.plot(curve["threshold"].to_numpy(), curve["n_biases"].to_numpy(), drawstyle="steps-post",
                    color=colors[model], linewidth=2.6 if contrastive else 1.3,
                    linestyle="-" if contrastive else "--", label=row["title"])
        ax.set_xscale("log")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts of tests
        ax.set_title(LAYER_TITLES.get(layer, layer))
        ax.grid(True, which="major", alpha=0.3)
    for ax in axes[len(layers):]:
        ax.set_visible(False)
    for ax in axes[::ncols]:
        ax.set_ylabel("number of biases")
    for ax in axes[-ncols:]:
        ax.set_xlabel("threshold $p_t$")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize="small")
    caption = (
        "Number of biases (tests with seed-averaged p < p_t) against the threshold p_t from "
        f"{SWEEP_RANGE[0]:g} to {SWEEP_RANGE[1]:g} (log scale), one panel per layer, one line per model "
        f"({len(info)} model{'s' if len(info) != 1 else ''}; 'Random (mean)' averages the random initialisations). Contrastive models: "
        "thick solid lines; the others dashed (paper Figure 3)." + _study_note(summary, list(info.index))
    )
    return fig, caption


def _family_sorted(info: pd.DataFrame) -> pd.DataFrame:
    rank = {f: i for i, f in enumerate(FAMILIES)}
    order = sorted(range(len(info)), key=lambda i: (rank.get(info["family"].iloc[i], len(rank)), i))
    return info.iloc[order]


def intersectional_data(
    summary: pd.DataFrame, zoo: Mapping[str, Any] | None = None, *, layer: str = "avgpool"
) -> pd.DataFrame:
    """What Figure 4 draws: every (figure model, intersectional test) at ``layer``, models by family.

    Columns model, title, family, test_title, d, p, strong (p < :data:`STRONG_P`; the coloured cells).
    Rows of excluded results are left out. Per model, ``strong.sum()`` is the number after its name.
    """
    study_alternative(summary)
    info = _family_sorted(figure_model_labels(summary, zoo))
    kept = included(summary)
    rows = kept[(kept["layer"] == layer) & (kept["group"] == "intersectional") & kept["model"].isin(info.index)]
    rank = {m: i for i, m in enumerate(info.index)}
    data = rows.assign(
        title=rows["model"].map(info["title"]), family=rows["model"].map(info["family"]), test_title=rows["title"],
        strong=rows["p"] < STRONG_P, _rank=rows["model"].map(rank),
    ).sort_values("_rank", kind="stable")
    return data[["model", "title", "family", "test_title", "d", "p", "strong"]].reset_index(drop=True)


def plot_intersectional(
    summary: pd.DataFrame, zoo: Mapping[str, Any] | None = None, *, layer: str = "avgpool"
) -> tuple[Figure, str]:
    """Paper Figure 4: intersectional tests with p < 0.01 at ``layer``, per model, models grouped by family."""
    info = _family_sorted(figure_model_labels(summary, zoo))
    data = intersectional_data(summary, zoo, layer=layer)
    order = list(dict.fromkeys(data["test_title"]))
    d = data.pivot(index="test_title", columns="model", values="d").reindex(index=order, columns=info.index)
    strong_mask = data.pivot(index="test_title", columns="model", values="strong").reindex(index=order, columns=info.index)
    strong = d.where(strong_mask.fillna(False).astype(bool))
    counts = data.groupby("model")["strong"].sum().reindex(info.index, fill_value=0)
    fig = Figure(figsize=(0.55 * len(info) + 5.0, 0.32 * max(len(d), 1) + 3.0), layout="constrained")
    ax = fig.subplots()
    if len(d):
        ax.set_facecolor("0.93")  # grey = not significant
        limit = float(np.nanmax(np.abs(strong.to_numpy()))) if strong.notna().any().any() else 1.0
        sns.heatmap(strong, ax=ax, cmap="vlag", center=0, vmin=-limit, vmax=limit, linewidths=0.5,
                    linecolor="white", cbar_kws={"label": "effect size d (p < 0.01 only)"})
        ax.set_xticks(np.arange(len(info)) + 0.5)
        ax.set_xticklabels([f"{info.at[m, 'title']} ({counts[m]})" for m in info.index], rotation=60, ha="right")
        boundaries = np.flatnonzero(info["family"].to_numpy()[1:] != info["family"].to_numpy()[:-1]) + 1
        for x in boundaries:
            ax.axvline(x, color="black", linewidth=1.5)
        starts = np.concatenate([[0], boundaries])
        ends = np.concatenate([boundaries, [len(info)]])
        for start, end in zip(starts, ends):
            ax.text((start + end) / 2, -0.4, info["family"].iloc[start], ha="center", va="bottom", fontsize="small")
    else:
        ax.text(0.5, 0.5, f"no intersectional tests at {LAYER_TITLES.get(layer, layer)}", ha="center",
                transform=ax.transAxes)
    ax.set_xlabel("")
    ax.set_ylabel("")
    caption = (
        f"Intersectional biases at {LAYER_TITLES.get(layer, layer)}: coloured cells are intersectional tests "
        f"with seed-averaged p < {STRONG_P} (colour = effect size d; grey = not significant). Models are "
        "grouped by family (separated by black lines); the number after each model is its count of such "
        "biases (paper Figure 4)."
        + _study_note(summary, list(info.index), layer, "intersectional")
    )
    return fig, caption


def strength_data(summary: pd.DataFrame, zoo: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """What Figure 5 draws: per figure model and layer, strength (sum of d) and number of tests with p < 0.01.

    Columns model, title, family, imagenet_top1, layer, strength, n_biases; models ordered by ImageNet
    top-1 (models without one first), layers in :data:`sbssl.layers.LAYERS` order. Excluded rows are
    left out, so n_biases equals :func:`sbssl.summary.bias_counts` at 0.01.
    """
    study_alternative(summary)
    info = figure_model_labels(summary, zoo)
    top1 = pd.to_numeric(info["imagenet_top1"], errors="coerce")
    info = info.assign(imagenet_top1=top1).sort_values("imagenet_top1", na_position="first", kind="stable")
    kept = included(summary)
    strong = kept[kept["model"].isin(info.index) & (kept["p"] < STRONG_P)]
    grid = pd.MultiIndex.from_product([info.index, _layers(summary)], names=["model", "layer"])
    totals = pd.DataFrame({
        "strength": strong.groupby(["model", "layer"])["d"].sum().reindex(grid, fill_value=0.0),
        "n_biases": strong.groupby(["model", "layer"]).size().reindex(grid, fill_value=0),
    }).reset_index()
    for column in ("title", "family", "imagenet_top1"):
        totals[column] = totals["model"].map(info[column])
    return totals[["model", "title", "family", "imagenet_top1", "layer", "strength", "n_biases"]]


def plot_strength(summary: pd.DataFrame, zoo: Mapping[str, Any] | None = None) -> tuple[Figure, str]:
    """Paper Figure 5: cumulative strength (sum of d over p < 0.01) and number of biases, per layer and model."""
    totals = strength_data(summary, zoo)
    models = totals.drop_duplicates("model").set_index("model")
    layers = list(dict.fromkeys(totals["layer"]))
    labels = {m: models.at[m, "title"] + ("" if pd.isna(models.at[m, "imagenet_top1"])
                                          else f"\n{models.at[m, 'imagenet_top1']:g}%") for m in models.index}
    totals = totals.assign(model_label=totals["model"].map(labels),
                           layer_title=totals["layer"].map(lambda layer: LAYER_TITLES.get(layer, layer)))
    fig = Figure(figsize=(0.75 * len(models) + 4.0, 7.5), layout="constrained")
    ax_strength, ax_count = fig.subplots(2, 1, sharex=True)
    palette = sns.color_palette("crest", len(layers))
    for ax, value, label in ((ax_strength, "strength", "cumulative strength (sum of d)"),
                             (ax_count, "n_biases", "number of biases")):
        sns.barplot(totals, x="model_label", y=value, hue="layer_title", palette=palette, ax=ax,
                    order=list(labels.values()), hue_order=[LAYER_TITLES.get(layer, layer) for layer in layers])
        ax.set_ylabel(label)
        ax.set_xlabel("")
        ax.get_legend().remove()
    fig.legend(*ax_strength.get_legend_handles_labels(), title="layer", loc="outside right center", fontsize="small")
    ax_count.tick_params(axis="x", rotation=60)
    caption = (
        f"Cumulative strength (sum of effect sizes d over tests with seed-averaged p < {STRONG_P}, top) and "
        "number of those biases (bottom) per layer and model. Models are ordered by ImageNet linear "
        "top-1 accuracy (shown under the name; models without one first) (paper Figure 5)."
        + _study_note(summary, list(models.index))
    )
    return fig, caption


def _layer_info(zoo: Mapping[str, Any] | None, model: str) -> dict[str, Any]:
    """slug -> :class:`sbssl.layers.LayerInfo` of a zoo model; the paper's ResNet-50 layers for anything else
    (published rows, the random-model mean)."""
    from sbssl.layers import LAYER_TITLES, RESNET50_DEPTHS, LayerInfo, model_layers
    from sbssl.models import ModelSpec

    spec = None if zoo is None else zoo.get(model)
    if isinstance(spec, ModelSpec):
        return {layer.slug: layer for layer in model_layers(spec)}
    return {slug: LayerInfo(slug, slug, LAYER_TITLES[slug], depth) for slug, depth in RESNET50_DEPTHS.items()}


def depth_data(summary: pd.DataFrame, zoo: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """What the depth figure draws: per figure model and layer, its relative depth (0 = input side, 1 = the
    model's last layer; :func:`sbssl.layers.model_layers`), the number of tests with p < :data:`STRONG_P` and
    their cumulative strength (sum of d), so that models of different depth share one axis.

    Columns model, title, family, layer, layer_title, depth, n_biases, strength; rows by model (summary order)
    then depth. Excluded rows are left out of the counts. A layer the model does not list is an error.
    """
    study_alternative(summary)
    info = figure_model_labels(summary, zoo)
    kept = included(summary)
    strong = kept[kept["model"].isin(info.index) & (kept["p"] < STRONG_P)]
    rows = []
    for model in info.index:
        layers = _layer_info(zoo, model)
        for layer in dict.fromkeys(summary.loc[summary["model"] == model, "layer"]):
            if layer not in layers:
                raise ValueError(f"depth figure: model {model!r} has no layer {layer!r}; its layers: {list(layers)}")
            hits = strong[(strong["model"] == model) & (strong["layer"] == layer)]
            rows.append({
                "model": model, "title": info.at[model, "title"], "family": info.at[model, "family"],
                "layer": layer, "layer_title": layers[layer].title, "depth": layers[layer].depth,
                "n_biases": len(hits), "strength": float(hits["d"].sum()),
            })  # fmt: skip
    columns = ["model", "title", "family", "layer", "layer_title", "depth", "n_biases", "strength"]
    data = pd.DataFrame(rows, columns=columns)
    order = {model: i for i, model in enumerate(info.index)}
    return data.sort_values(["model", "depth"], key=lambda c: c.map(order) if c.name == "model" else c,
                            kind="stable").reset_index(drop=True)  # fmt: skip


def plot_bias_by_depth(summary: pd.DataFrame, zoo: Mapping[str, Any] | None = None) -> tuple[Figure, str]:
    """Number of biases (p < :data:`STRONG_P`) against the relative depth of each layer, one line per model."""
    data = depth_data(summary, zoo)
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.subplots()
    for model, rows in data.groupby("model", sort=False):
        ax.plot(rows["depth"], rows["n_biases"], marker="o", label=rows["title"].iloc[0])
    ax.set_xlim(-0.03, 1.03)
    ax.set_xlabel("relative depth of the layer (0 = input side, 1 = last layer)")
    ax.set_ylabel(f"number of biases (p < {STRONG_P})")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.legend(loc="outside right center", fontsize="small")
    caption = (
        f"Number of tests with seed-averaged p < {STRONG_P} at each layer, against the layer's relative depth "
        "(the share of the network's modules run up to it; 0 = input side, 1 = the model's last layer), one "
        "line per model, so that models of different depth (ResNets, Vision Transformers) share one axis."
        + _study_note(summary, list(dict.fromkeys(data["model"])))
    )
    return fig, caption


def _mark(p: float) -> str:
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else ""


def heatmap_data(
    summary: pd.DataFrame, zoo: Mapping[str, Any] | None = None, *, layer: str = "avgpool"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """What the heat map draws at ``layer``: d (tests x figure models, by title) and the significance marks.

    Excluded results are blank (d NaN, no mark). ValueError when the summary has no results at ``layer``.
    """
    study_alternative(summary)
    info = figure_model_labels(summary, zoo)
    rows = summary[(summary["layer"] == layer) & summary["model"].isin(info.index)]
    if rows.empty:
        raise ValueError(f"heat map: no results at layer {layer!r}")
    order = list(dict.fromkeys(rows["title"]))
    rows = rows.assign(d=rows["d"].where(rows["excluded"] == ""), p=rows["p"].where(rows["excluded"] == ""))
    d = rows.pivot(index="title", columns="model", values="d").reindex(index=order, columns=info.index)
    marks = rows.pivot(index="title", columns="model", values="p").reindex(index=order, columns=info.index)
    return d, marks.map(lambda p: "" if pd.isna(p) else _mark(p))


def plot_effect_heatmap(
    summary: pd.DataFrame, zoo: Mapping[str, Any] | None = None, *, layer: str = "avgpool"
) -> tuple[Figure, str]:
    """Heat map of seed-averaged d (tests x models) at ``layer``, marked by significance of the mean p."""
    info = figure_model_labels(summary, zoo)
    d, marks = heatmap_data(summary, zoo, layer=layer)
    fig = Figure(figsize=(0.6 * len(info) + 5.5, 0.3 * len(d) + 2.5), layout="constrained")
    ax = fig.subplots()
    finite = np.abs(d.to_numpy(dtype=float))
    limit = float(np.nanmax(finite)) if np.isfinite(finite).any() else 1.0
    sns.heatmap(d, ax=ax, cmap="vlag", center=0, vmin=-(limit or 1.0), vmax=limit or 1.0, annot=marks, fmt="",
                annot_kws={"fontsize": 7}, cbar_kws={"label": "effect size d"})
    ax.set_xticks(np.arange(len(info)) + 0.5)
    ax.set_xticklabels(info["title"], rotation=60, ha="right")
    ax.set_xlabel("")
    ax.set_ylabel("")
    caption = (
        f"Effect size d of every test (rows) for every model (columns) at {LAYER_TITLES.get(layer, layer)}, "
        "averaged over seeds. Marks give the seed-averaged p: * p < 0.05, ** p < 0.01, *** p < 0.001 "
        "(unadjusted; adjusted values are in summary.csv); excluded results are blank."
        + _study_note(summary, list(info.index), layer)
    )
    return fig, caption


_RST_SPECIAL = re.compile(r"([\\*`|])")
_RST_TRAILING_UNDERSCORE = re.compile(r"_(?=\W|$)")


def rst_escape(text: str) -> str:
    """``text`` as literal reStructuredText (the captions of Snakemake's report).

    Escapes backslash, ``*`` (emphasis: the significance marks), backquote, ``|`` (substitutions) and an
    underscore that ends a word (a reference, e.g. ``p_``).
    """
    return _RST_TRAILING_UNDERSCORE.sub(r"\\_", _RST_SPECIAL.sub(r"\\\1", text))


def save_figure(fig: Figure, caption: str, out_dir: Path, name: str) -> FigureFiles:
    """Write ``fig`` as ``out_dir/name.png`` and ``.pdf`` (reproducible bytes) and its caption as ``.rst``."""
    files = FigureFiles(out_dir / f"{name}.png", out_dir / f"{name}.pdf", out_dir / f"{name}.rst", caption)
    with atomic_path(files.png) as tmp:
        fig.savefig(tmp, format="png", dpi=150)
    with atomic_path(files.pdf) as tmp:
        fig.savefig(tmp, format="pdf", metadata={"CreationDate": None})  # reproducible bytes
    write_text_atomic(files.caption_path, rst_escape(caption) + "\n")
    return files


def write_figures(
    summary: pd.DataFrame,
    zoo: Mapping[str, Any] | None,
    out_dir: str | Path,
    *,
    heatmap_layer: str = "avgpool",
    intersectional_layer: str = "avgpool",
    depth_figure: bool = False,
) -> dict[str, FigureFiles]:
    """Write every figure to ``out_dir`` as ``<name>.png``, ``<name>.pdf`` and ``<name>.rst`` (caption).

    Names: bias_counts (Figure 3), intersectional (Figure 4, at ``intersectional_layer``), strength
    (Figure 5), heatmap_<heatmap_layer>, and with ``depth_figure`` bias_by_depth
    (:func:`plot_bias_by_depth`). A summary mixing alternatives is refused before anything is written.
    """
    study_alternative(summary)
    out = Path(out_dir)
    figures = {
        "bias_counts": plot_bias_counts(summary, zoo),
        "intersectional": plot_intersectional(summary, zoo, layer=intersectional_layer),
        "strength": plot_strength(summary, zoo),
        f"heatmap_{heatmap_layer}": plot_effect_heatmap(summary, zoo, layer=heatmap_layer),
    }
    if depth_figure:
        figures["bias_by_depth"] = plot_bias_by_depth(summary, zoo)
    return {name: save_figure(fig, caption, out, name) for name, (fig, caption) in figures.items()}
