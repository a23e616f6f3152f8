from __future__ import annotations

import json
import os

import h5py
import jsonschema
import numpy as np
import pytest
from PIL import Image

import sbssl.runner as runner
from sbssl.catalogue import AssociationTestSpec
from sbssl.provenance import provenance
from sbssl.runner import (
    RESULT_KEYS,
    RESULT_SCHEMA,
    record_association_tests,
    record_association_tests_job,
    result_problems,
    run_association_test,
)
from sbssl.runner import test_definition as definition_of
from sbssl.similarity import read_similarity
from sbssl.storage import write_sha256
from sbssl.stats import association_test, effect_size_ci_from_similarity
from sbssl.stimuli import build_manifest, concept_images, distinct_images, write_manifest

TEST = {"id": "t", "title": "T", "group": "core", "x": "c/x", "y": "c/y", "a": "c/a", "b": "c/b"}
SPEC = AssociationTestSpec(**TEST)
ZOO = {"m": type("Spec", (), {"family": "random"})()}
RUN = {"model": "m", "layer": "avgpool", "permutations": 50, "n_boot": 200}


def _write_similarity(path, unit, hashes):
    with h5py.File(path, "w") as f:
        f.create_dataset("similarity", data=unit @ unit.T)
        write_sha256(f, hashes)
        f.attrs.update({"model": "m", "layer": "avgpool", "preprocessing": "sbssl", "pooling": "flatten"})


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
    # two target folders holding one image repeated: every s(w) is equal, d is undefined
    for folder, n in (("c/same1", 2), ("c/same2", 3)):
        (tmp_path / "stimuli" / folder).mkdir(parents=True)
        for i in range(n):
            (tmp_path / "stimuli" / folder / f"{i}.png").write_bytes((tmp_path / "stimuli/c/y/0.png").read_bytes())
    manifest = build_manifest(tmp_path / "stimuli")
    write_manifest(manifest, tmp_path / "manifest.csv")
    hashes = distinct_images(manifest)["sha256"].tolist()
    vectors = rng.standard_normal((len(hashes), 16))
    _write_similarity(tmp_path / "sim.h5", vectors / np.linalg.norm(vectors, axis=1, keepdims=True), hashes)
    embedding = dict(zip(hashes, vectors))
    return tmp_path, manifest, embedding


def _run(root, test=TEST, seed=3, **kwargs):
    return run_association_test(root / "sim.h5", root / "manifest.csv", test, seed=seed, **{**RUN, **kwargs})


def _record(root, name, test=TEST, seed=0, **kwargs):
    out = root / "out" / f"{name}.json"
    record_association_tests(root / "sim.h5", root / "manifest.csv", test, {seed: out}, root / "log" / f"{name}.log",
                             **{**RUN, **kwargs})  # fmt: skip
    return out


