from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sbssl.layers import LAYER_TITLES, LAYERS, RESNET50_DEPTHS, LayerInfo, model_layer_slugs, model_layers, slug_title
from sbssl.models import LayerLabel, ModelSpec

REPO = Path(__file__).resolve().parents[1]


def _spec(source: str, architecture: str, layers=None, labels=None) -> ModelSpec:
    return ModelSpec("m", architecture, None, 0, source=source, layers=layers, title="M", family="random",
                     layer_labels=labels or {})  # fmt: skip


def test_slug_titles():
    assert [slug_title(s) for s in ("block6", "final_norm", "l20", "embed", "stage12")] == [
        "Block 6", "Final norm", "L 20", "Embed", "Stage 12"]


def test_paper_layers_need_no_torch():
    # the DAG lists every shipped model's layers, and the figures the paper's titles and depths, without torch
    code = (
        "import sys; from sbssl.models import load_zoo; from sbssl.layers import model_layers, model_layer_slugs\n"
        f"zoo = load_zoo({str(REPO / 'config' / 'models.yaml')!r})\n"
        "rows = [model_layers(s) for s in zoo.values() if s.architecture == 'resnet50']\n"
        "assert model_layer_slugs(zoo['vit_random'])[:2] == ['embed', 'block3']\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "print(len(rows), [r.title for r in rows[0]])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "15 ['Block 1', 'Block 2', 'Block 3', 'Block 4', 'Block 5', 'GAP']"


def test_paper_resnet_layers():
    layers = model_layers(_spec("torchvision", "resnet50"))
    assert layers == [LayerInfo(s, s, LAYER_TITLES[s], RESNET50_DEPTHS[s]) for s in LAYERS]
    assert [layer.depth for layer in layers] == sorted(layer.depth for layer in layers)
    # a subset listed in the entry keeps the paper's titles and depths
    subset = model_layers(_spec("torchvision", "resnet50", layers=(("gap", "avgpool"), ("block3", "layer2"))))
    assert [(l.slug, l.module, l.title, l.depth) for l in subset] == [
        ("gap", "avgpool", "GAP", 1.0), ("block3", "layer2", "Block 3", RESNET50_DEPTHS["layer2"])]


def test_listed_layers_take_the_entry_labels_then_the_defaults():
    labels = {"last": LayerLabel(title="Last token map", depth=None), "mid": LayerLabel(title=None, depth=0.4)}
    layers = (("mid", "blocks.5"), ("last", "norm"), ("qkv", "blocks.0.attn.qkv"))
    spec = _spec("timm", "vit_tiny_patch16_224", layers=layers, labels=labels)
    assert model_layer_slugs(spec) == ["mid", "last", "qkv"]
    rows = {layer.slug: layer for layer in model_layers(spec)}
    assert (rows["mid"].title, rows["mid"].depth) == ("Block 6", 0.4)  # default title of blocks.5, entry's depth
    assert (rows["last"].title, rows["last"].depth) == ("Last token map", 1.0)
    assert rows["qkv"].title == "Qkv" and 0 < rows["qkv"].depth < rows["mid"].depth


def test_unknown_module_is_named():
    spec = _spec("timm", "vit_tiny_patch16_224", layers=(("x", "blocks.99"),))
    with pytest.raises(ValueError, match=r"model 'm': cannot derive the depth.*no module 'blocks.99'.*give each layer"):
        model_layers(spec)
