from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sbssl.figures import (
    plot_bias_counts,
    plot_effect_heatmap,
    plot_intersectional,
    plot_strength,
    write_figures,
)
from sbssl.models import ModelSpec, load_zoo
from sbssl.results import read_tests_table, summarize


def _spec(name: str, family: str, meta_group: str | None, top1: float | None) -> ModelSpec:
    return ModelSpec(name=name, title=name.upper(), family=family, meta_group=meta_group, imagenet_top1=top1,
                     architecture="resnet50", weights=None, init_seed=None)


ZOO = {
    "geo": _spec("geo", "geometric", "non_contrastive", 40.0),
    "con": _spec("con", "contrastive", "contrastive", 70.0),
    "random_1": _spec("random_1", "random", None, None),
}


@pytest.fixture(scope="module")
def summary() -> pd.DataFrame:
    rows = []
    for model, family in (("geo", "geometric"), ("con", "contrastive"), ("random_1", "random")):
        for layer in ("layer4", "avgpool"):
            for i, (test, group) in enumerate((("t_core", "core"), ("i_one", "intersectional"),
                                               ("i_two", "intersectional"))):
                p = {"geo": 0.5, "con": 0.001 * (i + 1), "random_1": 0.02}[model]
                rows.append({"model": model, "family": family, "layer": layer, "test": test, "title": test,
                             "group": group, "seed": 0, "d": 0.1 * (i + 1), "p": p, "p_floor": np.nan})
    return summarize(pd.DataFrame(rows), ZOO)


def test_bias_count_lines_step_at_the_p_values(summary):
    fig, caption = plot_bias_counts(summary, ZOO)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["Block 5", "GAP"]
    lines = {line.get_label(): line for line in panels[1].get_lines()}
    assert set(lines) == {"GEO", "CON", "Random (mean)"}  # the instance random_1 only via its mean
    con = lines["CON"]
    x, y = con.get_xdata(), con.get_ydata()
    # con's tests have p = 0.001, 0.002, 0.003: counts of p < x
    assert list(y[np.searchsorted(x, [0.0015, 0.0025, 0.05])]) == [1, 2, 3]
    assert con.get_linestyle() == "-" and lines["GEO"].get_linestyle() == "--"
    assert con.get_linewidth() > lines["GEO"].get_linewidth()
    assert panels[1].get_xscale() == "log" and "3 models" in caption


def test_intersectional_marks_only_strong_biases(summary):
    fig, caption = plot_intersectional(summary, ZOO)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["GEO (0)", "CON (2)", "Random (mean) (0)"]  # family order, count of p < 0.01
    assert "p < 0.01" in caption
    empty, _ = plot_intersectional(summary[summary["group"] != "intersectional"], ZOO)
    assert "no intersectional tests" in empty.axes[0].texts[0].get_text()


def test_strength_orders_models_by_imagenet_accuracy(summary):
    fig, caption = plot_strength(summary, ZOO)
    labels = [t.get_text() for t in fig.axes[1].get_xticklabels()]
    assert labels == ["Random (mean)", "GEO\n40%", "CON\n70%"]  # no accuracy first
    heights = sorted(round(bar.get_height(), 6) for bar in fig.axes[0].patches if bar.get_height() > 0)
    assert heights == [0.6, 0.6]  # con: d 0.1 + 0.2 + 0.3 at p < 0.01, at each of the two layers
    assert "ImageNet" in caption


def test_heatmap_marks_significance_and_rejects_missing_layer(summary):
    fig, _ = plot_effect_heatmap(summary, ZOO)
    marks = sorted(t.get_text() for t in fig.axes[0].texts if t.get_text())
    assert marks == ["*", "*", "*", "**", "**", "**"]  # con: p 0.001-0.003 -> **, random: 0.02 -> *
    with pytest.raises(ValueError, match="no results at layer 'maxpool'"):
        plot_effect_heatmap(summary, ZOO, layer="maxpool")


def test_write_figures_png_pdf_and_captions(summary, tmp_path):
    files = write_figures(summary, ZOO, tmp_path, heatmap_layer="layer4")
    assert set(files) == {"bias_counts", "intersectional", "strength", "heatmap_layer4"}
    for f in files.values():
        assert f.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f.pdf.read_bytes()[:5] == b"%PDF-"
        assert f.caption_path.read_text().strip() == f.caption.replace("*", r"\*")  # reStructuredText
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{n}.{s}" for n in files for s in ("png", "pdf", "rst"))


def test_figures_from_published_rows(shared_dir, repo_dir, tmp_path):
    tests = read_tests_table(shared_dir / "sbssl" / "published_results.csv", "sbssl-published",
                             catalogue=repo_dir / "config" / "tests.yaml")
    zoo = load_zoo(repo_dir / "config" / "models.yaml")
    files = write_figures(summarize(tests, zoo), zoo, tmp_path)
    for f in files.values():
        assert f.png.stat().st_size > 10_000 and f.pdf.stat().st_size > 10_000 and f.caption
