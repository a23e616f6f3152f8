"""A whole study's aggregates in one call: summary, bias counts, meta-test and figures.

:func:`write_study_summary` is the one code path behind ``sbssl summarize``, the workflow's aggregate
jobs and the paper's own study from the published rows::

    from sbssl.published import published_zoo, read_published
    from sbssl.study import write_study_summary
    write_study_summary(read_published(), published_zoo(), "results/demo/paper")
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from sbssl.figures import write_figures
from sbssl.io import atomic_path, write_json_atomic
from sbssl.meta import meta_test_report
from sbssl.summary import bias_counts, read_tests_table, study_alternative, summarize

#: Formats of a per-test table: ours (results/tables/tests.csv) and the SB-SSL authors' rows.
FORMATS = ("sbssl", "sbssl-published")


def read_results(
    path: str | os.PathLike[str], fmt: str = "sbssl", catalogue: str | os.PathLike[str] | Sequence[Any] | None = None
) -> pd.DataFrame:
    """Read a per-test table of format ``fmt`` (:data:`FORMATS`).

    "sbssl": :func:`sbssl.summary.read_tests_table` (``catalogue``, when given, checks the test ids).
    "sbssl-published": :func:`sbssl.published.read_published` (``catalogue`` maps titles to ids; default
    the checkout's config/tests.yaml).
    """
    if fmt == "sbssl":
        return read_tests_table(path, catalogue=catalogue)
    if fmt == "sbssl-published":
        from sbssl.published import DEFAULT_CATALOGUE, read_published

        return read_published(path, catalogue=DEFAULT_CATALOGUE if catalogue is None else catalogue)
    raise ValueError(f"unknown results format {fmt!r}; use one of {', '.join(FORMATS)}")


def write_csv(frame: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """``frame`` to CSV without the index, atomically (floats as shortest round-trip reprs)."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def write_study_summary(
    tests: pd.DataFrame,
    zoo: Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    *,
    heatmap_layer: str = "avgpool",
    meta_test_layer: str = "avgpool",
) -> dict[str, Path]:
    """Summary, counts, meta-test and figures of a study into ``out_dir``; the path of each output by name.

    ``tests``: a per-test table (:func:`read_results`). ``zoo``: ``{name: label}`` where each label has
    title, family, meta_group and imagenet_top1 (a :class:`sbssl.models.ModelSpec` of our zoo, or
    :func:`sbssl.published.published_zoo` for the paper's models); it orders the models, picks the
    figures' models and the meta-test's groups.

    Writes ``summary.csv`` (:func:`sbssl.summary.summarize`), ``counts.csv``
    (:func:`sbssl.summary.bias_counts` at 0.1, 0.05, 0.01), ``meta_test.json``
    (:func:`sbssl.meta.meta_test_report` at ``meta_test_layer``) and, under ``figures/``, each figure of
    :func:`sbssl.figures.write_figures` as PNG and PDF with its caption as ``.rst``. Keys: summary,
    counts, meta_test, and ``<figure>_png``, ``<figure>_pdf``, ``<figure>_caption``.

    Tests flagged degenerate stay in summary.csv with the reason in ``excluded`` and leave the counts,
    meta-test and figures; a table mixing alternatives is refused before anything is written.
    """
    out = Path(out_dir)
    summary = summarize(tests, zoo)
    study_alternative(summary)
    paths = {"summary": out / "summary.csv", "counts": out / "counts.csv", "meta_test": out / "meta_test.json"}
    write_csv(summary, paths["summary"])
    write_csv(bias_counts(summary), paths["counts"])
    write_json_atomic(paths["meta_test"], meta_test_report(summary, zoo, layer=meta_test_layer))
    for name, files in write_figures(summary, zoo, out / "figures", heatmap_layer=heatmap_layer).items():
        paths[f"{name}_png"], paths[f"{name}_pdf"], paths[f"{name}_caption"] = files.png, files.pdf, files.caption_path
    return paths
