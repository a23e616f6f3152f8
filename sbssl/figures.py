"""The paper's figures (3, 4, 5) and a heat map of effect sizes, from a :func:`sbssl.results.summarize` table.

Each ``plot_*`` function returns ``(matplotlib Figure, caption)``; :func:`write_figures` saves them all as PNG
and PDF (atomically) with the caption beside as ``.rst`` for Snakemake's report. Figures are built on
``matplotlib.figure.Figure`` objects, never pyplot's global state, so they are safe inside DAG jobs.
"""

from __future__ import annotations

from collections.abc import Mapping
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
from sbssl.results import RANDOM_MODEL, figure_models

FAMILY_ORDER = ("geometric", "clustering", "contrastive", "supervised", "random")
#: Threshold of the paper's Figures 4 and 5.
STRONG_P = 0.01
#: Threshold range of Figure 3 (log axis).
SWEEP_RANGE = (1e-4, 1e-1)


@dataclass(frozen=True)
class FigureFiles:
    """One written figure: its PNG and PDF, the caption text and the ``.rst`` file holding it."""

    png: Path
    pdf: Path
    caption_path: Path
    caption: str


def _models(summary: pd.DataFrame, zoo: Mapping[str, Any] | None) -> pd.DataFrame:
    """Per figure model (rows in summary order): title, family, meta_group, imagenet_top1."""
    families = summary.drop_duplicates("model").set_index("model")["family"]
    rows = []
    for model in figure_models(summary, zoo):
        spec = None if zoo is None else zoo.get(model)
        title = getattr(spec, "title", None) or ("Random (mean)" if model == RANDOM_MODEL else model)
        rows.append({
            "model": model,
            "title": title,
            "family": families[model],
            "meta_group": getattr(spec, "meta_group", None),
            "imagenet_top1": getattr(spec, "imagenet_top1", None),
        })
    return pd.DataFrame(rows).set_index("model")


def _layers(summary: pd.DataFrame) -> list[str]:
    present = set(summary["layer"])
    return [layer for layer in LAYERS if layer in present] + sorted(present - set(LAYERS))


def plot_bias_counts(summary: pd.DataFrame, zoo: Mapping[str, Any] | None = None) -> tuple[Figure, str]:
    """Paper Figure 3: number of tests with p < p_t against p_t (log axis), one panel per layer."""
    info = _models(summary, zoo)
    layers = _layers(summary)
    thresholds = np.logspace(np.log10(SWEEP_RANGE[0]), np.log10(SWEEP_RANGE[1]), 400)
    ncols = min(3, len(layers))
    nrows = -(-len(layers) // ncols)
    fig = Figure(figsize=(4.2 * ncols + 2.2, 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False).ravel()
    colors = dict(zip(info.index, sns.color_palette("tab20", len(info))))
    for ax, layer in zip(axes, layers):
        at_layer = summary[summary["layer"] == layer]
        for model, row in info.iterrows():
            p = np.sort(at_layer.loc[at_layer["model"] == model, "p"].to_numpy())
            contrastive = row["meta_group"] == "contrastive"
            ax.plot(thresholds, np.searchsorted(p, thresholds, side="left"), drawstyle="steps-post",
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
        "thick solid lines; the others dashed (paper Figure 3)."
    )
    return fig, caption


def _family_sorted(info: pd.DataFrame) -> pd.DataFrame:
    rank = {f: i for i, f in enumerate(FAMILY_ORDER)}
    order = sorted(range(len(info)), key=lambda i: (rank.get(info["family"].iloc[i], len(rank)), i))
    return info.iloc[order]


def plot_intersectional(
    summary: pd.DataFrame, zoo: Mapping[str, Any] | None = None, *, layer: str = "avgpool"
) -> tuple[Figure, str]:
    """Paper Figure 4: intersectional tests with p < 0.01 at ``layer``, per model, models grouped by family."""
    info = _family_sorted(_models(summary, zoo))
    rows = summary[(summary["layer"] == layer) & (summary["group"] == "intersectional")]
    d = rows.pivot(index="title", columns="model", values="d").reindex(columns=info.index)
    p = rows.pivot(index="title", columns="model", values="p").reindex(index=d.index, columns=info.index)
    strong = d.where(p < STRONG_P)
    counts = (p < STRONG_P).sum(axis=0)
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
    )
    return fig, caption


def plot_strength(summary: pd.DataFrame, zoo: Mapping[str, Any] | None = None) -> tuple[Figure, str]:
    """Paper Figure 5: cumulative strength (sum of d over p < 0.01) and number of biases, per layer and model."""
    info = _models(summary, zoo)
    top1 = pd.to_numeric(info["imagenet_top1"], errors="coerce")
    info = info.assign(top1=top1).sort_values("top1", na_position="first", kind="stable")
    strong = summary[summary["model"].isin(info.index) & (summary["p"] < STRONG_P)]
    layers = _layers(summary)
    grid = pd.MultiIndex.from_product([info.index, layers], names=["model", "layer"])
    totals = pd.DataFrame({
        "strength": strong.groupby(["model", "layer"])["d"].sum().reindex(grid, fill_value=0.0),
        "n_biases": strong.groupby(["model", "layer"]).size().reindex(grid, fill_value=0),
    }).reset_index()
    labels = {m: info.at[m, "title"] + ("" if pd.isna(info.at[m, "top1"]) else f"\n{info.at[m, 'top1']:g}%")
              for m in info.index}
    totals["model_label"] = totals["model"].map(labels)
    totals["layer_title"] = totals["layer"].map(lambda layer: LAYER_TITLES.get(layer, layer))
    fig = Figure(figsize=(0.75 * len(info) + 4.0, 7.5), layout="constrained")
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
    )
    return fig, caption


