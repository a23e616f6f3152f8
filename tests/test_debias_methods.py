"""Debiasing pieces against hand-computed values: gradient reversal, Wang et al.'s adversary, GroupDRO's
weights, ClusterFix's cosine k-means and cluster/sample weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from sbssl.debias import methods as M


@pytest.mark.parametrize("lam", [0.5, 2.0])
def test_gradient_reversal_flips_and_scales_the_gradient(lam: float) -> None:
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    c = torch.tensor([0.5, 4.0, -1.0])
    y = M.grad_reverse(x, lam)
    assert torch.equal(y, x)  # identity forward
    (y * c).sum().backward()
    # d/dx of sum(c * x) is c; reversed and scaled: -lam * c
    assert torch.allclose(x.grad, -lam * c)


def test_gradient_reversal_reaches_the_backbone_reversed_while_the_adversary_learns_normally() -> None:
    torch.manual_seed(0)
    backbone, adversary = nn.Linear(4, 3), nn.Linear(3, 2)
    x, a = torch.randn(8, 4), torch.randint(0, 2, (8,))

    def grads(lam: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        backbone.zero_grad()
        adversary.zero_grad()
        feature = backbone(x)
        if lam is not None:
            feature = M.grad_reverse(feature, lam)
        nn.functional.cross_entropy(adversary(feature), a).backward()
        return backbone.weight.grad.clone(), adversary.weight.grad.clone()

    plain_backbone, plain_adversary = grads(None)
    reversed_backbone, reversed_adversary = grads(2.0)
    assert torch.allclose(reversed_backbone, -2.0 * plain_backbone)
    assert torch.allclose(reversed_adversary, plain_adversary)


def test_gradient_reversal_refuses_a_negative_lambda() -> None:
    with pytest.raises(ValueError, match="lambda"):
        M.grad_reverse(torch.zeros(2, requires_grad=True), -1.0)


def test_adversary_is_wangs_mlp_without_input_batchnorm() -> None:
    mlp = M.adversary_mlp(10)
    kinds = [type(layer).__name__ for layer in mlp]
    assert kinds == ["Linear", "BatchNorm1d", "LeakyReLU", "Linear", "BatchNorm1d", "LeakyReLU", "Linear",
                     "BatchNorm1d", "LeakyReLU", "Linear"]
    assert (mlp[0].in_features, mlp[0].out_features, mlp[-1].out_features) == (10, 300, 2)
    assert M.adversary_mlp(10, 20, n_outputs=3)[-1].out_features == 3


def test_group_mean_losses_gives_zero_to_an_absent_group() -> None:
    losses = torch.tensor([1.0, 3.0, 2.0])
    mean, count = M.group_mean_losses(losses, torch.tensor([0, 0, 2]), 4)
    assert torch.allclose(mean, torch.tensor([2.0, 0.0, 2.0, 0.0]))
    assert torch.equal(count, torch.tensor([2.0, 0.0, 1.0, 0.0]))


def test_group_dro_step_is_exponentiated_gradient() -> None:
    q = torch.full((4,), 0.25)
    loss = torch.tensor([1.0, 0.0, 2.0, 0.0])
    new = M.group_dro_step(q, loss, 0.5)
    raw = [math.exp(0.5), 1.0, math.exp(1.0), 1.0]
    assert torch.allclose(new, torch.tensor([r / sum(raw) for r in raw]))
    adjusted = M.group_dro_step(q, loss, 0.5, adjustment=torch.tensor([0.0, 2.0, 0.0, 0.0]))
    raw = [math.exp(0.5), math.exp(1.0), math.exp(1.0), 1.0]
    assert torch.allclose(adjusted, torch.tensor([r / sum(raw) for r in raw]))


def test_cluster_weights_by_hand() -> None:
    # L = (0.2, 0.6, 0.2) sums to 1; N / n = 100/10, 100/30, 100/60
    w = M.cluster_weights(np.array([0.2, 0.6, 0.2]), np.array([10, 30, 60]), 100)
    assert np.allclose(w, [0.2 * 10, 0.6 * 100 / 30, 0.2 * 100 / 60])
    # all-zero losses: equal shares, not 0/0
    assert np.allclose(M.cluster_weights(np.zeros(2), np.array([10, 40]), 50), [0.5 * 5, 0.5 * 1.25])


# batch: global cluster ids, pseudo-head and target losses, previous weights; cluster sizes over the train set
IDS = torch.tensor([0, 0, 1, 2])
PSEUDO = torch.tensor([0.1, 0.3, 0.6, 0.2])
TARGET = torch.tensor([1.0, 1.0, 0.0, 2.0])
OLD = torch.tensor([2.0, 1.0, 1.0, 0.5])
SIZES = torch.tensor([10, 30, 60])


def _expected(w_cluster: list[float]) -> list[float]:
    new = [w_cluster[i] for i in (0, 0, 1, 2)]
    new = [v / (sum(new) / 4) for v in new]  # mean 1 in the batch
    smoothed = [0.7 * o + 0.3 * n for o, n in zip(OLD.tolist(), new)]
    return [v / (sum(smoothed) / 4) for v in smoothed]  # renormalised


def test_clusterfix_sample_weights_code_variant_by_hand() -> None:
    # L_k = mean pseudo loss: cluster 0 (0.1 + 0.3) / 2 = 0.2, cluster 1 0.6, cluster 2 0.2; sum 1.0
    w_cluster = [0.2 / 1.0 * 100 / 10, 0.6 / 1.0 * 100 / 30, 0.2 / 1.0 * 100 / 60]
    got = M.clusterfix_sample_weights(IDS, PSEUDO, TARGET, OLD, SIZES, 100, momentum=0.3, variant="code")
    assert torch.allclose(got, torch.tensor(_expected(w_cluster)))
    assert got.mean().item() == pytest.approx(1.0)
    assert not got.requires_grad


def test_clusterfix_sample_weights_readme_variant_by_hand() -> None:
    # L_k = mean of target + pseudo: cluster 0 (1.1 + 1.3) / 2 = 1.2, cluster 1 0.6, cluster 2 2.2; sum 4.0
    w_cluster = [1.2 / 4.0 * 100 / 10, 0.6 / 4.0 * 100 / 30, 2.2 / 4.0 * 100 / 60]
    got = M.clusterfix_sample_weights(IDS, PSEUDO, TARGET, OLD, SIZES, 100, momentum=0.3, variant="readme")
    assert torch.allclose(got, torch.tensor(_expected(w_cluster)))


def test_clusterfix_sample_weights_momentum_one_ignores_the_past_and_refuses_unknown_variant() -> None:
    got = M.clusterfix_sample_weights(IDS, PSEUDO, TARGET, OLD, SIZES, 100, momentum=1.0)
    w = [2.0, 2.0, 2.0, 100 / 60 * 0.2]
    assert torch.allclose(got, torch.tensor([v / (sum(w) / 4) for v in w]))
    with pytest.raises(ValueError, match="variant"):
        M.clusterfix_sample_weights(IDS, PSEUDO, TARGET, OLD, SIZES, 100, variant="paper")


def test_cosine_kmeans_clusters_by_direction_within_each_class() -> None:
    rng = np.random.default_rng(0)
    directions = np.eye(3)
    # class 0: two directions; class 1: one direction; lengths vary wildly (cosine ignores them)
    rows = [(0, 0), (0, 1), (1, 2)] * 10
    y = np.array([c for c, _ in rows])
    features = np.array([directions[d] * rng.uniform(0.1, 50) + rng.normal(0, 0.01, 3) for _, d in rows])
    clusters = M.cosine_kmeans(features, y, n_classes=2, k=2, seed=0)
    direction = np.array([d for _, d in rows])
    class0 = y == 0
    # within class 0, the clusters are exactly the two directions
    assert len(set(zip(clusters.labels[class0], direction[class0]))) == 2
    assert clusters.global_ids(y).max() < 2 * 2
    # training points are assigned back to their own clusters
    assert np.array_equal(M.assign_to_centres(features, y, clusters), clusters.labels)
    # a rescaled copy of a point joins the same cluster
    assert np.array_equal(M.assign_to_centres(features[:3] * 7.0, y[:3], clusters), clusters.labels[:3])


def test_cosine_kmeans_small_class_and_zero_vector() -> None:
    features = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.2]])
    clusters = M.cosine_kmeans(features, np.array([0, 0, 0, 1]), n_classes=2, k=8, seed=0)
    assert [len(c) for c in clusters.centres] == [3, 1]  # min(k, class size)
    with pytest.raises(ValueError, match="all zeros"):
        M.cosine_kmeans(np.zeros((2, 2)), np.array([0, 1]), n_classes=2, k=1, seed=0)
    with pytest.raises(ValueError, match="class 1"):
        M.cosine_kmeans(features, np.zeros(4, dtype=int), n_classes=2, k=1, seed=0)
