"""Wang et al. leakage: estimators against a closed-form truth, amplification, inputs, outputs, balanced subsets."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from sbssl import leakage as L

SEED = 0
# Larger test subsamples than the COCO default: the acceptance bound (0.02) is about the estimator, and
# with 3000 test images the sampling error of one accuracy alone has a std of ~0.008.
BIG_TEST = {"train": 3000, "val": 1500, "test": 4500}


@pytest.fixture(scope="module")
def synthetic() -> tuple[pd.DataFrame, np.ndarray]:
    rates = L.synthetic_rates(8, SEED)
    return L.synthetic_annotations(40_000, seed=SEED, rates=rates), rates


@pytest.fixture(scope="module")
def small() -> pd.DataFrame:
    return L.synthetic_annotations(12_000, seed=1)


def predictions_from(annotations: pd.DataFrame, logits: np.ndarray) -> pd.DataFrame:
    table = annotations[["image_id"]].copy()
    for j, column in enumerate(L.label_columns(annotations)):
        table[column] = logits[:, j]
    return table


def gender_sign(annotations: pd.DataFrame) -> np.ndarray:
    return np.where(annotations["gender"] == "man", 1.0, -1.0)


# --- closed form -------------------------------------------------------------------------------------


def test_bayes_accuracy_simple_cases():
    assert L.bayes_accuracy(np.array([[0.2], [0.8]])) == pytest.approx(0.8)
    # An uninformative second label changes nothing; with no information the prior decides.
    assert L.bayes_accuracy(np.array([[0.2, 0.5], [0.8, 0.5]])) == pytest.approx(0.8)
    assert L.bayes_accuracy(np.array([[0.3, 0.6], [0.3, 0.6]]), prior=0.7) == pytest.approx(0.7)
    # Two independent labels each 0.8-informative: majority of 2 votes, ties (prob .32) split 50/50.
    assert L.bayes_accuracy(np.array([[0.2, 0.2], [0.8, 0.8]])) == pytest.approx(0.64 + 0.32 / 2)
    with pytest.raises(ValueError, match="limited to"):
        L.bayes_accuracy(np.full((2, L.MAX_BAYES_LABELS + 1), 0.5))


def test_synthetic_labels_follow_their_rates(synthetic):
    table, rates = synthetic
    observed = table.groupby("gender")[L.label_columns(table)].mean().loc[["man", "woman"]].to_numpy()
    np.testing.assert_allclose(observed, rates, atol=0.01)
    assert set(table["split"]) == set(L.SPLITS)


def test_lambda_D_logistic_within_002_of_bayes(synthetic):
    table, rates = synthetic
    report = L.leakage_report(table, attacker="logistic", rounds=5, flip_grid=(0.0,), sizes=BIG_TEST, seed=SEED)
    assert abs(report.lambda_D.mean - L.bayes_accuracy(rates)) < 0.02
    assert len(report.lambda_D.values) == 5 and report.lambda_D.std > 0


def test_lambda_D_mlp_within_002_of_bayes(synthetic):
    """Wang et al.'s MLP; 10 epochs suffice here (30 give the same best-validation epoch). ~5-20 s on 2 cores."""
    table, rates = synthetic
    report = L.leakage_report(table, attacker="mlp", rounds=2, epochs=10, flip_grid=(0.0,), sizes=BIG_TEST,
                              seed=SEED, device="cpu")
    assert abs(report.lambda_D.mean - L.bayes_accuracy(rates)) < 0.02
    assert report.epochs == 10


# --- amplification -----------------------------------------------------------------------------------

GRID = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)


def test_perfect_predictions_do_not_amplify(small):
    truth = small[L.label_columns(small)].to_numpy(dtype=float)
    report = L.leakage_report(small, predictions_from(small, 8 * (2 * truth - 1)), rounds=3, flip_grid=GRID)
    assert report.model_f1 == pytest.approx(1.0)
    assert report.lambda_D_at_model_f1 == pytest.approx(report.lambda_D.mean)
    assert abs(report.amplification) < 0.02
    assert report.model_f1_within_curve


def test_gender_signal_in_predictions_amplifies(small):
    truth = small[L.label_columns(small)].to_numpy(dtype=float)
    rng = np.random.default_rng(5)
    logits = 3 * (2 * truth - 1) + rng.normal(size=truth.shape)
    logits[:, :3] += 1.5 * gender_sign(small)[:, None]  # the model leans on gender for three labels
    report = L.leakage_report(small, predictions_from(small, logits), rounds=3, flip_grid=GRID)
    assert report.model_f1 < 1
    assert report.amplification > 0.05
    assert report.lambda_M.mean > report.lambda_D.mean


