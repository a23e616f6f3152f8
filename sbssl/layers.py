"""Which layers of a model are probed: slugs (the workflow's ``{layer}`` wildcard), module paths, display
titles and relative depth.

The six ResNet-50 layers of the paper keep their torchvision module names as slugs and the paper's titles
(:data:`LAYERS`, :data:`LAYER_TITLES`). Any other model's layers come from its zoo entry (``layers:``) or its
architecture's default (:func:`sbssl.backbones.default_layers`); :func:`model_layers` gives them all as
:class:`LayerInfo` rows, with a relative depth in [0, 1] so that figures can put models of different depth on
one axis. Importing this module imports no torch; only :func:`model_layers` of a non-ResNet-50 model does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sbssl.models import ModelDefinition, ModelSpec

#: torchvision ``resnet50`` module names, in forward order. The paper calls them blocks 1-5 and GAP.
LAYERS: tuple[str, ...] = ("maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool")

LAYER_TITLES: dict[str, str] = {
    "maxpool": "Block 1",
    "layer1": "Block 2",
    "layer2": "Block 3",
    "layer3": "Block 4",
    "layer4": "Block 5",
    "avgpool": "GAP",
}

#: Output shape (C, H, W) of each of the six layers of torchvision's resnet50 at a 224 x 224 input: a flattened
#: map has C * H * W values per image (802,816 at layer1).
RESNET50_SHAPES: dict[str, tuple[int, int, int]] = {
    "maxpool": (64, 56, 56),
    "layer1": (256, 56, 56),
    "layer2": (512, 28, 28),
    "layer3": (1024, 14, 14),
    "layer4": (2048, 7, 7),
    "avgpool": (2048, 1, 1),
}

#: Relative depth of the six layers in torchvision's resnet50 (leaf modules run: 4, 27, 57, 101, 124 and 125
#: of 125), what :func:`sbssl.backbones.layer_depths` computes, kept here so the paper's models need no torch.
RESNET50_DEPTHS: dict[str, float] = {
    "maxpool": 4 / 125,
    "layer1": 27 / 125,
    "layer2": 57 / 125,
    "layer3": 101 / 125,
    "layer4": 124 / 125,
    "avgpool": 1.0,
}


@dataclass(frozen=True)
class LayerInfo:
    """One probed layer of a model: ``slug`` (wildcard, file name), ``module`` (path of the hooked module in
    the built network), ``title`` (display) and ``depth`` (relative depth in [0, 1], see
    :func:`sbssl.backbones.layer_depths`)."""

    slug: str
    module: str
    title: str
    depth: float


def slug_title(slug: str) -> str:
    """A display title for a slug without one: ``block6`` -> ``Block 6``, ``final_norm`` -> ``Final norm``."""
    return re.sub(r"(?<=[a-z])(?=\d)", " ", slug).replace("_", " ").capitalize()


def _is_paper_resnet(definition: ModelDefinition) -> bool:
    return definition.source == "torchvision" and definition.architecture == "resnet50"


def model_layers(
    model: ModelSpec | ModelDefinition, config_dir: str | Path | None = None
) -> list[LayerInfo]:
    """The probed layers of a zoo model, in forward order.

    The entry's ``layers:`` (slug -> module, in the entry's order) or else the architecture's default layers.
    Titles: the entry's own (``{module, title}``), else the default layer's title for that module, else
    :func:`slug_title`. Depths: the entry's own (``depth``), else derived from the architecture
    (:func:`sbssl.backbones.layer_depths`; a torchvision resnet50 uses :data:`RESNET50_DEPTHS`).
    config_dir: a Hugging Face model's config folder (its fetched weights) when the architecture is a hub id.
    """
    from sbssl.models import ModelSpec

    definition = model.definition if isinstance(model, ModelSpec) else model
    labels = model.layer_labels if isinstance(model, ModelSpec) else {}
    if definition.layers is None and _is_paper_resnet(definition):
        return [LayerInfo(slug, slug, LAYER_TITLES[slug], RESNET50_DEPTHS[slug]) for slug in LAYERS]
    from sbssl import backbones

    if definition.layers is None:
        defaults = backbones.default_layers(definition, config_dir)
        depths = backbones.layer_depths(definition, [d.module for d in defaults], config_dir)
        return [LayerInfo(d.slug, d.module, d.title, depths[d.module]) for d in defaults]
    pairs = list(definition.layers)
    titles = dict(LAYER_TITLES) if _is_paper_resnet(definition) else {}
    need_depth = [module for slug, module in pairs if labels.get(slug) is None or labels[slug].depth is None]
    depths: dict[str, float] = {}
    if need_depth:
        if _is_paper_resnet(definition) and all(m in RESNET50_DEPTHS for m in need_depth):
            depths = dict(RESNET50_DEPTHS)
        else:
            try:
                depths = backbones.layer_depths(definition, need_depth, config_dir)
                titles = {d.module: d.title for d in backbones.default_layers(definition, config_dir)}
            except ValueError as exc:
                raise ValueError(
                    f"model {definition.name!r}: cannot derive the depth of its layers ({exc}); give each layer "
                    "{module, title, depth} in the zoo"
                ) from exc
    out = []
    for slug, module in pairs:
        label = labels.get(slug)
        title = (label.title if label else None) or titles.get(module) or slug_title(slug)
        depth = label.depth if label is not None and label.depth is not None else depths[module]
        out.append(LayerInfo(slug, module, title, float(depth)))
    return out


def model_layer_slugs(model: ModelSpec | ModelDefinition, config_dir: str | Path | None = None) -> list[str]:
    """The slugs of :func:`model_layers` (no torch for entries that list their layers or a resnet50)."""
    from sbssl.models import ModelSpec

    definition = model.definition if isinstance(model, ModelSpec) else model
    if definition.layers is not None:
        return [slug for slug, _ in definition.layers]
    if _is_paper_resnet(definition):
        return list(LAYERS)
    return [layer.slug for layer in model_layers(model, config_dir)]
