"""The published results the study is checked against, and the adapter for the SB-SSL authors' rows.

Two small fixtures ship with the repository under ``data/published/`` (sources in its README.md):

- :data:`SBSSL_PUBLISHED_ROWS`: every per-test result of the SB-SSL study (Sirotkin et al., CVPR 2022),
  3 runs x 6 layers x 16 models x 39 tests, as the authors' result files give them (columns run, layer,
  model, test, d, p, n_t, n_a; the p and d strings are the source's, so the floats are bit-identical).
- :data:`IEAT_PUBLISHED_TABLE`: the iEAT paper's table (Steed & Caliskan 2021), 39 tests x 3 models.
- :data:`LAYER_PROBE_ACCURACIES`: the per-layer linear accuracies the source zoos publish for our models
  (OpenSelfSup, MMSelfSup), one row per (model, layer, benchmark, checkpoint), each with its source line;
  read with :func:`read_layer_probe_accuracies`.

The paths are relative to the checkout (the package is installed editable); an installed copy without
the checkout passes the file explicitly (``sbssl summarize --results FILE``).

:func:`read_published` turns the SB-SSL rows into our per-test table (the columns of
:data:`sbssl.runner.TESTS_TABLE_COLUMNS`), and :func:`published_zoo` gives the labels of the paper's
models, so ``sbssl.study.write_study_summary(read_published(), published_zoo(), out)`` is the paper's study.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sbssl.io import atomic_path
from sbssl.layers import LAYERS
from sbssl.runner import TESTS_TABLE_COLUMNS
from sbssl.summary import catalogue_titles, check_tests_table

_REPO = Path(__file__).resolve().parents[1]
#: Folder of the published fixtures in the checkout.
PUBLISHED_DIR = _REPO / "data" / "published"
#: The SB-SSL authors' per-test rows (gzipped CSV; X/Y/A/B path columns dropped, see :func:`compact_published_rows`).
SBSSL_PUBLISHED_ROWS = PUBLISHED_DIR / "sbssl_published_results.csv.gz"
#: The iEAT paper's published table (Test, Model, X, Y, A, B, d, p, n_t, n_a, sig).
IEAT_PUBLISHED_TABLE = PUBLISHED_DIR / "ieat_published_results.csv"
#: Per-layer linear accuracies published by the source zoos (columns :data:`LAYER_PROBE_COLUMNS`).
LAYER_PROBE_ACCURACIES = PUBLISHED_DIR / "layer_probe_accuracies.csv"
#: The test catalogue of the checkout: the published rows name tests by title.
DEFAULT_CATALOGUE = _REPO / "config" / "tests.yaml"

#: Columns kept in the shipped SB-SSL rows; the source also has X, Y, A, B (stimulus folder paths,
#: one set per test title, which the catalogue states).
PUBLISHED_COLUMNS: tuple[str, ...] = ("run", "layer", "model", "test", "d", "p", "n_t", "n_a")

# Names in the SB-SSL result files -> ours.
PUBLISHED_LAYERS: dict[str, str] = {
    "layer_0": "maxpool", "layer_1": "layer1", "layer_2": "layer2",
    "layer_3": "layer3", "layer_4": "layer4", "avg_pool": "avgpool",
}  # fmt: skip
PUBLISHED_MODELS: dict[str, str] = {
    "simclr_vissl_200": "simclr", "random_torch_1": "random_1",
    "random_torch_2": "random_2", "random_torch_3": "random_3",
}  # fmt: skip


@dataclass(frozen=True)
class PublishedModel:
    """What the study needs to know about a published model (the labels a zoo entry carries).

    imagenet_top1: linear-probe ImageNet top-1 (%) of the paper's checkpoint as its source lists it
    (used only to order Figure 5); None for random nets.
    """

    name: str
    title: str
    family: str
    meta_group: str | None
    imagenet_top1: float | None


# The paper's 15 models (our names). Meta groups as in the paper, section 4.1; families as the SB-SSL
# repository groups them (the files have no family column). Top-1: the values of config/models.yaml for
# the paper's own files (OpenSelfSup MODEL_ZOO "feat5", VISSL MODEL_ZOO).
_PAPER_MODELS: tuple[PublishedModel, ...] = (
    PublishedModel("rotation", "Rotation", "geometric", "non_contrastive", 47.01),
    PublishedModel("relative_loc", "Relative Loc.", "geometric", "non_contrastive", 38.83),
    PublishedModel("jigsaw", "Jigsaw", "geometric", "non_contrastive", 46.73),
    PublishedModel("cluster_fit", "ClusterFit", "clustering", "non_contrastive", 53.63),
    PublishedModel("odc", "ODC", "clustering", "non_contrastive", 53.42),
    PublishedModel("swav", "SwAV", "clustering", None, 73.85),
    PublishedModel("npid", "NPID", "contrastive", "contrastive", 56.60),
    PublishedModel("moco_v1", "MoCo v1", "contrastive", "contrastive", 61.02),
    PublishedModel("moco_v2", "MoCo v2", "contrastive", "contrastive", 67.69),
    PublishedModel("simclr", "SimCLR", "contrastive", "contrastive", 66.61),
    PublishedModel("byol", "BYOL", "contrastive", "contrastive", 71.61),
    PublishedModel("supervised", "Supervised", "supervised", None, 76.13),
    PublishedModel("random_1", "Random 1", "random", None, None),
    PublishedModel("random_2", "Random 2", "random", None, None),
    PublishedModel("random_3", "Random 3", "random", None, None),
)
#: Family of every model in the published rows (our names); simclr_openselfsup is in the rows, not the paper.
PUBLISHED_FAMILIES: dict[str, str] = {
    **{m.name: m.family for m in _PAPER_MODELS}, "simclr_openselfsup": "contrastive",
}


def published_zoo() -> dict[str, PublishedModel]:
    """``{name: PublishedModel}`` for the 15 models of the paper's figures and meta-test, in the paper's order.

    Use it where a zoo is expected (:func:`sbssl.study.write_study_summary`, :func:`sbssl.meta.meta_test`,
    the figures). The 16th model of the rows, simclr_openselfsup, is left out as the paper leaves it out:
    it stays in the summary but not in the figures or the meta-test thresholds.
    """
    return {m.name: m for m in _PAPER_MODELS}


def _open_text(path: Path):
    return gzip.open(path, "rt", newline="", encoding="utf-8") if path.suffix == ".gz" else open(
        path, newline="", encoding="utf-8")


def compact_published_rows(source: str | os.PathLike[str], dest: str | os.PathLike[str]) -> int:
    """Write the SB-SSL rows of ``source`` (the authors' converted CSV) to ``dest`` (gzip) as shipped.

    Keeps :data:`PUBLISHED_COLUMNS` and drops X, Y, A, B after checking that each test title has one
    set of folders. Works on the text, never on parsed floats, so every d and p string (and hence every
    float read back) is the source's. The gzip header has no name and time: the bytes depend on the
    content only. Returns the number of rows written.
    """
    source = Path(source)
    with _open_text(source) as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in (*PUBLISHED_COLUMNS, "X", "Y", "A", "B") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{source}: missing column(s) {', '.join(missing)}; expected the SB-SSL rows "
                             "as converted in ../shared/sbssl (run, layer, model, test, X, Y, A, B, d, p, n_t, n_a)")
        folders: dict[str, tuple[str, ...]] = {}
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(PUBLISHED_COLUMNS)
        n = 0
        for row in reader:
            sets = tuple(row[k] for k in "XYAB")
            if folders.setdefault(row["test"], sets) != sets:
                raise ValueError(f"{source}: test {row['test']!r} has two sets of folders: "
                                 f"{folders[row['test']]} and {sets}")
            writer.writerow([row[c] for c in PUBLISHED_COLUMNS])
            n += 1
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
            gz.write(text.getvalue().encode("utf-8"))
    return n


def read_published(
    path: str | os.PathLike[str] = SBSSL_PUBLISHED_ROWS,
    catalogue: str | os.PathLike[str] | object = DEFAULT_CATALOGUE,
) -> pd.DataFrame:
    """The SB-SSL authors' rows as our per-test table (columns :data:`sbssl.runner.TESTS_TABLE_COLUMNS`).

    ``path``: the shipped fixture (default) or the authors' converted CSV (gzipped or not, with or
    without the X/Y/A/B columns). run -> seed; layer and model names -> ours (:data:`PUBLISHED_LAYERS`,
    :data:`PUBLISHED_MODELS`; others kept, e.g. simclr_openselfsup); family from
    :data:`PUBLISHED_FAMILIES`; each test title -> catalogue id and group via ``catalogue`` (a tests.yaml
    path or a list of AssociationTestSpec). alternative is "greater" (the iEAT upper tail), flags "" and
    preprocessing "sbssl-published"; n_x = n_y = n_t and n_a = n_b = n_a. Columns the authors did not
    record (statistic, exact, n_permutations, p_floor, d_ci_low, d_ci_high, pooling, provenance) are NaN.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"published SB-SSL rows not found: {path} (shipped as data/published/ in the checkout; "
            "pass the file explicitly, e.g. sbssl summarize --results FILE --format sbssl-published)"
        )
    raw = pd.read_csv(path)
    missing = [c for c in ("run", "layer", "model", "test", "d", "p") if c not in raw.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(map(str, raw.columns))} "
                         "(is this our tests.csv? then use the sbssl format)")
    unknown_layers = sorted(set(raw["layer"]) - set(PUBLISHED_LAYERS))
    if unknown_layers:
        raise ValueError(f"{path}: unknown layer name(s) {', '.join(unknown_layers)}; "
                         f"expected {', '.join(PUBLISHED_LAYERS)}")
    by_title = catalogue_titles(catalogue)
    unknown = sorted(set(raw["test"]) - set(by_title))
    if unknown:
        raise ValueError(f"{path}: test title(s) not in the catalogue {catalogue}: {', '.join(unknown)}")
    model = raw["model"].map(lambda m: PUBLISHED_MODELS.get(m, m))
    table = pd.DataFrame({
        "model": model,
        "family": model.map(lambda m: PUBLISHED_FAMILIES.get(m, "unknown")),
        "layer": raw["layer"].map(PUBLISHED_LAYERS),
        "test": raw["test"].map(lambda t: by_title[t][0]),
        "title": raw["test"],
        "group": raw["test"].map(lambda t: by_title[t][1]),
        "seed": raw["run"],
        "d": raw["d"],
        "p": raw["p"],
        "alternative": "greater",
        "preprocessing": "sbssl-published",
        "flags": "",
    })
    for ours, theirs in (("n_x", "n_t"), ("n_y", "n_t"), ("n_a", "n_a"), ("n_b", "n_a")):
        if theirs in raw.columns:
            table[ours] = raw[theirs]
    table = table.reindex(columns=list(TESTS_TABLE_COLUMNS), fill_value=np.nan)
    check_tests_table(table, str(path))
    return table


