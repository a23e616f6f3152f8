from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sbssl.control import build_control_stimuli, control_survival, permute_pixels
from sbssl.stimuli import build_manifest


def test_permute_pixels_keeps_the_colour_multiset_and_is_seeded():
    pixels = np.random.default_rng(0).integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, mode="RGB")
    a = np.asarray(permute_pixels(image, np.random.default_rng(1)))
    b = np.asarray(permute_pixels(image, np.random.default_rng(1)))
    assert a.shape == pixels.shape
    assert np.array_equal(a, b)
    assert not np.array_equal(a, pixels)
    key = lambda arr: sorted(map(tuple, arr.reshape(-1, 3)))  # noqa: E731
    assert key(a) == key(pixels)


def _tree(root, folders, n=2):
    rng = np.random.default_rng(0)
    for folder in folders:
        for i in range(n):
            path = root / folder / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)).save(path)


TEST = {"id": "t", "title": "T", "group": "core", "x": "c/x", "y": "c/y", "a": "c/a", "b": "c/b"}


def test_build_control_stimuli_permutes_targets_and_copies_attributes(tmp_path):
    _tree(tmp_path / "in", ["c/x", "c/y", "c/a", "c/b", "c/unused"])
    manifest = build_manifest(tmp_path / "in")
    written = build_control_stimuli(tmp_path / "in", manifest, [TEST], tmp_path / "out", seed=3)
    assert sorted(written["role"].value_counts().items()) == [("copied", 4), ("permuted", 4)]
    assert not (tmp_path / "out/c/unused").exists()
    assert (tmp_path / "out/c/a/0.jpg").read_bytes() == (tmp_path / "in/c/a/0.jpg").read_bytes()
    permuted = np.asarray(Image.open(tmp_path / "out/c/x/0.png"))
    original = np.asarray(Image.open(tmp_path / "in/c/x/0.jpg").convert("RGB"))
    assert sorted(map(tuple, permuted.reshape(-1, 3))) == sorted(map(tuple, original.reshape(-1, 3)))
    again = build_control_stimuli(tmp_path / "in", manifest, [TEST], tmp_path / "again", seed=3)
    assert again.equals(written)
    assert (tmp_path / "again/c/x/0.png").read_bytes() == (tmp_path / "out/c/x/0.png").read_bytes()


def test_a_folder_that_is_target_and_attribute_is_refused(tmp_path):
    _tree(tmp_path / "in", ["c/x", "c/y", "c/a", "c/b"])
    other = {**TEST, "id": "u", "x": "c/a"}
    with pytest.raises(ValueError, match=r"c/a"):
        build_control_stimuli(tmp_path / "in", build_manifest(tmp_path / "in"), [TEST, other], tmp_path / "out")


def _rows(model, test, ps, ds):
    return [
        {"model": model, "layer": "avgpool", "test": test, "title": test.upper(), "group": "core", "seed": s, "p": p, "d": d}
        for s, (p, d) in enumerate(zip(ps, ds))
    ]


def test_control_survival_averages_seeds_and_flags_survivors():
    original = pd.DataFrame(_rows("m", "a", [0.01, 0.03], [1.0, 1.2]) + _rows("m", "b", [0.2, 0.4], [0.1, 0.3])
                            + _rows("m", "c", [0.001, 0.001], [2.0, 2.0]))
    permuted = pd.DataFrame(_rows("m", "a", [0.5, 0.7], [0.0, 0.2]) + _rows("m", "b", [0.01, 0.01], [1.0, 1.0])
                            + _rows("m", "c", [0.02, 0.04], [1.5, 1.7]))
    table = control_survival(original, permuted, alpha=0.05).set_index("test")
    assert table.loc["a", "p"] == pytest.approx(0.02) and table.loc["a", "p_permuted"] == pytest.approx(0.6)
    assert table.loc["a", "d"] == pytest.approx(1.1) and table.loc["a", "d_permuted"] == pytest.approx(0.1)
    assert table["significant"].to_dict() == {"a": True, "b": False, "c": True}
    assert table["survives"].to_dict() == {"a": False, "b": False, "c": True}


def test_control_survival_needs_the_original_results():
    permuted = pd.DataFrame(_rows("m", "a", [0.5], [0.0]))
    original = pd.DataFrame(_rows("other", "a", [0.5], [0.0]))
    with pytest.raises(ValueError, match="no original result"):
        control_survival(original, permuted)
