"""The pieces of the debiasing methods that are not plain ERM: gradient reversal and Wang et al.'s adversary,
GroupDRO's online group weights, and ClusterFix's per-class cosine k-means and cluster reweighting.

Sources and where this code follows one over another:

- **Adversarial removal** (Wang et al., ICCV 2019, ``object_multilabel/adv/model.py``): the feature of a chosen
  backbone layer goes through a gradient-reversal layer (identity forward, gradient x -λ backward) into an
  MLP adversary that predicts the protected attribute; one optimiser minimises task loss + adversary loss,
  so the adversary learns to predict the attribute while the backbone receives the reversed gradient.
  Their adversary is Linear(d, 300), then [BN, LeakyReLU, Linear(300, 300)] x 2, then BN, LeakyReLU,
  Linear(300, 2): the attacker MLP of :func:`sbssl.leakage.mlp_attacker` without its input BatchNorm
  (their ``adv_mlp`` has none, their ``GenderClassifier`` has one). Their layer names are off by one from
  torchvision's: their ``conv4`` / ``conv5`` are the outputs of ``layer3`` / ``layer4``. Their code average-
  pools the tap unless ``--no_avgpool`` (then flattened: the setting issue 12 cites as their best); here
  the tap is flattened, and the pooled variant of ``layer4`` is the tap ``avgpool``. Their image-space
  variant (a U-Net mask, ``ae_adv_*``) is left out. Their listed runs (``commands.ipynb``) resume a trained
  model and fine-tune it with the adversary on (``--layer conv4|conv5 --no_avgpool --adv_lambda 2
  --batch_balanced``, Adam lr 5e-6); here the adversary trains with the task from the first step (one
  optimiser, as their ``train.py``), the same schedule as every other method. The adversary's training
  loss and accuracy are logged per epoch: a reversed gradient vanishes once the adversary is certain, which
  is what happens on colored-digits (see :mod:`sbssl.debias.train`).
- **GroupDRO** (Sagawa et al., ICLR 2020, ``loss.py``): the per-group mean losses of a batch (0 for a group
  absent from it) update the group weights ``q <- q * exp(η * (loss_g + C / sqrt(n_g)))``, renormalised; the
  training loss is ``Σ_g q_g loss_g``. η = 0.01 and C = 0 are their defaults.
- **ClusterFix** ("Pseudo-Labels Regularization for Unbiased Classification"): see :func:`cosine_kmeans`,
  :func:`cluster_weights` and :func:`clusterfix_sample_weights`. Their repository was not available to this
  implementation; it follows the description of their code and README in issue 12. Where that leaves a
  choice: L_k is the mean over the cluster's samples *in the batch* and Σ L runs over the clusters present
  in the batch, n_k and N count the whole training set; the momentum acts per sample (each training sample
  keeps its last weight, starting at 1), the text saying "per-sample weights"; weights carry no gradient.
  Their code and README disagree on L_k: the code's (the pseudo-head loss alone) is the default, the
  README's (target + pseudo-head loss) is ``variant="readme"``. On colored-digits the code's weight
  *lowers* the weight of a minority cluster, whose pseudo-label its colour makes easy (mean weight of the
  red digits >= 5: 0.02 after 30 epochs, against 1.3 with the README's), as the measured trials found.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

#: ClusterFix weight variants: ``code`` (L_k = the cluster's mean pseudo-head loss), ``readme`` (mean of
#: target + pseudo-head loss).
CLUSTERFIX_VARIANTS = ("code", "readme")


class _GradientReversal(torch.autograd.Function):
    """Identity in the forward pass; multiplies the incoming gradient by ``-lam`` in the backward pass."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lam: float) -> torch.Tensor:
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.neg() * ctx.lam, None


def grad_reverse(x: torch.Tensor, lam: float) -> torch.Tensor:
    """Gradient-reversal layer: returns ``x`` unchanged; the gradient flowing back into ``x`` is -``lam`` x the
    gradient arriving at the output (``lam >= 0``; Wang et al.'s ``ReverseLayerF``)."""
    if lam < 0:
        raise ValueError(f"gradient reversal: lambda must be >= 0 (the sign is the reversal), got {lam}")
    return _GradientReversal.apply(x, float(lam))


def adversary_mlp(n_features: int, hidden: int = 300, n_outputs: int = 2) -> nn.Sequential:
    """Wang et al.'s adversary: Linear(d, hidden), [BN, LeakyReLU, Linear(hidden, hidden)] x 2, BN, LeakyReLU,
    Linear(hidden, n_outputs); input (B, d) flattened features, output (B, n_outputs) logits."""
    from sbssl.leakage import mlp_attacker

    mlp = mlp_attacker(n_features, hidden)[1:]  # the attacker without its input BatchNorm
    if n_outputs != 2:
        mlp[-1] = nn.Linear(hidden, n_outputs)
    return mlp


# --- GroupDRO -----------------------------------------------------------------------------------------------

