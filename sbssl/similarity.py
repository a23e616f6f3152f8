"""Cosine similarities of all distinct images, per (model, layer), from the HDF5 embedding cache.

The permutation tests only ever need cosines between images, so each embeddings file is reduced once to an
(n, n) float64 matrix that the many test jobs read. This module must not import torch: test jobs import it
thousands of times. The file formats are those of :mod:`sbssl.storage`; each similarity file records
:func:`sbssl.provenance.provenance` of the similarity stage.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sbssl.provenance import code_digest, provenance
from sbssl.storage import (
    PROVENANCE_KEYS,
    SIMILARITY_REMEDY,
    open_embeddings,
    open_h5,
    plain_attrs,
    read_embeddings_header,
    read_sha256,
    read_similarity_arrays,
    write_similarity,
)

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
    256 MiB (e.g. 83 rows of 802,816 float32 values). Every product is accumulated in float64: the result
    equals the float64 cosines of the stored values up to float64 rounding.

    The output's attrs are the embeddings file's, with ``sbssl_version``/``code_digest`` of the similarity
    stage. Raises ValueError naming the image when a row has zero norm or non-finite values (its cosine is
    undefined), and naming the file when it is unreadable or lacks the ``embeddings``/``sha256`` datasets.
    """
    src, dst = Path(embeddings_path), Path(out_path)
    with open_embeddings(src) as (emb, header):
        hashes = header.sha256
        n, dim = header.shape
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
    return write_similarity(dst, gram / np.outer(norms, norms), hashes, {**header.attrs, **provenance("similarity")})


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

    Raises FileNotFoundError when absent and ValueError naming the file when it is unreadable (truncated,
    corrupt), a dataset is missing, the matrix is not square or the number of hashes does not match its size.
    """
    matrix, hashes, attrs = read_similarity_arrays(path)
    return SimilarityMatrix(matrix=matrix, sha256=hashes, attrs=attrs)


def _identity(attrs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attrs.items() if k not in PROVENANCE_KEYS}


def similarity_is_current(embeddings_path: str | os.PathLike[str], similarity_path: str | os.PathLike[str]) -> bool:
    """True when ``similarity_path`` exists, was written by the current similarity code and from an embeddings
    file with the same attributes and image list as ``embeddings_path`` (so recomputing it would give the
    same matrix). An unreadable similarity file is not current; an unreadable embeddings file is an error."""
    source = read_embeddings_header(embeddings_path)
    sim = Path(similarity_path)
    if not sim.is_file():
        return False
    try:
        with open_h5(sim, "similarity", SIMILARITY_REMEDY) as f:
            attrs = plain_attrs(f.attrs)
            hashes = read_sha256(f) if "sha256" in f else None
    except ValueError:
        return False
    return (
        attrs.get("code_digest") == code_digest("similarity")
        and _identity(attrs) == _identity(source.attrs)
        and hashes == source.sha256
    )
