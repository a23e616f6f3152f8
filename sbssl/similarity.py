"""Cosine similarities of all distinct images, per (model, layer), from the HDF5 embedding cache.

The permutation tests only ever need cosines between images, so each embeddings file is reduced once to an
(n, n) float64 matrix that the many test jobs read. This module must not import torch: test jobs import it
thousands of times. The file formats are those of :mod:`sbssl.storage`; each similarity file records
:func:`sbssl.provenance.provenance` of the similarity stage.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
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

#: Default memory budget of one band of columns of all rows, as stored (bytes). Two bands are held at once: the
#: next one is read while this one is multiplied.
DEFAULT_BAND_BYTES = 256 * 2**20
#: Budget of one float64 column slice of a band (bytes), converted for one symmetric product.
_SLICE_BYTES = 64 * 2**20


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

    @functools.cached_property
    def _position(self) -> dict[str, int]:
        # Built once per matrix: the workflow looks up four concepts per test in the same cached matrix.
        return {sha: i for i, sha in enumerate(self.sha256)}

    def indices(self, hashes: Sequence[str]) -> np.ndarray:
        """Row indices (int64, same order, repeats kept) of the images with these sha256 hashes."""
        position = self._position
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
    band_columns: int | None = None,
) -> Path:
    """Write the (n, n) cosine-similarity matrix of all rows of an embeddings file; return ``out_path``.

    The Gram matrix is accumulated over bands of columns: each band holds every row's values of
    ``band_columns`` columns as stored, and is read once (the next band is read in a thread while this one is
    multiplied); it is converted to float64 a column slice at a time and each slice adds its symmetric product
    ``S @ S.T`` (BLAS syrk). Memory stays bounded by two bands as stored plus one 64 MiB float64 slice
    (buffers made once and reused), whatever the layer size; the default band keeps within 256 MiB, as a multiple of the file's chunk width
    (65,536 columns of the 664 iEAT images: 174 MB in float32). Every element is read and decompressed once
    when the chunks are column tiles (:func:`sbssl.storage.create_embeddings`); files with whole-row chunks
    of wide layers (sbssl before 2026-11) are decompressed once per band. Every product is accumulated in
    float64: the result equals the float64 cosines of the stored values up to float64 rounding.

    The output's attrs are the embeddings file's, with ``sbssl_version``/``code_digest`` of the similarity
    stage. Raises ValueError naming the image when a row has zero norm or non-finite values (its cosine is
    undefined), and naming the file when it is unreadable or lacks the ``embeddings``/``sha256`` datasets.
    """
    src, dst = Path(embeddings_path), Path(out_path)
    with open_embeddings(src) as (emb, header):
        hashes = header.sha256
        n, dim = header.shape
        if band_columns is None:
            band_columns = _default_band(n, dim, emb.dtype.itemsize, emb.chunks[1] if emb.chunks else dim)
        if band_columns < 1:
            raise ValueError(f"band_columns must be >= 1, got {band_columns}")
        width = max(1, min(band_columns, _SLICE_BYTES // (8 * n)))
        starts = range(0, dim, band_columns)
        # Buffers made once and reused (fresh gigabytes would cost as much in page faults as the products):
        # two bands (one read while the other is multiplied), one float64 slice, one product.
        bands = [np.empty((n, min(band_columns, dim)), dtype=emb.dtype) for _ in range(min(2, len(starts)))]
        part = np.empty((n, width), dtype=np.float64)
        product = np.empty((n, n), dtype=np.float64)
        gram = np.zeros((n, n), dtype=np.float64)

        def read(k: int) -> np.ndarray:
            b0 = starts[k]
            columns = min(band_columns, dim - b0)
            band = bands[k % len(bands)]
            emb.read_direct(band, np.s_[:, b0 : b0 + columns], np.s_[:, :columns])
            return band[:, :columns]

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sbssl-read") as reader:
            # h5py releases the GIL while it decompresses, so the next band is read during the products
            pending = reader.submit(read, 0)
            for k in range(len(starts)):
                band = pending.result()
                if k + 1 < len(starts):
                    pending = reader.submit(read, k + 1)
                for c0 in range(0, band.shape[1], width):
                    columns = min(width, band.shape[1] - c0)
                    np.copyto(part[:, :columns], band[:, c0 : c0 + columns])
                    s = part[:, :columns]
                    gram += np.matmul(s, s.T, out=product)  # the same operand transposed: BLAS syrk
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


def _default_band(n: int, dim: int, itemsize: int, chunk_columns: int) -> int:
    """Columns per band within :data:`DEFAULT_BAND_BYTES`, a multiple of the chunk width when that fits."""
    columns = max(1, DEFAULT_BAND_BYTES // (n * itemsize))
    if chunk_columns < dim and columns >= chunk_columns:
        columns -= columns % chunk_columns
    return min(columns, dim)


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
