from __future__ import annotations

import csv
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import yaml

from sbssl.catalogue import AssociationTestSpec, CatalogueWarning, load_catalogue, overlapping_roles
from sbssl.stimuli import StimuliScanWarning

# Tests whose title names the target sets in the other order than the published X and Y.
REVERSED = {
    "insect_flower",
    "arab_muslim",
    "intersectional_gender_career_wmbm",
    "intersectional_valence_bw",
    "intersectional_valence_wmwf",
}


@pytest.fixture(scope="module")
def catalogue_path(repo_dir: Path) -> Path:
    return repo_dir / "config" / "tests.yaml"


@pytest.fixture(scope="module")
def catalogue(catalogue_path: Path) -> list[AssociationTestSpec]:
    return load_catalogue(catalogue_path)


def test_catalogue_has_the_39_tests_by_group(catalogue):
    assert len(catalogue) == 39
    assert Counter(t.group for t in catalogue) == {"core": 15, "president": 4, "intersectional": 20}
    by_id = {t.id: t for t in catalogue}
    assert by_id["weapon_modern"] == AssociationTestSpec(
        "weapon_modern", "Weapon (Modern)", "core", "weapon/white", "weapon/black", "weapon/tool-modern",
        "weapon/weapon-modern",
    )  # fmt: skip
    assert by_id["intersectional_valence_wmbf"].folders() == {
        "X": "intersectional/white-male", "Y": "intersectional/black-female",
        "A": "valence/pleasant", "B": "valence/unpleasant",
    }  # fmt: skip
    assert by_id["president_clinton_trump"].title == "President - B. Clinton vs. Trump"
    assert by_id["gender_career"].a == "gender/career"


def test_reversed_tests_keep_published_order_and_say_so(catalogue, catalogue_path):
    by_id = {t.id: t for t in catalogue}
    assert (by_id["insect_flower"].x, by_id["insect_flower"].y) == ("insect-flower/flower", "insect-flower/insect")
    assert by_id["intersectional_gender_career_wmbm"].x == "intersectional/black-male"
    assert by_id["intersectional_valence_wmwf"].x == "intersectional/white-female"
    # every entry with the comment is one of the known reversed tests, and each of them has it
    blocks = re.split(r"\n  - ", catalogue_path.read_text())[1:]
    commented = {re.match(r"id: (\S+)", b).group(1) for b in blocks if "X/Y order disagrees with the title" in b}
    assert commented == REVERSED


