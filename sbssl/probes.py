"""Linear probes on a cached cosine-similarity matrix: gender decodability and task accuracy per (model, layer).

The workflow caches, per (model, layer), the (n, n) float64 cosine similarities of the distinct stimulus
images (:mod:`sbssl.storage`). Flattened feature maps have up to ~800,000 dimensions, so the probes work
on that matrix as a kernel and never see the embeddings: cos(u, v) is the inner product of the
L2-normalised embeddings, so a kernel method on it is exactly a linear probe on the normalised embeddings.

The probe
---------
A ridge (regularised least-squares) classifier in kernel form, one-vs-rest with one-hot targets and an
unpenalised intercept (the kernel and the targets are centred with the training fold's means). Its ridge
penalty is chosen inside each training fold, among :data:`RELATIVE_PENALTIES` times the mean eigenvalue of
the centred training kernel, by the exact leave-one-out squared error (closed form from one
eigendecomposition of the training kernel). Predicted class = argmax of the scores WITHOUT the intercept
(the training fold's class shares): the decision does not lean towards the training fold's majority. With
the intercept, a test fold that holds more of one class leaves fewer of it in training and is pushed
towards the other class, so shuffled (unstratified) labels score below chance on average, which made the
permutation p-values too small; without it the null is centred on chance.

Why ridge and not an SVM or logistic regression: it is a linear probe like the logistic attacker of
:mod:`sbssl.leakage`, and its fit is a linear map of the targets given the training kernel. Every refit on
shuffled labels (the permutation test) and every candidate penalty therefore reuse the fold's single
eigendecomposition: thousands of refits cost a few matrix products instead of thousands of solver runs.

Cross-validation
----------------
Stratified k-fold (scikit-learn's ``RepeatedStratifiedKFold``, seeded), repeated ``repeats`` times with
fresh splits. Each row of the matrix is one distinct image (one sha256): the caller passes the distinct
images (as the similarity files store them, and :func:`labelled_kernel` selects them), so the same image
never sits in a training and a test fold. Each repeat predicts every image once (out of fold); its score is
computed on those pooled predictions.

Outputs: :func:`probe_table` (one row per (model, layer): ``tables/leakage.csv``, and the trade-off table
after :func:`with_bias_counts`), :func:`plot_decodability` and :func:`plot_tradeoff`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: DAG jobs and CI have no display

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.model_selection import RepeatedStratifiedKFold

from sbssl.layers import LAYER_TITLES

#: Candidate ridge penalties, as multiples of the mean eigenvalue of the centred training kernel.
RELATIVE_PENALTIES = tuple(float(x) for x in np.logspace(-3, 3, 13))
#: Eigenvalues below this fraction of the largest are treated as zero (rounding noise of a PSD matrix).
EIGEN_RTOL = 1e-10
#: Refits (shuffled label vectors) solved together; bounds memory to a few (n, block x classes) arrays.
PERMUTATION_BLOCK = 256
#: Two scores closer than this count as tied (scores are ratios of counts; this absorbs rounding only).
SCORE_TOL = 1e-12


def _check_kernel(similarity: np.ndarray) -> np.ndarray:
    kernel = np.asarray(similarity, dtype=np.float64)
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1]:
        raise ValueError(f"similarity matrix has shape {kernel.shape}; expected square (n, n)")
    if not np.all(np.isfinite(kernel)):
        raise ValueError("similarity matrix has non-finite values; recompute the similarity file")
    if not np.allclose(kernel, kernel.T, rtol=0, atol=1e-8):
        raise ValueError("similarity matrix is not symmetric; expected the cosine similarities of one image set")
    return kernel


def _check_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _encode(classes: Sequence[Any] | np.ndarray, n: int, folds: int) -> tuple[np.ndarray, np.ndarray]:
    """(class index per row (n,), class values sorted); ValueError when unusable for ``folds``-fold CV."""
    values = np.asarray(classes)
    if values.ndim != 1 or len(values) != n:
        raise ValueError(f"got {values.shape} labels for a {n}x{n} similarity matrix; expected one label per row")
    uniques, index, counts = np.unique(values, return_inverse=True, return_counts=True)
    if len(uniques) < 2:
        raise ValueError(f"all {n} images have the same label {uniques.tolist()}; a probe needs two classes or more")
    if counts.min() < folds:
        small = {str(u): int(c) for u, c in zip(uniques, counts) if c < folds}
        raise ValueError(
            f"class(es) {small} have fewer images than folds={folds}; stratified cross-validation needs at least "
            "one image per class in every fold: add images or lower folds"
        )
    return index.astype(np.intp), uniques


class _FoldModel:
    """One training fold's centred kernel eigendecomposition and test-row projections (label-free)."""

    def __init__(self, kernel: np.ndarray, train: np.ndarray, test: np.ndarray) -> None:
        k_train = kernel[np.ix_(train, train)]
        row_mean = k_train.mean(axis=1)
        all_mean = row_mean.mean()
        centred = k_train - row_mean[:, None] - row_mean[None, :] + all_mean
        eigval, eigvec = np.linalg.eigh(centred)
        keep = eigval > EIGEN_RTOL * max(eigval[-1], 0.0)
        self.eigval, self.eigvec = eigval[keep], eigvec[:, keep]
        # No variance left (all training images identical): any penalty gives the intercept-only probe.
        self.penalties = np.asarray(RELATIVE_PENALTIES) * self.eigval.mean() if keep.any() else np.array([1.0])
        k_test = kernel[np.ix_(test, train)]
        k_test = k_test - k_test.mean(axis=1, keepdims=True) - row_mean[None, :] + all_mean
        self.test_basis = k_test @ self.eigvec  # (n_test, r)
        self.train = train
        self.squared_vec = self.eigvec**2

    def scores(self, targets: np.ndarray) -> np.ndarray:
        """Test-fold scores (n_test, problems, classes) of the probe refitted for every target problem.

        ``targets`` (n, problems, classes): one-hot targets of all n images per problem. Each problem gets
        its own penalty, the one with the smallest exact leave-one-out squared error on the training fold.
        """
        y = targets[self.train]
        n_train, problems, classes = y.shape
        y_mean = y.mean(axis=0)
        coeff = self.eigvec.T @ (y - y_mean).reshape(n_train, -1)  # (r, problems * classes)
        best_err = np.full(problems, np.inf)
        scores = np.empty((self.test_basis.shape[0], problems, classes))
        for penalty in self.penalties:
            shrink = self.eigval / (self.eigval + penalty)
            fitted = (self.eigvec @ (shrink[:, None] * coeff)).reshape(y.shape) + y_mean
            leverage = 1.0 / n_train + self.squared_vec @ shrink  # hat-matrix diagonal, intercept included
            loo = (y - fitted) / (1.0 - leverage)[:, None, None]
            err = np.einsum("ipc,ipc->p", loo, loo)
            better = err < best_err
            if better.any():
                best_err[better] = err[better]
                weights = coeff / (self.eigval + penalty)[:, None]
                pred = (self.test_basis @ weights).reshape(-1, problems, classes)
                scores[:, better] = pred[:, better]
        return scores


