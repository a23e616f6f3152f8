"""The pixel-permutation control of the paper (section 4.2), and which biases survive it.

The paper: "we randomly permute the pixels of the target images" and re-runs the tests: a bias that
survives is explained by colour statistics alone, since every shape and texture is destroyed while the
attribute images stay untouched.

Our choice: the permutation is applied to the model's INPUT TENSOR, after preprocessing (the ``permute``
option of :func:`sbssl.embed.embed_layers`): the 224 x 224 spatial positions of the (3, 224, 224) tensor
are shuffled, all three channels moved together, with a permutation seeded by (seed, image sha256). Shuffling
the pixels of the image file at its source resolution instead, as a stimuli tree of permuted copies would,
lets the preprocessing's resize average neighbouring shuffled pixels, so what the network sees depends on
each file's size (a 32 px CIFAR image becomes 7 x 7 blocks of one shuffled pixel each, a large photo is
averaged into near-uniform noise). On the input tensor every target image keeps exactly the colour multiset
the network would have seen, whatever its source size. The control therefore embeds the main manifest's
images again, with :func:`control_permutation` naming the images to permute; no second stimuli tree exists.

An image is permuted by content (sha256): when the same file also appears in an attribute folder of a
control test (in iEAT, ``insect-flower/insect/roach2_google.jpg`` is byte-identical to
``valence/unpleasant/roach2_google.jpg``), that attribute copy is permuted too; :func:`control_permutation`
warns naming the files. A folder that is a target in one control test and an attribute in another is an
error: the control would have to permute and keep it at once.
"""

from __future__ import annotations

import warnings
from typing import Iterable, Mapping

import numpy as np
import pandas as pd

from sbssl.stimuli import concept_images

#: The columns of :func:`control_survival`'s table, in order.
SURVIVAL_COLUMNS = (
    "model", "layer", "test", "title", "group", "alternative", "d", "p", "d_permuted", "p_permuted",
    "significant", "survives", "note",
)  # fmt: skip


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


def control_permutation(manifest: pd.DataFrame, tests: Iterable[Mapping[str, str]], seed: int) -> dict[str, int]:
    """The images to permute for the control: ``{sha256: seed}`` for every usable image of the target folders
    (x, y) of ``tests`` (catalogue entries or their image sets: mappings with keys x, y, a, b), for the
    ``permute`` option of :func:`sbssl.embed.embed_layers` on the same ``manifest``.

    Raises ValueError when a folder is a target of one control test and an attribute of another, when a
    folder has no usable image, or when ``seed`` is not a non-negative integer. Warns (UserWarning) naming the
    files when an attribute image has the same content as a target image (it is permuted too).
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"control seed must be a non-negative integer, got {seed!r}")
    targets, attributes = _control_roles(list(tests))
    if not targets:
        raise ValueError("no control tests: give at least one test to permute the targets of")
    permuted = {sha for concept in targets for sha in concept_images(manifest, concept)}
    kept = {sha for concept in attributes for sha in concept_images(manifest, concept)}
    shared = permuted & kept
    if shared:
        files = manifest[manifest["sha256"].isin(shared) & manifest["concept"].isin(attributes)]["path"]
        warnings.warn(
            f"{len(files)} attribute image(s) of the control tests have the same content as a target image and "
            f"are permuted too (the embeddings are per image content): {', '.join(sorted(files))}",
            stacklevel=2,
        )
    return {sha: int(seed) for sha in sorted(permuted)}


def _flags(table: pd.DataFrame) -> pd.Series:
    """True for rows whose ``flags`` column (``;``-joined; absent, empty or NaN = none) has ``degenerate``."""
    if "flags" not in table:
        return pd.Series(False, index=table.index)
    return table["flags"].fillna("").astype(str).str.split(";").apply(lambda flags: "degenerate" in flags)


def _alternative(original: pd.DataFrame, permuted: pd.DataFrame) -> str:
    found = {
        name: sorted(table["alternative"].dropna().unique()) if "alternative" in table else ["greater"]
        for name, table in (("original", original), ("permuted", permuted))
    }
    values = sorted(set(found["original"]) | set(found["permuted"]))
    if len(values) > 1:
        raise ValueError(
            f"the tests tables mix alternatives (original: {found['original']}, permuted: {found['permuted']}); "
            "the control compares one tail: run both branches with the same `alternative`"
        )
    return values[0] if values else "greater"


def control_survival(original: pd.DataFrame, permuted: pd.DataFrame, *, alpha: float = 0.05) -> pd.DataFrame:
    """Which biases survive pixel permutation of the targets.

    Both inputs are per-test tables (results/tables/tests.csv columns: model, layer, test, title, group, seed,
    d, p, and optionally alternative and flags). p and d are averaged over seeds per (model, layer, test).
    ``alternative`` (greater | less | two-sided; absent = greater, the paper's one-sided test) must be one
    value across both tables, else ValueError: p is small exactly when the test is significant in its tested
    direction, so significant = p < alpha. Under two-sided, a survivor must also keep the sign of d.

    A (model, layer, test) with ``degenerate`` in ``flags`` for any seed (d undefined) is kept with
    significant and survives False and a ``note`` saying which branch was degenerate.

    Columns :data:`SURVIVAL_COLUMNS`: d, p (original images), d_permuted, p_permuted, significant (p < alpha,
    not degenerate), survives (significant and p_permuted < alpha, permuted not degenerate, and for
    two-sided the same sign of d), note ("" or why a row is not assessed). Only (model, layer, test) present
    in ``permuted`` are reported.
    """
    keys = ["model", "layer", "test"]
    alternative = _alternative(original, permuted)

    def seed_mean(table: pd.DataFrame) -> pd.DataFrame:
        return table.assign(_degenerate=_flags(table)).groupby(keys, sort=True).agg(
            title=("title", "first"), group=("group", "first"), d=("d", "mean"), p=("p", "mean"),
            degenerate=("_degenerate", "any"),
        )  # fmt: skip

    merged = seed_mean(permuted).join(
        seed_mean(original)[["d", "p", "degenerate"]].rename(columns=lambda c: f"{c}_original"), how="left"
    )
    missing = merged[merged["p_original"].isna()]
    if not missing.empty:
        raise ValueError(f"no original result for control rows {list(missing.index[:3])}; run the main tests first")
    degenerate_original = merged["degenerate_original"].astype(bool)
    degenerate_permuted = merged["degenerate"].astype(bool)
    result = pd.DataFrame(
        {
            "title": merged["title"],
            "group": merged["group"],
            "alternative": alternative,
            "d": merged["d_original"],
            "p": merged["p_original"],
            "d_permuted": merged["d"],
            "p_permuted": merged["p"],
        }
    )
    result["significant"] = (result["p"] < alpha) & ~degenerate_original
    survives = result["significant"] & (result["p_permuted"] < alpha) & ~degenerate_permuted
    if alternative == "two-sided":
        survives &= np.sign(result["d"]) == np.sign(result["d_permuted"])
    result["survives"] = survives
    notes = pd.Series("", index=result.index)
    notes[degenerate_original & degenerate_permuted] = "degenerate on original and permuted images (d undefined)"
    notes[degenerate_original & ~degenerate_permuted] = "degenerate on the original images (d undefined)"
    notes[~degenerate_original & degenerate_permuted] = "degenerate on the permuted images (d undefined)"
    result["note"] = notes
    return result.reset_index()[list(SURVIVAL_COLUMNS)]
