from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from sbssl.cli import main
from sbssl.precomputed import (
    RESULT_COLUMNS,
    ImageMismatch,
    StimuliMismatchWarning,
    compare_with_stimuli,
    embedding_file,
    read_concept,
    read_embeddings,
    run_catalogue,
)
from sbssl.stats import association_test

CONCEPTS = {"c/x": 4, "c/y": 4, "c/a": 3, "c/b": 5}


def _write_cache(path: Path, vectors: np.ndarray, images: list[str]) -> None:
    """The iEAT cache layout: unnamed index column, 0..D-1, img."""
    df = pd.DataFrame(vectors, columns=[str(i) for i in range(vectors.shape[1])])
    df["img"] = images
    text = df.to_csv()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)


@pytest.fixture()
def cache(tmp_path: Path) -> dict:
    """A small embeddings folder (model m1), a stimuli folder and a one-test catalogue."""
    rng = np.random.default_rng(0)
    emb_dir, stim_dir = tmp_path / "emb", tmp_path / "stimuli"
    emb_dir.mkdir()
    vectors = {}
    for i, (concept, n) in enumerate(CONCEPTS.items()):
        vectors[concept] = rng.normal(size=(n, 6))
        images = [f"{concept.split('/')[1]}{j}.jpg" for j in range(n)]
        ext = ".csv.gz" if i % 2 else ".csv"
        _write_cache(emb_dir / f"{concept.replace('/', '_')}_m1{ext}", vectors[concept], images)
        (stim_dir / concept).mkdir(parents=True)
        for name in images:
            (stim_dir / concept / name).write_bytes(b"\xff\xd8")
    catalogue = tmp_path / "tests.yaml"
    spec = {"id": "t_one", "title": "T One", "group": "core", "x": "c/x", "y": "c/y", "a": "c/a", "b": "c/b"}
    swapped = {**spec, "id": "t_two", "title": "T Two", "x": "c/y", "y": "c/x"}
    catalogue.write_text(yaml.safe_dump({"tests": [spec, swapped]}))
    return {"emb": emb_dir, "stimuli": stim_dir, "catalogue": catalogue, "vectors": vectors}


def test_read_concept_round_trips_csv_and_gzip(cache):
    for concept, n in CONCEPTS.items():
        emb = read_concept(cache["emb"], concept, "m1")
        assert emb.concept == concept and emb.model == "m1"
        assert emb.vectors.dtype == np.float64 and emb.vectors.shape == (n, 6)
        np.testing.assert_allclose(emb.vectors, cache["vectors"][concept], rtol=1e-15)
        assert emb.images == tuple(f"{concept.split('/')[1]}{j}.jpg" for j in range(n))


def test_embedding_file_prefers_gzip_and_names_what_it_tried(cache):
    assert embedding_file(cache["emb"], "c/y", "m1").name == "c_y_m1.csv.gz"
    assert embedding_file(cache["emb"], "c/x", "m1").name == "c_x_m1.csv"
    (cache["emb"] / "c_x_m1.csv.gz").write_bytes((cache["emb"] / "c_x_m1.csv").read_bytes())
    assert embedding_file(cache["emb"], "c/x", "m1").name == "c_x_m1.csv.gz"
    with pytest.raises(FileNotFoundError, match=r"'c/x' and model 'm2': tried .*c_x_m2.csv.gz, .*c_x_m2.csv"):
        embedding_file(cache["emb"], "c/x", "m2")
    with pytest.raises(ValueError, match="category/concept"):
        embedding_file(cache["emb"], "x", "m1")


@pytest.mark.parametrize(
    "text,match",
    [
        (",0,1\n0,1.0,2.0\n", "no 'img' column"),
        (",0,2,img\n0,1.0,2.0,a.jpg\n", r"columns must be 0..D-1 in order"),
        (",img\n0,a.jpg\n", r"columns must be 0..D-1"),
        (",0,1,img\n", "no rows"),
        (",0,1,img\n0,1.0,abc,a.jpg\n", "non-numeric"),
        (",0,1,img\n0,1.0,nan,a.jpg\n1,1.0,2.0,b.jpg\n", r"NaN or inf in the rows for \['a.jpg'\]"),
        ("", "not a readable embeddings CSV"),
    ],
)
def test_read_embeddings_rejects_bad_files(tmp_path, text, match):
    path = tmp_path / "c_x_m.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as info:
        read_embeddings(path)
    assert str(path) in str(info.value)


def test_read_embeddings_rejects_corrupt_gzip(tmp_path):
    path = tmp_path / "c_x_m.csv.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(ValueError, match="not a readable embeddings CSV"):
        read_embeddings(path)


