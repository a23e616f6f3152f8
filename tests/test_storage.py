from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest

from sbssl.provenance import module_closure
from sbssl.storage import (
    EMBEDDINGS_REMEDY,
    SIMILARITY_REMEDY,
    create_embeddings,
    open_embeddings,
    plain_attrs,
    read_embeddings_header,
    read_sha256,
    read_similarity_arrays,
    write_sha256,
    write_similarity,
)

HASHES = [f"{i:064x}" for i in range(5)]


def embeddings_file(path: Path, values: np.ndarray, hashes=HASHES, **attrs) -> Path:
    with h5py.File(path, "w") as f:
        create_embeddings(f, len(values), values.shape[1], values.dtype)[...] = values
        write_sha256(f, hashes)
        f.attrs.update({"model": "m", "layer": "layer1", "permuted_images": 0, **attrs})
    return path


def test_embeddings_round_trip_with_row_chunks(tmp_path):
    values = np.random.default_rng(0).random((5, 3000), dtype=np.float32)
    path = embeddings_file(tmp_path / "e.h5", values)
    header = read_embeddings_header(path)
    assert header.sha256 == HASHES and header.shape == (5, 3000)
    assert header.attrs == {"model": "m", "layer": "layer1", "permuted_images": 0}
    assert type(header.attrs["permuted_images"]) is int  # plain Python values, not numpy scalars
    with open_embeddings(path) as (dataset, same):
        np.testing.assert_array_equal(dataset[1:3], values[1:3])
        assert same == header
        assert dataset.chunks == (5, 3000)  # whole rows, <= 1 MiB per chunk
    with h5py.File(tmp_path / "big.h5", "w") as f:
        assert create_embeddings(f, 10, 802_816, np.dtype("float32")).chunks == (1, 65_536)  # a row's column tiles
        assert create_embeddings(f.create_group("g"), 1000, 2048, np.dtype("float16")).chunks == (256, 2048)


def test_embeddings_are_lz4_compressed_and_lzf_files_of_earlier_sbssl_still_read(tmp_path):
    values = np.maximum(np.random.default_rng(1).standard_normal((5, 3000), dtype=np.float32), 0)  # as after a ReLU
    with open_embeddings(embeddings_file(tmp_path / "e.h5", values)) as (dataset, _):
        assert dataset.id.get_create_plist().get_filter(0)[0] == hdf5plugin.LZ4_ID
        assert dataset.id.get_storage_size() < 0.8 * values.nbytes  # the zeros compress
        np.testing.assert_array_equal(dataset[()], values)
    with h5py.File(tmp_path / "lzf.h5", "w") as f:
        f.create_dataset("embeddings", data=values, chunks=(1, 3000), compression="lzf")
        write_sha256(f, HASHES)
    with open_embeddings(tmp_path / "lzf.h5") as (dataset, _):
        np.testing.assert_array_equal(dataset[()], values)


def test_importing_the_module_registers_the_filter_for_other_readers(tmp_path):
    path = embeddings_file(tmp_path / "e.h5", np.ones((5, 3), np.float32))
    read = f"import h5py; print(h5py.File({str(path)!r}, 'r')['embeddings'][()].sum())"
    assert subprocess.run([sys.executable, "-c", "import sbssl.storage; " + read], capture_output=True, text=True,
                          check=True).stdout.strip() == "15.0"  # fmt: skip
    assert subprocess.run([sys.executable, "-c", read], capture_output=True).returncode != 0  # h5py alone cannot


def test_sha256_and_attrs_helpers(tmp_path):
    with h5py.File(tmp_path / "s.h5", "w") as f:
        write_sha256(f, ["ab", "cd"])
        f.attrs["n"] = np.int64(3)
        f.attrs["x"] = "text"
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert read_sha256(f) == ["ab", "cd"]
        assert plain_attrs(f.attrs) == {"n": 3, "x": "text"} and type(plain_attrs(f.attrs)["n"]) is int


