"""One association test of the DAG, run from a cached similarity matrix, and the result file's contract.

The permutation stage has about 3,500 jobs in the full study, each running one (model, layer, test) with
every seed (10,530 tests), so a test must be cheap: it reads the (model, layer) similarity matrix and the
stimuli manifest through an in-process cache (the workflow's jobs are threads of one Snakemake process that
hand their tests to one worker process, :func:`record_association_tests_job`) that holds every matrix
of the study (:data:`SIMILARITY_CACHE_BYTES`), so each file is read once whatever the job order, and never
imports torch.

A result (one JSON file per (model, layer, test, seed), keys :data:`RESULT_KEYS`, schema
:data:`RESULT_SCHEMA`) holds exactly what its numbers depend on: the model, layer, seed, the test's id and
image sets (:data:`TEST_DEFINITION_KEYS`), the test options and the code. Labels (the model's family, the
test's title and group) are joined by :func:`sbssl.per_test_table.tests_table`, so relabelling a model or a test reruns no job.

Result keys (units: d and its CI dimensionless, statistic in cosine units):

- model, layer, test (catalogue id), seed: which job.
- statistic, d, p, exact, n_permutations, p_floor, alternative, n_x, n_y, n_a, n_b: as in
  :class:`sbssl.stats.AssociationResult`; ``d`` is null when undefined (all scores equal up to rounding).
- preprocessing, pooling: how the embeddings were made (attributes of the similarity file).
- d_ci_low, d_ci_high: seeded percentile bootstrap CI of d (:func:`sbssl.stats.effect_size_ci_from_similarity`,
  seeded with the job's seed) at ``ci_confidence`` over ``n_boot`` replicates; null when d is undefined or
  no replicate has a defined d.
- flags: ``;``-joined, in :data:`FLAGS` order, ``""`` when none: ``degenerate`` (d undefined; p is what
  the permutation test gives), ``target_attribute_overlap`` (an image is both a target, in X or Y, and an
  attribute, in A or B).
- sbssl_version, code_digest: :func:`sbssl.provenance.provenance` of the test stage.

Files are standard JSON (null, never NaN). :func:`sbssl.per_test_table.tests_table` validates every file it reads
(:func:`result_problems`) and names the file and the remedy when one is truncated, foreign or inconsistent.
"""

from __future__ import annotations

import atexit
import collections
import functools
import itertools
import math
import os
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

import fastjsonschema
import jsonschema
import numpy as np
import pandas as pd

from sbssl.io import write_json_atomic, write_text_atomic
from sbssl.provenance import provenance
from sbssl.similarity import SimilarityMatrix, read_similarity
from sbssl.stats import ALTERNATIVES, association_test_from_similarity, effect_size_ci_from_similarity
from sbssl.stimuli import concept_images, read_manifest
from sbssl.worker import WorkerGone, WorkerProcess

#: Catalogue keys that define a test's numbers; title and group are labels joined at table time.
TEST_DEFINITION_KEYS: tuple[str, ...] = ("id", "x", "y", "a", "b")
#: Flags a result can carry, in the order they are joined.
FLAGS: tuple[str, ...] = ("degenerate", "target_attribute_overlap")
#: Keys of one association-test result (one JSON file per job), in order.
RESULT_KEYS: tuple[str, ...] = (
    "model", "layer", "test", "seed", "statistic", "d", "p", "exact", "n_permutations", "p_floor",
    "alternative", "preprocessing", "pooling", "n_x", "n_y", "n_a", "n_b", "d_ci_low", "d_ci_high",
    "ci_confidence", "n_boot", "flags", "sbssl_version", "code_digest",
)  # fmt: skip
#: Columns of the per-test table (results/tables/tests.csv): the results' numbers with their labels.
TESTS_TABLE_COLUMNS: tuple[str, ...] = (
    "model", "family", "layer", "test", "title", "group", "seed", "d", "p", "statistic", "exact",
    "n_permutations", "p_floor", "alternative", "preprocessing", "pooling", "n_x", "n_y", "n_a", "n_b",
    "d_ci_low", "d_ci_high", "flags", "sbssl_version", "code_digest",
)  # fmt: skip
#: Bootstrap defaults of a job's CI of d.
DEFAULT_N_BOOT = 2_000
DEFAULT_CONFIDENCE = 0.95