def _cross_validated_predictions(
    kernel: np.ndarray, label_rows: np.ndarray, n_classes: int, splits: list[tuple[np.ndarray, np.ndarray]], repeats: int
) -> np.ndarray:
    """Out-of-fold predicted class (repeats, problems, n) for each label vector in ``label_rows`` (problems, n)."""
    problems, n = label_rows.shape
    predicted = np.empty((repeats, problems, n), dtype=np.int32)
    folds = len(splits) // repeats
    for i, (train, test) in enumerate(splits):
        model = _FoldModel(kernel, train, test)
        for start in range(0, problems, PERMUTATION_BLOCK):
            block = label_rows[start:start + PERMUTATION_BLOCK]
            onehot = np.zeros((n, len(block), n_classes))
            onehot[np.arange(n)[:, None], np.arange(len(block))[None, :], block.T] = 1.0
            predicted[i // folds, start:start + len(block)][:, test] = model.scores(onehot).argmax(axis=2).T
    return predicted


def _balanced_accuracy(predicted: np.ndarray, label_rows: np.ndarray, n_classes: int) -> np.ndarray:
    """Mean per-class recall (repeats, problems) of predictions (repeats, problems, n) against label_rows (problems, n)."""
    correct = predicted == label_rows[None]
    recalls = []
    for c in range(n_classes):
        member = label_rows == c
        recalls.append((correct & member[None]).sum(axis=2) / member.sum(axis=1)[None])
    return np.mean(recalls, axis=0)


def _accuracy(predicted: np.ndarray, label_rows: np.ndarray, n_classes: int) -> np.ndarray:
    """Plain accuracy (repeats, problems) of predictions (repeats, problems, n) against label_rows (problems, n)."""
    return (predicted == label_rows[None]).mean(axis=2)


def _probe(
    similarity: np.ndarray,
    classes: Sequence[Any] | np.ndarray,
    *,
    folds: int,
    repeats: int,
    permutations: int,
    seed: int,
    metric: str,
) -> dict[str, Any]:
    kernel = _check_kernel(similarity)
    folds = _check_int("folds", folds, 2)
    repeats = _check_int("repeats", repeats, 1)
    permutations = _check_int("permutations", permutations, 0)
    seed = _check_int("seed", seed, 0)
    index, values = _encode(classes, kernel.shape[0], folds)
    score = {"balanced_accuracy": _balanced_accuracy, "accuracy": _accuracy}[metric]
    rng = np.random.default_rng(seed)
    cv = RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=int(rng.integers(2**31 - 1)))
    splits = list(cv.split(np.zeros(len(index)), index))
    # Row 0: the real labels; then shuffled labels over the same splits (the probe is refitted on each).
    rows = np.vstack([index] + [index[rng.permutation(len(index))] for _ in range(permutations)])
    scores = score(_cross_validated_predictions(kernel, rows, len(values), splits, repeats), rows, len(values))
    observed, null = scores[:, 0], scores[:, 1:].mean(axis=0)
    mean = float(observed.mean())
    result = {
        "accuracy_mean": mean,
        "accuracy_std": float(observed.std(ddof=1)) if repeats > 1 else 0.0,
        "metric": metric,
        "chance": 1.0 / len(values) if metric == "balanced_accuracy" else float(np.bincount(index).max() / len(index)),
        "n_images": int(len(index)),
        "classes": [str(v) for v in values],
        "n_per_class": [int(c) for c in np.bincount(index)],
        "folds": folds,
        "repeats": repeats,
        "permutations": permutations,
        "seed": seed,
        "probe": "kernel ridge classifier on the cosine kernel (linear probe on L2-normalised embeddings)",
    }
    if permutations:
        result["p_value"] = float((1 + np.count_nonzero(null >= mean - SCORE_TOL)) / (1 + permutations))
        result["null_mean"] = float(null.mean())
    else:
        result["p_value"] = None
        result["null_mean"] = None
    return result


