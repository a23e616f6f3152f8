"""Which code computed a result: the sbssl version and a digest of the source each workflow stage runs.

A number depends on the code that computes it as much as on its inputs. Snakemake's ``code`` rerun
trigger sees only a rule's own ``run:``/``script:`` text, not the ``sbssl`` package the job imports, so
the workflow passes :func:`code_digest` of each stage as a job parameter (a change of that code reruns the
stage) and every result file records :func:`provenance` (which code made it).

A stage's digest covers the source of its entry modules, every ``sbssl`` module they import (directly or
not, lazy imports inside functions included), and the digests of the stages it reads from: a change of
the embedding code changes the digest of the similarity and test stages too, so no result is kept that
was computed from stale upstream numbers.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

import sbssl

PACKAGE_DIR = Path(sbssl.__file__).resolve().parent

#: stage -> (entry modules of the stage's jobs, stages whose outputs it reads).
STAGES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "stimuli": (("stimuli", "demo"), ()),
    "weights": (("models", "download"), ()),
    "embed": (("embed",), ("stimuli", "weights")),
    # the control branch's embedding job: sbssl.control picks the images whose input is permuted
    "control_embed": (("control",), ("similarity",)),
    "similarity": (("similarity",), ("embed",)),
    "test": (("runner",), ("similarity",)),
    "tables": (("per_test_table", "study"), ("test",)),
    "probes": (("probes",), ("similarity",)),
    # dataset and model leakage on annotation tables (COCO): no upstream stage of the audit
    "leakage": (("leakage", "coco"), ()),
}


def _imports(module: str) -> set[str]:
    """Names of the ``sbssl`` modules that ``sbssl.<module>`` imports anywhere in its source."""
    tree = ast.parse((PACKAGE_DIR / f"{module}.py").read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] == "sbssl":
                if len(parts) > 1:
                    found.add(parts[1])
                else:  # from sbssl import X: X may be a module or a package attribute
                    found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "sbssl" and len(parts) > 1:
                    found.add(parts[1])
    return {name for name in found if (PACKAGE_DIR / f"{name}.py").is_file()}


def module_closure(entries: tuple[str, ...]) -> list[str]:
    """The entry modules and every ``sbssl`` module they import, transitively; sorted names.

    ``__init__`` is always included (it holds the version).
    """
    seen: set[str] = {"__init__"}
    todo = [name for name in entries]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        if not (PACKAGE_DIR / f"{name}.py").is_file():
            raise ValueError(f"sbssl has no module {name!r} (stage entry or import); see sbssl/provenance.py")
        seen.add(name)
        todo.extend(_imports(name) - seen)
    return sorted(seen)


@functools.lru_cache(maxsize=None)
def code_digest(stage: str) -> str:
    """Hex sha256 (first 16 digits) of the source of ``stage`` and its upstream stages (see module doc)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; known: {sorted(STAGES)}")
    entries, upstream = STAGES[stage]
    digest = hashlib.sha256()
    for name in upstream:
        digest.update(f"stage {name} {code_digest(name)}\n".encode())
    for name in module_closure(entries):
        source = (PACKAGE_DIR / f"{name}.py").read_bytes()
        digest.update(f"module {name} {len(source)}\n".encode())
        digest.update(source)
    return digest.hexdigest()[:16]


def provenance(stage: str) -> dict[str, str]:
    """``{"sbssl_version": ..., "code_digest": ...}`` for a result file written by ``stage``."""
    return {"sbssl_version": sbssl.__version__, "code_digest": code_digest(stage)}
