"""Association tests on precomputed embeddings in the iEAT cache format.

One file per concept folder and model: ``<category>_<concept>_<model>.csv`` or ``.csv.gz`` (the folder
``gender/career`` and model ``igpt_l_32`` give ``gender_career_igpt_l_32.csv.gz``). Columns: an unnamed
index column, ``0 .. D-1`` (the embedding) and ``img`` (the image file's base name), one row per image.
The file is the source of truth for a concept's images: the published ``gender/career`` cache has 21 rows
although one of its images is missing from the stimuli. When a stimuli folder is given, rows without an
image and images without a row are reported (:func:`compare_with_stimuli`, :func:`run_catalogue`),
never silently fixed.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Iterable

import numpy as np

from sbssl.catalogue import AssociationTestSpec, load_catalogue
from sbssl.stats import association_test

if TYPE_CHECKING:
    import pandas as pd

RESULT_COLUMNS = (
    "test", "title", "model", "d", "p", "exact", "n_permutations", "p_floor", "statistic",
    "n_x", "n_y", "n_a", "n_b",
)  # fmt: skip


class StimuliMismatchWarning(UserWarning):
    """The embeddings of a concept and its stimulus folder list different images."""


@dataclass(frozen=True)
class ConceptEmbeddings:
    """One concept's cached embeddings: ``vectors`` (n_images, D) float64, ``images`` the n base names."""

    concept: str
    model: str
    path: Path
    images: tuple[str, ...]
    vectors: np.ndarray


@dataclass(frozen=True)
class ImageMismatch:
    """Images of ``concept`` present in only one of the embeddings file and the stimulus folder (sorted)."""

    concept: str
    rows_without_image: tuple[str, ...]
    images_without_row: tuple[str, ...]

    def describe(self) -> str:
        parts = []
        if self.rows_without_image:
            rows = ", ".join(self.rows_without_image)
            parts.append(f"{len(self.rows_without_image)} row(s) without an image: {rows}")
        if self.images_without_row:
            parts.append(f"{len(self.images_without_row)} image(s) without a row: {', '.join(self.images_without_row)}")
        return f"{self.concept}: " + "; ".join(parts)


def embedding_file(embeddings_dir: str | os.PathLike[str], concept: str, model: str) -> Path:
    """Path of the cache file for ``concept`` ("category/concept") and ``model``; .csv.gz preferred over .csv."""
    parts = PurePosixPath(concept).parts
    if len(parts) != 2:
        raise ValueError(f"concept {concept!r}: expected 'category/concept' (two folder levels)")
    stem = f"{parts[0]}_{parts[1]}_{model}"
    tried = [Path(embeddings_dir) / f"{stem}{ext}" for ext in (".csv.gz", ".csv")]
    for path in tried:
        if path.is_file():
            return path
    raise FileNotFoundError(f"no embeddings for {concept!r} and model {model!r}: tried {', '.join(map(str, tried))}")


def read_embeddings(path: str | os.PathLike[str], concept: str = "", model: str = "") -> ConceptEmbeddings:
    """Read one cache file; ValueError naming the file when its columns or values are not as documented."""
    import pandas as pd

    path = Path(path)
    try:
        df = pd.read_csv(path, index_col=0)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, EOFError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"{path}: not a readable embeddings CSV ({exc})") from None
    if "img" not in df.columns:
        raise ValueError(f"{path}: no 'img' column (expected an index column, 0..D-1 and img)")
    dims = [c for c in df.columns if c != "img"]
    if not dims or dims != [str(i) for i in range(len(dims))]:
        shown = f"{dims[:5]}{'...' if len(dims) > 5 else ''}"
        raise ValueError(f"{path}: embedding columns must be 0..D-1 in order, got {shown}")
    if df.empty:
        raise ValueError(f"{path}: no rows")
    try:
        vectors = df[dims].to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: non-numeric embedding values ({exc})") from None
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        raise ValueError(f"{path}: NaN or inf in the rows for {df['img'][bad].astype(str).tolist()}")
    return ConceptEmbeddings(concept, model, path, tuple(df["img"].astype(str)), vectors)


def read_concept(embeddings_dir: str | os.PathLike[str], concept: str, model: str) -> ConceptEmbeddings:
    """The cached embeddings of one concept folder ("category/concept") for ``model``."""
    return read_embeddings(embedding_file(embeddings_dir, concept, model), concept, model)


def compare_with_stimuli(embeddings: ConceptEmbeddings, stimuli_root: str | os.PathLike[str]) -> ImageMismatch | None:
    """Compare the ``img`` column with the files of ``stimuli_root/concept``; None when they list the same images.

    Counted as multisets, so a row listed twice for one file is reported. Hidden files are ignored.
    """
    folder = Path(stimuli_root) / embeddings.concept
    if not folder.is_dir():
        raise FileNotFoundError(f"stimulus folder {folder} not found (concept {embeddings.concept!r})")
    files = Counter(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    rows = Counter(embeddings.images)
    if files == rows:
        return None
    return ImageMismatch(
        embeddings.concept,
        tuple(sorted((rows - files).elements())),
        tuple(sorted((files - rows).elements())),
    )


def _concepts(catalogue: Iterable[AssociationTestSpec]) -> list[str]:
    return list(dict.fromkeys(folder for spec in catalogue for folder in spec.folders().values()))


def run_catalogue(
    embeddings_dir: str | os.PathLike[str],
    model: str,
    catalogue: str | os.PathLike[str] | Iterable[AssociationTestSpec],
    *,
    permutations: int = 10_000,
    seed: int = 0,
    stimuli_root: str | os.PathLike[str] | None = None,
) -> "pd.DataFrame":
    """Run every catalogue test on the cached embeddings of ``model``; one row per test, catalogue order.

    Columns (RESULT_COLUMNS): test (catalogue id), title, model, d (effect size), p, exact,
    n_permutations, p_floor, statistic, n_x, n_y, n_a, n_b. ``catalogue`` is a path or loaded specs.
    With ``stimuli_root``, each concept whose images differ from its stimulus folder raises a
    StimuliMismatchWarning and the list of ImageMismatch is in ``df.attrs["stimuli_mismatches"]``.
    """
    import pandas as pd

    specs = load_catalogue(catalogue) if isinstance(catalogue, (str, os.PathLike)) else list(catalogue)
    loaded = {concept: read_concept(embeddings_dir, concept, model) for concept in _concepts(specs)}
    mismatches: list[ImageMismatch] = []
    if stimuli_root is not None:
        for emb in loaded.values():
            mismatch = compare_with_stimuli(emb, stimuli_root)
            if mismatch is not None:
                mismatches.append(mismatch)
                warnings.warn(mismatch.describe(), StimuliMismatchWarning, stacklevel=2)
    rows = []
    for spec in specs:
        x, y, a, b = (loaded[folder].vectors for folder in spec.folders().values())
        try:
            result = association_test(x, y, a, b, permutations=permutations, seed=seed)
        except ValueError as exc:
            raise ValueError(f"test {spec.id!r}, model {model!r}: {exc}") from None
        rows.append(
            {
                "test": spec.id,
                "title": spec.title,
                "model": model,
                "d": result.effect_size,
                "p": result.p_value,
                "exact": result.exact,
                "n_permutations": result.n_permutations,
                "p_floor": result.p_floor,
                "statistic": result.statistic,
                "n_x": result.n_x,
                "n_y": result.n_y,
                "n_a": result.n_a,
                "n_b": result.n_b,
            }
        )
    df = pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
    df.attrs["stimuli_mismatches"] = mismatches
    return df
