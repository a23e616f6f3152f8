"""The HDF5 file formats of the embedding cache and of the similarity matrices, in one module.

This module must not import torch: the test jobs read similarity files thousands of times.

- embeddings ``results/embeddings/{model}/{layer}.h5`` (written by :mod:`sbssl.embed`): dataset
  ``embeddings`` (n_images, dim) float32 (or float16 when asked for), compressed with the LZ4 HDF5 filter
  (registered filter 32004, from ``hdf5plugin``; importing this module registers it, and any other reader needs
  ``import hdf5plugin`` before reading the values), in chunks of whole rows up to :data:`CHUNK_COLUMNS` values
  per row and of one row's :data:`CHUNK_COLUMNS`-column tiles beyond (so a band of columns of every row reads
  without decompressing the rest). Files written before 2026-11-30 are LZF-compressed; they read the same way,
  with a slower decompression. Dataset
  ``sha256`` (n_images,) UTF-8, the image of each row; attrs model, weights_sha256, preprocessing, layer,
  pooling, dtype, permute, permuted_images, versions (JSON string), sbssl_version, code_digest, plus any
  further model-identity keys the caller gives.
- similarity ``results/similarity/{model}/{layer}.h5`` (written by :mod:`sbssl.similarity`): dataset
  ``similarity`` (n, n) float64 cosines, row and column order = dataset ``sha256`` (n,) UTF-8; attrs those
  of the embeddings file, with sbssl_version and code_digest those of the similarity stage.

Readers check the datasets and shapes and raise ValueError naming the file and the remedy, also when the
file is truncated or otherwise unreadable by HDF5.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import h5py
import hdf5plugin
import numpy as np

from sbssl.io import atomic_path

#: HDF5 type of the ``sha256`` datasets (variable-length UTF-8 strings).
SHA256_DTYPE = h5py.string_dtype("utf-8")
#: Attributes that say which code wrote a file (:func:`sbssl.provenance.provenance`).
PROVENANCE_KEYS = ("sbssl_version", "code_digest")
#: Target size of one embeddings chunk of whole rows: large enough for fast compression, small enough for the chunk
#: cache.
CHUNK_BYTES = 2**20
#: HDF5 filter of the embeddings values. LZ4 rather than h5py's built-in LZF: on ReLU-like float32 maps it is about
#: as compact (the zeros are what compresses; the mantissas do not) and decompresses 4-8 times faster, which is
#: what the similarity job, reading every value once, waits for (``benchmarks/bench_similarity.py``). Zstandard
#: would be ~12% smaller but decompresses at half LZ4's speed.
EMBEDDINGS_FILTER = hdf5plugin.LZ4()
#: Widest chunk (values): rows wider than this (flattened maps, 802,816 values at layer1) are stored as one row's
#: tiles of this many columns, so the similarity job reads column bands of all rows, each chunk once.
CHUNK_COLUMNS = 2**16

EMBEDDINGS_REMEDY = "delete it and re-run the embedding step"
SIMILARITY_REMEDY = "delete it and re-run the similarity step"


def write_sha256(group: h5py.Group, hashes: Sequence[str]) -> None:
    """Write the ``sha256`` dataset (n,) of UTF-8 strings into an open HDF5 file or group."""
    group.create_dataset("sha256", data=np.array(list(hashes), dtype=object), dtype=SHA256_DTYPE)


def read_sha256(group: h5py.Group) -> list[str]:
    """Read the ``sha256`` dataset of an open HDF5 file as a list of str."""
    return [str(s) for s in group["sha256"].asstr()[()]]


def plain_attrs(attrs: h5py.AttributeManager) -> dict[str, Any]:
    """HDF5 attributes as plain Python values (str, int, float, ...), not numpy scalars."""
    return {key: (value.item() if isinstance(value, np.generic) else value) for key, value in attrs.items()}


@contextlib.contextmanager
def open_h5(path: str | os.PathLike[str], what: str, remedy: str) -> Iterator[h5py.File]:
    """Open an HDF5 file read-only; yield it.

    Raises FileNotFoundError when absent, and ValueError naming the file, ``what`` it should be and
    ``remedy`` when HDF5 cannot read it (truncated, corrupt, not HDF5), at opening or while reading it
    inside the ``with`` block.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{what} file {file} not found; {remedy}")
    try:
        with h5py.File(file, "r") as f:
            yield f
    except OSError as exc:
        raise ValueError(f"{file}: not a readable HDF5 {what} file (truncated or corrupt: {exc}); {remedy}") from exc


def require_datasets(f: h5py.File, path: str | os.PathLike[str], names: Sequence[str], what: str, remedy: str) -> None:
    """Raise ValueError naming the file when any of the datasets ``names`` is missing."""
    missing = [name for name in names if not isinstance(f.get(name), h5py.Dataset)]
    if missing:
        raise ValueError(f"{path}: not a valid {what} file (dataset(s) {', '.join(missing)} missing); {remedy}")


