from __future__ import annotations

import subprocess
import sys
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest

import sbssl.similarity as similarity
import sbssl.storage as storage
from sbssl.provenance import provenance
from sbssl.similarity import SimilarityMatrix, cosine_similarities, read_similarity, similarity_is_current
from sbssl.storage import write_sha256

ATTRS = {"model": "m", "weights_sha256": "ab" * 32, "preprocessing": "sbssl", "layer": "layer1",
         "pooling": "flatten", "dtype": "float16", "permute": "none", "versions": '{"numpy": "x"}',
         "sbssl_version": "0.0.1", "code_digest": "0123456789abcdef"}  # fmt: skip


def write_embeddings(path: Path, values: np.ndarray, hashes: list[str] | None = None, **attrs) -> list[str]:
    """An embeddings file in the contract format (what sbssl.embed writes)."""
    hashes = hashes or [f"{i:064x}" for i in range(len(values))]
    with h5py.File(path, "w") as f:
        f.create_dataset("embeddings", data=values, chunks=(1, values.shape[1]), compression="lzf")
        write_sha256(f, hashes)
        f.attrs.update({**ATTRS, **attrs})
    return hashes


def stored_cosines(values: np.ndarray) -> np.ndarray:
    """Direct float64 cosines of the values as stored."""
    x = values.astype(np.float64)
    norms = np.linalg.norm(x, axis=1)
    return (x @ x.T) / np.outer(norms, norms)


@pytest.fixture
def embeddings(tmp_path: Path) -> tuple[Path, np.ndarray, list[str]]:
    rng = np.random.default_rng(0)
    # Post-ReLU-like: non-negative, sparse, correlated rows (a shared component), quantised to float16.
    shared = rng.gamma(2.0, 1.0, size=3000)
    values = np.maximum(shared + rng.normal(0, 2.0, size=(23, 3000)), 0).astype(np.float16)
    path = tmp_path / "emb.h5"
    return path, values, write_embeddings(path, values)


def test_equals_direct_float64_cosines_of_stored_values(embeddings, tmp_path):
    path, values, hashes = embeddings
    out = cosine_similarities(path, tmp_path / "sim" / "layer1.h5")
    sim = read_similarity(out)
    assert sim.matrix.dtype == np.float64 and sim.matrix.shape == (23, 23)
    np.testing.assert_allclose(sim.matrix, stored_cosines(values), rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.diag(sim.matrix), 1.0, atol=1e-14)
    np.testing.assert_array_equal(sim.matrix, sim.matrix.T)
    assert sim.sha256 == hashes
    # The embeddings' attributes, with the provenance of the similarity code instead of the embedding code.
    assert sim.attrs == {**ATTRS, **provenance("similarity")}
    assert sim.attrs["code_digest"] != ATTRS["code_digest"]


@pytest.mark.parametrize("band_columns", [1, 7, 64, 1000, 2999, 3000, 10_000])
def test_band_width_does_not_change_the_result(embeddings, tmp_path, band_columns):
    path, values, _ = embeddings
    reference = read_similarity(cosine_similarities(path, tmp_path / "ref.h5")).matrix
    banded = read_similarity(cosine_similarities(path, tmp_path / "b.h5", band_columns=band_columns)).matrix
    np.testing.assert_allclose(banded, reference, rtol=0, atol=1e-14)
    np.testing.assert_array_equal(banded, banded.T)


def test_column_slices_accumulate_exactly(embeddings, tmp_path, monkeypatch):
    path, values, _ = embeddings
    # 7-column float64 slices of 500-column bands: 430 partial products.
    monkeypatch.setattr(similarity, "_SLICE_BYTES", 8 * 7 * 23)
    sim = read_similarity(cosine_similarities(path, tmp_path / "s.h5", band_columns=500)).matrix
    np.testing.assert_allclose(sim, stored_cosines(values), rtol=0, atol=1e-12)


def test_tiled_and_whole_row_chunks_give_the_same_matrix(tmp_path, monkeypatch):
    """Files written by create_embeddings (column tiles of wide rows) and by earlier sbssl (whole rows)."""
    monkeypatch.setattr(storage, "CHUNK_COLUMNS", 256)
    rng = np.random.default_rng(3)
    values = np.maximum(rng.normal(size=(11, 1000)), 0).astype(np.float32)
    hashes = write_embeddings(tmp_path / "rows.h5", values)
    with h5py.File(tmp_path / "tiles.h5", "w") as f:
        storage.create_embeddings(f, *values.shape, values.dtype)[...] = values
        assert f["embeddings"].chunks == (1, 256)
        write_sha256(f, hashes)
        f.attrs.update(ATTRS)
    tiled = read_similarity(cosine_similarities(tmp_path / "tiles.h5", tmp_path / "t.h5")).matrix
    rows = read_similarity(cosine_similarities(tmp_path / "rows.h5", tmp_path / "r.h5")).matrix
    np.testing.assert_allclose(tiled, stored_cosines(values), rtol=0, atol=1e-14)
    np.testing.assert_allclose(rows, tiled, rtol=0, atol=1e-14)