def _published(shared_dir: Path):
    """{title: (X, Y, A, B)} from each published table; fails when a table disagrees with itself."""
    ieat: dict[str, set] = {}
    with open(shared_dir / "ieat" / "published_results.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            ieat.setdefault(row["Test"], set()).add(tuple(row[k] for k in "XYAB"))
    sbssl: dict[str, set] = {}
    with open(shared_dir / "sbssl" / "published_results.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            sbssl.setdefault(row["test"], set()).add(tuple(row[k].removeprefix("data/experiments/") for k in "XYAB"))
    assert all(len(v) == 1 for v in ieat.values()), "iEAT table: a test with several X/Y/A/B"
    assert all(len(v) == 1 for v in sbssl.values()), "SB-SSL table: a test with several X/Y/A/B"
    return {k: v.pop() for k, v in ieat.items()}, {k: v.pop() for k, v in sbssl.items()}


def test_published_tables_agree_and_catalogue_matches_them(shared_dir, catalogue):
    ieat, sbssl = _published(shared_dir)
    assert set(ieat) == set(sbssl) == {t.title for t in catalogue}
    for title, folders in sbssl.items():
        assert tuple(f.split("/")[-1] for f in folders) == ieat[title], title
    for spec in catalogue:
        assert (spec.x, spec.y, spec.a, spec.b) == sbssl[spec.title], spec.id


def test_catalogue_folders_exist_in_the_reference_stimuli(shared_dir, catalogue_path):
    assert len(load_catalogue(catalogue_path, stimuli_root=shared_dir / "ieat" / "stimuli")) == 39


# --------------------------------------------------------------------------- validation errors

GOOD = {"id": "t_one", "title": "T One", "group": "core", "x": "c/x", "y": "c/y", "a": "c/a", "b": "c/b"}


def _write(tmp_path: Path, tests, top=None) -> Path:
    path = tmp_path / "tests.yaml"
    path.write_text(yaml.safe_dump(top if top is not None else {"tests": tests}))
    return path


@pytest.mark.parametrize(
    "entries,match",
    [
        ([{**GOOD, "colour": "red"}], r"test #1 \('t_one'\): unknown key\(s\) \['colour'\]"),
        ([{k: v for k, v in GOOD.items() if k != "b"}], r"'t_one'\): missing key\(s\) \['b'\]"),
        ([{**GOOD, "group": "extra"}], "group 'extra' is not one of core, president, intersectional"),
        ([{**GOOD, "id": "Bad-Id"}], "is not a slug"),
        ([{**GOOD, "title": ""}], "title must be a non-empty string"),
        ([{**GOOD, "x": 3}], "x must be a non-empty string"),
        ([{**GOOD, "a": "/abs/a"}], "a must be a plain relative posix folder"),
        ([{**GOOD, "b": "c/../b"}], "b must be a plain relative posix folder"),
        ([{**GOOD, "y": "c/x"}], "x and y are the same folder"),
        ([GOOD, {**GOOD, "title": "Other"}], r"test #2 \('t_one'\): duplicate id 't_one'"),
        ([GOOD, {**GOOD, "id": "t_two"}], r"test #2 \('t_two'\): duplicate title 'T One'"),
        (["t_one"], "test #1: expected a mapping"),
        ([], "'tests' must be a non-empty list"),
        ({"id": "x"}, "'tests' must be a non-empty list"),
    ],
)
def test_load_catalogue_rejects(tmp_path, entries, match):
    path = _write(tmp_path, entries)
    with pytest.raises(ValueError, match=match) as info:
        load_catalogue(path)
    assert str(path) in str(info.value)


def test_load_catalogue_rejects_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_catalogue(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="exactly one top-level key 'tests'"):
        load_catalogue(_write(tmp_path, None, top={"tests": [GOOD], "extra": 1}))
    with pytest.raises(ValueError, match="exactly one top-level key 'tests'"):
        load_catalogue(_write(tmp_path, None, top=[GOOD]))
    bad = tmp_path / "bad.yaml"
    bad.write_text("tests: [\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_catalogue(bad)


def _stimuli(root: Path, folders=("c/x", "c/y", "c/a", "c/b")) -> Path:
    for folder in folders:
        (root / folder).mkdir(parents=True)
        (root / folder / "img.jpg").write_bytes(b"\xff\xd8")
    return root


def test_load_catalogue_checks_stimulus_folders(tmp_path):
    path = _write(tmp_path, [GOOD])
    root = _stimuli(tmp_path / "stimuli")
    assert load_catalogue(path, stimuli_root=root)[0].id == "t_one"
    (root / "c/b/img.jpg").unlink()
    (root / "c/b/.hidden").write_text("")
    with pytest.raises(ValueError, match=r"test 't_one': B folder 'c/b' under .* holds no image files.*put the images"):
        load_catalogue(path, stimuli_root=root)
    (root / "c/b/.hidden").unlink()
    (root / "c/b").rmdir()
    with pytest.raises(FileNotFoundError, match=r"test 't_one': B folder 'c/b' not found under .*fix the path"):
        load_catalogue(path, stimuli_root=root)
    with pytest.raises(FileNotFoundError, match="stimuli root"):
        load_catalogue(path, stimuli_root=tmp_path / "nowhere")


def test_stimulus_folders_follow_the_scan_rules(tmp_path):
    """A folder passes only if build_manifest would list images in it (symlinks are not followed)."""
    path = _write(tmp_path, [GOOD])
    root = _stimuli(tmp_path / "stimuli")
    elsewhere = _stimuli(tmp_path / "elsewhere", folders=("c/a",))
    # a concept folder that is a symlink, out of the root or inside it
    shutil.rmtree(root / "c/a")
    for target in (elsewhere / "c/a", root / "c/x"):
        (root / "c/a").symlink_to(target, target_is_directory=True)
        with pytest.raises(ValueError, match=r"test 't_one': A folder 'c/a' under .* is a symlink.*replace the link"):
            load_catalogue(path, stimuli_root=root)
        (root / "c/a").unlink()
    # a real folder whose only file links out of the root, or is a FIFO
    (root / "c/a").mkdir()
    (root / "c/a/img.jpg").symlink_to(elsewhere / "c/a/img.jpg")
    os.mkfifo(root / "c/a/pipe.jpg")
    with pytest.warns(StimuliScanWarning, match="outside the root"):
        with pytest.raises(ValueError, match=r"test 't_one': A folder 'c/a' under .* holds no image files"):
            load_catalogue(path, stimuli_root=root)
    # a category folder that is a symlink: every concept below it is refused
    category = _stimuli(tmp_path / "category", folders=("d/x",))
    (root / "d").symlink_to(category / "d", target_is_directory=True)
    spec = {**GOOD, "a": "valence/a"}
    with pytest.raises(ValueError, match=r"X folder 'd/x' under .* is a symlink or lies below one"):
        load_catalogue(_write(tmp_path, [{**spec, "x": "d/x"}]), stimuli_root=root)
    # files directly in a category folder are not stimuli
    (root / "c/img.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(ValueError, match=r"Y folder 'c' is not a concept folder the stimuli scan reads"):
        load_catalogue(_write(tmp_path, [{**GOOD, "y": "c"}]), stimuli_root=root)


def test_overlapping_target_and_attribute_folders_warn(tmp_path):
    spec = AssociationTestSpec("t", "T", "core", "c/x", "c/y", "c/x", "c/b")
    assert overlapping_roles(spec) == [("X", "A")]
    assert overlapping_roles(AssociationTestSpec("t", "T", "core", "p", "q", "q", "p")) == [("X", "B"), ("Y", "A")]
    assert overlapping_roles(AssociationTestSpec("t", "T", "core", "p", "p", "p", "r")) == [
        ("X", "Y"), ("X", "A"), ("Y", "A")
    ]  # fmt: skip
    path = _write(tmp_path, [GOOD, {**GOOD, "id": "t_two", "title": "T Two", "a": "c/x", "b": "c/y"}])
    with pytest.warns(CatalogueWarning) as record:
        specs = load_catalogue(path, stimuli_root=_stimuli(tmp_path / "stimuli"))
    assert [s.id for s in specs] == ["t_one", "t_two"]  # still loaded
    assert len(record) == 1
    message = str(record[0].message)
    assert str(path) in message and "test #2 ('t_two')" in message
    assert "X = A = 'c/x', Y = B = 'c/y'" in message


def test_real_catalogue_has_no_overlaps(catalogue):
    assert [t.id for t in catalogue if overlapping_roles(t)] == []


def test_repeated_yaml_key_is_refused(tmp_path):
    path = tmp_path / "tests.yaml"
    path.write_text(
        "tests:\n  - id: t_one\n    title: T One\n    group: core\n    x: c/x\n    y: c/y\n"
        "    a: c/a\n    b: c/b\n    x: c/z\n"
    )
    with pytest.raises(ValueError, match=rf"(?s)catalogue {re.escape(str(path))}: .*found key 'x' a second time "
                       r"\(first at line 5\).*line 9"):
        load_catalogue(path)


def test_same_attribute_folders_load_with_a_warning(tmp_path):
    """A == B is degenerate (every s(w) = 0), not invalid: the study keeps it and flags it."""
    path = _write(tmp_path, [{**GOOD, "b": GOOD["a"]}])
    with pytest.warns(CatalogueWarning, match="a and b are the same folder .*degenerate"):
        specs = load_catalogue(path)
    assert specs[0].a == specs[0].b