_FLAGS_PATTERN = "^(?:{})?$".format(
    "|".join(";".join(c) for k in range(len(FLAGS), 0, -1) for c in itertools.combinations(FLAGS, k))
)
_COUNT = {"type": "integer", "minimum": 1}
_OPTIONAL_NUMBER = {"type": ["number", "null"]}
#: JSON schema (draft 2020-12) of one result file; :func:`check_result` adds the cross-key rules.
RESULT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "sbssl association-test result",
    "type": "object",
    "required": list(RESULT_KEYS),
    "additionalProperties": False,
    "properties": {
        "model": {"type": "string", "minLength": 1},
        "layer": {"type": "string", "minLength": 1},
        "test": {"type": "string", "minLength": 1},
        "seed": {"type": "integer", "minimum": 0},
        "statistic": {"type": "number"},
        "d": _OPTIONAL_NUMBER,
        "p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "exact": {"type": "boolean"},
        "n_permutations": _COUNT,
        "p_floor": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "alternative": {"enum": list(ALTERNATIVES)},
        "preprocessing": {"type": "string"},
        "pooling": {"type": "string"},
        "n_x": _COUNT,
        "n_y": _COUNT,
        "n_a": _COUNT,
        "n_b": _COUNT,
        "d_ci_low": _OPTIONAL_NUMBER,
        "d_ci_high": _OPTIONAL_NUMBER,
        "ci_confidence": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
        "n_boot": _COUNT,
        "flags": {"type": "string", "pattern": _FLAGS_PATTERN},
        "sbssl_version": {"type": "string", "minLength": 1},
        "code_digest": {"type": "string", "pattern": "^[0-9a-f]{16}$"},
    },
}
_VALIDATOR = jsonschema.Draft202012Validator(RESULT_SCHEMA)
# Every result is checked when its job writes it and again when the table reads it (10,530 in the full study):
# the compiled check (fastjsonschema) is about 20 times faster on a valid record; jsonschema lists the errors
# of an invalid one. The schema's keywords mean the same in draft 7, which fastjsonschema implements.
_IS_VALID = fastjsonschema.compile({**RESULT_SCHEMA, "$schema": "http://json-schema.org/draft-07/schema#"},
                                   use_default=False, use_formats=False)  # fmt: skip
# p and p_floor are ratios k / n_permutations computed in float64: far below any real difference.
_P_TOLERANCE = 1e-9
RERUN_HINT = "delete it and rerun; snakemake reruns that job"


_FileKey = tuple[str, int, int, int, int]


def _file_key(path: str | os.PathLike[str], what: str) -> _FileKey:
    """Cache key of a file version: (path as given, device, inode, mtime, size). It changes whenever the file
    is rewritten (an atomic rewrite is a new inode); one ``stat``, as each system call is a point where a job
    thread can lose the interpreter lock to the scheduler."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} not found; run the step that makes it first") from None
    return (os.fspath(path), stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size)


class _SimilarityCache:
    """Similarity files in memory, keyed by :func:`_file_key`; the least recently used are dropped once they
    hold more than ``max_bytes`` (the newest is always kept). Safe to share between job threads."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: collections.OrderedDict[_FileKey, SimilarityMatrix] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: _FileKey) -> SimilarityMatrix:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        # Read outside the lock so other jobs go on; two threads may read one file once each (harmless).
        # read_similarity names the file and the remedy when it is truncated or corrupt; errors are not kept.
        value = read_similarity(key[0])
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > 1 and sum(v.matrix.nbytes for v in self._items.values()) > self.max_bytes:
                self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


#: Bytes of similarity matrices kept in memory by the test jobs of one process. The jobs run in any order
#: (the scheduler samples the ready ones at random), so the cache holds every (model, layer) matrix of the
#: full study (90 matrices of 3.5 MB at 664 images) and each file is read once.
SIMILARITY_CACHE_BYTES = 1 << 30
_SIMILARITY = _SimilarityCache(SIMILARITY_CACHE_BYTES)


