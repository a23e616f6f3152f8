"""The offline demo's stimuli: procedural images with a planted low-level (colour) association.

Real iEAT stimuli cannot be redistributed and the demo must run with no download, so ``make demo``
generates its own concepts. The planted structure is deliberately low-level, the kind of signal a
randomly initialised network picks up (the paper's section 4.2 shows random nets find colour biases):

- ``targets/warm`` vs ``targets/cool`` with ``attributes/pleasant`` (warm tints) vs
  ``attributes/unpleasant`` (cool tints): a positive association that must come out significant,
  and the same test with X and Y swapped, which must not (the tests are one-sided).
- ``control/first`` vs ``control/second``: each image of ``second`` is the mirror image of its partner
  in ``first`` (same colours, same texture), so no association can exist; the control must not come
  out significant.
- ``intersectional/warm-dots`` vs ``intersectional/cool-dots``: a second planted pair with another
  texture, for the intersectional figure.
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image

from sbssl.io import atomic_path

#: Side of the generated square images, in pixels (the network input size, so no resampling blurs them).
IMAGE_SIZE = 224

# (folder, hue range in [0, 1) turns, saturation, texture)
_CONCEPTS: tuple[tuple[str, tuple[float, float], float, str], ...] = (
    ("targets/warm", (0.00, 0.10), 0.75, "waves"),
    ("targets/cool", (0.52, 0.66), 0.75, "waves"),
    ("attributes/pleasant", (0.02, 0.12), 0.45, "blobs"),
    ("attributes/unpleasant", (0.50, 0.64), 0.45, "blobs"),
    ("control/first", (0.00, 1.00), 0.55, "waves"),
    ("intersectional/warm-dots", (0.00, 0.10), 0.75, "dots"),
    ("intersectional/cool-dots", (0.52, 0.66), 0.75, "dots"),
)


def _texture(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A (size, size) float array in [0, 1]: the luminance pattern of one image."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    if kind == "waves":
        field = np.zeros((size, size))
        for _ in range(4):
            fx, fy = rng.uniform(1, 8, size=2)
            phase = rng.uniform(0, 2 * np.pi)
            field += np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)
    elif kind == "blobs":
        field = np.zeros((size, size))
        for _ in range(6):
            cx, cy = rng.uniform(0, 1, size=2)
            radius = rng.uniform(0.05, 0.25)
            field += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * radius**2))
    elif kind == "dots":
        period = rng.uniform(0.05, 0.12)
        field = np.cos(2 * np.pi * xx / period) * np.cos(2 * np.pi * yy / period)
    else:  # pragma: no cover - guarded by the _CONCEPTS table
        raise ValueError(f"unknown texture {kind!r}")
    field -= field.min()
    return field / max(field.max(), 1e-12)


def _render(hue: float, saturation: float, texture: np.ndarray) -> Image.Image:
    """Colour a luminance pattern with one hue: value follows the texture between 0.35 and 1."""
    value = 0.35 + 0.65 * texture
    r, g, b = colorsys.hsv_to_rgb(hue, saturation, 1.0)
    rgb = np.stack([value * r, value * g, value * b], axis=-1)
    return Image.fromarray(np.round(rgb * 255).astype(np.uint8), mode="RGB")


def generate_demo_stimuli(root: str | Path, *, images_per_concept: int = 8, seed: int = 0) -> list[Path]:
    """Write the demo's concept folders under ``root`` as PNG files and return their paths.

    ``images_per_concept`` images of IMAGE_SIZE x IMAGE_SIZE pixels go into each folder; the same
    ``seed`` gives byte-identical files. ``control/second`` holds the mirror images of ``control/first``.
    """
    if images_per_concept < 2:
        raise ValueError(f"images_per_concept must be at least 2 (got {images_per_concept})")
    root = Path(root)
    rng = np.random.default_rng(seed)
    written: list[Path] = []
    for folder, (hue_lo, hue_hi), saturation, kind in _CONCEPTS:
        for i in range(images_per_concept):
            image = _render(rng.uniform(hue_lo, hue_hi), saturation, _texture(kind, rng, IMAGE_SIZE))
            written.append(_save(image, root / folder / f"{i:02d}.png"))
            if folder == "control/first":
                mirrored = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                written.append(_save(mirrored, root / "control/second" / f"{i:02d}.png"))
    return written


def _save(image: Image.Image, path: Path) -> Path:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path