def representation_leakage(
    similarity: np.ndarray,
    labels: Sequence[Any] | np.ndarray,
    *,
    folds: int = 5,
    repeats: int = 5,
    permutations: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """How well a linear probe decodes a binary attribute (e.g. gender) from one layer's embeddings.

    ``similarity``: (n, n) cosine similarities of n distinct images (one row per sha256; see the module doc).
    ``labels``: (n,) the attribute of each row, two distinct values (0/1, or strings such as "female"/"male").

    Score: balanced accuracy (mean of the two per-class recalls; chance 0.5 whatever the class sizes) of
    the out-of-fold predictions of each repeat, NOT folded (``0.5 + |acc - 0.5|`` would turn the below-chance
    scores that cross-validation gives on uninformative data into apparent leakage; the permutation test
    is the guard against chance instead). Returns a JSON-ready dict:

    - ``accuracy_mean``, ``accuracy_std``: mean and std (ddof 1; 0 when repeats = 1) over the repeats;
    - ``p_value``: one-sided permutation p, (1 + #{null >= observed}) / (1 + permutations), where each null
      value is ``accuracy_mean`` of the probe refitted (penalty selection included) on shuffled labels over
      the same splits; None when permutations = 0. ``null_mean``: mean of those null values;
    - ``n_images``, ``classes`` (sorted label values), ``n_per_class``, ``metric``, ``chance``, ``folds``,
      ``repeats``, ``permutations``, ``seed``, ``probe``.

    Raises ValueError for a non-square, asymmetric or non-finite matrix, labels of the wrong length, a
    label set other than two values, or a class with fewer images than ``folds``.
    """
    n_values = len(np.unique(np.asarray(labels)))
    if n_values != 2:
        raise ValueError(f"representation leakage needs a binary attribute; the labels have {n_values} distinct values")
    return _probe(similarity, labels, folds=folds, repeats=repeats, permutations=permutations, seed=seed,
                  metric="balanced_accuracy")


def probe_accuracy(
    similarity: np.ndarray,
    classes: Sequence[Any] | np.ndarray,
    *,
    folds: int = 5,
    repeats: int = 5,
    permutations: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Cross-validated linear-probe accuracy of a task with two or more classes (e.g. class = image sub-folder).

    Same probe, folds and distinct-image contract as :func:`representation_leakage`; the score is plain
    accuracy of the pooled out-of-fold predictions (as the linear-evaluation accuracies the model zoos
    publish), ``chance`` = the share of the largest class. Returns the same keys; ``p_value`` only when
    ``permutations`` > 0.
    """
    return _probe(similarity, classes, folds=folds, repeats=repeats, permutations=permutations, seed=seed,
                  metric="accuracy")


def labelled_kernel(
    similarity: np.ndarray, sha256: Sequence[str], labels_by_sha256: Mapping[str, Any]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The rows/columns of a similarity matrix for the labelled images: (kernel (m, m), labels (m,), sha256 (m,)).

    ``sha256``: the row order of ``similarity`` (as stored in the similarity file); ``labels_by_sha256``:
    the label of each wanted image, one entry per distinct image. The order follows ``sha256``. Raises
    ValueError when a labelled image is not in the matrix (the similarity file is from another stimulus set)
    or when ``sha256`` repeats an image.
    """
    order = list(sha256)
    if len(set(order)) != len(order):
        raise ValueError("the similarity matrix lists an image (sha256) twice; it must hold distinct images")
    missing = sorted(set(labels_by_sha256) - set(order))
    if missing:
        raise ValueError(
            f"{len(missing)} labelled image(s) are not in the similarity matrix (first: {missing[0]}); "
            "recompute the similarity file for the current stimulus set"
        )
    rows = np.array([i for i, h in enumerate(order) if h in labels_by_sha256], dtype=np.intp)
    kernel = np.asarray(similarity, dtype=np.float64)[np.ix_(rows, rows)]
    hashes = [order[i] for i in rows]
    return kernel, np.array([labels_by_sha256[h] for h in hashes]), hashes


# ----------------------------------------------------------------------------------------------------
# Per-(model, layer) tables and figures

#: Columns of :func:`probe_table` (``tables/leakage.csv``; the trade-off table adds ``n_biases``, ``threshold``).
PROBE_TABLE_COLUMNS = (
    "model", "layer", "attribute", "accuracy_mean", "accuracy_std", "p_value", "null_mean", "chance", "metric",
    "n_images", "folds", "repeats", "permutations",
)


def probe_table(results: Mapping[tuple[str, str], Mapping[str, Any]], attribute: str) -> pd.DataFrame:
    """One row per (model, layer) of :func:`representation_leakage` or :func:`probe_accuracy` results.

    ``results``: {(model, layer): result dict}, in the order rows should appear (models, then their layers in
    forward order); ``attribute``: what was decoded (e.g. "gender", or the task's name). Columns
    :data:`PROBE_TABLE_COLUMNS`.
    """
    rows = [{"model": model, "layer": layer, "attribute": attribute, **{k: r.get(k) for k in PROBE_TABLE_COLUMNS[3:]}}
            for (model, layer), r in results.items()]
    return pd.DataFrame(rows, columns=list(PROBE_TABLE_COLUMNS))


def with_bias_counts(table: pd.DataFrame, counts: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """``table`` (model, layer, ...) with ``n_biases`` and ``threshold`` from a counts table at ``threshold``.

    ``counts``: :func:`sbssl.summary.bias_counts` rows (model, layer, threshold, n_biases, ...). Raises
    ValueError when the threshold is not in the counts or a (model, layer) of ``table`` has no count.
    """
    at = counts[np.isclose(counts["threshold"].astype(float), threshold, rtol=1e-9, atol=0)]
    if at.empty:
        raise ValueError(f"no bias counts at threshold {threshold}; counts hold {sorted(set(counts['threshold']))}")
    merged = table.merge(at[["model", "layer", "n_biases"]], on=["model", "layer"], how="left", validate="one_to_one")
    missing = merged.loc[merged["n_biases"].isna(), ["model", "layer"]]
    if len(missing):
        pairs = ", ".join(f"{m}/{lyr}" for m, lyr in missing.itertuples(index=False))
        raise ValueError(f"no bias count for {pairs}; the counts table must cover every (model, layer) probed")
    return merged.assign(n_biases=merged["n_biases"].astype(int), threshold=float(threshold))


def _plot_layer_lines(table: pd.DataFrame, x: str, y: str, xlabel: str, ylabel: str) -> Figure:
    """One line per model through its layers (row order), each point labelled with its layer's short name."""
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.subplots()
    for model, rows in table.groupby("model", sort=False):
        (line,) = ax.plot(rows[x], rows[y], "o-", ms=4, label=str(model))
        for layer, xv, yv in zip(rows["layer"], rows[x], rows[y]):
            ax.annotate(LAYER_TITLES.get(layer, str(layer)), (xv, yv), fontsize=6, color=line.get_color(),
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, ncol=2 if table["model"].nunique() > 8 else 1)
    return fig


def plot_decodability(table: pd.DataFrame) -> tuple[Figure, str]:
    """Gender decodability (y) against the iEAT bias count (x) per layer, one line per model.

    ``table``: :func:`with_bias_counts` of a :func:`probe_table` of representation leakage. Returns
    ``(Figure, caption)`` as :mod:`sbssl.figures`.
    """
    attribute = ", ".join(sorted(set(table["attribute"])))
    threshold = float(table["threshold"].iloc[0])
    fig = _plot_layer_lines(table, "n_biases", "accuracy_mean", f"iEAT biases (p < {threshold:g})",
                            f"{attribute} decodability (balanced accuracy)")
    fig.axes[0].axhline(0.5, color="grey", lw=0.8, ls="--")
    significant = int((table["p_value"] < 0.05).sum()) if table["p_value"].notna().any() else 0
    caption = (
        f"Decodability of {attribute} from each layer (cross-validated kernel ridge probe on the cosine "
        f"similarities of the labelled stimuli, mean over repeats; dashed: chance) against the number of iEAT "
        f"tests with p < {threshold:g} at that layer. {significant} of {len(table)} (model, layer) pairs decode "
        f"{attribute} with permutation p < 0.05."
    )
    return fig, caption


def plot_tradeoff(table: pd.DataFrame) -> tuple[Figure, str]:
    """The bias-accuracy trade-off: iEAT bias count (y) against task-probe accuracy (x) per layer, one line per model.

    ``table``: :func:`with_bias_counts` of a :func:`probe_table` of :func:`probe_accuracy` results.
    """
    task = ", ".join(sorted(set(table["attribute"])))
    threshold = float(table["threshold"].iloc[0])
    fig = _plot_layer_lines(table, "accuracy_mean", "n_biases", f"linear-probe accuracy on {task}",
                            f"iEAT biases (p < {threshold:g})")
    caption = (
        f"Bias-accuracy trade-off per layer: cross-validated linear-probe accuracy on {task} (kernel ridge on "
        f"cosine similarities, mean over repeats) against the number of iEAT tests with p < {threshold:g}; "
        "a point low and to the right is a layer that transfers well with few biases."
    )
    return fig, caption


# ----------------------------------------------------------------------------------------------------
# The workflow's jobs: which images carry which label, one (model, layer), and the tables and figures


def folder_labels(manifest: pd.DataFrame, groups: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """``{sha256: label}`` for the usable images of each group's concept folders.

    ``groups``: label -> concept folders (e.g. ``{"female": ["gender/female", ...], "male": [...]}``).
    An image (by content) in folders of two different labels is an error naming both folders: it cannot
    be a training example of either. ValueError, too, for a folder without usable images.
    """
    from sbssl.stimuli import concept_images

    labels: dict[str, str] = {}
    source: dict[str, str] = {}
    for label, folders in groups.items():
        for folder in folders:
            for sha in concept_images(manifest, folder):
                if labels.get(sha, label) != label:
                    raise ValueError(
                        f"image {sha[:12]}... is in {source[sha]!r} (label {labels[sha]!r}) and in {folder!r} "
                        f"(label {label!r}); a labelled image must carry one label: fix the folders"
                    )
                labels[sha] = label
                source.setdefault(sha, folder)
    return labels


def subfolder_classes(manifest: pd.DataFrame, folder: str) -> dict[str, str]:
    """``{sha256: class}`` with class = the concept sub-folder of ``folder`` holding the image
    (``folder/<class>/<image>``); ValueError when ``folder`` has no concept sub-folders in the manifest."""
    prefix = folder.rstrip("/") + "/"
    concepts = sorted(c for c in set(manifest["concept"]) if c.startswith(prefix))
    if not concepts:
        raise ValueError(f"task folder {folder!r} has no concept sub-folders in the stimuli manifest")
    return folder_labels(manifest, {c[len(prefix):]: [c] for c in concepts})


def layer_probes(
    similarity_path: str,
    manifest_path: str,
    *,
    attribute: str | None,
    groups: Mapping[str, Sequence[str]] | None,
    task: str | None,
    task_folder: str | None,
    folds: int = 5,
    repeats: int = 5,
    permutations: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The probes of one (model, layer) similarity file: ``{"leakage": ..., "task": ..., provenance}``.

    ``leakage``: :func:`representation_leakage` of ``attribute`` with labels from ``groups``
    (:func:`folder_labels`), or None without groups. ``task``: :func:`probe_accuracy` of the classes under
    ``task_folder`` (:func:`subfolder_classes`), or None. Both use the same folds, repeats and seed.
    """
    from sbssl.provenance import provenance
    from sbssl.stimuli import read_manifest
    from sbssl.storage import read_similarity_arrays

    matrix, hashes, _ = read_similarity_arrays(similarity_path)
    manifest = read_manifest(manifest_path)
    options = {"folds": folds, "repeats": repeats, "seed": seed}
    result: dict[str, Any] = {"attribute": attribute, "task": task, "leakage": None, "task_probe": None}
    if groups:
        kernel, labels, _ = labelled_kernel(matrix, hashes, folder_labels(manifest, groups))
        result["leakage"] = representation_leakage(kernel, labels, permutations=permutations, **options)
    if task_folder:
        kernel, classes, _ = labelled_kernel(matrix, hashes, subfolder_classes(manifest, task_folder))
        result["task_probe"] = probe_accuracy(kernel, classes, **options)
    return {**result, **provenance("probes")}


def probe_tables(
    results: Mapping[tuple[str, str], Mapping[str, Any]], counts: pd.DataFrame, threshold: float
) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """(leakage table, trade-off table) from :func:`layer_probes` results keyed by (model, layer), each with
    the iEAT bias count at ``threshold`` (:func:`with_bias_counts`); None where no probe of that kind ran."""
    tables = []
    for key, name in (("leakage", "attribute"), ("task_probe", "task")):
        present = {k: r[key] for k, r in results.items() if r.get(key)}
        if not present:
            tables.append(None)
            continue
        label = next(r[name] for r in results.values() if r.get(key))
        tables.append(with_bias_counts(probe_table(present, label), counts, threshold))
    return tables[0], tables[1]