def test_predictions_independent_of_gender_leak_nothing(small):
    logits = np.random.default_rng(6).normal(size=(len(small), len(L.label_columns(small))))
    report = L.leakage_report(small, predictions_from(small, logits), rounds=3, flip_grid=GRID)
    assert abs(report.lambda_M.mean - 0.5) < 0.02


def test_lambda_M_uses_only_images_with_predictions(small):
    kept = small[small.index % 2 == 0]
    truth = kept[L.label_columns(kept)].to_numpy(dtype=float)
    report = L.leakage_report(small, predictions_from(kept, 8 * (2 * truth - 1)), rounds=2, flip_grid=(0.0,))
    for split in L.SPLITS:
        n = kept[kept["split"] == split]["gender"].value_counts().min()
        assert report.sizes["lambda_M"][split] == min(L.DEFAULT_SIZES[split], n)
    assert report.sizes["lambda_M"]["train"] < report.sizes["lambda_D"]["train"]


def test_predictions_without_test_images_are_refused(small):
    kept = small[small["split"] != "test"]
    with pytest.raises(ValueError, match="test"):
        L.leakage_report(small, predictions_from(kept, np.zeros((len(kept), 8))), rounds=1, flip_grid=(0.0,))


# --- the natural-leakage curve -----------------------------------------------------------------------


def test_natural_leakage_curve(small):
    curve = L.natural_leakage(small, rounds=2, flip_grid=(0.5, 0.1, 0.02))  # 0 is added, rows sorted by p
    assert curve.columns.tolist() == ["p", "f1", "f1_std", "leakage_mean", "leakage_std"]
    assert curve["p"].tolist() == [0.0, 0.02, 0.1, 0.5]
    assert curve["f1"].iloc[0] == pytest.approx(1.0)
    assert curve["f1"].is_monotonic_decreasing and curve["leakage_mean"].is_monotonic_decreasing
    assert abs(curve["leakage_mean"].iloc[-1] - 0.5) < 0.02  # p = 0.5: the labels carry nothing
    report = L.leakage_report(small, rounds=2, flip_grid=(0.5, 0.1, 0.02))
    pd.testing.assert_frame_equal(report.natural_leakage, curve)
    assert report.lambda_D.mean == curve["leakage_mean"].iloc[0]


def test_flip_grid_out_of_range_is_refused(small):
    with pytest.raises(ValueError, match=r"\[0, 0.5\]"):
        L.natural_leakage(small, rounds=1, flip_grid=(0.1, 0.7))


def test_leakage_at_f1_interpolates_and_flags_the_outside():
    curve = pd.DataFrame({"p": [0.0, 0.1, 0.5], "f1": [1.0, 0.8, 0.4], "leakage_mean": [0.7, 0.6, 0.5]})
    assert L.leakage_at_f1(curve, 0.9) == (pytest.approx(0.65), True)
    assert L.leakage_at_f1(curve, 0.5) == (pytest.approx(0.525), True)
    assert L.leakage_at_f1(curve, 0.2) == (pytest.approx(0.5), False)


def test_model_f1_thresholds_logits_at_zero():
    ann = pd.DataFrame({
        "image_id": ["a", "b", "c", "d", "e", "f"],
        "split": ["train", "val", "test", "test", "test", "test"],
        "gender": ["man", "woman"] * 3,
        "label_x": [1, 1, 1, 1, 0, 0],
        "label_y": [0, 0, 1, 0, 1, 0],
    })
    pred = pd.DataFrame({"image_id": list("abcdef"), "label_x": [-9, -9, 0.1, -0.1, -3, 2],
                         "label_y": [9, 9, 5, -5, 5, -5]})
    # Test rows c..f. x: predicted 1,0,0,1 vs truth 1,1,0,0 -> F1 0.5; y: perfect -> 1. Train/val rows ignored.
    assert L.model_f1(ann, pred) == pytest.approx(0.75)


# --- attackers, seeds --------------------------------------------------------------------------------


def test_mlp_attacker_is_wang_et_al():
    from torch import nn

    net = L.mlp_attacker(7)
    kinds = [type(m).__name__ for m in net]
    assert kinds == ["BatchNorm1d", "Linear"] + ["BatchNorm1d", "LeakyReLU", "Linear"] * 3
    linears = [m for m in net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(7, 300), (300, 300), (300, 300), (300, 2)]
    assert net[0].num_features == 7


def test_balanced_sample_caps_and_balances():
    codes = np.array([0] * 10 + [1] * 4 + [0] * 6 + [1] * 6 + [0, 1])
    splits = np.array(["train"] * 14 + ["val"] * 12 + ["test"] * 2)
    sample = L.balanced_sample(codes, splits, {"train": 5, "val": 2, "test": 9}, np.random.default_rng(0))
    assert {s: len(v) for s, v in sample.items()} == {"train": 8, "val": 4, "test": 2}
    for split, rows in sample.items():
        assert (splits[rows] == split).all() and len(set(rows)) == len(rows)
        assert codes[rows].sum() * 2 == len(rows)


