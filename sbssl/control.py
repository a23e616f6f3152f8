"""The pixel-permutation control of the paper (section 4.2).

The target images of chosen tests get their pixel positions shuffled (a seeded permutation per image:
colour statistics stay, every shape and texture is destroyed); the attribute images stay untouched.
Re-running the tests on these stimuli shows which biases survive without any image content, i.e.
which are explained by low-level colour statistics alone.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pandas as pd
from PIL import Image

from sbssl.io import atomic_path
from sbssl.stimuli import load_image


def permute_pixels(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Shuffle the pixel positions of an RGB image (each pixel keeps its three channels).

    The result has the same size and exactly the same multiset of pixel colours.
    """
    pixels = np.asarray(image.convert("RGB"))
    height, width, _ = pixels.shape
    flat = pixels.reshape(height * width, 3)
    return Image.fromarray(flat[rng.permutation(height * width)].reshape(height, width, 3), mode="RGB")


def _control_roles(tests: Iterable[Mapping[str, str]]) -> tuple[list[str], list[str]]:
    targets = sorted({t[k] for t in tests for k in ("x", "y")})
    attributes = sorted({t[k] for t in tests for k in ("a", "b")})
    both = sorted(set(targets) & set(attributes))
    if both:
        raise ValueError(
            f"folder(s) {both} are targets in one control test and attributes in another; "
            "the control permutes targets only, so choose control.tests without such overlap"
        )
    return targets, attributes


def build_control_stimuli(
    stimuli_root: str | Path,
    manifest: pd.DataFrame,
    tests: Iterable[Mapping[str, str]],
    out_root: str | Path,
    *,
    seed: int = 0,
) -> pd.DataFrame:
    """Write the control stimuli tree for ``tests`` (catalogue entries) under ``out_root``.

    Target folders (x, y) get pixel-permuted PNG copies of their usable images; attribute folders
    (a, b) get byte-identical copies. Each image's permutation is seeded by ``seed`` and its sha256,
    so it does not depend on folder order. Returns one row per written file: source, path (relative
    to ``out_root``), role ("permuted" or "copied").
    """
    stimuli_root, out_root = Path(stimuli_root), Path(out_root)
    targets, attributes = _control_roles(list(tests))
    usable = manifest[~manifest["status"].str.contains("unreadable")]
    rows = []
    for concept in targets + attributes:
        files = usable[usable["concept"] == concept]
        if files.empty:
            raise ValueError(f"control concept {concept!r} has no usable images under {stimuli_root}")
        for path, sha in zip(files["path"], files["sha256"]):
            source = stimuli_root / path
            if concept in targets:
                rng = np.random.default_rng([seed, int(sha[:16], 16)])
                dest = (out_root / path).with_suffix(".png")
                with atomic_path(dest) as tmp:
                    permute_pixels(load_image(source), rng).save(tmp, format="PNG")
                role = "permuted"
            else:
                dest = out_root / path
                with atomic_path(dest) as tmp:
                    shutil.copyfile(source, tmp)
                role = "copied"
            rows.append({"source": path, "path": dest.relative_to(out_root).as_posix(), "role": role})
    return pd.DataFrame(rows, columns=["source", "path", "role"])


def control_survival(original: pd.DataFrame, permuted: pd.DataFrame, *, alpha: float = 0.05) -> pd.DataFrame:
    """Which biases survive pixel permutation of the targets.

    Both inputs are per-test tables (results/tables/tests.csv columns); p and d are averaged over seeds
    per (model, layer, test). Columns: model, layer, test, title, group, d, p, d_permuted, p_permuted,
    significant (p < alpha on the original images), survives (significant and p_permuted < alpha).
    Only (model, layer, test) present in ``permuted`` are reported.
    """
    keys = ["model", "layer", "test"]

    def seed_mean(table: pd.DataFrame) -> pd.DataFrame:
        return table.groupby(keys, sort=True).agg(
            title=("title", "first"), group=("group", "first"), d=("d", "mean"), p=("p", "mean")
        )

    merged = seed_mean(permuted).join(
        seed_mean(original)[["d", "p"]].rename(columns={"d": "d_original", "p": "p_original"}), how="left"
    )
    missing = merged[merged["p_original"].isna()]
    if not missing.empty:
        raise ValueError(f"no original result for control rows {list(missing.index[:3])}; run the main tests first")
    result = pd.DataFrame(
        {
            "title": merged["title"],
            "group": merged["group"],
            "d": merged["d_original"],
            "p": merged["p_original"],
            "d_permuted": merged["d"],
            "p_permuted": merged["p"],
        }
    ).reset_index()
    result["significant"] = result["p"] < alpha
    result["survives"] = result["significant"] & (result["p_permuted"] < alpha)
    return result