def group_mean_losses(losses: torch.Tensor, groups: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group mean of ``losses`` (B,) by ``groups`` (B,) int: ``(mean (G,), count (G,))``; 0 for an absent group
    (Sagawa et al.'s ``compute_group_avg``)."""
    onehot = (groups.unsqueeze(0) == torch.arange(n_groups, device=groups.device).unsqueeze(1)).to(losses.dtype)
    count = onehot.sum(1)
    return onehot @ losses / (count + (count == 0)), count


def group_dro_step(
    q: torch.Tensor, group_loss: torch.Tensor, step_size: float, adjustment: torch.Tensor | None = None
) -> torch.Tensor:
    """One exponentiated-gradient update of the group weights (G,): ``q * exp(η (loss + adj))``, renormalised
    to sum 1. ``group_loss`` is detached here; ``adjustment`` is ``C / sqrt(n_g)`` (None: 0)."""
    adjusted = group_loss.detach() if adjustment is None else group_loss.detach() + adjustment
    q = q * torch.exp(step_size * adjusted)
    return q / q.sum()


# --- ClusterFix ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Clusters:
    """Per-class k-means of L2-normalised features.

    ``labels``: (N,) cluster index within the sample's class, in ``[0, k)``; ``centres``: per class an array
    (k_c, d) of centres in the normalised feature space (k_c = min(k, samples of the class)); ``k``: the
    clusters per class asked for. Global cluster id of a sample: ``y * k + label`` (:meth:`global_ids`).
    """

    labels: np.ndarray
    centres: tuple[np.ndarray, ...]
    k: int

    def global_ids(self, y: np.ndarray) -> np.ndarray:
        """``y * k + labels``: one id per (class, cluster) pair, in ``[0, n_classes * k)``."""
        return np.asarray(y) * self.k + self.labels


def _normalised(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError("ClusterFix: a feature vector is all zeros; cosine distance is undefined for it")
    return features / norms


def cosine_kmeans(features: np.ndarray, y: np.ndarray, n_classes: int, k: int, seed: int) -> Clusters:
    """k-means with cosine distance on ``features`` (N, d), separately within each class of ``y`` (N,).

    The features are L2-normalised and clustered by scikit-learn's ``KMeans`` (Lloyd, k-means++ init,
    ``n_init=10``, ``random_state=seed``). On unit vectors the squared Euclidean distance is 2 - 2 cos, so
    every assignment step assigns by cosine distance; the centres are plain means (not re-normalised as in
    spherical k-means), which changes the centres' norms, not the assignment rule. A class with fewer than
    ``k`` samples gets one cluster per sample; an empty class is an error.
    """
    from sklearn.cluster import KMeans

    x, y = _normalised(features), np.asarray(y)
    labels = np.zeros(len(y), dtype=np.int64)
    centres = []
    for c in range(n_classes):
        rows = np.flatnonzero(y == c)
        if rows.size == 0:
            raise ValueError(f"ClusterFix: class {c} has no training samples to cluster")
        km = KMeans(n_clusters=min(k, rows.size), n_init=10, random_state=seed).fit(x[rows])
        labels[rows] = km.labels_
        centres.append(km.cluster_centers_)
    return Clusters(labels, tuple(centres), k)


def assign_to_centres(features: np.ndarray, y: np.ndarray, clusters: Clusters) -> np.ndarray:
    """Cluster index (within the true class) of each row of ``features`` (N, d) by the training centres of its
    class ``y`` (N,): the nearest centre to the L2-normalised feature (KMeans' own prediction rule)."""
    x, y = _normalised(features), np.asarray(y)
    out = np.zeros(len(y), dtype=np.int64)
    for c, centre in enumerate(clusters.centres):
        rows = np.flatnonzero(y == c)
        if rows.size:
            d2 = ((x[rows, None, :] - centre[None, :, :]) ** 2).sum(-1)
            out[rows] = d2.argmin(1)
    return out


def cluster_weights(mean_loss: np.ndarray | torch.Tensor, size: np.ndarray | torch.Tensor, n_total: int) -> Any:
    """ClusterFix's cluster weight ``w_k = (L_k / Σ_j L_j) · (N / n_k)`` for the clusters present in a batch.

    ``mean_loss`` (K,): L_k, the cluster's mean loss over its samples in the batch; ``size`` (K,): n_k, the
    cluster's size in the whole training set; ``n_total``: N, the training set size. Array in, array out.
    All-zero losses (a perfectly fitted batch in float32) count as equal shares rather than 0 / 0.
    """
    total = mean_loss.sum()
    share = mean_loss / total if total > 0 else mean_loss * 0 + 1 / len(mean_loss)
    return share * (n_total / size)


def clusterfix_sample_weights(
    batch_ids: torch.Tensor,
    pseudo_loss: torch.Tensor,
    target_loss: torch.Tensor,
    old: torch.Tensor,
    cluster_size: torch.Tensor,
    n_total: int,
    *,
    momentum: float = 0.3,
    variant: str = "code",
) -> torch.Tensor:
    """The per-sample weights of one ClusterFix batch (B,), detached, mean 1.

    1. L_k per cluster present in the batch: mean of ``pseudo_loss`` (``variant="code"``) or of
       ``target_loss + pseudo_loss`` (``"readme"``) over the batch's samples of cluster k (``batch_ids`` (B,),
       global ids); ``w_k`` by :func:`cluster_weights` with ``cluster_size`` (all ids) and ``n_total``;
    2. each sample takes its cluster's ``w_k``; normalised to mean 1 over the batch;
    3. smoothed with the sample's previous weight ``old`` (B,): ``(1 - momentum) * old + momentum * new``;
    4. renormalised to mean 1 over the batch.

    The caller stores the result as the samples' ``old`` for their next visit (weights start at 1).
    """
    if variant not in CLUSTERFIX_VARIANTS:
        raise ValueError(f"ClusterFix weight variant {variant!r} unknown; expected one of {list(CLUSTERFIX_VARIANTS)}")
    loss = pseudo_loss.detach() + (target_loss.detach() if variant == "readme" else 0)
    present, inverse = torch.unique(batch_ids, return_inverse=True)
    sums = torch.zeros(len(present), dtype=loss.dtype, device=loss.device).index_add_(0, inverse, loss)
    counts = torch.bincount(inverse, minlength=len(present)).to(loss.dtype)
    w = cluster_weights(sums / counts, cluster_size[present].to(loss.dtype), n_total)
    new = w[inverse]
    new = new / new.mean()
    smoothed = (1 - momentum) * old.to(loss.dtype) + momentum * new
    return smoothed / smoothed.mean()