def test_default_band_is_a_multiple_of_the_chunk_width_within_the_budget(monkeypatch):
    monkeypatch.setattr(similarity, "DEFAULT_BAND_BYTES", 256 * 2**20)
    # the iEAT images at layer1 in float32: 101,067 columns fit, 65,536 (one tile width) are taken
    assert similarity._default_band(664, 802_816, 4, 65_536) == 65_536
    assert similarity._default_band(664, 802_816, 2, 65_536) == 196_608  # float16: three tile widths
    assert similarity._default_band(664, 2048, 4, 2048) == 2048  # a narrow layer: one band
    assert similarity._default_band(664, 802_816, 4, 802_816) == 101_067  # whole-row chunks: the budget
    assert similarity._default_band(100_000, 802_816, 4, 65_536) == 671  # many images: narrower than a tile
    assert similarity._default_band(10**10, 10, 4, 10) == 1


def test_memory_stays_bounded_by_bands(tmp_path):
    rng = np.random.default_rng(1)
    n, dim = 64, 100_000
    values = rng.random((n, dim), dtype=np.float32).astype(np.float16)
    path = tmp_path / "big.h5"
    write_embeddings(path, values)
    del values
    tracemalloc.start()
    cosine_similarities(path, tmp_path / "big_sim.h5", band_columns=20_000)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # Loading everything as float64 would need n * dim * 8 = 51 MB; two float16 bands of 20,000 columns and
    # one float64 slice of them need about 15 MB.
    assert peak < n * dim * 8 / 3, peak


def test_zero_norm_row_names_the_image(tmp_path):
    values = np.ones((4, 10), dtype=np.float16)
    values[2] = 0
    hashes = write_embeddings(tmp_path / "e.h5", values)
    with pytest.raises(ValueError, match=f"{hashes[2]}.*zero norm"):
        cosine_similarities(tmp_path / "e.h5", tmp_path / "s.h5")
    assert not (tmp_path / "s.h5").exists()


def test_non_finite_row_names_the_image(tmp_path):
    values = np.ones((3, 10), dtype=np.float16)
    values[1, 4] = np.inf
    hashes = write_embeddings(tmp_path / "e.h5", values)
    with pytest.raises(ValueError, match=f"{hashes[1]}.*non-finite"):
        cosine_similarities(tmp_path / "e.h5", tmp_path / "s.h5")


def test_missing_or_malformed_embeddings(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        cosine_similarities(tmp_path / "nope.h5", tmp_path / "s.h5")
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f.create_dataset("embeddings", data=np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"bad\.h5.*sha256 missing"):
        cosine_similarities(tmp_path / "bad.h5", tmp_path / "s.h5")


def test_read_similarity_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.h5"):
        read_similarity(tmp_path / "absent.h5")
    with h5py.File(tmp_path / "nosim.h5", "w") as f:
        write_sha256(f, ["a", "b"])
    with pytest.raises(ValueError, match=r"nosim\.h5.*similarity missing"):
        read_similarity(tmp_path / "nosim.h5")
    with h5py.File(tmp_path / "rect.h5", "w") as f:
        f.create_dataset("similarity", data=np.ones((2, 3)))
        write_sha256(f, ["a", "b"])
    with pytest.raises(ValueError, match=r"rect\.h5.*square"):
        read_similarity(tmp_path / "rect.h5")
    with h5py.File(tmp_path / "count.h5", "w") as f:
        f.create_dataset("similarity", data=np.eye(3))
        write_sha256(f, ["a", "b"])
    with pytest.raises(ValueError, match=r"count\.h5.*2 sha256 entries for a 3x3"):
        read_similarity(tmp_path / "count.h5")


def test_indices_keep_order_and_repeats():
    sim = SimilarityMatrix(matrix=np.eye(3), sha256=["a", "b", "c"], attrs={"model": "m", "layer": "l"})
    np.testing.assert_array_equal(sim.indices(["c", "a", "c"]), [2, 0, 2])
    with pytest.raises(KeyError, match="'m'.*'l'.*first: zz"):
        sim.indices(["a", "zz"])


def test_similarity_is_current_tracks_the_embeddings(embeddings, tmp_path):
    path, values, hashes = embeddings
    sim = tmp_path / "s.h5"
    assert not similarity_is_current(path, sim)
    cosine_similarities(path, sim)
    assert similarity_is_current(path, sim)
    write_embeddings(path, values, hashes[::-1])
    assert not similarity_is_current(path, sim)
    write_embeddings(path, values, hashes, pooling="mean")
    assert not similarity_is_current(path, sim)


def test_similarity_from_other_code_or_unreadable_is_not_current(embeddings, tmp_path):
    path, _, _ = embeddings
    sim = cosine_similarities(path, tmp_path / "s.h5")
    with h5py.File(sim, "a") as f:
        f.attrs["code_digest"] = "ffffffffffffffff"
    assert not similarity_is_current(path, sim)
    cosine_similarities(path, sim)
    assert similarity_is_current(path, sim)
    truncate(sim)
    assert not similarity_is_current(path, sim)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_files_are_errors_naming_the_file_and_the_remedy(embeddings, tmp_path):
    path, _, _ = embeddings
    sim = cosine_similarities(path, tmp_path / "s.h5")
    truncate(sim)
    with pytest.raises(ValueError, match=r"s\.h5: not a readable HDF5 similarity file \(truncated.*delete it and re-run the similarity step"):
        read_similarity(sim)
    truncate(path)
    with pytest.raises(ValueError, match=r"emb\.h5: not a readable HDF5 embeddings file.*delete it and re-run the embedding step"):
        cosine_similarities(path, tmp_path / "s2.h5")
    with pytest.raises(ValueError, match=r"emb\.h5: not a readable HDF5 embeddings file"):
        similarity_is_current(path, sim)
    assert not (tmp_path / "s2.h5").exists()


def test_module_does_not_import_torch():
    code = "import sys, sbssl.similarity; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