@functools.lru_cache(maxsize=4)
def _cached_manifest(key: _FileKey) -> pd.DataFrame:
    return read_manifest(key[0])


@functools.lru_cache(maxsize=1024)
def _cached_concept_images(manifest_key: _FileKey, concept: str) -> tuple[str, ...]:
    # A concept is looked up by every model, layer, test and seed that uses it: once per manifest here.
    return tuple(concept_images(_cached_manifest(manifest_key), concept))


def _indices(shas: Sequence[str], similarity: SimilarityMatrix, concept: str, role: str) -> np.ndarray:
    if not shas:
        raise ValueError(f"{role} = {concept!r} has no usable images in the stimuli manifest; check the folder")
    return similarity.indices(shas)


def concept_indices(manifest: pd.DataFrame, similarity: SimilarityMatrix, concept: str, *, role: str) -> np.ndarray:
    """Row indices into ``similarity`` of every usable image of ``concept`` (one per file, repeats kept).

    ``role`` (X, Y, A or B) makes the error precise.
    """
    return _indices(concept_images(manifest, concept), similarity, concept, role)


def test_definition(test: Mapping[str, Any] | Any) -> dict[str, str]:
    """What defines a test's numbers: ``{id, x, y, a, b}`` of a catalogue entry (a mapping, extra keys such as
    title and group ignored, or an :class:`sbssl.catalogue.AssociationTestSpec`)."""
    get = test.__getitem__ if isinstance(test, Mapping) else functools.partial(getattr, test)
    try:
        return {key: str(get(key)) for key in TEST_DEFINITION_KEYS}
    except (KeyError, AttributeError) as exc:
        raise ValueError(f"test definition lacks {exc}; expected keys {', '.join(TEST_DEFINITION_KEYS)}") from None


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def run_association_test(
    similarity_path: str | os.PathLike[str],
    manifest_path: str | os.PathLike[str],
    test: Mapping[str, Any] | Any,
    *,
    model: str,
    layer: str,
    seed: int,
    permutations: int,
    alternative: str = "greater",
    n_boot: int = DEFAULT_N_BOOT,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict[str, Any]:
    """Run one catalogue test on one (model, layer) similarity matrix; return the result (keys
    :data:`RESULT_KEYS`, valid against :data:`RESULT_SCHEMA`; see the module docstring).

    ``test``: only its :data:`TEST_DEFINITION_KEYS` are read (:func:`test_definition`). The bootstrap CI of d
    uses ``seed``, ``n_boot`` replicates and ``confidence``.
    """
    definition = test_definition(test)
    similarity_key = _file_key(similarity_path, "similarity file")
    manifest_key = _file_key(manifest_path, "stimuli manifest")
    similarity = _SIMILARITY.get(similarity_key)
    idx = {
        role: _indices(_cached_concept_images(manifest_key, concept), similarity, concept, role)
        for role, concept in ((role, definition[role.lower()]) for role in ("X", "Y", "A", "B"))
    }
    sets = (similarity.matrix, idx["X"], idx["Y"], idx["A"], idx["B"])
    result = association_test_from_similarity(*sets, permutations=permutations, seed=seed, alternative=alternative)
    # Also computed when d is undefined (rare), so that bad bootstrap options fail the same way every time.
    ci = effect_size_ci_from_similarity(*sets, n_boot=n_boot, confidence=confidence, seed=seed)
    degenerate = math.isnan(result.effect_size)
    low, high = (None, None) if degenerate else (_finite_or_none(ci.low), _finite_or_none(ci.high))
    overlap = bool(np.intersect1d(np.concatenate([idx["X"], idx["Y"]]), np.concatenate([idx["A"], idx["B"]])).size)
    flags = [flag for flag, on in zip(FLAGS, (degenerate, overlap)) if on]
    return {
        "model": model,
        "layer": layer,
        "test": definition["id"],
        "seed": int(seed),
        "statistic": result.statistic,
        "d": None if degenerate else result.effect_size,
        "p": result.p_value,
        "exact": result.exact,
        "n_permutations": result.n_permutations,
        "p_floor": result.p_floor,
        "alternative": result.alternative,
        "preprocessing": str(similarity.attrs.get("preprocessing", "")),
        "pooling": str(similarity.attrs.get("pooling", "")),
        "n_x": result.n_x,
        "n_y": result.n_y,
        "n_a": result.n_a,
        "n_b": result.n_b,
        "d_ci_low": low,
        "d_ci_high": high,
        "ci_confidence": float(confidence),
        "n_boot": int(n_boot),
        "flags": ";".join(flags),
        **provenance("test"),
    }


def result_problems(record: Any) -> list[str]:
    """Every way ``record`` breaks the result contract (schema and cross-key rules); empty when valid.

    Cross-key rules: ``p_floor <= p <= 1``; ``p_floor`` is 1 / n_permutations (2 / n_permutations, at most 1,
    for two-sided) and ``p`` a multiple of 1 / n_permutations; exact tests have ``n_permutations`` =
    C(n_x + n_y, n_x) and sampled ones fewer; ``d`` is null exactly when ``flags`` has ``degenerate``; the
    CI is null when d is, and otherwise both bounds are null or ``d_ci_low <= d_ci_high``. Floats are
    compared within a relative 1e-9.
    """
    try:
        _IS_VALID(record)
    except fastjsonschema.JsonSchemaException:
        errors = sorted(_VALIDATOR.iter_errors(record), key=lambda e: list(e.absolute_path))
        if errors:  # jsonschema is the reference: the cross-key rules below run when it finds none
            return [f"{'/'.join(map(str, e.absolute_path)) or 'top level'}: {e.message}" for e in errors]
    problems = []
    n, p, floor = record["n_permutations"], record["p"], record["p_floor"]
    splits = math.comb(record["n_x"] + record["n_y"], record["n_x"])
    if record["exact"] and n != splits:
        problems.append(f"exact but n_permutations = {n}, not C(n_x + n_y, n_x) = {splits}")
    if not record["exact"] and n >= splits:
        problems.append(f"sampled but n_permutations = {n} >= C(n_x + n_y, n_x) = {splits} (would be exact)")
    expected_floor = min(1.0, 2 / n) if record["alternative"] == "two-sided" else 1 / n
    if not math.isclose(floor, expected_floor, rel_tol=_P_TOLERANCE):
        problems.append(f"p_floor = {floor!r}, not {expected_floor!r} for n_permutations = {n}")
    if not floor * (1 - _P_TOLERANCE) <= p <= 1 + _P_TOLERANCE:
        problems.append(f"p = {p!r} outside [p_floor, 1] = [{floor!r}, 1]")
    if abs(p * n - round(p * n)) > _P_TOLERANCE * max(1.0, p * n):
        problems.append(f"p = {p!r} is not a multiple of 1 / n_permutations = 1 / {n}")
    degenerate = "degenerate" in record["flags"].split(";")
    if (record["d"] is None) != degenerate:
        problems.append("d is null without the degenerate flag" if record["d"] is None
                        else "flag degenerate with a defined d")  # fmt: skip
    low, high = record["d_ci_low"], record["d_ci_high"]
    if (low is None) != (high is None):
        problems.append("only one CI bound is null")
    elif record["d"] is None and low is not None:
        problems.append("a CI of d although d is undefined")
    elif low is not None and low > high:
        problems.append(f"d_ci_low = {low!r} > d_ci_high = {high!r}")
    return problems


def record_association_tests(
    similarity_path: str | os.PathLike[str],
    manifest_path: str | os.PathLike[str],
    test: Mapping[str, Any] | Any,
    outputs: Mapping[int, str | os.PathLike[str]],
    log_path: str | os.PathLike[str],
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """The workflow job: :func:`run_association_test` once per seed of ``outputs`` (seed -> result file, in
    its order), each result checked and written atomically as standard JSON, one log line per seed.

    One job covers every seed of a (model, layer, test) so that the full study's DAG has a third as many
    jobs (Snakemake's own cost is about a millisecond per job). May run inside the Snakemake process (as a
    thread, :func:`record_association_tests_job`), so it must not redirect the process-wide stdout/stderr the
    way script jobs do; it writes its own log file instead. Returns the rows in the order of ``outputs``.
    """
    rows, lines = [], []
    for seed, out_path in outputs.items():
        try:
            row = run_association_test(similarity_path, manifest_path, test, seed=seed, **kwargs)
            problems = result_problems(row)
            if problems:  # a bug, not bad input: never write a file the table would refuse
                raise RuntimeError(f"result breaks the contract: {'; '.join(problems)}")
        except Exception as exc:
            write_text_atomic(log_path, "".join(lines) + f"seed={seed} failed: {type(exc).__name__}: {exc}\n")
            raise
        write_json_atomic(out_path, row)
        d = "undefined" if row["d"] is None else f"{row['d']:.6g}"
        lines.append(
            f"{row['model']} {row['layer']} {row['test']} seed={row['seed']}: d={d} p={row['p']:.6g} "
            f"exact={row['exact']} n_permutations={row['n_permutations']} flags={row['flags'] or '-'}\n"
        )
        rows.append(row)
    _write_log(log_path, "".join(lines))
    return rows


@functools.cache
def single_threaded_blas() -> None:
    """Run this process's BLAS on one thread from now on (threadpoolctl); the workflow's test jobs call it
    (it acts once per process: later calls return at once).

    Those jobs are threads of the Snakemake process and their matrix products are tiny: idle BLAS threads
    spinning beside the scheduler made the permutation stage about a third slower (benchmarks/bench_dag.py).
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")


def _write_log(path: str | os.PathLike[str], text: str) -> None:
    """A job's log, written directly: no job reads it, and an atomic write costs about seven more
    system calls, each a point where the job thread can lose the interpreter lock to the scheduler."""
    log = Path(path)
    try:
        log.write_text(text, encoding="utf-8")
    except FileNotFoundError:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(text, encoding="utf-8")


_WORKER: WorkerProcess | None = None
_WORKER_LOCK = threading.Lock()
_WORKER_BROKEN = False


@atexit.register
def _stop_worker() -> None:
    global _WORKER
    if _WORKER is not None:
        _WORKER.close()
        _WORKER = None


def _test_worker() -> WorkerProcess | None:
    """This process's worker, started on first use; None once one has died."""
    global _WORKER, _WORKER_BROKEN
    with _WORKER_LOCK:
        if _WORKER is None and not _WORKER_BROKEN:
            worker = WorkerProcess()
            try:
                worker.call(single_threaded_blas)
                _WORKER = worker
            except WorkerGone:
                _WORKER_BROKEN = True
                worker.close()
        return _WORKER


def _retire_worker(worker: WorkerProcess) -> None:
    """Stop using a worker that died (later jobs run here) and reap its process."""
    global _WORKER, _WORKER_BROKEN
    with _WORKER_LOCK:
        _WORKER_BROKEN = True
        if _WORKER is worker:
            _WORKER = None
    worker.close()


def record_association_tests_job(*args: Any, in_worker: bool, **kwargs: Any) -> list[dict[str, Any]]:
    """The workflow's test job: :func:`record_association_tests` (same arguments, files and result), in this
    process's worker process (:class:`sbssl.worker.WorkerProcess`) when ``in_worker``, else here.

    The workflow's test jobs are threads of the Snakemake process, whose scheduler needs the interpreter lock for
    about 12 ms of its own work per job: run in the job thread, a job's numpy calls (a few ms for three seeds)
    and the scheduler take turns. In one worker process beside Snakemake they run on another core while the job
    thread only waits (benchmarks/bench_dag.py); the workflow asks for it with two or more cores. One worker:
    Snakemake's scheduler is the bottleneck, not the tests. It is started on first use (a new interpreter, which
    imports sbssl once, about a second), holds its own similarity cache and BLAS on one thread, and ends with
    this process. Exceptions reach the caller. Where the worker dies (the out-of-memory killer, a kill by hand),
    this job and every later one run here: the same results.
    """
    worker = _test_worker() if in_worker else None
    if worker is not None:
        try:
            return worker.call(record_association_tests, *args, **kwargs)
        except WorkerGone:
            _retire_worker(worker)
    single_threaded_blas()  # these jobs are threads of Snakemake: BLAS threads would only spin
    return record_association_tests(*args, **kwargs)
