from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sbssl.figures import (
    bias_count_data,
    heatmap_data,
    intersectional_data,
    plot_bias_counts,
    plot_effect_heatmap,
    plot_intersectional,
    plot_strength,
    rst_escape,
    strength_data,
    write_figures,
)
from sbssl.models import ModelSpec
from sbssl.summary import bias_counts, summarize


def _spec(name: str, family: str, meta_group: str | None, top1: float | None) -> ModelSpec:
    return ModelSpec(name=name, title=name.upper(), family=family, meta_group=meta_group, imagenet_top1=top1,
                     architecture="resnet50", weights=None, init_seed=None)


ZOO = {
    "geo": _spec("geo", "geometric", "non_contrastive", 40.0),
    "con": _spec("con", "contrastive", "contrastive", 70.0),
    "random_1": _spec("random_1", "random", None, None),
}


def _tests(alternative: str = "greater") -> pd.DataFrame:
    rows = []
    for model, family in (("geo", "geometric"), ("con", "contrastive"), ("random_1", "random")):
        for layer in ("layer4", "avgpool"):
            for i, (test, group) in enumerate((("t_core", "core"), ("i_one", "intersectional"),
                                               ("i_two", "intersectional"), ("i_flat", "intersectional"))):
                p = {"geo": 0.5, "con": 0.001 * (i + 1), "random_1": 0.02}[model]
                # i_flat is degenerate for con: d undefined, excluded from every figure
                degenerate = model == "con" and test == "i_flat"
                flags = "degenerate" if degenerate else "target_attribute_overlap" if test == "t_core" else ""
                rows.append({"model": model, "family": family, "layer": layer, "test": test, "title": test,
                             "group": group, "seed": 0, "d": np.nan if degenerate else 0.1 * (i + 1), "p": p,
                             "p_floor": np.nan, "alternative": alternative, "flags": flags})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def summary() -> pd.DataFrame:
    return summarize(_tests(), ZOO)


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
    # 2 layers: con's degenerate i_flat excluded at each; t_core flagged for all 3 drawn models at each
    assert "Alternative greater: a bias is p < t for the tested direction" in caption
    assert "2 test result(s) excluded" in caption and "6 kept but flagged target_attribute_overlap" in caption


def test_bias_count_data_is_what_figure_3_draws_and_equals_the_counts(summary):
    data = bias_count_data(summary, ZOO)
    assert set(data["model"]) == {"geo", "con", "random"}
    assert {0.1, 0.05, 0.01} <= set(data["threshold"])
    fig, _ = plot_bias_counts(summary, ZOO)
    gap = next(ax for ax in fig.axes if ax.get_title() == "GAP")
    drawn = {line.get_label(): line.get_ydata() for line in gap.get_lines()}
    curve = data[(data["layer"] == "avgpool") & (data["model"] == "con")]
    assert list(drawn["CON"]) == list(curve["n_biases"])
    at = data[data["threshold"].isin([0.1, 0.05, 0.01])].set_index(["model", "layer", "threshold"])["n_biases"]
    counts = bias_counts(summary).set_index(["model", "layer", "threshold"])["n_biases"]
    assert (at == counts.reindex(at.index)).all()
    assert at[("con", "avgpool", 0.01)] == 3  # p 0.001, 0.002, 0.003; i_flat (0.004) excluded


def test_intersectional_marks_only_strong_biases(summary):
    fig, caption = plot_intersectional(summary, ZOO)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["GEO (0)", "CON (2)", "Random (mean) (0)"]  # family order, count of p < 0.01
    assert "p < 0.01" in caption and "1 test result(s) excluded" in caption
    data = intersectional_data(summary, ZOO)
    assert data.groupby("family", sort=False)["strong"].sum().to_dict() == {
        "geometric": 0, "contrastive": 2, "random": 0}
    assert data[data["model"] == "con"]["test_title"].tolist() == ["i_one", "i_two"]  # i_flat left out
    assert intersectional_data(summary, ZOO, layer="layer4")["d"].tolist() == intersectional_data(summary, ZOO)["d"].tolist()
    empty, _ = plot_intersectional(summary[summary["group"] != "intersectional"], ZOO)
    assert "no intersectional tests" in empty.axes[0].texts[0].get_text()


def test_strength_orders_models_by_imagenet_accuracy(summary):
    fig, caption = plot_strength(summary, ZOO)
    labels = [t.get_text() for t in fig.axes[1].get_xticklabels()]
    assert labels == ["Random (mean)", "GEO\n40%", "CON\n70%"]  # no accuracy first
    heights = sorted(round(bar.get_height(), 6) for bar in fig.axes[0].patches if bar.get_height() > 0)
    assert heights == [0.6, 0.6]  # con: d 0.1 + 0.2 + 0.3 at p < 0.01, at each of the two layers
    assert "ImageNet" in caption
    data = strength_data(summary, ZOO)
    assert data["model"].unique().tolist() == ["random", "geo", "con"]
    con = data[data["model"] == "con"].set_index("layer")
    assert con["strength"].round(9).tolist() == [0.6, 0.6] and con["n_biases"].tolist() == [3, 3]
    counts = bias_counts(summary)
    at_001 = counts[counts["threshold"] == 0.01].set_index(["model", "layer"])["n_biases"]
    assert (data.set_index(["model", "layer"])["n_biases"] == at_001.reindex(data.set_index(["model", "layer"]).index)).all()


