"""The debiasing training job: every method's outputs on a short colored-digits run, resumption after a
simulated kill (same metrics as an uninterrupted run), settings checks, batches, and the ResNet-50 path on a
tiny Waterbirds folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sbssl.debias import DebiasConfig, debias_runs, debias_table, run_debias
from sbssl.debias import train as T
from sbssl.debias.datasets import colored_digits

from test_debias_datasets import waterbirds_folder

KEYS = {"worst_group_acc", "avg_acc", "group_acc", "best_epoch", "method", "seed", "dataset", "group_count",
        "empty_groups", "epochs", "val_worst_group_acc", "val_avg_acc", "val_group_acc", "train_group_count",
        "history", "config", "device", "sbssl_version"}


@pytest.fixture(scope="module")
def digits():
    return colored_digits()


@pytest.mark.parametrize("method", T.METHODS)
def test_short_colored_digits_run_writes_metrics_and_weights(method: str, digits, tmp_path: Path) -> None:
    metrics = run_debias("colored-digits", method, 3, tmp_path, data=digits, epochs=2, device="cpu")
    assert KEYS <= set(metrics)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert (metrics["method"], metrics["seed"], metrics["epochs"]) == (method, 3, 2)
    assert metrics["dataset"] == "colored-digits"
    assert set(metrics["group_acc"]) == set(digits.group_names)
    assert metrics["group_count"] == digits.group_counts()["test"]
    assert metrics["best_epoch"] in (1, 2) and len(metrics["history"]) == 2
    best = metrics["history"][metrics["best_epoch"] - 1]
    assert metrics["worst_group_acc"] == best["test_worst_group_acc"] == min(metrics["group_acc"].values())
    assert metrics["val_worst_group_acc"] == max(h["val_worst_group_acc"] for h in metrics["history"])
    assert metrics["avg_acc"] == pytest.approx(np.mean(list(metrics["group_acc"].values())))
    assert not (tmp_path / "checkpoint.pt").exists()
    backbone = torch.load(tmp_path / "model.pt", weights_only=True)
    T.SmallCNN().load_state_dict(backbone)  # weights only, the backbone's own keys
    heads = torch.load(tmp_path / "heads.pt", weights_only=True)
    prefixes = {key.split(".")[0] for key in heads}
    extra = {"adversarial": {"adversary"}, "clusterfix": {"pseudo_heads"}}.get(method, set())
    assert prefixes == {"head"} | extra
    if method == "clusterfix":
        assert metrics["clusters"]["bias_purity"] == 1.0  # the raw pixels isolate the tints (MEASURED-FACTS)
        assert sum(metrics["clusters"]["sizes"].values()) == 1000
        assert "val_worst_cluster_acc" in metrics["history"][0]


@pytest.mark.parametrize("method", ["groupdro", "adversarial", "clusterfix"])
def test_killed_job_resumes_to_the_same_metrics(method: str, digits, tmp_path: Path) -> None:
    options = {"cf_k": 4}
    whole = run_debias("colored-digits", method, 1, tmp_path / "whole", data=digits, epochs=3, options=options)
    stopped = run_debias("colored-digits", method, 1, tmp_path / "killed", data=digits, epochs=3, options=options,
                         stop_after_epoch=1)
    assert stopped == {"stopped_after_epoch": 1}
    assert (tmp_path / "killed" / "checkpoint.pt").is_file() and not (tmp_path / "killed" / "metrics.json").exists()
    # another process's RNG state must not matter: the checkpoint restores it
    torch.manual_seed(12345)
    np.random.seed(54321)
    resumed = run_debias("colored-digits", method, 1, tmp_path / "killed", data=digits, epochs=3, options=options)
    assert resumed == whole
    a = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resumption_differs_from_a_fresh_run_when_the_state_is_lost(digits, tmp_path: Path) -> None:
    """The check above has teeth: a run whose first epoch is redone from scratch with another seed differs."""
    a = run_debias("colored-digits", "erm", 1, tmp_path / "a", data=digits, epochs=2)
    b = run_debias("colored-digits", "erm", 2, tmp_path / "b", data=digits, epochs=2)
    assert a["history"] != b["history"]


def test_history_logs_the_adversary_and_the_clusterfix_weights(digits, tmp_path: Path) -> None:
    """The diagnostics that explain the colored-digits figures (sbssl.debias.train's module doc)."""
    adv = run_debias("colored-digits", "adversarial", 0, tmp_path / "adv", data=digits, epochs=2)
    assert adv["config"]["adv_layer"] == "conv1" and adv["config"]["adv_lambda"] == 1.0
    first, second = adv["history"]
    assert first["train_adv_loss"] > second["train_adv_loss"] > 0
    # the tint is separable from every pixel: the adversary is certain by the second epoch, its reversed
    # gradient gone
    assert 0.5 < first["train_adv_acc"] < second["train_adv_acc"] == 1.0
    assert second["train_adv_loss"] < 0.01
    cf = run_debias("colored-digits", "clusterfix", 0, tmp_path / "cf", data=digits, epochs=2)
    weight = cf["history"][-1]["train_group_weight"]
    assert set(weight) == set(digits.group_names)
    counts = digits.group_counts()["train"]
    # per-batch mean 1 -> mean 1 over the epoch's samples (each visited once)
    assert sum(weight[g] * counts[g] for g in weight) / 1000 == pytest.approx(1.0, abs=0.05)
    # early on the inverse cluster size lifts the minority groups (10% of each class) above the majority
    assert min(weight["digit<5/green"], weight["digit>=5/red"]) > max(weight["digit<5/red"], weight["digit>=5/green"])
    erm = run_debias("colored-digits", "erm", 0, tmp_path / "erm", data=digits, epochs=1)
    assert set(erm["history"][0]) == {"epoch", "train_loss", "val_worst_group_acc", "val_avg_acc",
                                      "test_worst_group_acc", "test_avg_acc"}


def test_finished_folder_and_other_settings(digits, tmp_path: Path) -> None:
    first = run_debias("colored-digits", "erm", 0, tmp_path, data=digits, epochs=1)
    (tmp_path / "model.pt").unlink()  # proof that nothing is retrained: model.pt is not rewritten
    assert run_debias("colored-digits", "erm", 0, tmp_path, data=digits, epochs=1) == first
    assert not (tmp_path / "model.pt").exists()
    with pytest.raises(ValueError, match="other settings"):
        run_debias("colored-digits", "erm", 0, tmp_path, data=digits, epochs=2)
    run_debias("colored-digits", "erm", 0, tmp_path / "k", data=digits, epochs=3, stop_after_epoch=1)
    with pytest.raises(ValueError, match="checkpoint of other settings"):
        run_debias("colored-digits", "groupdro", 0, tmp_path / "k", data=digits, epochs=3)
    # the workflow's job: a stale checkpoint is discarded, and the run equals one in a fresh folder
    fresh = run_debias("colored-digits", "groupdro", 0, tmp_path / "fresh", data=digits, epochs=2)
    again = run_debias("colored-digits", "groupdro", 0, tmp_path / "k", data=digits, epochs=2,
                       discard_other_settings=True)
    assert again["history"] == fresh["history"] and again["worst_group_acc"] == fresh["worst_group_acc"]
    assert list(debias_table(debias_runs([tmp_path / "metrics.json"]))["method"]) == ["erm"]


def test_settings_are_checked(digits, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not 'waterbirds'"):
        run_debias("waterbirds", "erm", 0, tmp_path, data=digits)
    with pytest.raises(ValueError, match="unknown debias option"):
        T.make_config("colored-digits", options={"learning_rate": 1})
    with pytest.raises(ValueError, match="adv_layer must be one of"):
        T.make_config("colored-digits", options={"adv_layer": "layer4"})
    with pytest.raises(ValueError, match="cf_variant"):
        T.make_config("waterbirds", options={"cf_variant": "paper"})
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        T.make_config("celeba", epochs=0)
    with pytest.raises(ValueError, match="unknown debias method"):
        run_debias("colored-digits", "jtt", 0, "unused")
    config = T.make_config("waterbirds")
    assert (config.lr, config.weight_decay, config.schedule, config.cf_beta, config.cf_k, config.cf_momentum) == (
        1e-4, 1e-2, "cosine", 0.01, 8, 0.3)
    assert T.make_config("celeba").cf_beta == 0.5 and T.make_config("celeba").cf_variant == "code"
    assert isinstance(config, DebiasConfig)


def test_batches(digits) -> None:
    config = T.make_config("colored-digits", options={"batch_size": 40, "adv_balanced_batches": True})
    balanced = T.epoch_batches(digits, "adversarial", config, 0, 1)
    a = digits.splits["train"].a
    assert balanced and all(len(b) == 40 and np.sum(a[b] == 0) == 20 for b in balanced)
    assert [b.tolist() for b in T.epoch_batches(digits, "adversarial", config, 0, 1)] == [b.tolist() for b in balanced]
    plain = T.epoch_batches(digits, "erm", config, 0, 1)
    assert sorted(np.concatenate(plain).tolist()) == list(range(1000))  # a permutation
    dro = np.concatenate(T.epoch_batches(digits, "groupdro", config, 0, 1))
    share = np.bincount(digits.groups("train")[dro], minlength=4) / len(dro)
    assert np.allclose(share, 0.25, atol=0.05)  # group-balanced sampling (train groups are 45/5/5/45 %)
    assert [len(b) for b in T._chunks(np.arange(81), 40)] == [40, 41]  # no batch of one (BatchNorm)


@pytest.fixture
def one_thread():
    """ResNet-50 jobs use torch's threads as configured; on busy shared cores two threads ran 4x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_resnet50_on_a_tiny_waterbirds_folder(tmp_path: Path, one_thread) -> None:
    from torchvision.models import resnet50

    folder = waterbirds_folder(tmp_path / "wb", n_per_split=8)
    init = tmp_path / "init.pth"
    torch.manual_seed(0)
    reference = resnet50()
    torch.save(reference.state_dict(), init)
    options = {"image_size": 16, "batch_size": 4, "cf_k": 2, "init_weights": str(init)}
    metrics = run_debias("waterbirds", "clusterfix", 0, tmp_path / "cf", data=folder, epochs=1, options=options)
    assert set(metrics["group_acc"]) == {"landbird/land", "landbird/water", "waterbird/land", "waterbird/water"}
    assert metrics["config"]["init_weights"] == str(init)
    state = torch.load(tmp_path / "cf" / "model.pt", weights_only=True)
    expected = {k for k in reference.state_dict() if not k.startswith("fc.")}
    assert set(state) == expected  # torchvision's ResNet-50 keys, no classifier
    net = resnet50()
    net.fc = torch.nn.Identity()
    net.load_state_dict(state)  # strict
    adv = run_debias("waterbirds", "adversarial", 0, tmp_path / "adv", data=folder, epochs=1,
                     options={"image_size": 16, "batch_size": 4})
    assert adv["config"]["adv_layer"] == "layer4" and adv["config"]["adv_lambda"] == 2.0


def test_method_settings_keep_shared_and_own_fields_only() -> None:
    settings = T.default_config("colored-digits")
    erm = T.method_settings(settings, "erm")
    assert "lr" in erm and "epochs" in erm and not any(k.startswith(("dro_", "adv_", "cf_")) for k in erm)
    clusterfix = T.method_settings(settings, "clusterfix")
    assert clusterfix["cf_beta"] == settings["cf_beta"] and "adv_lambda" not in clusterfix
    assert set(T.method_settings(settings, "adversarial")) == set(erm) | {k for k in settings if k.startswith("adv_")}
    # every field is someone's: the union over methods is the whole config
    assert set().union(*(T.method_settings(settings, m) for m in T.METHODS)) == set(settings)
    with pytest.raises(ValueError, match="unknown debias method 'dann'"):
        T.method_settings(settings, "dann")
