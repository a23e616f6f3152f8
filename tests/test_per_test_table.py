"""The per-test table: every result file validated on read, labels joined, byte-stable order."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from sbssl.catalogue import AssociationTestSpec
from sbssl.per_test_table import read_result
from sbssl.per_test_table import tests_table as build_tests_table
from sbssl.runner import TESTS_TABLE_COLUMNS, result_problems
from test_runner import SPEC, TEST, ZOO, _record, _strict_json
from test_runner import study as study  # noqa: F401 (a fixture: the stimuli, manifest and similarity file)


def test_degenerate_result_reads_back_as_nan(study):
    root, _, _ = study
    out = _record(root, "deg", test={**TEST, "x": "c/same1", "y": "c/same2"})
    table = build_tests_table([out], ZOO, [SPEC])
    assert math.isnan(table.loc[0, "d"]) and table.loc[0, "flags"] == "degenerate"


def test_record_and_table_are_sorted_and_byte_stable(study):
    root, _, _ = study
    paths = [_record(root, str(seed), seed=seed) for seed in (1, 0)]
    assert "seed=" in (root / "log/1.log").read_text()
    table = build_tests_table(paths, ZOO, [SPEC])
    assert list(table.columns) == list(TESTS_TABLE_COLUMNS)
    assert set(table["family"]) == {"random"} and set(table["title"]) == {"T"} and set(table["group"]) == {"core"}
    assert table["seed"].tolist() == [0, 1]
    backwards = build_tests_table(reversed(paths), ZOO, {"t": SPEC})
    assert table.to_csv(index=False) == backwards.to_csv(index=False)
    assert _strict_json(paths[0])["seed"] == 1


def test_relabelled_catalogue_title_appears_without_changing_the_json(study):
    root, _, _ = study
    out = _record(root, "r")
    before = out.read_bytes()
    relabelled = AssociationTestSpec(**{**TEST, "title": "Renamed", "group": "intersectional"})
    table = build_tests_table([out], ZOO, [relabelled])
    assert (table.loc[0, "title"], table.loc[0, "group"]) == ("Renamed", "intersectional")
    assert out.read_bytes() == before


def _edited(root, name, **changes):
    out = _record(root, name)
    record = json.loads(out.read_text())
    record.update(changes)
    out.write_text(json.dumps(record))
    return out


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"p": 0.001}, r"p = 0\.001 outside \[p_floor, 1\]"),  # below the floor 1/50
        ({"p": 0.0301}, "not a multiple of 1 / n_permutations"),
        ({"p_floor": 0.01}, r"p_floor = 0\.01, not 0\.02"),
        ({"exact": True}, "exact but n_permutations = 50, not C"),
        ({"n_permutations": 200, "p_floor": 0.005, "p": 0.5}, "sampled but n_permutations = 200 >= C"),
        ({"d": None}, "d is null without the degenerate flag"),
        ({"flags": "degenerate;target_attribute_overlap"}, "flag degenerate with a defined d"),
        ({"flags": "target_attribute_overlap;degenerate"}, "does not match"),
        ({"d_ci_low": None}, "only one CI bound is null"),
        ({"d_ci_low": 9.0, "d_ci_high": 8.0}, "d_ci_low = 9.0 > d_ci_high"),
        ({"title": "T"}, "Additional properties"),  # a file of the old format
        ({"seed": "0"}, "seed: '0' is not of type 'integer'"),
    ],
)  # fmt: skip
def test_table_refuses_an_inconsistent_result(study, changes, match):
    root, _, _ = study
    out = _edited(root, "bad", **changes)
    with pytest.raises(ValueError, match=match) as error:
        build_tests_table([out], ZOO, [SPEC])
    assert str(out) in str(error.value) and "delete it and rerun; snakemake reruns that job" in str(error.value)


def test_exact_result_with_wrong_n_permutations_is_refused(study):
    root, _, _ = study
    out = _record(root, "exact", permutations=10_000)
    record = _strict_json(out)
    assert record["exact"] and record["n_permutations"] == 126 and result_problems(record) == []
    record.update(n_permutations=10_000, p_floor=1e-4)
    out.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"exact\.json: .*exact but n_permutations = 10000, not C\(.*\) = 126"):
        build_tests_table([out], ZOO, [SPEC])


@pytest.mark.parametrize("cut", [0, 1, 0.5, -2])
def test_table_refuses_a_truncated_json(study, cut):
    root, _, _ = study
    out = _record(root, "cut")
    text = out.read_text()
    out.write_text(text[: int(cut * len(text)) if isinstance(cut, float) else cut])
    with pytest.raises(ValueError, match=r"cut\.json: not a valid result JSON.*delete it and rerun; snakemake reruns"):
        read_result(out)


def test_table_refuses_nan_literals(study):
    root, _, _ = study
    out = _record(root, "nan")
    out.write_text(out.read_text().replace('"d_ci_low": ', '"d_ci_low": NaN, "x": '))
    with pytest.raises(ValueError, match="NaN is not standard JSON"):
        build_tests_table([out], ZOO, [SPEC])


def test_table_rejects_foreign_json(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"model": "m"}))
    with pytest.raises(ValueError, match="x.json.*'layer' is a required property"):
        build_tests_table([path], ZOO, [SPEC])


def test_table_rejects_unknown_model_or_test_and_duplicates(study):
    root, _, _ = study
    out = _record(root, "r")
    with pytest.raises(ValueError, match=r"r\.json: model 'm' is not in the zoo"):
        build_tests_table([out], {"other": ZOO["m"]}, [SPEC])
    other = AssociationTestSpec(**{**TEST, "id": "u"})
    with pytest.raises(ValueError, match=r"r\.json: test 't' is not in the catalogue"):
        build_tests_table([out], ZOO, [other])
    copy = root / "copy.json"
    copy.write_bytes(out.read_bytes())
    with pytest.raises(ValueError, match=r"copy\.json and .*r\.json are both results"):
        build_tests_table([out, copy], ZOO, [SPEC])


def test_empty_table_has_the_columns():
    table = build_tests_table([], ZOO, [SPEC])
    assert list(table.columns) == list(TESTS_TABLE_COLUMNS) and len(table) == 0
    assert isinstance(table, pd.DataFrame)
