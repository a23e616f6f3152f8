from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sbssl.control import SURVIVAL_COLUMNS, control_permutation, control_survival
from sbssl.stimuli import build_manifest, concept_images


def _tree(root, folders, n=2, seed=0):
    rng = np.random.default_rng(seed)
    for folder in folders:
        for i in range(n):
            path = root / folder / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)).save(path)


TEST = {"id": "t", "title": "T", "group": "core", "x": "c/x", "y": "c/y", "a": "c/a", "b": "c/b"}


def test_control_permutation_names_the_target_images_only(tmp_path):
    _tree(tmp_path, ["c/x", "c/y", "c/a", "c/b", "c/unused"])
    manifest = build_manifest(tmp_path)
    permute = control_permutation(manifest, [TEST], seed=3)
    targets = concept_images(manifest, "c/x") + concept_images(manifest, "c/y")
    assert permute == {sha: 3 for sha in targets} and len(permute) == 4
    assert list(permute) == sorted(permute)  # independent of folder order
    assert control_permutation(manifest, [{k: TEST[k] for k in ("id", "x", "y", "a", "b")}], seed=3) == permute


def test_a_folder_that_is_target_and_attribute_is_refused(tmp_path):
    _tree(tmp_path, ["c/x", "c/y", "c/a", "c/b"])
    other = {**TEST, "id": "u", "x": "c/a"}
    with pytest.raises(ValueError, match=r"\['c/a'\] are targets in one control test and attributes"):
        control_permutation(build_manifest(tmp_path), [TEST, other], seed=0)


def test_an_attribute_file_identical_to_a_target_is_reported(tmp_path):
    _tree(tmp_path, ["c/x", "c/y", "c/a", "c/b"])
    (tmp_path / "c/b/copy.png").write_bytes((tmp_path / "c/x/0.png").read_bytes())
    with pytest.warns(UserWarning, match=r"1 attribute image\(s\).*permuted too.*c/b/copy\.png"):
        permute = control_permutation(build_manifest(tmp_path), [TEST], seed=0)
    assert len(permute) == 4


def test_bad_control_requests(tmp_path):
    _tree(tmp_path, ["c/x", "c/y", "c/a", "c/b"])
    manifest = build_manifest(tmp_path)
    with pytest.raises(ValueError, match="non-negative integer"):
        control_permutation(manifest, [TEST], seed=-1)
    with pytest.raises(ValueError, match="no control tests"):
        control_permutation(manifest, [], seed=0)
    with pytest.raises(ValueError, match="'c/missing' is not in the stimuli manifest"):
        control_permutation(manifest, [{**TEST, "y": "c/missing"}], seed=0)


def _rows(model, test, ps, ds, **extra):
    return [
        {"model": model, "layer": "avgpool", "test": test, "title": test.upper(), "group": "core", "seed": s,
         "p": p, "d": d, **extra}
        for s, (p, d) in enumerate(zip(ps, ds))
    ]  # fmt: skip


def test_control_survival_averages_seeds_and_flags_survivors():
    original = pd.DataFrame(_rows("m", "a", [0.01, 0.03], [1.0, 1.2]) + _rows("m", "b", [0.2, 0.4], [0.1, 0.3])
                            + _rows("m", "c", [0.001, 0.001], [2.0, 2.0]))
    permuted = pd.DataFrame(_rows("m", "a", [0.5, 0.7], [0.0, 0.2]) + _rows("m", "b", [0.01, 0.01], [1.0, 1.0])
                            + _rows("m", "c", [0.02, 0.04], [1.5, 1.7]))
    table = control_survival(original, permuted, alpha=0.05)
    assert tuple(table.columns) == SURVIVAL_COLUMNS
    table = table.set_index("test")
    assert table.loc["a", "p"] == pytest.approx(0.02) and table.loc["a", "p_permuted"] == pytest.approx(0.6)
    assert table.loc["a", "d"] == pytest.approx(1.1) and table.loc["a", "d_permuted"] == pytest.approx(0.1)
    assert table["significant"].to_dict() == {"a": True, "b": False, "c": True}
    assert table["survives"].to_dict() == {"a": False, "b": False, "c": True}
    assert set(table["alternative"]) == {"greater"} and set(table["note"]) == {""}


@pytest.mark.parametrize("alternative", ["less", "two-sided"])
def test_control_survival_follows_the_alternative_column(alternative):
    # Small p = significant in the tested direction, whatever the direction.
    original = pd.DataFrame(_rows("m", "a", [0.01], [-1.0], alternative=alternative)
                            + _rows("m", "b", [0.01], [-1.0], alternative=alternative))
    permuted = pd.DataFrame(_rows("m", "a", [0.02], [-0.8], alternative=alternative)
                            + _rows("m", "b", [0.02], [0.8], alternative=alternative))
    table = control_survival(original, permuted).set_index("test")
    assert set(table["alternative"]) == {alternative}
    assert table["significant"].to_dict() == {"a": True, "b": True}
    # Two-sided: a significant effect of the opposite sign is not the same bias surviving.
    assert table["survives"].to_dict() == {"a": True, "b": alternative == "less"}


def test_control_survival_refuses_mixed_alternatives():
    original = pd.DataFrame(_rows("m", "a", [0.01], [1.0], alternative="greater")
                            + _rows("m", "b", [0.01], [1.0], alternative="less"))
    permuted = pd.DataFrame(_rows("m", "a", [0.01], [1.0], alternative="greater"))
    with pytest.raises(ValueError, match=r"mix alternatives \(original: \['greater', 'less'\].*same `alternative`"):
        control_survival(original, permuted)
    with pytest.raises(ValueError, match="mix alternatives"):
        control_survival(original.iloc[:1], permuted.assign(alternative="two-sided"))


def test_control_survival_keeps_degenerate_rows_unassessed(tmp_path):
    nan = float("nan")
    original = pd.DataFrame(
        _rows("m", "a", [0.001, 0.001], [nan, nan], flags="degenerate")
        + _rows("m", "b", [0.001], [2.0], flags="") + _rows("m", "c", [0.001], [2.0], flags="target_attribute_overlap")
    )
    permuted = pd.DataFrame(
        _rows("m", "a", [0.001], [1.0], flags="") + _rows("m", "b", [0.001], [nan], flags="target_attribute_overlap;degenerate")
        + _rows("m", "c", [0.001], [2.0], flags="")
    )
    # As read back from tests.csv: an empty flags cell is NaN.
    original.to_csv(tmp_path / "o.csv", index=False)
    permuted.to_csv(tmp_path / "p.csv", index=False)
    table = control_survival(pd.read_csv(tmp_path / "o.csv"), pd.read_csv(tmp_path / "p.csv")).set_index("test")
    assert table["significant"].to_dict() == {"a": False, "b": True, "c": True}
    assert table["survives"].to_dict() == {"a": False, "b": False, "c": True}
    assert table["note"].to_dict() == {
        "a": "degenerate on the original images (d undefined)",
        "b": "degenerate on the permuted images (d undefined)",
        "c": "",
    }
    assert np.isnan(table.loc["a", "d"]) and np.isnan(table.loc["b", "d_permuted"])


def test_control_survival_needs_the_original_results():
    permuted = pd.DataFrame(_rows("m", "a", [0.5], [0.0]))
    original = pd.DataFrame(_rows("other", "a", [0.5], [0.0]))
    with pytest.raises(ValueError, match="no original result"):
        control_survival(original, permuted)