def read_ieat_published(path: str | os.PathLike[str] = IEAT_PUBLISHED_TABLE) -> pd.DataFrame:
    """The iEAT paper's table: one row per (Test, Model), columns Test, Model, X, Y, A, B, d, p, n_t, n_a, sig.

    X, Y, A, B are concept names (the last part of the catalogue's folders); Model is igpt, igpt-logit
    or simclr. p is one-sided (upper tail); exact where C(2 n_t, n_t) <= 10,000, else from 10,000 splits.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"published iEAT table not found: {path} (shipped as data/published/ in the checkout)")
    table = pd.read_csv(path)
    missing = [c for c in ("Test", "Model", "X", "Y", "A", "B", "d", "p", "n_t", "n_a") if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; expected the iEAT published table")
    if table.duplicated(["Test", "Model"]).any():
        row = table[table.duplicated(["Test", "Model"])].iloc[0]
        raise ValueError(f"{path}: duplicate rows for Test={row.Test} Model={row.Model}")
    return table


#: Columns of :data:`LAYER_PROBE_ACCURACIES` (meanings in data/published/README.md).
LAYER_PROBE_COLUMNS: tuple[str, ...] = (
    "model", "layer", "source_layer", "benchmark", "value", "checkpoint_kind", "checkpoint", "source",
)  # fmt: skip
#: Benchmarks of the per-layer table: ImageNet / Places205 top-1 (%) of a linear classifier on each layer's
#: map average-pooled to ~9k dimensions ("multihead") or on the global average pool, VOC07 SVM mAP (%).
LAYER_PROBE_BENCHMARKS: tuple[str, ...] = (
    "imagenet_linear_multihead_top1", "imagenet_linear_avgpool_top1", "places205_linear_multihead_top1",
    "voc07_svm_map",
)  # fmt: skip
#: sbssl_paper: measured on the file the SB-SSL paper used; zoo_recipe: reported for the training config
#: of the file config/models.yaml downloads (which released file was measured is not stated).
CHECKPOINT_KINDS: tuple[str, ...] = ("sbssl_paper", "zoo_recipe")


def read_layer_probe_accuracies(path: str | os.PathLike[str] = LAYER_PROBE_ACCURACIES) -> pd.DataFrame:
    """The published per-layer linear accuracies: columns :data:`LAYER_PROBE_COLUMNS`, ``value`` in percent (float).

    One row per (model, layer, benchmark, checkpoint_kind); ``model`` is one of the paper's models (our
    names), ``layer`` one of :data:`sbssl.layers.LAYERS` (the source's own layer name in ``source_layer``;
    the mapping and its one approximation, feat1 -> maxpool, are in data/published/README.md), ``source``
    the repository@commit:file:line the number was read from. Raises FileNotFoundError, or ValueError naming
    the file and the first bad row.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"published per-layer accuracies not found: {path} (shipped as data/published/ "
                                "in the checkout)")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if tuple(table.columns) != LAYER_PROBE_COLUMNS:
        raise ValueError(f"{path}: columns {list(table.columns)}; expected {list(LAYER_PROBE_COLUMNS)}")
    models = {m.name for m in _PAPER_MODELS}
    allowed = {"model": models, "layer": set(LAYERS), "benchmark": set(LAYER_PROBE_BENCHMARKS),
               "checkpoint_kind": set(CHECKPOINT_KINDS)}
    for column, values in allowed.items():
        bad = table[~table[column].isin(values)]
        if len(bad):
            raise ValueError(f"{path}: row {bad.index[0] + 2}: {column} {bad[column].iloc[0]!r} is not one of "
                             f"{sorted(values)}")
    value = pd.to_numeric(table["value"], errors="coerce")
    bad = table[value.isna() | (value < 0) | (value > 100)]
    if len(bad):
        raise ValueError(f"{path}: row {bad.index[0] + 2}: value {bad['value'].iloc[0]!r} is not a percentage")
    empty = table[(table["source"] == "") | (table["source_layer"] == "") | (table["checkpoint"] == "")]
    if len(empty):
        raise ValueError(f"{path}: row {empty.index[0] + 2}: every row needs source_layer, checkpoint and source")
    key = ["model", "layer", "benchmark", "checkpoint_kind"]
    dupes = table[table.duplicated(key)]
    if len(dupes):
        raise ValueError(f"{path}: row {dupes.index[0] + 2}: a second value for {dupes[key].iloc[0].to_dict()}")
    return table.assign(value=value.astype(float))