def test_same_seed_same_report_other_seed_other_subsamples(small):
    a = L.leakage_report(small, rounds=2, flip_grid=(0.0, 0.1), seed=3)
    b = L.leakage_report(small, rounds=2, flip_grid=(0.0, 0.1), seed=3)
    c = L.leakage_report(small, rounds=2, flip_grid=(0.0, 0.1), seed=4)
    assert a.as_dict() == b.as_dict()
    assert a.lambda_D.values != c.lambda_D.values


@pytest.mark.parametrize("kwargs, match", [
    ({"attacker": "svm"}, "unknown attacker"),
    ({"rounds": 0}, "rounds must be"),
    ({"epochs": 0}, "epochs must be"),
    ({"sizes": {"train": 10, "val": 10}}, "sizes must give"),
    ({"sizes": {"train": 10, "val": 0, "test": 5}}, "sizes must give"),
])
def test_bad_options(small, kwargs, match):
    with pytest.raises(ValueError, match=match):
        L.leakage_report(small, **kwargs)


# --- outputs -----------------------------------------------------------------------------------------


def test_write_leakage(small, tmp_path):
    truth = small[L.label_columns(small)].to_numpy(dtype=float)
    report = L.leakage_report(small, predictions_from(small, 8 * (2 * truth - 1)), rounds=2, flip_grid=(0.0, 0.2))
    paths = L.write_leakage(report, tmp_path / "out", extra={"sbssl_version": "x"})
    data = json.loads(paths["json"].read_text())
    assert data["lambda_D"] == {"mean": report.lambda_D.mean, "std": report.lambda_D.std,
                                "rounds": list(report.lambda_D.values)}
    assert data["lambda_M"]["mean"] == report.lambda_M.mean
    for key in ("model_f1", "lambda_D_at_model_f1", "amplification"):
        assert data[key] == getattr(report, key)
    assert (data["attacker"], data["rounds"], data["epochs"], data["sbssl_version"]) == ("logistic", 2, None, "x")
    assert data["attribute_values"] == ["man", "woman"]
    pd.testing.assert_frame_equal(pd.read_csv(paths["csv"]), report.natural_leakage, check_exact=False, rtol=1e-12)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths["pdf"].read_bytes()[:5] == b"%PDF-"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths.values())


def test_report_without_predictions_has_no_model_fields(small):
    data = L.leakage_report(small, rounds=1, flip_grid=(0.0,)).as_dict()
    assert data["lambda_M"] is None and data["amplification"] is None and data["model_f1"] is None
    assert set(data["sizes"]) == {"lambda_D"}


# --- input tables ------------------------------------------------------------------------------------


def ann_table() -> pd.DataFrame:
    return pd.DataFrame({
        "image_id": [1, 2, 3, 4, 5, 6],
        "split": ["train", "train", "val", "val", "test", "test"],
        "gender": ["man", "woman"] * 3,
        "label_dog": [1, 0, 0, 1, 1, 0],
        "label_cat": [0, 0, 1, 1, 0, 1],
    })


def test_read_annotations_and_predictions(tmp_path):
    ann_path, pred_path = tmp_path / "ann.csv", tmp_path / "pred.csv"
    ann_table().to_csv(ann_path, index=False)
    pd.DataFrame({"image_id": [5, 6], "label_cat": [0.5, -1.0], "label_dog": [2.0, -2.0]}).to_csv(pred_path, index=False)
    ann = L.read_annotations(ann_path)
    assert ann["image_id"].tolist() == ["1", "2", "3", "4", "5", "6"]
    assert ann["label_dog"].dtype == np.int8
    pred = L.read_predictions(pred_path, ann)
    assert pred.columns.tolist() == ["image_id", "label_dog", "label_cat"]  # the annotations' order
    assert pred["label_cat"].tolist() == [0.5, -1.0]