def test_invalid_embeddings_files_name_the_file_and_the_remedy(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"embeddings file .*absent\.h5 not found; {EMBEDDINGS_REMEDY}"):
        read_embeddings_header(tmp_path / "absent.h5")
    with h5py.File(tmp_path / "nosha.h5", "w") as f:
        f.create_dataset("embeddings", data=np.ones((2, 3)))
    with pytest.raises(ValueError, match=rf"nosha\.h5: not a valid embeddings file \(dataset\(s\) sha256 missing\); {EMBEDDINGS_REMEDY}"):
        read_embeddings_header(tmp_path / "nosha.h5")
    embeddings_file(tmp_path / "count.h5", np.ones((4, 3), np.float32), hashes=HASHES[:3])
    with pytest.raises(ValueError, match=r"count\.h5: embeddings have shape \(4, 3\) but 3 sha256 entries"):
        read_embeddings_header(tmp_path / "count.h5")
    (tmp_path / "text.h5").write_text("not HDF5")
    with pytest.raises(ValueError, match=rf"text\.h5: not a readable HDF5 embeddings file .*{EMBEDDINGS_REMEDY}"):
        read_embeddings_header(tmp_path / "text.h5")


def test_truncated_or_corrupt_files_are_errors_naming_the_file(tmp_path):
    values = np.tile(np.arange(3000, dtype=np.float32), (5, 1))  # compressible: the chunks are compressed
    path = embeddings_file(tmp_path / "e.h5", values)
    data = path.read_bytes()
    (tmp_path / "short.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"short\.h5: not a readable HDF5 embeddings file \(truncated or corrupt"):
        read_embeddings_header(tmp_path / "short.h5")
    # Garbage inside the compressed chunk: the header reads, the values do not.
    with h5py.File(path, "r") as f:
        offset = f["embeddings"].id.get_chunk_info(0).byte_offset
    corrupt = bytearray(data)
    corrupt[offset : offset + 64] = b"\xff" * 64
    (tmp_path / "bad.h5").write_bytes(bytes(corrupt))
    assert read_embeddings_header(tmp_path / "bad.h5").shape == (5, 3000)
    with pytest.raises(ValueError, match=rf"bad\.h5: not a readable HDF5 embeddings file .*{EMBEDDINGS_REMEDY}"):
        with open_embeddings(tmp_path / "bad.h5") as (dataset, _):
            dataset[()]


def test_similarity_round_trip_and_checks(tmp_path):
    matrix = np.array([[1.0, 0.5], [0.5, 1.0]])
    path = write_similarity(tmp_path / "sim" / "s.h5", matrix, ["a", "b"], {"model": "m", "code_digest": "c"})
    read_matrix, hashes, attrs = read_similarity_arrays(path)
    np.testing.assert_array_equal(read_matrix, matrix)
    assert hashes == ["a", "b"] and attrs == {"model": "m", "code_digest": "c"}
    assert not list(path.parent.glob(".*"))  # written atomically, no temporary file left
    with pytest.raises(ValueError, match=r"shape \(2, 2\) for 3 images"):
        write_similarity(tmp_path / "x.h5", matrix, ["a", "b", "c"], {})
    data = path.read_bytes()
    path.write_bytes(data[:1000])
    with pytest.raises(ValueError, match=rf"s\.h5: not a readable HDF5 similarity file .*{SIMILARITY_REMEDY}"):
        read_similarity_arrays(path)


def test_the_embedding_code_does_not_depend_on_the_similarity_code():
    # The formats live in storage: the embed stage's code (and its digest) no longer includes similarity.py.
    assert "similarity" not in module_closure(("embed",))
    assert "storage" in module_closure(("embed",)) and "storage" in module_closure(("similarity",))


def test_module_does_not_import_torch():
    code = "import sys, sbssl.storage; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