def _strict_json(path):
    def refuse(name):
        raise AssertionError(f"{path} holds {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


# --------------------------------------------------------------------------- one job


def test_run_association_test_equals_the_test_on_raw_embeddings(study):
    root, manifest, embedding = study
    row = _run(root, permutations=100)
    sets = {k: np.array([embedding[s] for s in concept_images(manifest, TEST[k])]) for k in "xyab"}
    expected = association_test(sets["x"], sets["y"], sets["a"], sets["b"], permutations=100, seed=3)
    assert list(row) == list(RESULT_KEYS)
    assert result_problems(row) == []
    assert row["n_a"] == 4  # the shared image counts in both of its folders
    assert row["d"] == pytest.approx(expected.effect_size, abs=1e-12)
    assert row["statistic"] == pytest.approx(expected.statistic, abs=1e-12)
    assert row["p"] == expected.p_value and row["exact"] == expected.exact
    assert (row["preprocessing"], row["pooling"], row["model"], row["seed"]) == ("sbssl", "flatten", "m", 3)
    assert row["flags"] == "target_attribute_overlap"  # c/x/0.png is also in c/a
    assert {k: row[k] for k in ("sbssl_version", "code_digest")} == provenance("test")


def test_ci_is_the_bootstrap_seeded_with_the_jobs_seed(study):
    root, manifest, _ = study
    with h5py.File(root / "sim.h5", "r") as f:
        sim, order = f["similarity"][()], [s.decode() for s in f["sha256"][()]]
    idx = {k: np.array([order.index(s) for s in concept_images(manifest, TEST[k])]) for k in "xyab"}
    ci = effect_size_ci_from_similarity(sim, idx["x"], idx["y"], idx["a"], idx["b"], n_boot=300, confidence=0.9,
                                        seed=5)  # fmt: skip
    row = _run(root, seed=5, n_boot=300, confidence=0.9)
    assert (row["d_ci_low"], row["d_ci_high"], row["n_boot"], row["ci_confidence"]) == (ci.low, ci.high, 300, 0.9)
    assert row["d_ci_low"] < row["d"] < row["d_ci_high"]
    other = _run(root, seed=6, n_boot=300, confidence=0.9)
    assert (row["d_ci_low"], row["d_ci_high"]) != (other["d_ci_low"], other["d_ci_high"])


def test_result_depends_on_the_test_definition_only(study):
    root, _, _ = study
    relabelled = {**TEST, "title": "Another title", "group": "president"}
    assert _run(root) == _run(root, test=relabelled) == _run(root, test=SPEC)
    assert definition_of(relabelled) == {"id": "t", "x": "c/x", "y": "c/y", "a": "c/a", "b": "c/b"}
    assert "title" not in RESULT_KEYS and "group" not in RESULT_KEYS
    with pytest.raises(ValueError, match="lacks 'b'"):
        _run(root, test={k: v for k, v in TEST.items() if k != "b"})


def test_overlap_flag_marks_an_image_both_target_and_attribute(study):
    root, _, _ = study
    # c/same1 and c/same2 repeat c/y/0.png; c/a holds a copy of c/x/0.png
    assert _run(root, test={**TEST, "a": "c/b", "b": "c/same1"})["flags"] == "target_attribute_overlap"
    assert _run(root, test={**TEST, "y": "c/same2", "a": "c/b", "b": "c/same1"})["flags"] == "target_attribute_overlap"
    assert _run(root, test={**TEST, "y": "c/same2", "a": "c/b", "b": "c/b"})["flags"] == "degenerate"  # A == B
    both = {**TEST, "x": "c/same1", "y": "c/same2", "a": "c/b", "b": "c/same1"}
    assert _run(root, test=both)["flags"] == "degenerate;target_attribute_overlap"


def test_degenerate_result_is_null_in_standard_json_and_read_back(study):
    root, _, _ = study
    degenerate = {**TEST, "x": "c/same1", "y": "c/same2"}
    out = _record(root, "deg", test=degenerate)
    record = _strict_json(out)
    assert record["d"] is None and record["d_ci_low"] is None and record["d_ci_high"] is None
    assert record["flags"] == "degenerate"
    assert record["p"] == 1.0  # every split ties with the observed one
    assert "d=undefined" in (root / "log/deg.log").read_text()


def test_a_seeds_result_is_the_same_bytes_whichever_seeds_share_its_job(study):
    # The workflow runs every seed of a (model, layer, test) in one job: adding a seed reruns the job, and
    # the finished seeds must come back unchanged.
    root, _, _ = study
    alone, together = root / "out/alone.json", {seed: root / f"out/together_{seed}.json" for seed in (0, 1)}
    record_association_tests(root / "sim.h5", root / "manifest.csv", TEST, {1: alone}, root / "log/alone.log", **RUN)
    rows = record_association_tests(root / "sim.h5", root / "manifest.csv", TEST, together, root / "log/both.log", **RUN)
    assert together[1].read_bytes() == alone.read_bytes()
    assert [row["seed"] for row in rows] == [0, 1] and _strict_json(together[0])["seed"] == 0
    assert rows[0]["p"] != rows[1]["p"]  # sampled p-values: the seeds differ
    assert [line.split(": ")[0] for line in (root / "log/both.log").read_text().splitlines()] == [
        "m avgpool t seed=0", "m avgpool t seed=1",
    ]


def test_the_worker_process_writes_the_same_bytes_and_reports_errors_by_message(study):
    # The workflow runs its test jobs in one worker process beside Snakemake (rules/tests.smk).
    root, _, _ = study
    paths = (root / "sim.h5", root / "manifest.csv")
    here = record_association_tests(*paths, TEST, {0: root / "out/here.json"}, root / "log/here.log", **RUN)
    there = record_association_tests_job(*paths, TEST, {0: root / "out/there.json"}, root / "log/there.log", in_worker=True,
                                         **RUN)  # fmt: skip
    assert runner._WORKER is not None and not runner._WORKER_BROKEN  # it ran there, not here after a failure
    assert there == here
    assert (root / "out/there.json").read_bytes() == (root / "out/here.json").read_bytes()
    assert (root / "log/there.log").read_text() == (root / "log/here.log").read_text()
    missing = {**TEST, "x": "c/nothing"}
    with pytest.raises(ValueError, match=r"'c/nothing'"):
        record_association_tests_job(*paths, missing, {0: root / "out/bad.json"}, root / "log/bad.log", in_worker=True, **RUN)
    assert "seed=0 failed: ValueError" in (root / "log/bad.log").read_text()
    assert not (root / "out/bad.json").exists()


def test_when_the_worker_dies_the_tests_run_inline_with_the_same_bytes(study, monkeypatch):
    import signal

    root, _, _ = study
    monkeypatch.setattr(runner, "_WORKER", None)  # a worker of this test's own
    monkeypatch.setattr(runner, "_WORKER_BROKEN", False)
    paths = (root / "sim.h5", root / "manifest.csv")
    record_association_tests_job(*paths, TEST, {0: root / "out/first.json"}, root / "log/first.log", in_worker=True, **RUN)
    dead = runner._WORKER
    os.kill(dead.call(os.getpid), signal.SIGKILL)  # as the out-of-memory killer would
    record_association_tests_job(*paths, TEST, {0: root / "out/inline.json"}, root / "log/inline.log", in_worker=True,
                                 **RUN)  # fmt: skip
    assert runner._WORKER is None and runner._WORKER_BROKEN
    assert dead._process.returncode == -signal.SIGKILL  # reaped, not left a zombie
    assert (root / "out/inline.json").read_bytes() == (root / "out/first.json").read_bytes()


def test_missing_concept_is_a_clear_error(study):
    root, _, _ = study
    with pytest.raises(ValueError, match=r"'c/nothing'"):
        _run(root, test={**TEST, "b": "c/nothing"})


def test_bad_bootstrap_options_fail_even_when_d_is_undefined(study):
    root, _, _ = study
    with pytest.raises(ValueError, match="n_boot"):
        _run(root, test={**TEST, "x": "c/same1", "y": "c/same2"}, n_boot=0)


def test_truncated_similarity_file_names_the_file_and_the_remedy(study):
    root, _, _ = study
    data = (root / "sim.h5").read_bytes()
    (root / "sim.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"sim\.h5.*delete it"):
        _run(root)
    with pytest.raises(FileNotFoundError, match="nothing.h5"):
        run_association_test(root / "nothing.h5", root / "manifest.csv", TEST, seed=0, **RUN)


def test_cache_rereads_a_replaced_file_with_the_same_size_and_mtime(study):
    root, manifest, _ = study
    before = _run(root)
    stat = os.stat(root / "sim.h5")
    hashes = distinct_images(manifest)["sha256"].tolist()
    vectors = np.random.default_rng(99).standard_normal((len(hashes), 16))
    _write_similarity(root / "new.h5", vectors / np.linalg.norm(vectors, axis=1, keepdims=True), hashes)
    assert os.stat(root / "new.h5").st_size == stat.st_size
    os.replace(root / "new.h5", root / "sim.h5")  # as an atomic rewrite does
    os.utime(root / "sim.h5", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert _run(root)["d"] != before["d"]


def test_schema_is_valid_and_matches_the_keys():
    jsonschema.Draft202012Validator.check_schema(RESULT_SCHEMA)
    assert RESULT_SCHEMA["required"] == list(RESULT_KEYS) == list(RESULT_SCHEMA["properties"])


def test_compiled_schema_check_agrees_with_jsonschema_on_every_kind_of_break(study):
    # result_problems checks with fastjsonschema first and asks jsonschema (the reference) only when that
    # fails: the two must agree on each record below, or a broken result would pass unreported.
    from sbssl.runner import _IS_VALID

    root, _, _ = study
    good = _run(root)
    breaks = [
        ("seed", True), ("seed", -1), ("seed", 1.5), ("n_x", 0), ("n_boot", True), ("exact", 1), ("d", "1"),
        ("p", 0.0), ("p", 1.5), ("p_floor", 0), ("alternative", "both"), ("model", ""), ("flags", "nope"),
        ("flags", "degenerate;"), ("code_digest", "XYZ"), ("ci_confidence", 1.0), ("statistic", None),
        ("sbssl_version", 3), ("extra", 1),
    ]
    records = [good, {k: v for k, v in good.items() if k != "layer"}, [good], None]
    records += [{**good, key: value} for key, value in breaks]
    reference = jsonschema.Draft202012Validator(RESULT_SCHEMA)
    for record in records:
        try:
            _IS_VALID(record)
            compiled = True
        except Exception:
            compiled = False
        assert compiled == reference.is_valid(record), record
        assert (result_problems(record) == []) == (record is good), record
    assert sum(not reference.is_valid(r) for r in records) == len(records) - 1


def test_similarity_cache_reads_each_file_once_within_its_byte_budget(study, monkeypatch):
    root, _, _ = study
    reads = []

    def counted(path):
        reads.append(path)
        return read_similarity(path)

    monkeypatch.setattr(runner, "read_similarity", counted)
    for name in ("s1", "s2", "s3"):
        (root / f"{name}.h5").write_bytes((root / "sim.h5").read_bytes())
    nbytes = read_similarity(root / "sim.h5").matrix.nbytes
    cache = runner._SimilarityCache(max_bytes=2 * nbytes)
    monkeypatch.setattr(runner, "_SIMILARITY", cache)
    paths = [root / f"{name}.h5" for name in ("s1", "s2", "s1", "s2", "s1")]
    rows = [run_association_test(p, root / "manifest.csv", TEST, seed=0, **RUN) for p in paths]
    assert [os.path.basename(p) for p in reads] == ["s1.h5", "s2.h5"]  # then all from memory
    assert all(row == rows[0] for row in rows)
    run_association_test(root / "s3.h5", root / "manifest.csv", TEST, seed=0, **RUN)  # over budget: drops s2
    run_association_test(root / "s1.h5", root / "manifest.csv", TEST, seed=0, **RUN)
    run_association_test(root / "s2.h5", root / "manifest.csv", TEST, seed=0, **RUN)
    assert [os.path.basename(p) for p in reads] == ["s1.h5", "s2.h5", "s3.h5", "s2.h5"]
    assert runner.SIMILARITY_CACHE_BYTES >= 90 * 664 * 664 * 8  # the full study's matrices


def test_single_threaded_blas_limits_blas_once_per_process(monkeypatch):
    import threadpoolctl

    calls = []
    monkeypatch.setattr(threadpoolctl, "threadpool_limits", lambda *args, **kwargs: calls.append((args, kwargs)))
    runner.single_threaded_blas.cache_clear()
    try:
        runner.single_threaded_blas()
        runner.single_threaded_blas()
        assert calls == [((1,), {"user_api": "blas"})]
    finally:
        runner.single_threaded_blas.cache_clear()
