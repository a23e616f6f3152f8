"""The per-test table (``results/tables/tests.csv``): every job's result file, validated, with its labels.

Kept apart from :mod:`sbssl.runner` (what a test job runs) so that a change of how the table is
assembled is a change of the table stage only (:mod:`sbssl.provenance`) and reruns no test job.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from sbssl.runner import RERUN_HINT, TESTS_TABLE_COLUMNS, result_problems


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not standard JSON")


def read_result(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate one result file (:func:`result_problems`); ValueError naming the file and the
    remedy when it is not standard JSON (truncated, NaN literals) or breaks the contract."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"), parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{path}: not a valid result JSON, probably truncated ({exc}); {RERUN_HINT}") from None
    problems = result_problems(record)
    if problems:
        raise ValueError(
            f"{path}: not a valid association-test result (written by another sbssl version or edited): "
            f"{'; '.join(problems)}; {RERUN_HINT}"
        )
    return record


def _catalogue_labels(catalogue: Iterable[Any] | Mapping[str, Any]) -> dict[str, Any]:
    specs = catalogue.values() if isinstance(catalogue, Mapping) else catalogue
    return {spec.id: spec for spec in specs}


def tests_table(
    result_paths: Iterable[str | os.PathLike[str]],
    zoo: Mapping[str, Any],
    catalogue: Iterable[Any] | Mapping[str, Any],
) -> pd.DataFrame:
    """Read and validate the per-job result files (:func:`read_result`) into the per-test table.

    ``zoo``: ``{name: ModelSpec}`` (its ``family`` is joined); ``catalogue``: AssociationTestSpec list or
    ``{id: spec}`` (``title`` and ``group`` are joined). Columns :data:`TESTS_TABLE_COLUMNS`; d and the CI
    bounds are NaN where null. Rows sorted by model, layer, test, seed, so the table is byte-identical
    however the jobs ran. ValueError naming the file for an invalid file, a model outside the zoo, a test
    outside the catalogue, or two files for one (model, layer, test, seed).
    """
    tests = _catalogue_labels(catalogue)
    records, seen = [], {}
    for path in result_paths:
        record = read_result(path)
        if record["model"] not in zoo:
            raise ValueError(
                f"{path}: model {record['model']!r} is not in the zoo; add it to the zoo file or delete the file"
            )
        if record["test"] not in tests:
            raise ValueError(f"{path}: test {record['test']!r} is not in the catalogue; add it or delete the file")
        key = (record["model"], record["layer"], record["test"], record["seed"])
        if key in seen:
            raise ValueError(f"{path} and {seen[key]} are both results of {key}; delete the stray one")
        seen[key] = path
        spec = tests[record["test"]]
        records.append({**record, "family": zoo[record["model"]].family, "title": spec.title, "group": spec.group})
    table = pd.DataFrame.from_records(records, columns=list(TESTS_TABLE_COLUMNS))
    table = table.astype({"d": "float64", "d_ci_low": "float64", "d_ci_high": "float64"})
    return table.sort_values(["model", "layer", "test", "seed"], kind="stable").reset_index(drop=True)
