from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sbssl.runner import RESULT_COLUMNS, TESTS_TABLE_COLUMNS, record_association_test, run_association_test
from sbssl.runner import tests_table as build_tests_table
from sbssl.similarity import write_sha256
from sbssl.stats import association_test
from sbssl.stimuli import build_manifest, concept_images, distinct_images, write_manifest

TEST = {"id": "t", "title": "T", "group": "core", "x": "c/x", "y": "c/y", "a": "c/a", "b": "c/b"}


@pytest.fixture()
def study(tmp_path):
    """A stimuli tree, its manifest, random embeddings of the distinct images and their similarity file."""
    rng = np.random.default_rng(0)
    for folder, n in (("c/x", 4), ("c/y", 5), ("c/a", 3), ("c/b", 3)):
        for i in range(n):
            path = tmp_path / "stimuli" / folder / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)).save(path)
    # the same file in two concepts, as iEAT's roach image is both target and attribute
    (tmp_path / "stimuli/c/a/shared.png").write_bytes((tmp_path / "stimuli/c/x/0.png").read_bytes())
    manifest = build_manifest(tmp_path / "stimuli")
    write_manifest(manifest, tmp_path / "manifest.csv")
    hashes = distinct_images(manifest)["sha256"].tolist()
    vectors = rng.standard_normal((len(hashes), 16))
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    with h5py.File(tmp_path / "sim.h5", "w") as f:
        f.create_dataset("similarity", data=unit @ unit.T)
        write_sha256(f, hashes)
        f.attrs.update({"model": "m", "layer": "avgpool", "preprocessing": "sbssl", "pooling": "flatten"})
    embedding = dict(zip(hashes, vectors))
    return tmp_path, manifest, embedding


def test_run_association_test_equals_the_test_on_raw_embeddings(study):
    root, manifest, embedding = study
    row = run_association_test(root / "sim.h5", root / "manifest.csv", TEST, model="m",
                               layer="avgpool", seed=3, permutations=100)
    sets = {k: np.array([embedding[s] for s in concept_images(manifest, TEST[k])]) for k in "xyab"}
    expected = association_test(sets["x"], sets["y"], sets["a"], sets["b"], permutations=100, seed=3)
    assert list(row) == list(RESULT_COLUMNS)
    assert row["n_a"] == 4  # the shared image counts in both of its folders
    assert row["d"] == pytest.approx(expected.effect_size, abs=1e-12)
    assert row["statistic"] == pytest.approx(expected.statistic, abs=1e-12)
    assert row["p"] == expected.p_value and row["exact"] == expected.exact
    assert row["preprocessing"] == "sbssl" and row["model"] == "m" and row["seed"] == 3


def test_missing_concept_is_a_clear_error(study):
    root, _, _ = study
    with pytest.raises(ValueError, match=r"'c/nothing'"):
        run_association_test(root / "sim.h5", root / "manifest.csv", {**TEST, "b": "c/nothing"}, model="m",
                             layer="avgpool", seed=0, permutations=10)


def test_record_and_table_are_sorted_and_byte_stable(study):
    root, _, _ = study
    paths = []
    for seed in (1, 0):
        out = root / f"out/{seed}.json"
        record_association_test(root / "sim.h5", root / "manifest.csv", TEST, out, root / f"log/{seed}.log",
                                model="m", layer="avgpool", seed=seed, permutations=50)
        paths.append(out)
        assert "seed=" in (root / f"log/{seed}.log").read_text()
    table = build_tests_table(paths, {"m": "random"})
    assert list(table.columns) == list(TESTS_TABLE_COLUMNS) and set(table["family"]) == {"random"}
    assert table["seed"].tolist() == [0, 1]
    assert table.equals(build_tests_table(reversed(paths), {"m": "random"}))
    assert json.loads(paths[0].read_text())["seed"] == 1


def test_table_rejects_foreign_json(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"model": "m"}))
    with pytest.raises(ValueError, match="lacks"):
        build_tests_table([path], {"m": "random"})


def test_table_rejects_a_model_outside_the_zoo(study):
    root, _, _ = study
    out = root / "r.json"
    record_association_test(root / "sim.h5", root / "manifest.csv", TEST, out, root / "r.log",
                            model="m", layer="avgpool", seed=0, permutations=10)
    with pytest.raises(ValueError, match="not in the zoo"):
        build_tests_table([out], {"other": "random"})