@pytest.mark.parametrize("change, match", [
    (lambda t: t.drop(columns="split"), r"column\(s\) \['split'\] missing"),
    (lambda t: t.drop(columns=["label_dog", "label_cat"]), "no label columns"),
    (lambda t: t.assign(gender="man"), "one value only"),
    (lambda t: t.assign(gender=["man", "woman", "other"] * 2), "3 values"),
    (lambda t: t.assign(label_dog=[1, 0, 2, 1, 1, 0]), "'label_dog' is not binary"),
    (lambda t: t.assign(label_cat=[0, 0.5, 1, 1, 0, 1]), "'label_cat' is not binary"),
    (lambda t: t.assign(split=["train", None, "val", "val", "test", "test"]), "missing or unknown split"),
    (lambda t: t.assign(split=["train", "dev", "val", "val", "test", "test"]), r"unknown split \('dev'\)"),
    (lambda t: t.assign(split=["train", "train", "train", "train", "test", "test"]), r"no images in split\(s\) \['val'\]"),
    (lambda t: t.assign(image_id=[1, 1, 3, 4, 5, 6]), "image_id repeated"),
])
def test_bad_annotations(tmp_path, change, match):
    path = tmp_path / "ann.csv"
    change(ann_table()).to_csv(path, index=False)
    with pytest.raises(ValueError, match=match) as info:
        L.read_annotations(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("pred, match", [
    (pd.DataFrame({"image_id": [5, 99], "label_dog": [1.0, 2], "label_cat": [0.0, 1]}), r"1 image id\(s\) not in the annotations \(e.g. '99'\)"),
    (pd.DataFrame({"image_id": [5], "label_dog": [1.0]}), r"label column\(s\) \['label_cat'\] missing"),
    (pd.DataFrame({"image_id": [5], "label_dog": [1.0], "label_cat": [0.0], "label_cow": [0.0]}), "not in the annotations"),
    (pd.DataFrame({"image_id": [5, 6], "label_dog": [1.0, np.inf], "label_cat": [0.0, 1]}), "'label_dog'.*infinite"),
    (pd.DataFrame({"image_id": [5, 6], "label_dog": ["high", 1], "label_cat": [0.0, 1]}), "non-numeric"),
    (pd.DataFrame({"image_id": [5, 5], "label_dog": [1.0, 1], "label_cat": [0.0, 1]}), "image_id repeated"),
    (pd.DataFrame({"id": [5], "label_dog": [1.0], "label_cat": [0.0]}), "'image_id' missing"),
])
def test_bad_predictions(tmp_path, pred, match):
    path = tmp_path / "pred.csv"
    pred.to_csv(path, index=False)
    with pytest.raises(ValueError, match=match) as info:
        L.read_predictions(path, L.validate_annotations(ann_table()))
    assert str(path) in str(info.value)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="annotations file"):
        L.read_annotations(tmp_path / "nope.csv")
    with pytest.raises(FileNotFoundError, match="predictions file"):
        L.read_predictions(tmp_path / "nope.csv", L.validate_annotations(ann_table()))


def test_split_without_one_attribute_value_is_refused():
    table = ann_table().assign(gender=["man", "woman", "man", "man", "man", "woman"])
    with pytest.raises(ValueError, match="split 'val' lacks"):
        L.leakage_report(table, rounds=1, flip_grid=(0.0,))


# --- balanced subsets --------------------------------------------------------------------------------


def worst_ratio(table: pd.DataFrame) -> float:
    worst = 0.0
    for _, group in table.groupby("split"):
        counts = group.groupby("gender")[L.label_columns(table)].sum()
        high, low = counts.max(), counts.min()
        ratios = np.where(low > 0, high / low.clip(lower=1), np.where(high > 0, np.inf, 1.0))
        worst = max(worst, float(ratios.max()))
    return worst


@pytest.mark.parametrize("alpha", [1, 2, 3])
def test_balanced_subset_bounds_every_ratio(alpha):
    table = L.synthetic_annotations(6000, seed=2, rates=L.synthetic_rates(10, 2, gap=0.3))
    assert worst_ratio(table) > 3
    subset = L.balanced_subset(table, alpha, seed=0)
    assert worst_ratio(subset) <= alpha
    assert set(subset["image_id"]) < set(table["image_id"])
    # Kept rows keep their order and their values.
    original = table.set_index("image_id").loc[subset["image_id"]].reset_index()
    pd.testing.assert_frame_equal(subset, original, check_dtype=False)
    pd.testing.assert_frame_equal(subset, L.balanced_subset(table, alpha, seed=0))
    if alpha == 1:
        unlabelled = table[table[L.label_columns(table)].sum(axis=1) == 0]
        assert set(unlabelled["image_id"]) <= set(subset["image_id"])


def test_balanced_subset_keeps_a_balanced_table_whole():
    # Every label has as many men as women in every split: nothing to remove, even at alpha = 1.
    table = ann_table().assign(label_dog=[1, 1, 0, 0, 1, 1], label_cat=[0, 0, 1, 1, 0, 0])
    pd.testing.assert_frame_equal(L.balanced_subset(table, 1), L.validate_annotations(table))


def test_balanced_subset_rejects_alpha_below_one():
    with pytest.raises(ValueError, match="alpha must be"):
        L.balanced_subset(ann_table(), 0.5)
