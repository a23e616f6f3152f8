"""One association test of the DAG, run from a cached similarity matrix, and the per-test table.

The permutation stage has about 10,500 jobs in the full study, so a job must be cheap: it reads the
(model, layer) similarity matrix and the stimuli manifest through a small in-process cache (the
workflow runs these jobs as threads of one Snakemake process) and never imports torch.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from sbssl.io import write_json_atomic, write_text_atomic
from sbssl.similarity import SimilarityMatrix, read_similarity
from sbssl.stats import association_test_from_similarity
from sbssl.stimuli import concept_images, read_manifest

#: Keys of one association-test result (one JSON file per job), in order.
RESULT_COLUMNS: tuple[str, ...] = (
    "model", "layer", "test", "title", "group", "seed", "statistic", "d", "p", "exact",
    "n_permutations", "p_floor", "alternative", "preprocessing", "pooling", "n_x", "n_y", "n_a", "n_b",
)
#: Columns of the per-test table (results/tables/tests.csv): the results plus the model's family.
TESTS_TABLE_COLUMNS: tuple[str, ...] = ("model", "family", *RESULT_COLUMNS[1:])


def _file_key(path: str | os.PathLike[str]) -> tuple[str, int, int]:
    """Cache key that changes whenever the file is rewritten."""
    stat = os.stat(path)
    return (str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _cached_similarity(key: tuple[str, int, int]) -> SimilarityMatrix:
    return read_similarity(key[0])


@functools.lru_cache(maxsize=4)
def _cached_manifest(key: tuple[str, int, int]) -> pd.DataFrame:
    return read_manifest(key[0])


def concept_indices(manifest: pd.DataFrame, similarity: SimilarityMatrix, concept: str, *, role: str) -> np.ndarray:
    """Row indices into ``similarity`` of every usable image of ``concept`` (one per file, repeats kept).

    ``role`` (X, Y, A or B) makes the error precise.
    """
    shas = concept_images(manifest, concept)
    if not shas:
        raise ValueError(f"{role} = {concept!r} has no usable images in the stimuli manifest; check the folder")
    return similarity.indices(shas)


@functools.lru_cache(maxsize=4096)
def _cached_concept_indices(
    manifest_key: tuple[str, int, int], similarity_key: tuple[str, int, int], concept: str, role: str
) -> np.ndarray:
    # A concept is looked up by every test and seed that uses it: resolve it once per file pair.
    indices = concept_indices(_cached_manifest(manifest_key), _cached_similarity(similarity_key), concept, role=role)
    indices.flags.writeable = False
    return indices


def run_association_test(
    similarity_path: str | os.PathLike[str],
    manifest_path: str | os.PathLike[str],
    test: Mapping[str, Any],
    *,
    model: str,
    layer: str,
    seed: int,
    permutations: int,
    alternative: str = "greater",
) -> dict[str, Any]:
    """Run one catalogue test on one (model, layer) similarity matrix; return the result as a dict.

    ``test`` is a catalogue entry (keys id, title, group, x, y, a, b). The keys of the result are
    :data:`RESULT_COLUMNS`; ``d`` is the effect size, ``p`` the permutation p-value. The model's family
    is not part of it (it is a label of the zoo, added by :func:`tests_table`), so relabelling a model
    reruns no test.
    """
    similarity_key, manifest_key = _file_key(similarity_path), _file_key(manifest_path)
    similarity = _cached_similarity(similarity_key)
    idx = {
        role: _cached_concept_indices(manifest_key, similarity_key, test[role.lower()], role)
        for role in ("X", "Y", "A", "B")
    }
    result = association_test_from_similarity(
        similarity.matrix, idx["X"], idx["Y"], idx["A"], idx["B"],
        permutations=permutations, seed=seed, alternative=alternative,
    )
    return {
        "model": model,
        "layer": layer,
        "test": test["id"],
        "title": test["title"],
        "group": test["group"],
        "seed": seed,
        "statistic": result.statistic,
        "d": result.effect_size,
        "p": result.p_value,
        "exact": result.exact,
        "n_permutations": result.n_permutations,
        "p_floor": result.p_floor,
        "alternative": result.alternative,
        "preprocessing": similarity.attrs.get("preprocessing", ""),
        "pooling": similarity.attrs.get("pooling", ""),
        "n_x": result.n_x,
        "n_y": result.n_y,
        "n_a": result.n_a,
        "n_b": result.n_b,
    }


def tests_table(result_paths: Iterable[str | os.PathLike[str]], families: Mapping[str, str]) -> pd.DataFrame:
    """Concatenate per-job result JSON files into the per-test table (columns :data:`TESTS_TABLE_COLUMNS`).

    ``families`` maps each model to its zoo family. Rows are sorted by model, layer, test and seed so the
    table is byte-identical however the jobs ran.
    """
    records = []
    for path in result_paths:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
        missing = [c for c in RESULT_COLUMNS if c not in record]
        if missing:
            raise ValueError(f"{path} lacks {missing}; it was written by another version: delete it and rerun")
        if record["model"] not in families:
            raise ValueError(f"{path}: model {record['model']!r} is not in the zoo; add it to the zoo file")
        records.append({**record, "family": families[record["model"]]})
    table = pd.DataFrame.from_records(records, columns=list(TESTS_TABLE_COLUMNS))
    return table.sort_values(["model", "layer", "test", "seed"], kind="stable").reset_index(drop=True)


def record_association_test(
    similarity_path: str | os.PathLike[str],
    manifest_path: str | os.PathLike[str],
    test: Mapping[str, Any],
    out_path: str | os.PathLike[str],
    log_path: str | os.PathLike[str],
    **kwargs: Any,
) -> dict[str, Any]:
    """The workflow job: :func:`run_association_test`, its row written atomically as JSON, one log line.

    Runs inside the Snakemake process (as a thread), so it must not redirect the process-wide
    stdout/stderr the way script jobs do; it writes its own log file instead.
    """
    try:
        row = run_association_test(similarity_path, manifest_path, test, **kwargs)
    except Exception as exc:
        write_text_atomic(log_path, f"failed: {type(exc).__name__}: {exc}\n")
        raise
    write_json_atomic(out_path, row)
    write_text_atomic(
        log_path,
        f"{row['model']} {row['layer']} {row['test']} seed={row['seed']}: "
        f"d={row['d']:.6g} p={row['p']:.6g} exact={row['exact']} n_permutations={row['n_permutations']}\n",
    )
    return row