def test_compare_with_stimuli_reports_both_directions(cache):
    emb = read_concept(cache["emb"], "c/a", "m1")
    assert compare_with_stimuli(emb, cache["stimuli"]) is None
    (cache["stimuli"] / "c/a/a0.jpg").unlink()
    (cache["stimuli"] / "c/a/extra.png").write_bytes(b"")
    (cache["stimuli"] / "c/a/.DS_Store").write_bytes(b"")
    mismatch = compare_with_stimuli(emb, cache["stimuli"])
    assert mismatch == ImageMismatch("c/a", ("a0.jpg",), ("extra.png",))
    assert mismatch.describe() == "c/a: 1 row(s) without an image: a0.jpg; 1 image(s) without a row: extra.png"
    with pytest.raises(FileNotFoundError, match="c/a"):
        compare_with_stimuli(emb, cache["stimuli"] / "nowhere")


def test_run_catalogue_matches_direct_tests(cache):
    df = run_catalogue(cache["emb"], "m1", cache["catalogue"], permutations=10_000, seed=0)
    assert list(df.columns) == list(RESULT_COLUMNS)
    assert df["test"].tolist() == ["t_one", "t_two"]
    v = cache["vectors"]
    direct = association_test(v["c/x"], v["c/y"], v["c/a"], v["c/b"])
    row = df.iloc[0]
    assert (row["d"], row["p"], row["statistic"], row["p_floor"]) == (
        direct.effect_size, direct.p_value, direct.statistic, direct.p_floor,
    )  # fmt: skip
    assert bool(row["exact"]) and row["n_permutations"] == 70 and row["model"] == "m1" and row["title"] == "T One"
    assert df.iloc[1]["d"] == pytest.approx(-direct.effect_size, abs=1e-12)  # X and Y swapped
    assert df.attrs["stimuli_mismatches"] == []


def test_run_catalogue_warns_about_stimuli_mismatches(cache):
    (cache["stimuli"] / "c/b/b4.jpg").unlink()
    with pytest.warns(StimuliMismatchWarning, match=r"c/b: 1 row\(s\) without an image: b4.jpg"):
        df = run_catalogue(cache["emb"], "m1", cache["catalogue"], stimuli_root=cache["stimuli"])
    assert df.attrs["stimuli_mismatches"] == [ImageMismatch("c/b", ("b4.jpg",), ())]
    assert df.iloc[0]["n_b"] == 5  # the file, not the folder, decides the images


def test_run_catalogue_names_the_test_on_bad_data(cache):
    _write_cache(cache["emb"] / "c_a_m1.csv", np.zeros((3, 6)), ["a0.jpg", "a1.jpg", "a2.jpg"])
    with pytest.raises(ValueError, match=r"test 't_one', model 'm1': A: zero vector"):
        run_catalogue(cache["emb"], "m1", cache["catalogue"])


def test_cli_writes_csv_atomically(cache, tmp_path, capsys):
    out = tmp_path / "out" / "results.csv"
    (cache["stimuli"] / "c/x/new.jpg").write_bytes(b"")
    argv = ["test-embeddings", "--embeddings", str(cache["emb"]), "--model", "m1", "--catalogue",
            str(cache["catalogue"]), "--permutations", "50", "--seed", "3", "--stimuli", str(cache["stimuli"]),
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    df = pd.read_csv(out)
    assert df["test"].tolist() == ["t_one", "t_two"]
    assert not df["exact"].any() and (df["n_permutations"] == 50).all()
    expected = run_catalogue(cache["emb"], "m1", cache["catalogue"], permutations=50, seed=3)
    np.testing.assert_allclose(df["p"], expected["p"], rtol=0)
    np.testing.assert_allclose(df["d"], expected["d"], rtol=1e-15)
    assert sorted(p.name for p in out.parent.iterdir()) == ["results.csv"]
    err = capsys.readouterr().err
    assert "c/x: 1 image(s) without a row: new.jpg" in err


def test_cli_reports_errors_and_leaves_no_output(cache, tmp_path, capsys):
    out = tmp_path / "results.csv"
    argv = ["test-embeddings", "--embeddings", str(cache["emb"]), "--model", "nope", "--catalogue",
            str(cache["catalogue"]), "--out", str(out)]  # fmt: skip
    assert main(argv) == 2
    assert "no embeddings for 'c/x' and model 'nope'" in capsys.readouterr().err
    assert not out.exists()


def test_reference_career_cache_has_the_missing_image(shared_dir):
    emb = read_concept(shared_dir / "ieat" / "embeddings", "gender/career", "igpt-logit_l_32")
    assert emb.vectors.shape == (21, 512)
    assert compare_with_stimuli(emb, shared_dir / "ieat" / "stimuli") == ImageMismatch(
        "gender/career", ("professional2_google.jpg",), ()
    )
