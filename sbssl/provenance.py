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
    # debiasing: one training run per (data set, method, seed); the table and figure over the runs; the
    # before/after audit table of the debiased backbones (their embeddings and tests are the stages above)
    "debias": (("debias.train",), ()),
    "debias_tables": (("debias.metrics",), ("debias",)),
    "debias_audit": (("debias.audit",), ("tables", "probes", "debias")),
}


def module_file(module: str) -> Path:
    """The source file of ``sbssl.<module>``: ``a.b`` is ``a/b.py``, a package ``a`` is ``a/__init__.py``
    (``__init__`` alone is the package ``sbssl`` itself)."""
    path = PACKAGE_DIR.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _is_module(name: str) -> bool:
    return module_file(name).is_file()


def _imports(module: str) -> set[str]:
    """Names (dotted below ``sbssl``) of the ``sbssl`` modules that ``sbssl.<module>`` imports anywhere in its
    source, with the packages on the way: importing ``sbssl.a.b`` runs ``sbssl/a/__init__.py`` too."""
    with_parents = set()
    for name in _imported_names(module_file(module).read_text(encoding="utf-8")):
        parts = name.split(".")
        with_parents.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return {name for name in with_parents if _is_module(name)}


@functools.lru_cache(maxsize=None)
def _imported_names(source: str) -> frozenset[str]:
    """The names below ``sbssl`` that ``source`` imports (modules or attributes). Cached by source text: the
    workflow digests a dozen stages that share most modules, and parsing is most of the cost."""
    tree = ast.parse(source)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] == "sbssl":
                base = ".".join(parts[1:])
                if base:
                    found.add(base)
                # from sbssl[.pkg] import X: X may be a submodule or an attribute of the package
                found.update(f"{base}.{alias.name}" if base else alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "sbssl" and len(parts) > 1:
                    found.add(".".join(parts[1:]))
    return frozenset(found)


def module_closure(entries: tuple[str, ...]) -> list[str]:
    """The entry modules and every ``sbssl`` module they import, transitively; sorted dotted names (``a.b`` for
    ``sbssl/a/b.py``, ``a`` for a package's ``__init__.py``).

    ``__init__`` is always included (it holds the version).
    """
    seen: set[str] = {"__init__"}
    todo = [name for name in entries]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        if not _is_module(name):
            raise ValueError(f"sbssl has no module {name!r} (stage entry or import); see sbssl/provenance.py")
        seen.add(name)
        parts = name.split(".")
        parents = {".".join(parts[:i]) for i in range(1, len(parts))}  # imported on the way to the module
        todo.extend((_imports(name) | parents) - seen)
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
        source = module_file(name).read_bytes()
        digest.update(f"module {name} {len(source)}\n".encode())
        digest.update(source)
    return digest.hexdigest()[:16]


def provenance(stage: str) -> dict[str, str]:
    """``{"sbssl_version": ..., "code_digest": ...}`` for a result file written by ``stage``."""
    return {"sbssl_version": sbssl.__version__, "code_digest": code_digest(stage)}
