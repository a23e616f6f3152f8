"""Kernel ridge probes on cosine-similarity matrices: decodability, permutation p, task accuracy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import RidgeCV

from sbssl import probes as P


def cosine(x: np.ndarray) -> np.ndarray:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return x @ x.T


def embeddings(n: int, dim: int, seed: int, signal: float = 0.0, labels: np.ndarray | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)) + 1.0  # all-positive-ish cosines, like post-ReLU feature maps
    if labels is not None:
        x[:, 0] += signal * (2 * labels - 1)
    return x


def test_separable_attribute_is_decoded_with_smallest_p():
    labels = np.repeat([0, 1], 40)
    result = P.representation_leakage(cosine(embeddings(80, 300, 0, 8.0, labels)), labels, permutations=99, seed=1)
    assert result["accuracy_mean"] > 0.97
    assert result["p_value"] == pytest.approx(1 / 100)
    assert result["null_mean"] == pytest.approx(0.5, abs=0.03)
    assert (result["n_images"], result["n_per_class"], result["classes"]) == (80, [40, 40], ["0", "1"])
    assert (result["metric"], result["chance"], result["folds"], result["repeats"]) == ("balanced_accuracy", 0.5, 5, 5)


def test_label_independent_attribute_is_at_chance():
    labels = np.repeat(["female", "male"], [45, 55])
    result = P.representation_leakage(cosine(embeddings(100, 300, 2)), labels, permutations=199, seed=3)
    assert result["accuracy_mean"] == pytest.approx(0.5, abs=0.07)
    assert result["p_value"] > 0.1
    assert result["classes"] == ["female", "male"]


def test_null_is_centred_on_chance():
    """Shuffled labels are not stratified: a test fold with more of one class leaves fewer of it in training.
    A decision that kept the training fold's class shares (the intercept) scored them ~0.43 on average,
    which made p too small; averaged over data sets the null must sit at chance."""
    nulls = []
    for seed in range(4):
        labels = np.repeat([0, 1], 30)
        nulls.append(P.representation_leakage(cosine(embeddings(60, 200, seed)), labels, repeats=2,
                                              permutations=100, seed=seed)["null_mean"])
    assert np.mean(nulls) == pytest.approx(0.5, abs=0.02)


def test_probe_is_ridge_with_intercept_and_leave_one_out_penalty():
    """One fold's scores equal scikit-learn's RidgeCV (efficient LOO, intercept) on the normalised embeddings,
    minus its intercept (the decision ignores the training class shares)."""
    rng = np.random.default_rng(4)
    x = embeddings(50, 30, 4)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = rng.integers(0, 3, 50)
    x[:, 0] += 0.3 * labels
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    train, test = np.arange(38), np.arange(38, 50)
    onehot = np.eye(3)[labels][:, None, :]  # one problem
    scores = P._FoldModel(x @ x.T, train, test).scores(onehot)[:, 0, :]
    centred = x[train] - x[train].mean(axis=0)
    mean_eig = np.linalg.eigvalsh(centred @ centred.T).clip(min=0)
    mean_eig = mean_eig[mean_eig > P.EIGEN_RTOL * mean_eig.max()].mean()
    ridge = RidgeCV(alphas=np.array(P.RELATIVE_PENALTIES) * mean_eig, fit_intercept=True).fit(x[train], np.eye(3)[labels[train]])
    expected = ridge.predict(x[test]) - np.eye(3)[labels[train]].mean(axis=0)
    np.testing.assert_allclose(scores, expected, atol=1e-8)


def test_probe_accuracy_multiclass():
    classes = np.repeat(["cat", "dog", "owl"], [20, 25, 30])
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(3, 100)) * 3
    x = centres[np.searchsorted(["cat", "dog", "owl"], classes)] + rng.normal(size=(75, 100))
    result = P.probe_accuracy(cosine(x), classes, seed=0)
    assert result["accuracy_mean"] > 0.95
    assert result["metric"] == "accuracy" and result["chance"] == pytest.approx(30 / 75)
    assert result["p_value"] is None and result["permutations"] == 0
    noise = P.probe_accuracy(cosine(embeddings(75, 100, 6)), classes, seed=0)
    assert noise["accuracy_mean"] < 0.5


def test_seeded():
    labels = np.repeat([0, 1], 30)
    k = cosine(embeddings(60, 50, 7, 1.0, labels))
    a = P.representation_leakage(k, labels, permutations=20, seed=5)
    assert a == P.representation_leakage(k, labels, permutations=20, seed=5)
    assert a != P.representation_leakage(k, labels, permutations=20, seed=6)
    one = P.representation_leakage(k, labels, repeats=1, permutations=0)
    assert one["accuracy_std"] == 0.0 and one["p_value"] is None


def test_identical_images_give_chance_not_an_error():
    labels = np.repeat([0, 1], 10)
    result = P.representation_leakage(np.ones((20, 20)), labels, permutations=10)
    assert result["accuracy_mean"] == 0.5


@pytest.mark.parametrize("kernel, labels, match", [
    (np.ones((4, 5)), [0, 1, 0, 1], "square"),
    (np.array([[1.0, 0.2], [0.3, 1.0]]), [0, 1], "not symmetric"),
    (np.full((2, 2), np.nan), [0, 1], "non-finite"),
    (np.eye(10), [0] * 10, "binary attribute"),
    (np.eye(10), [0, 1, 2] * 3 + [0], "binary attribute"),
    (np.eye(10), [0] * 7 + [1] * 3, r"class\(es\) \{'1': 3\} have fewer images than folds=5"),
    (np.eye(10), [0, 1] * 4, "one label per row"),
])
def test_bad_input(kernel, labels, match):
    with pytest.raises(ValueError, match=match):
        P.representation_leakage(kernel, labels)


@pytest.mark.parametrize("option, value", [("folds", 1), ("repeats", 0), ("permutations", -1), ("seed", 1.5)])
def test_bad_options(option, value):
    with pytest.raises(ValueError, match=f"{option} must be"):
        P.representation_leakage(np.eye(10), [0, 1] * 5, **{option: value})


def test_labelled_kernel_selects_distinct_labelled_rows():
    k = np.arange(16, dtype=float).reshape(4, 4)
    k = k + k.T
    sub, labels, hashes = P.labelled_kernel(k, ["a", "b", "c", "d"], {"d": "male", "b": "female"})
    assert hashes == ["b", "d"] and labels.tolist() == ["female", "male"]
    np.testing.assert_array_equal(sub, k[np.ix_([1, 3], [1, 3])])
    with pytest.raises(ValueError, match=r"1 labelled image\(s\) are not in the similarity matrix \(first: e\)"):
        P.labelled_kernel(k, ["a", "b", "c", "d"], {"e": "male"})
    with pytest.raises(ValueError, match="twice"):
        P.labelled_kernel(k, ["a", "b", "b", "d"], {"a": "male"})


# --- tables and figures ------------------------------------------------------------------------------


def layer_results() -> dict[tuple[str, str], dict]:
    labels = np.repeat([0, 1], 15)
    out = {}
    for i, (model, layer) in enumerate([("a", "maxpool"), ("a", "avgpool"), ("b", "maxpool"), ("b", "avgpool")]):
        out[(model, layer)] = P.representation_leakage(cosine(embeddings(30, 40, i, 2.0 * i, labels)), labels,
                                                       repeats=2, permutations=20, seed=i)
    return out


def counts_table() -> pd.DataFrame:
    rows = [(m, lyr, "greater", t, n + (t > 0.02), 39, 0)
            for (m, lyr), n in {("a", "maxpool"): 3, ("a", "avgpool"): 5, ("b", "maxpool"): 0, ("b", "avgpool"): 8}.items()
            for t in (0.01, 0.05)]
    return pd.DataFrame(rows, columns=["model", "layer", "alternative", "threshold", "n_biases", "n_tests", "n_excluded"])


def test_probe_table_and_bias_counts():
    results = layer_results()
    table = P.probe_table(results, "gender")
    assert table.columns.tolist() == list(P.PROBE_TABLE_COLUMNS)
    assert list(zip(table["model"], table["layer"])) == list(results)
    assert table["accuracy_mean"].tolist() == [r["accuracy_mean"] for r in results.values()]
    assert (table["attribute"] == "gender").all() and (table["permutations"] == 20).all()
    merged = P.with_bias_counts(table, counts_table(), 0.05)
    assert merged["n_biases"].tolist() == [4, 6, 1, 9] and (merged["threshold"] == 0.05).all()
    with pytest.raises(ValueError, match="no bias counts at threshold 0.1"):
        P.with_bias_counts(table, counts_table(), 0.1)
    with pytest.raises(ValueError, match="no bias count for b/avgpool"):
        P.with_bias_counts(table, counts_table().iloc[:-1], 0.05)


def test_figures_draw_one_line_per_model():
    merged = P.with_bias_counts(P.probe_table(layer_results(), "gender"), counts_table(), 0.01)
    fig, caption = P.plot_decodability(merged)
    lines = [line for line in fig.axes[0].lines if line.get_label() in {"a", "b"}]
    assert [line.get_label() for line in lines] == ["a", "b"]
    np.testing.assert_array_equal(lines[1].get_xdata(), [0, 8])
    assert "p < 0.01" in caption and "gender" in caption
    significant = int((merged["p_value"] < 0.05).sum())
    assert f"{significant} of 4 (model, layer) pairs" in caption
    fig, caption = P.plot_tradeoff(merged.assign(attribute="demo classes"))
    lines = [line for line in fig.axes[0].lines if line.get_label() in {"a", "b"}]
    np.testing.assert_array_equal(lines[0].get_ydata(), [3, 5])
    assert "demo classes" in caption


# --------------------------------------------------------------------------- the workflow's jobs


def _manifest(rows):
    return pd.DataFrame(
        [(f"{c}/{i}.png", c, sha, "PNG", 4, 4, "ok") for i, (c, sha) in enumerate(rows)],
        columns=["path", "concept", "sha256", "format", "width", "height", "status"],
    )


def test_folder_labels_and_subfolder_classes():
    manifest = _manifest([("g/f", "a"), ("g/f", "b"), ("i/f", "c"), ("g/m", "d"), ("t/x", "a"), ("t/y", "d")])
    assert P.folder_labels(manifest, {"female": ["g/f", "i/f"], "male": ["g/m"]}) == {
        "a": "female", "b": "female", "c": "female", "d": "male"
    }  # fmt: skip
    assert P.subfolder_classes(manifest, "t") == {"a": "x", "d": "y"}
    with pytest.raises(ValueError, match=r"is in 'g/f' \(label 'female'\) and in 't/x' \(label 'male'\)"):
        P.folder_labels(manifest, {"female": ["g/f"], "male": ["t/y", "t/x"]})
    with pytest.raises(ValueError, match="task folder 'nope' has no concept sub-folders"):
        P.subfolder_classes(manifest, "nope")


def test_layer_probes_reads_the_files_and_tables_join_the_counts(tmp_path):
    from sbssl.provenance import code_digest
    from sbssl.stimuli import write_manifest
    from sbssl.storage import write_sha256

    import h5py

    rng = np.random.default_rng(0)
    n = 24
    hashes = [f"{i:064x}" for i in range(n)]
    labels = np.repeat([0, 1], n // 2)
    vectors = rng.standard_normal((n, 16)) + 8.0 * labels[:, None] * np.eye(16)[0]
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with h5py.File(tmp_path / "sim.h5", "w") as f:
        f.create_dataset("similarity", data=vectors @ vectors.T)
        write_sha256(f, hashes)
    concepts = ["g/female" if y == 0 else "g/male" for y in labels]
    task = ["t/a" if i % 2 else "t/b" for i in range(n)]
    rows = list(zip(concepts, hashes)) + list(zip(task, hashes))
    write_manifest(_manifest(rows), tmp_path / "manifest.csv")
    result = P.layer_probes(
        str(tmp_path / "sim.h5"), str(tmp_path / "manifest.csv"), attribute="gender",
        groups={"female": ["g/female"], "male": ["g/male"]}, task="parity", task_folder="t",
        folds=3, repeats=2, permutations=50, seed=0,
    )
    assert result["code_digest"] == code_digest("probes")
    assert result["leakage"]["accuracy_mean"] > 0.9 and result["leakage"]["p_value"] == pytest.approx(1 / 51)
    assert result["task_probe"]["n_images"] == n and result["task_probe"]["p_value"] is None
    counts = pd.DataFrame({"model": ["m"], "layer": ["avgpool"], "threshold": [0.05], "n_biases": [7]})
    leakage, tradeoff = P.probe_tables({("m", "avgpool"): result}, counts, 0.05)
    assert leakage.loc[0, "attribute"] == "gender" and leakage.loc[0, "n_biases"] == 7
    assert tradeoff.loc[0, "attribute"] == "parity"
    assert leakage.loc[0, "accuracy_mean"] == result["leakage"]["accuracy_mean"]
