from __future__ import annotations

import csv
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

from sbssl.catalogue import AssociationTestSpec, load_catalogue

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


def test_load_catalogue_checks_stimulus_folders(tmp_path):
    path = _write(tmp_path, [GOOD])
    root = tmp_path / "stimuli"
    for folder in ("c/x", "c/y", "c/a", "c/b"):
        (root / folder).mkdir(parents=True)
        (root / folder / "img.jpg").write_bytes(b"\xff\xd8")
    assert load_catalogue(path, stimuli_root=root)[0].id == "t_one"
    (root / "c/b/img.jpg").unlink()
    (root / "c/b/.hidden").write_text("")
    with pytest.raises(ValueError, match=r"test 't_one': B folder 'c/b' under .* holds no files"):
        load_catalogue(path, stimuli_root=root)
    (root / "c/b/.hidden").unlink()
    (root / "c/b").rmdir()
    with pytest.raises(FileNotFoundError, match=r"test 't_one': B folder 'c/b' not found"):
        load_catalogue(path, stimuli_root=root)
    with pytest.raises(FileNotFoundError, match="stimuli root"):
        load_catalogue(path, stimuli_root=tmp_path / "nowhere")