def _mark(p: float) -> str:
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else ""


def plot_effect_heatmap(
    summary: pd.DataFrame, zoo: Mapping[str, Any] | None = None, *, layer: str = "avgpool"
) -> tuple[Figure, str]:
    """Heat map of seed-averaged d (tests x models) at ``layer``, marked by significance of the mean p."""
    info = _models(summary, zoo)
    rows = summary[(summary["layer"] == layer) & summary["model"].isin(info.index)]
    if rows.empty:
        raise ValueError(f"heat map: no results at layer {layer!r}")
    order = list(dict.fromkeys(rows["title"]))
    d = rows.pivot(index="title", columns="model", values="d").reindex(index=order, columns=info.index)
    marks = rows.pivot(index="title", columns="model", values="p").reindex(index=order, columns=info.index)
    marks = marks.map(lambda p: "" if pd.isna(p) else _mark(p))
    fig = Figure(figsize=(0.6 * len(info) + 5.5, 0.3 * len(d) + 2.5), layout="constrained")
    ax = fig.subplots()
    limit = float(np.nanmax(np.abs(d.to_numpy()))) or 1.0
    sns.heatmap(d, ax=ax, cmap="vlag", center=0, vmin=-limit, vmax=limit, annot=marks, fmt="",
                annot_kws={"fontsize": 7}, cbar_kws={"label": "effect size d"})
    ax.set_xticks(np.arange(len(info)) + 0.5)
    ax.set_xticklabels(info["title"], rotation=60, ha="right")
    ax.set_xlabel("")
    ax.set_ylabel("")
    caption = (
        f"Effect size d of every test (rows) for every model (columns) at {LAYER_TITLES.get(layer, layer)}, "
        "averaged over seeds. Marks give the seed-averaged p: * p < 0.05, ** p < 0.01, *** p < 0.001 "
        "(unadjusted; adjusted values are in summary.csv)."
    )
    return fig, caption


def _save(fig: Figure, caption: str, out_dir: Path, name: str) -> FigureFiles:
    files = FigureFiles(out_dir / f"{name}.png", out_dir / f"{name}.pdf", out_dir / f"{name}.rst", caption)
    with atomic_path(files.png) as tmp:
        fig.savefig(tmp, format="png", dpi=150)
    with atomic_path(files.pdf) as tmp:
        fig.savefig(tmp, format="pdf", metadata={"CreationDate": None})  # reproducible bytes
    # The .rst is the caption in Snakemake's report: escape "*" (the significance marks) for reStructuredText.
    write_text_atomic(files.caption_path, caption.replace("*", r"\*") + "\n")
    return files


def write_figures(
    summary: pd.DataFrame,
    zoo: Mapping[str, Any] | None,
    out_dir: str | Path,
    *,
    heatmap_layer: str = "avgpool",
) -> dict[str, FigureFiles]:
    """Write every figure to ``out_dir`` as ``<name>.png``, ``<name>.pdf`` and ``<name>.rst`` (caption).

    Names: bias_counts (Figure 3), intersectional (Figure 4, at GAP), strength (Figure 5),
    heatmap_<heatmap_layer>.
    """
    out = Path(out_dir)
    figures = {
        "bias_counts": plot_bias_counts(summary, zoo),
        "intersectional": plot_intersectional(summary, zoo),
        "strength": plot_strength(summary, zoo),
        f"heatmap_{heatmap_layer}": plot_effect_heatmap(summary, zoo, layer=heatmap_layer),
    }
    return {name: _save(fig, caption, out, name) for name, (fig, caption) in figures.items()}