def test_heatmap_marks_significance_and_rejects_missing_layer(summary):
    fig, _ = plot_effect_heatmap(summary, ZOO)
    marks = sorted(t.get_text() for t in fig.axes[0].texts if t.get_text())
    # con: p 0.001-0.003 -> ** (i_flat excluded: no mark), random: 0.02 -> * on its 4 tests
    assert marks == ["*", "*", "*", "*", "**", "**", "**"]
    d, data_marks = heatmap_data(summary, ZOO)
    assert np.isnan(d.at["i_flat", "con"]) and data_marks.at["i_flat", "con"] == ""
    assert d.at["i_two", "con"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="no results at layer 'maxpool'"):
        plot_effect_heatmap(summary, ZOO, layer="maxpool")


def test_write_figures_png_pdf_and_captions(summary, tmp_path):
    files = write_figures(summary, ZOO, tmp_path, heatmap_layer="layer4")
    assert set(files) == {"bias_counts", "intersectional", "strength", "heatmap_layer4"}
    for f in files.values():
        assert f.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f.pdf.read_bytes()[:5] == b"%PDF-"
        assert f.caption_path.read_text().strip() == rst_escape(f.caption)  # reStructuredText
    assert r"\* p < 0.05, \*\* p < 0.01" in files["heatmap_layer4"].caption_path.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{n}.{s}" for n in files for s in ("png", "pdf", "rst"))


def test_rst_escape_makes_captions_literal():
    assert rst_escape("* p < 0.05, ** p") == r"\* p < 0.05, \*\* p"
    assert rst_escape("a `x` |b| c_ d_e \\") == r"a \`x\` \|b\| c\_ d_e \\"


def test_figures_follow_the_alternative_and_refuse_a_mix(tmp_path):
    two_sided = summarize(_tests("two-sided"), ZOO)
    _, caption = plot_bias_counts(two_sided, ZOO)
    assert "Alternative two-sided: a bias is p < t in either direction" in caption
    mixed = pd.concat([_tests(), _tests("less").query("layer == 'avgpool'").assign(layer="layer1")])
    with pytest.raises(ValueError, match="mixes alternatives"):
        write_figures(summarize(mixed, ZOO), ZOO, tmp_path)
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_depth_figure_puts_models_of_different_depth_on_one_axis(summary, tmp_path):
    from sbssl.figures import depth_data, plot_bias_by_depth
    from sbssl.layers import RESNET50_DEPTHS
    from sbssl.models import LayerLabel

    # a ViT whose two layers are named by slugs of its own, beside the ResNets of the summary
    vit = ModelSpec("vit", "vit_tiny_patch16_224", None, 0, source="timm", title="VIT", family="contrastive",
                    layers=(("block6", "blocks.5"), ("final", "norm")),
                    layer_labels={"block6": LayerLabel("Block 6", 0.5), "final": LayerLabel("Final norm", 1.0)})
    rows = _tests()
    rows = pd.concat([rows, rows[rows["model"] == "con"].assign(
        model="vit", layer=lambda r: r["layer"].map({"layer4": "block6", "avgpool": "final"}))])
    zoo = {**ZOO, "vit": vit}
    table = summarize(rows, zoo)
    data = depth_data(table, zoo)
    assert list(data.columns) == ["model", "title", "family", "layer", "layer_title", "depth", "n_biases", "strength"]
    by = data.set_index(["model", "layer"])
    assert by.loc[("geo", "layer4"), "depth"] == RESNET50_DEPTHS["layer4"] and by.loc[("geo", "avgpool"), "depth"] == 1.0
    assert (by.loc[("vit", "block6"), "depth"], by.loc[("vit", "block6"), "layer_title"]) == (0.5, "Block 6")
    # the counts are Figure 5's
    strength = strength_data(table, zoo).set_index(["model", "layer"])
    for key, row in by.iterrows():
        assert row["n_biases"] == strength.loc[key, "n_biases"]
    assert by.loc[("vit", "final"), "n_biases"] == by.loc[("con", "avgpool"), "n_biases"] == 3
    fig, caption = plot_bias_by_depth(table, zoo)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert list(lines["VIT"].get_xdata()) == [0.5, 1.0] and "relative depth" in caption
    files = write_figures(table, zoo, tmp_path, heatmap_layer="avgpool", intersectional_layer="avgpool",
                          depth_figure=True)
    assert files["bias_by_depth"].png.is_file()