def create_embeddings(f: h5py.File, n: int, dim: int, dtype: np.dtype) -> h5py.Dataset:
    """Create the ``embeddings`` dataset (n, dim), compressed with :data:`EMBEDDINGS_FILTER`: whole rows per chunk
    of about :data:`CHUNK_BYTES` when ``dim`` <= :data:`CHUNK_COLUMNS`, else one row's :data:`CHUNK_COLUMNS`-column
    tile per chunk."""
    dtype = np.dtype(dtype)
    if dim > CHUNK_COLUMNS:
        chunks = (1, CHUNK_COLUMNS)
    else:
        chunks = (max(1, min(n, CHUNK_BYTES // (dim * dtype.itemsize))), dim)
    return f.create_dataset("embeddings", shape=(n, dim), dtype=dtype, chunks=chunks, compression=EMBEDDINGS_FILTER)


def _check_embeddings(f: h5py.File, path: Path) -> list[str]:
    require_datasets(f, path, ("embeddings", "sha256"), "embeddings", EMBEDDINGS_REMEDY)
    hashes = read_sha256(f)
    shape = f["embeddings"].shape
    if len(shape) != 2 or shape[0] != len(hashes) or shape[0] == 0:
        raise ValueError(
            f"{path}: embeddings have shape {shape} but {len(hashes)} sha256 entries; expected (n_images, dim) "
            f"with n_images = len(sha256) > 0; {EMBEDDINGS_REMEDY}"
        )
    return hashes


@dataclass(frozen=True)
class EmbeddingsHeader:
    """What an embeddings file holds, without its values: attrs (plain values), sha256 (row order), shape."""

    attrs: dict[str, Any]
    sha256: list[str]
    shape: tuple[int, int]


def read_embeddings_header(path: str | os.PathLike[str]) -> EmbeddingsHeader:
    """Attributes, row hashes and shape of a valid embeddings file (ValueError naming the file otherwise)."""
    file = Path(path)
    with open_h5(file, "embeddings", EMBEDDINGS_REMEDY) as f:
        hashes = _check_embeddings(f, file)
        return EmbeddingsHeader(attrs=plain_attrs(f.attrs), sha256=hashes, shape=tuple(f["embeddings"].shape))


@contextlib.contextmanager
def open_embeddings(path: str | os.PathLike[str]) -> Iterator[tuple[h5py.Dataset, EmbeddingsHeader]]:
    """Open a valid embeddings file; yield its ``embeddings`` dataset (read rows from it lazily) and header.

    Errors as :func:`open_h5` and :func:`read_embeddings_header`, including read errors inside the block.
    """
    file = Path(path)
    with open_h5(file, "embeddings", EMBEDDINGS_REMEDY) as f:
        hashes = _check_embeddings(f, file)
        yield f["embeddings"], EmbeddingsHeader(plain_attrs(f.attrs), hashes, tuple(f["embeddings"].shape))


def write_similarity(
    path: str | os.PathLike[str], matrix: np.ndarray, hashes: Sequence[str], attrs: Mapping[str, Any]
) -> Path:
    """Write a similarity file atomically: ``matrix`` (n, n) float64, its ``sha256`` order and ``attrs``."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape != (len(hashes), len(hashes)):
        raise ValueError(f"similarity matrix of shape {matrix.shape} for {len(hashes)} images; expected (n, n)")
    dst = Path(path)
    with atomic_path(dst) as tmp:
        with h5py.File(tmp, "w") as out:
            out.create_dataset("similarity", data=matrix)
            write_sha256(out, hashes)
            out.attrs.update(dict(attrs))
    return dst


def read_similarity_arrays(path: str | os.PathLike[str]) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """(matrix (n, n) float64, sha256 list, attrs) of a similarity file, validated.

    Raises FileNotFoundError when absent and ValueError naming the file when it is unreadable, a dataset is
    missing, the matrix is not square or the number of hashes does not match its size.
    """
    file = Path(path)
    with open_h5(file, "similarity", SIMILARITY_REMEDY) as f:
        require_datasets(f, file, ("similarity", "sha256"), "similarity", SIMILARITY_REMEDY)
        matrix = f["similarity"][()]
        hashes = read_sha256(f)
        attrs = plain_attrs(f.attrs)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"{file}: similarity matrix has shape {matrix.shape}, expected square (n, n); {SIMILARITY_REMEDY}")
    if len(hashes) != matrix.shape[0]:
        raise ValueError(
            f"{file}: {len(hashes)} sha256 entries for a {matrix.shape[0]}x{matrix.shape[0]} similarity matrix; "
            f"{SIMILARITY_REMEDY}"
        )
    return np.asarray(matrix, dtype=np.float64), hashes, attrs
