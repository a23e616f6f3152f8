"""The code digest of each workflow stage: which source it covers and that a change of it is seen."""

from __future__ import annotations

import shutil

import pytest

import sbssl
from sbssl import provenance


def test_closure_follows_imports_including_lazy_ones():
    closure = provenance.module_closure(("runner",))
    # runner imports stats and similarity at the top; __init__ holds the version
    assert {"__init__", "runner", "stats", "similarity", "io"} <= set(closure)
    assert "figures" not in closure  # the test stage does not run plotting code


def test_stage_digests_cover_their_upstream_stages(tmp_path, monkeypatch):
    copy = tmp_path / "sbssl"
    shutil.copytree(provenance.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(provenance, "PACKAGE_DIR", copy)
    provenance.code_digest.cache_clear()
    try:
        before = {stage: provenance.code_digest(stage) for stage in provenance.STAGES}
        assert len(set(before.values())) == len(before)
        # a comment in the embedding code changes embed, similarity and test, not the stimuli stage
        embed = copy / "embed.py"
        embed.write_text(embed.read_text() + "\n# changed\n")
        provenance.code_digest.cache_clear()
        after = {stage: provenance.code_digest(stage) for stage in provenance.STAGES}
    finally:
        provenance.code_digest.cache_clear()
    changed = {stage for stage in before if before[stage] != after[stage]}
    # downstream of the embedding code: everything that reads embeddings; never the stimuli or COCO leakage
    assert {"embed", "control_embed", "similarity", "test", "tables", "probes"} <= changed
    assert not changed & {"stimuli", "leakage"}


def test_provenance_names_version_and_digest():
    record = provenance.provenance("test")
    assert record == {"sbssl_version": sbssl.__version__, "code_digest": provenance.code_digest("test")}
    assert len(record["code_digest"]) == 16


def test_unknown_stage_is_an_error():
    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        provenance.code_digest("nope")


def test_closure_follows_subpackages_and_their_init(tmp_path, monkeypatch):
    closure = provenance.module_closure(("debias.audit",))
    # importing sbssl.debias.audit runs sbssl/debias/__init__.py, which imports the training code
    assert {"debias", "debias.audit", "debias.train", "debias.methods", "summary"} <= set(closure)
    assert provenance.module_file("debias") == provenance.PACKAGE_DIR / "debias" / "__init__.py"
    copy = tmp_path / "sbssl"
    shutil.copytree(provenance.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(provenance, "PACKAGE_DIR", copy)
    provenance.code_digest.cache_clear()
    try:
        before = {stage: provenance.code_digest(stage) for stage in ("debias", "debias_audit", "embed", "test")}
        methods = copy / "debias" / "methods.py"
        methods.write_text(methods.read_text() + "\n# changed\n")
        provenance.code_digest.cache_clear()
        after = {stage: provenance.code_digest(stage) for stage in before}
    finally:
        provenance.code_digest.cache_clear()
    # a change in the training code reruns the training and its audit, not the study's embeddings or tests
    assert {s for s in before if before[s] != after[s]} == {"debias", "debias_audit"}
