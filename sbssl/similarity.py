"""Cosine similarities of all distinct images, per (model, layer), from the HDF5 embedding cache.

The permutation tests only ever need cosines between images, so each embeddings file is reduced once to an
(n, n) float64 matrix that the many test jobs read. This module must not import torch: test jobs import it
thousands of times.

File formats (see the team contract):

- embeddings ``results/embeddings/{model}/{layer}.h5``: dataset ``embeddings`` (n_images, dim), float16 or
  float32; dataset ``sha256`` (n_images,) UTF-8; attrs model, weights_sha256, preprocessing, layer, pooling,
  dtype, versions (JSON string).
- similarity ``results/similarity/{model}/{layer}.h5``: dataset ``similarity`` (n, n) float64 cosines, row and
  column order = dataset ``sha256`` (n,) UTF-8; attrs copied from the embeddings file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from sbssl.io import atomic_path

#: HDF5 type of the ``sha256`` datasets (variable-length UTF-8 strings).
SHA256_DTYPE = h5py.string_dtype("utf-8")

#: Default memory budget of one row block of embeddings as stored (bytes). Two blocks are held at once.
DEFAULT_BLOCK_BYTES = 256 * 2**20
#: Budget of one float64 column slice of a row block (bytes); two are held at once during a product.
_SLICE_BYTES = 32 * 2**20


@dataclass(frozen=True)
class SimilarityMatrix:
    """A similarity file in memory.

    matrix: (n, n) float64 cosine similarities; row/column i is the image with hash ``sha256[i]``.
    sha256: the n image hashes (hex), in matrix order.
    attrs: the file's attributes (model, layer, preprocessing, pooling, ...), as plain Python values.
    """

    matrix: np.ndarray
    sha256: list[str]
    attrs: dict[str, Any]

    def indices(self, hashes: Sequence[str]) -> np.ndarray:
        """Row indices (int64, same order, repeats kept) of the images with these sha256 hashes."""
        position = {sha: i for i, sha in enumerate(self.sha256)}
        missing = [sha for sha in hashes if sha not in position]
        if missing:
            raise KeyError(
                f"{len(missing)} image(s) not in the similarity matrix of model {self.attrs.get('model')!r}, "
                f"layer {self.attrs.get('layer')!r} (first: {missing[0]}); re-run the embedding step on the "
                "current stimuli manifest"
            )
        return np.fromiter((position[sha] for sha in hashes), dtype=np.int64, count=len(hashes))


def write_sha256(group: h5py.Group, hashes: Sequence[str]) -> None:
    """Write the ``sha256`` dataset (n,) of UTF-8 strings into an open HDF5 file or group."""
    group.create_dataset("sha256", data=np.array(list(hashes), dtype=object), dtype=SHA256_DTYPE)


def read_sha256(group: h5py.Group) -> list[str]:
    """Read the ``sha256`` dataset of an open HDF5 file as a list of str."""
    return [str(s) for s in group["sha256"].asstr()[()]]


def plain_attrs(attrs: h5py.AttributeManager) -> dict[str, Any]:
    """HDF5 attributes as plain Python values (str, int, float, ...), not numpy scalars."""
    return {key: (value.item() if isinstance(value, np.generic) else value) for key, value in attrs.items()}


def _require_datasets(f: h5py.File, path: Path, names: Sequence[str], what: str) -> None:
    missing = [name for name in names if not isinstance(f.get(name), h5py.Dataset)]
    if missing:
        raise ValueError(
            f"{path}: not a valid {what} file (dataset(s) {', '.join(missing)} missing); delete it and re-run "
            "the embedding step"
        )


def cosine_similarities(
    embeddings_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    block_rows: int | None = None,
) -> Path:
    """Write the (n, n) cosine-similarity matrix of all rows of an embeddings file; return ``out_path``.

    The Gram matrix is computed block by block (row blocks of ``block_rows`` images, column slices of the
    feature dimension converted to float64), so memory stays bounded by about two row blocks as stored plus
    two 32 MiB float64 slices, whatever the layer size. The default ``block_rows`` keeps one block within
    256 MiB (e.g. 167 rows of 802,816 float16 values). Every product is accumulated in float64: the result
    equals the float64 cosines of the stored (e.g. float16) values up to float64 rounding. Measured on the
    664 iEAT images at layer1 (802,816 float16 values each): peak RSS 0.84 GB, 17 s on 2 CPU cores.

    Raises ValueError naming the image when a row has zero norm or non-finite values (its cosine is
    undefined), and when the file lacks the ``embeddings``/``sha256`` datasets.
    """
    src, dst = Path(embeddings_path), Path(out_path)
    if not src.is_file():
        raise FileNotFoundError(f"embeddings file {src} not found; run the embedding step first")
    with h5py.File(src, "r") as f:
        _require_datasets(f, src, ("embeddings", "sha256"), "embeddings")
        emb = f["embeddings"]
        hashes = read_sha256(f)
        attrs = dict(f.attrs)
        if emb.ndim != 2 or emb.shape[0] != len(hashes) or emb.shape[0] == 0:
            raise ValueError(
                f"{src}: embeddings have shape {emb.shape} but {len(hashes)} sha256 entries; expected "
                "(n_images, dim) with n_images = len(sha256) > 0; delete it and re-run the embedding step"
            )
        n, dim = emb.shape
        if block_rows is None:
            block_rows = max(1, DEFAULT_BLOCK_BYTES // (dim * emb.dtype.itemsize))
        if block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {block_rows}")
        block_rows = min(block_rows, n)
        starts = list(range(0, n, block_rows))
        gram = np.empty((n, n), dtype=np.float64)
        for i0 in starts:
            i1 = min(i0 + block_rows, n)
            rows_i = emb[i0:i1]
            for j0 in starts:
                if j0 < i0:
                    continue  # symmetric: the lower blocks are the transposes of upper ones
                j1 = min(j0 + block_rows, n)
                rows_j = rows_i if j0 == i0 else emb[j0:j1]
                block = _gram_block(rows_i, rows_j)
                gram[i0:i1, j0:j1] = block
                gram[j0:j1, i0:i1] = block.T
            del rows_i
    norms = np.sqrt(np.diagonal(gram))
    bad = np.flatnonzero(~np.isfinite(norms) | (norms == 0))
    if bad.size:
        i = int(bad[0])
        kind = "zero" if norms[i] == 0 else "non-finite"
        raise ValueError(
            f"{src}: the embedding of image {hashes[i]} has {kind} norm ({bad.size} image(s) affected), so its "
            "cosine similarity is undefined; check the image and the model weights (use dtype float32 if "
            "float16 overflowed)"
        )
    similarity = gram / np.outer(norms, norms)
    with atomic_path(dst) as tmp:
        with h5py.File(tmp, "w") as out:
            out.create_dataset("similarity", data=similarity)
            write_sha256(out, hashes)
            out.attrs.update(attrs)
    return dst


def _gram_block(rows_i: np.ndarray, rows_j: np.ndarray) -> np.ndarray:
    """float64 ``rows_i @ rows_j.T`` over column slices small enough to convert to float64 on the fly."""
    width = max(1, _SLICE_BYTES // (8 * max(len(rows_i), len(rows_j))))
    block = np.zeros((len(rows_i), len(rows_j)), dtype=np.float64)
    for c0 in range(0, rows_i.shape[1], width):
        a = rows_i[:, c0 : c0 + width].astype(np.float64)
        b = a if rows_j is rows_i else rows_j[:, c0 : c0 + width].astype(np.float64)
        block += a @ b.T
    return block


def read_similarity(path: str | os.PathLike[str]) -> SimilarityMatrix:
    """Read a similarity file written by :func:`cosine_similarities`.

    Raises FileNotFoundError when absent and ValueError naming the file when a dataset is missing, the
    matrix is not square or the number of hashes does not match its size.
    """
    src = Path(path)
    if not src.is_file():
        raise FileNotFoundError(f"similarity file {src} not found; run the embedding/similarity step first")
    with h5py.File(src, "r") as f:
        _require_datasets(f, src, ("similarity", "sha256"), "similarity")
        matrix = f["similarity"][()]
        hashes = read_sha256(f)
        attrs = plain_attrs(f.attrs)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"{src}: similarity matrix has shape {matrix.shape}, expected square (n, n); delete it")
    if len(hashes) != matrix.shape[0]:
        raise ValueError(
            f"{src}: {len(hashes)} sha256 entries for a {matrix.shape[0]}x{matrix.shape[0]} similarity matrix; "
            "delete it and recompute"
        )
    return SimilarityMatrix(matrix=np.asarray(matrix, dtype=np.float64), sha256=hashes, attrs=attrs)


def similarity_is_current(embeddings_path: str | os.PathLike[str], similarity_path: str | os.PathLike[str]) -> bool:
    """True when ``similarity_path`` exists and was made from an embeddings file with the same attributes and
    image list as ``embeddings_path`` (so recomputing it would give the same matrix)."""
    sim = Path(similarity_path)
    if not sim.is_file():
        return False
    with h5py.File(embeddings_path, "r") as f:
        source_attrs, source_hashes = plain_attrs(f.attrs), read_sha256(f)
    with h5py.File(sim, "r") as f:
        return plain_attrs(f.attrs) == source_attrs and "sha256" in f and read_sha256(f) == source_hashes
