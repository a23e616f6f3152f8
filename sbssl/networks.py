"""Networks defined by sbssl itself (zoo source ``sbssl``): the small CNN that the debiasing branch trains on
the embedded colored-digits set (:mod:`sbssl.debias`), so that a debiased network is a zoo model like any other.

Kept apart from the training code: the embedding stage builds these networks, and its code digest
(:mod:`sbssl.provenance`) must not change when only the training code does.
"""

from __future__ import annotations

import torch
from torch import nn

#: Input side (pixels) the small CNN is trained at: scikit-learn's digits are 8 x 8.
SMALL_CNN_INPUT = 8


class GlobalAveragePool(nn.Module):
    """(B, C, H, W) -> (B, C): the mean over the spatial positions."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))


class SmallCNN(nn.Module):
    """Two 3x3 conv layers (32, 64 channels, ReLU; padding keeps the input's H x W) and global average pooling:
    (B, 3, H, W) in [0, 1] -> 64-d. ``forward`` returns the taps ``conv1``, ``conv2`` (feature maps (B, C, H, W))
    and ``pool`` (B, 64). No BatchNorm: with it, this network learnt the digits' shape fast enough that ERM's
    worst group reached ~0.9 on colored-digits, leaving nothing to debias. ``pool`` is a module (no parameters)
    so that the embedding stage can hook it like the convolutions."""

    out_features = 64

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU())
        self.pool = GlobalAveragePool()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        c1 = self.conv1(x)
        c2 = self.conv2(c1)
        return {"conv1": c1, "conv2": c2, "pool": self.pool(c2)}


#: Architectures of the ``sbssl`` source: name -> constructor.
ARCHITECTURES = {"small_cnn": SmallCNN}
#: Their layers (slug -> module path): the conv maps and the pooled feature.
LAYERS = {"small_cnn": (("conv1", "conv1"), ("conv2", "conv2"), ("pool", "pool"))}
