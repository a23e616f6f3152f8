"""The six ResNet-50 layers the study probes, by torchvision module name, with the paper's display names."""

from __future__ import annotations

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
