"""One debiasing training job: :func:`run_debias` (dataset, method, seed) -> ``metrics.json`` + ``model.pt``.

Methods (:data:`METHODS`; the pieces in :mod:`sbssl.debias.methods`):

- ``erm``: mean cross-entropy.
- ``groupdro``: Sagawa et al.'s online group DRO over the true groups (target x bias), with their
  group-balanced sampling (``dro_reweight_sampling``: each epoch draws N samples with replacement, each with
  probability proportional to 1 / its group's size; their runs use it); the reference upper line.
- ``adversarial``: Wang et al.'s gradient reversal from the backbone tap ``adv_layer`` (flattened) into their
  300-wide adversary predicting the bias attribute; loss = task CE + adversary CE; optional batches balanced
  in the attribute (``adv_balanced_batches``: as their code, draw 2.5 x batch, keep batch/2 per value, skip a
  draw without enough of either).
- ``clusterfix``: features of the training images from a frozen network (``cf_features``: ``pixels``, the
  raw image, or ``backbone``, the initial backbone's pooled feature), per-class cosine k-means (k =
  ``cf_k``), a pseudo-label head per class (each sample through its true class's head), the per-sample
  weights of :func:`~sbssl.debias.methods.clusterfix_sample_weights`; loss = mean(w * CE_target) +
  ``cf_beta`` * mean(CE_pseudo). Val and test samples are assigned to the training centres of their class;
  the worst cluster accuracy on val is logged each epoch (an unsupervised selection signal; the selection
  itself uses the true groups, as for every method).

Training and selection, the same for every method so that only the method differs: Adam (coupled L2
weight decay, ``torch.optim.Adam``), a cosine schedule over the epochs (stepped per epoch), and the test
figures at the epoch with the best validation worst-group accuracy (the first such epoch on ties).
ClusterFix trains Waterbirds/CelebA with Adam lr 1e-4, weight decay 1e-2, a cosine schedule and β = 0.01 /
0.5 (issue 12); the baselines use the same optimiser here (GroupDRO's own runs used SGD with momentum), and
the epochs are GroupDRO's (300 Waterbirds, 50 CelebA; ClusterFix's were not available). The adversary's
default there is Wang et al.'s best tap (``layer4``, flattened) and their COCO λ = 2.
colored-digits trains a small CNN from scratch (no pretrained network exists for 8x8 images): Adam lr 3e-3,
60 epochs, as the measured trials, batch 128, no weight decay and a constant learning rate (from scratch,
a cosine decay stopped every method before it learnt the digits' shape: ERM and ClusterFix both at worst-
group 0 on seed 0); its ClusterFix features are the raw pixels (k-means on them isolates the minority
tints, MEASURED-FACTS), and the adversary reads ``conv1`` (flattened) with λ = 1, the tap and λ chosen on
mean validation worst-group accuracy over seeds 0-2 among Wang et al.'s knobs (conv1 at λ 0.3 / 1 / 2:
0.28 / 0.28 / 0.26; pool at λ 0.3 / 1: 0.19 / 0.05; conv2 and balanced batches lower): the pooled feature encodes the target, which predicts the tint in 90% of the
training images, so an adversary there also pulls the target out of the feature (val worst group 0.05 at
λ = 1, against ERM's 0.25); conv1 sees colour before shape. Balanced batches keep 128 of every 320 images
(their rule, the tint being 50/50), too few steps for the shape in 60 epochs (val worst group 0).

Why the adversary does not debias colored-digits (measured; ``history`` logs ``train_adv_loss`` and
``train_adv_acc`` per epoch): the tint is separable from every pixel, so the 300-wide adversary reaches
100% within about 5 Adam steps at every tap and λ tried (1-100, also without its BatchNorms); its cross-entropy then falls towards 0 and the
reversed gradient it sends into the backbone vanishes (1e-4 of the task gradient at conv1 after 25 steps),
so the backbone keeps the tint (a linear probe reads it within each class at 100%). Removal would need
conv1's red and green weights equal; the task gradient pushes them apart. This is the known weakness of a
gradient-reversal adversary against a saturating one (Wang et al.'s COCO gender is far from separable), not
an implementation slip: the reversal's sign and scale are unit-tested. ClusterFix logs
``train_group_weight`` (mean sample weight per true group, a diagnostic only).

Resumption: after every epoch ``out_dir/checkpoint.pt`` (atomic) holds the model, optimiser, scheduler, the
method's state (GroupDRO's q, ClusterFix's sample weights and clusters), the torch / numpy / python RNG
states, the history and the best epoch's weights. A rerun continues from it and gives the same metrics as
an uninterrupted run (each epoch's batch order is drawn from ``numpy.random.default_rng([seed, epoch])``;
on CUDA, cuDNN runs deterministic kernels while the job runs). A finished job's ``metrics.json`` is final:
a rerun with the same settings returns it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import random
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import sbssl
from sbssl.debias.datasets import DATASETS, DebiasData, Split, load_dataset
from sbssl.debias.methods import (
    CLUSTERFIX_VARIANTS,
    adversary_mlp,
    assign_to_centres,
    clusterfix_sample_weights,
    cosine_kmeans,
    grad_reverse,
    group_dro_step,
    group_mean_losses,
)
from sbssl.debias.metrics import GroupAccuracy, group_accuracy
from sbssl.io import atomic_path, write_json_atomic
from sbssl.networks import SmallCNN

METHODS = ("erm", "groupdro", "adversarial", "clusterfix")
BACKBONES = ("small_cnn", "resnet50")
#: Backbone taps the adversary can read (flattened), per backbone; the last is the pooled feature.
TAPS = {"small_cnn": ("conv1", "conv2", "pool"), "resnet50": ("layer3", "layer4", "avgpool")}
SCHEDULES = ("cosine", "constant")
EVAL_BATCH = 256


@dataclass(frozen=True)
class DebiasConfig:
    """Every setting that changes a run's numbers (see the module doc; defaults per data set in
    :func:`default_config`). Paths are strings; ``None`` means "not used" or "random initialisation"."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    backbone: str
    schedule: str = "cosine"
    init_weights: str | None = None  # backbone checkpoint (resnet50), read by sbssl.models.load_checkpoint
    init_format: str = "torchvision"
    image_size: int = 224
    # GroupDRO (Sagawa et al.'s defaults)
    dro_step_size: float = 0.01
    dro_adjustment: float = 0.0
    dro_reweight_sampling: bool = True
    # adversarial (Wang et al.)
    adv_lambda: float = 1.0
    adv_layer: str = "pool"
    adv_hidden: int = 300
    adv_balanced_batches: bool = False
    # ClusterFix
    cf_k: int = 8
    cf_beta: float = 0.5
    cf_momentum: float = 0.3
    cf_variant: str = "code"
    cf_features: str = "pixels"
    cf_feature_weights: str | None = None  # frozen feature network (resnet50); None: init_weights
    # data
    data_seed: int = 0  # colored-digits split and tints
    aligned: float = 0.9  # colored-digits: share of each training class with its class's tint
    target: str = "Blond_Hair"  # celeba
    bias: str = "Male"  # celeba


_DEFAULTS: dict[str, dict[str, Any]] = {
    "colored-digits": dict(epochs=60, batch_size=128, lr=3e-3, weight_decay=0.0, schedule="constant",
                           backbone="small_cnn", adv_layer="conv1", adv_lambda=1.0, cf_beta=0.5, cf_features="pixels"),
    "waterbirds": dict(epochs=300, batch_size=128, lr=1e-4, weight_decay=1e-2, backbone="resnet50",
                       adv_layer="layer4", adv_lambda=2.0, cf_beta=0.01, cf_features="backbone"),
    "celeba": dict(epochs=50, batch_size=128, lr=1e-4, weight_decay=1e-2, backbone="resnet50",
                   adv_layer="layer4", adv_lambda=2.0, cf_beta=0.5, cf_features="backbone"),
}


def default_config(dataset: str) -> dict[str, Any]:
    """The default settings of ``dataset`` as a dict of :class:`DebiasConfig` fields."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown debias data set {dataset!r}; expected one of {list(DATASETS)}")
    fields = {f.name: f.default for f in dataclasses.fields(DebiasConfig)}
    return {**fields, **_DEFAULTS[dataset]}


#: Setting prefixes that belong to one method only; every other setting is shared by all methods.
METHOD_PREFIXES = {"groupdro": "dro_", "adversarial": "adv_", "clusterfix": "cf_"}


def method_settings(settings: Mapping[str, Any], method: str) -> dict[str, Any]:
    """The part of ``settings`` (:class:`DebiasConfig` fields) that changes ``method``'s numbers: the shared
    settings and the method's own (``dro_*`` GroupDRO, ``adv_*`` adversarial, ``cf_*`` ClusterFix), without the
    other methods' (the workflow's params: changing ClusterFix's β must not rerun ERM)."""
    if method not in METHODS:
        raise ValueError(f"unknown debias method {method!r}; expected one of {list(METHODS)}")
    others = tuple(prefix for m, prefix in METHOD_PREFIXES.items() if m != method)
    return {key: value for key, value in settings.items() if not key.startswith(others)}


def make_config(dataset: str, *, epochs: int | None = None, options: Mapping[str, Any] | None = None) -> DebiasConfig:
    """:func:`default_config` with ``options`` (any :class:`DebiasConfig` field) and ``epochs`` applied, checked.

    Raises ValueError naming an unknown option or a value out of range.
    """
    values = default_config(dataset)
    unknown = sorted(set(options or {}) - set(values))
    if unknown:
        raise ValueError(f"unknown debias option(s) {unknown}; known: {sorted(values)}")
    values.update(options or {})
    if epochs is not None:
        values["epochs"] = epochs
    config = DebiasConfig(**values)
    problems = []
    for name in ("epochs", "batch_size", "cf_k", "adv_hidden", "image_size"):
        if not isinstance(getattr(config, name), int) or getattr(config, name) < 1:
            problems.append(f"{name} must be a positive integer, got {getattr(config, name)!r}")
    for name, allowed in (("backbone", BACKBONES), ("schedule", SCHEDULES), ("cf_variant", CLUSTERFIX_VARIANTS),
                          ("cf_features", ("pixels", "backbone"))):
        if getattr(config, name) not in allowed:
            problems.append(f"{name} must be one of {list(allowed)}, got {getattr(config, name)!r}")
    if config.backbone in TAPS and config.adv_layer not in TAPS[config.backbone]:
        problems.append(f"adv_layer must be one of {list(TAPS[config.backbone])} for {config.backbone}, "
                        f"got {config.adv_layer!r}")
    if not 0 <= config.cf_momentum <= 1:
        problems.append(f"cf_momentum must lie in [0, 1], got {config.cf_momentum}")
    for name in ("lr", "weight_decay", "dro_step_size", "adv_lambda", "cf_beta", "dro_adjustment"):
        if getattr(config, name) < 0:
            problems.append(f"{name} must be >= 0, got {getattr(config, name)}")
    if problems:
        raise ValueError(f"debias settings for {dataset}: " + "; ".join(problems))
    return config


# --- networks -----------------------------------------------------------------------------------------------

def _resnet50_taps() -> nn.Module:
    """A torchvision ResNet-50 (``fc`` = identity, so its state_dict has torchvision's keys without ``fc``) whose
    ``forward`` returns the taps ``layer3``, ``layer4`` (feature maps) and ``avgpool`` (B, 2048)."""
    from torchvision.models.resnet import Bottleneck, ResNet

    class ResNet50Taps(ResNet):
        out_features = 2048

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            l3 = self.layer3(self.layer2(self.layer1(x)))
            l4 = self.layer4(l3)
            return {"layer3": l3, "layer4": l4, "avgpool": torch.flatten(self.avgpool(l4), 1)}

    net = ResNet50Taps(Bottleneck, [3, 4, 6, 3])
    net.fc = nn.Identity()
    return net


def build_backbone(config: DebiasConfig, weights: str | None = None) -> nn.Module:
    """The backbone of ``config`` (random init from the current torch RNG), with ``weights`` loaded when given
    (resnet50 only: any :data:`sbssl.models.FORMATS` layout as ``config.init_format``; every backbone tensor
    must be present, only ``fc`` may be absent or is dropped)."""
    if config.backbone == "small_cnn":
        if weights is not None:
            raise ValueError("the small_cnn backbone trains from scratch; it takes no init weights")
        return SmallCNN()
    net = _resnet50_taps()
    if weights is not None:
        from sbssl.models import load_checkpoint

        state = {k: v for k, v in load_checkpoint(weights, config.init_format).items() if not k.startswith("fc.")}
        expected = net.state_dict()
        missing = sorted(k for k in set(expected) - set(state) if not k.endswith("num_batches_tracked"))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{weights}: not a ResNet-50 backbone as format {config.init_format!r} "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        net.load_state_dict(state, strict=False)
    return net


class DebiasNet(nn.Module):
    """Backbone + target head; plus per-class pseudo-label heads (ClusterFix) or an adversary (adversarial).

    ``forward(x, y=None)`` returns ``{"logits" (B, C), "feature" (B, d), "tap" (B, ...)}`` and, when present,
    ``"adv_logits"`` (B, n_bias; through the gradient-reversal layer) and, given ``y``, ``"pseudo_logits"``
    (B, k: each sample through its class's pseudo head).
    """

    def __init__(self, backbone: nn.Module, n_classes: int, *, feature_tap: str, adv_tap: str | None = None,
                 adversary: nn.Module | None = None, adv_lambda: float = 0.0, pseudo_k: int | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_tap, self.adv_tap, self.adv_lambda = feature_tap, adv_tap, adv_lambda
        d = backbone.out_features
        self.head = nn.Linear(d, n_classes)
        self.adversary = adversary
        self.pseudo_heads = nn.ModuleList(nn.Linear(d, pseudo_k) for _ in range(n_classes)) if pseudo_k else None

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        taps = self.backbone(x)
        feature = taps[self.feature_tap]
        out = {"logits": self.head(feature), "feature": feature}
        if self.adversary is not None:
            tap = torch.flatten(taps[self.adv_tap], 1)
            out["adv_logits"] = self.adversary(grad_reverse(tap, self.adv_lambda))
        if self.pseudo_heads is not None and y is not None:
            every = torch.stack([head(feature) for head in self.pseudo_heads], 1)  # (B, C, k)
            # a mask, not indexing: indexing's backward accumulates with atomics on CUDA (not reproducible)
            mask = F.one_hot(y, len(self.pseudo_heads)).to(every.dtype)
            out["pseudo_logits"] = (every * mask[:, :, None]).sum(1)
        return out


def _tap_size(backbone: nn.Module, tap: str, sample: torch.Tensor) -> int:
    was = backbone.training
    backbone.eval()
    with torch.no_grad():
        size = torch.flatten(backbone(sample[:1])[tap], 1).shape[1]
    backbone.train(was)
    return size


# --- batches ------------------------------------------------------------------------------------------------

def _chunks(order: np.ndarray, size: int) -> list[np.ndarray]:
    """``order`` cut into batches of ``size``; a last batch of one sample joins the previous one (BatchNorm
    cannot train on a single sample)."""
    batches = [order[i:i + size] for i in range(0, len(order), size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2] = np.concatenate(batches[-2:])
        batches.pop()
    return batches


def epoch_batches(data: DebiasData, method: str, config: DebiasConfig, seed: int, epoch: int) -> list[np.ndarray]:
    """The training batches (index arrays into the train split) of ``epoch``, drawn from
    ``numpy.random.default_rng([seed, epoch])`` only, so a resumed run draws the same batches."""
    rng = np.random.default_rng([seed, epoch])
    train = data.splits["train"]
    n = len(train)
    if method == "groupdro" and config.dro_reweight_sampling:
        groups = data.groups("train")
        weight = 1.0 / np.bincount(groups, minlength=len(data.group_names))[groups]
        return _chunks(rng.choice(n, size=n, replace=True, p=weight / weight.sum()), config.batch_size)
    order = rng.permutation(n)
    if method == "adversarial" and config.adv_balanced_batches:
        per_value = config.batch_size // data.n_bias
        batches = []
        for draw in _chunks(order, int(2.5 * config.batch_size)):
            parts = [draw[train.a[draw] == v][:per_value] for v in range(data.n_bias)]
            if min(map(len, parts)) == per_value:
                batches.append(np.concatenate(parts))
        if not batches:
            raise ValueError(f"adv_balanced_batches: no draw of {int(2.5 * config.batch_size)} training samples "
                             f"holds {per_value} of every bias value; lower batch_size")
        return batches
    return _chunks(order, config.batch_size)


# --- evaluation ---------------------------------------------------------------------------------------------

@torch.no_grad()
def predict(model: nn.Module, split: Split, device: torch.device, *, num_workers: int = 0,
            output: str = "logits") -> torch.Tensor:
    """``model``'s ``output`` (``logits`` or ``feature``) on every sample of ``split`` in order (eval mode), on CPU."""
    was = model.training
    model.eval()
    index = np.arange(len(split))
    outs = [model(x.to(device))[output].float().cpu()
            for _, x in split.batches(_chunks(index, EVAL_BATCH), num_workers=num_workers)]
    model.train(was)
    return torch.cat(outs)


def _evaluate(model: nn.Module, data: DebiasData, split: str, device: torch.device,
              num_workers: int) -> tuple[GroupAccuracy, np.ndarray]:
    """Group accuracies of ``model`` on ``split`` and its predicted classes (N,)."""
    predicted = predict(model, data.splits[split], device, num_workers=num_workers).argmax(1).numpy()
    accuracy = group_accuracy(predicted, data.splits[split].y, data.groups(split), data.group_names, split=split)
    return accuracy, predicted


# --- checkpoints --------------------------------------------------------------------------------------------

def _rng_states() -> dict[str, Any]:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


@contextlib.contextmanager
def _deterministic_cudnn() -> Iterator[None]:
    """cuDNN's deterministic kernels while a job runs (so a resumed CUDA run repeats the same numbers);
    the process's previous flags restored afterwards."""
    flags = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run torch with ``n`` intra-op threads (None: unchanged), restored afterwards. The small CNN runs one
    thread on CPU: its tensors are too small to pay for threads, and on busy cores threads stall (a
    3-epoch colored-digits job took 10 s with 2 threads next to other jobs, under 2 s with one)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _identity(dataset: str, method: str, seed: int, config: DebiasConfig) -> dict[str, Any]:
    return {"dataset": dataset, "method": method, "seed": seed, "config": asdict(config)}


# --- the job ------------------------------------------------------------------------------------------------

def _clusterfix_setup(data: DebiasData, config: DebiasConfig, seed: int, device: torch.device,
                      num_workers: int) -> dict[str, Any]:
    """Frozen features -> per-class cosine k-means of train; val/test assigned to the training centres."""
    if config.cf_features == "pixels":
        if any(s.images is None for s in data.splits.values()):
            raise ValueError(f"cf_features='pixels' needs in-memory images; {data.name} is read from files: "
                             "use cf_features='backbone'")
        features = {name: s.images.flatten(1).numpy() for name, s in data.splits.items()}
    else:
        with torch.random.fork_rng(devices=[]):  # a random-init feature network must not shift the run's RNG
            torch.manual_seed(seed)
            net = build_backbone(config, config.cf_feature_weights or config.init_weights).to(device)
        tap = TAPS[config.backbone][-1]
        frozen = DebiasNet(net, data.n_classes, feature_tap=tap).to(device)
        features = {name: predict(frozen, s, device, num_workers=num_workers, output="feature").numpy()
                    for name, s in data.splits.items()}
    train = data.splits["train"]
    clusters = cosine_kmeans(features["train"], train.y, data.n_classes, config.cf_k, seed)
    ids = {"train": clusters.global_ids(train.y)}
    for name in ("val", "test"):
        labels = assign_to_centres(features[name], data.splits[name].y, clusters)
        ids[name] = data.splits[name].y * config.cf_k + labels
    return {"clusters": clusters, "ids": ids}


def _cluster_summary(data: DebiasData, ids: np.ndarray, k: int) -> dict[str, Any]:
    """Training-cluster sizes and bias purity (share of samples whose bias value is their cluster's majority)."""
    a = data.splits["train"].a
    sizes, majority_total = {}, 0
    for cid in np.unique(ids):
        members = a[ids == cid]
        sizes[f"{data.class_names[cid // k]}#{cid % k}"] = int(members.size)
        majority_total += int(np.bincount(members).max())
    return {"sizes": sizes, "bias_purity": majority_total / len(ids)}


def _train_epoch(model: DebiasNet, data: DebiasData, method: str, config: DebiasConfig, batches: list[np.ndarray],
                 optimiser: torch.optim.Optimizer, state: dict[str, Any], device: torch.device,
                 num_workers: int) -> dict[str, float]:
    """One pass over ``batches``; updates ``state`` (GroupDRO's q, ClusterFix's weights). Returns the epoch's
    sample-weighted means: ``train_loss``; for ``adversarial`` also ``train_adv_loss`` (the adversary's
    cross-entropy) and ``train_adv_acc`` (its accuracy on the bias attribute, before each step)."""
    train = data.splits["train"]
    groups_all = torch.as_tensor(data.groups("train"))
    model.train()
    sums: dict[str, float] = {}
    seen = 0
    for idx, x in train.batches(batches, num_workers=num_workers):
        tidx = torch.as_tensor(idx)
        x, y = x.to(device), torch.as_tensor(train.y[idx], device=device)
        out = model(x, y if method == "clusterfix" else None)
        ce = F.cross_entropy(out["logits"], y, reduction="none")
        if method == "erm":
            loss = ce.mean()
        elif method == "groupdro":
            group_loss, _ = group_mean_losses(ce, groups_all[tidx].to(device), len(data.group_names))
            state["q"] = group_dro_step(state["q"], group_loss, config.dro_step_size, state["adjustment"])
            loss = group_loss @ state["q"]
        elif method == "adversarial":
            a = torch.as_tensor(train.a[idx], device=device)
            adv_loss = F.cross_entropy(out["adv_logits"], a)
            loss = ce.mean() + adv_loss
            sums["train_adv_loss"] = sums.get("train_adv_loss", 0.0) + float(adv_loss.detach()) * len(idx)
            sums["train_adv_acc"] = sums.get("train_adv_acc", 0.0) + float((out["adv_logits"].argmax(1) == a).sum())
        else:
            ids = state["ids"][tidx]
            pseudo = F.cross_entropy(out["pseudo_logits"], (ids % config.cf_k).to(device), reduction="none")
            # weights on CPU: a handful of numbers, and CUDA's index_add_ would not be reproducible
            w = clusterfix_sample_weights(ids, pseudo.detach().cpu(), ce.detach().cpu(), state["weights"][tidx],
                                          state["sizes"], state["n_total"], momentum=config.cf_momentum,
                                          variant=config.cf_variant)
            state["weights"][tidx] = w
            loss = (w.to(device) * ce).mean() + config.cf_beta * pseudo.mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        sums["train_loss"] = sums.get("train_loss", 0.0) + float(loss.detach()) * len(idx)
        seen += len(idx)
    return {key: value / seen for key, value in sums.items()}


def run_debias(
    dataset: str,
    method: str,
    seed: int,
    out_dir: str | os.PathLike[str],
    *,
    data: str | os.PathLike[str] | DebiasData | None = None,
    epochs: int | None = None,
    device: str | None = None,
    options: Mapping[str, Any] | None = None,
    num_workers: int = 0,
    stop_after_epoch: int | None = None,
    discard_other_settings: bool = False,
) -> dict[str, Any]:
    """Train ``method`` on ``dataset`` with ``seed``; write ``out_dir/metrics.json`` and ``out_dir/model.pt``.

    - ``data``: the data set's folder (waterbirds, celeba), or a ready :class:`DebiasData` (tests); None for
      colored-digits. ``epochs`` and ``options`` (:class:`DebiasConfig` fields) override
      :func:`default_config`. ``device``: a torch device string; None picks CUDA when present, else CPU.
      ``num_workers``: image-decoding workers for file-based data (no effect on the numbers).
    - ``stop_after_epoch=k`` stops after epoch k's checkpoint (simulates a killed job) and returns
      ``{"stopped_after_epoch": k}``; calling again resumes.
    - Returns the metrics dict, also written (atomically) to ``metrics.json``: ``dataset``, ``method``,
      ``seed``, ``worst_group_acc``, ``avg_acc`` (test, at ``best_epoch``), ``group_acc`` and ``group_count``
      ({group name: test accuracy (None when empty) / test samples}), ``empty_groups``, ``best_epoch``
      (1-based), ``epochs``, ``val_worst_group_acc``, ``val_avg_acc``, ``val_group_acc``,
      ``train_group_count``, ``history`` (per epoch: train_loss, val/test worst and average accuracy;
      adversarial adds train_adv_loss, train_adv_acc; ClusterFix adds val_worst_cluster_acc and
      train_group_weight, the mean sample weight per true group), ``config`` (every setting), ``clusters``
      (ClusterFix: training cluster sizes, bias purity), ``device``, ``sbssl_version``.
    - ``model.pt``: the selected epoch's backbone state_dict (weights only; resnet50: torchvision keys
      without ``fc``, loadable by :func:`sbssl.models.build_model` as format ``torchvision``);
      ``heads.pt``: its heads (target ``head.*``, ``pseudo_heads.*``, ``adversary.*``).

    A finished ``out_dir`` with the same settings returns its metrics at once; one with other settings (or a
    checkpoint of other settings) is an error: use another folder or delete it. With
    ``discard_other_settings`` a checkpoint of other settings is deleted and training starts afresh (the
    workflow's jobs: Snakemake reruns a job exactly when its settings changed, so such a checkpoint is stale).
    """
    if method not in METHODS:
        raise ValueError(f"unknown debias method {method!r}; expected one of {list(METHODS)}")
    config = make_config(dataset, epochs=epochs, options=options)
    out = Path(out_dir)
    identity = _identity(dataset, method, int(seed), config)
    metrics_path = out / "metrics.json"
    if metrics_path.is_file():
        done = json.loads(metrics_path.read_text(encoding="utf-8"))
        if {k: done.get(k) for k in identity} != identity:
            raise ValueError(f"{metrics_path}: a finished run with other settings; use another folder or delete it")
        return done
    if isinstance(data, DebiasData):
        if data.name != dataset:
            raise ValueError(f"data is the {data.name!r} data set, not {dataset!r}")
        debias_data = data
    else:
        loader_options: dict[str, Any] = {
            "colored-digits": {"data_seed": config.data_seed, "aligned": config.aligned},
            "waterbirds": {"image_size": config.image_size},
            "celeba": {"image_size": config.image_size, "target": config.target, "bias": config.bias},
        }.get(dataset, {})
        debias_data = load_dataset(dataset, data, **loader_options)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with _deterministic_cudnn(), _threads(1 if dev.type == "cpu" and config.backbone == "small_cnn" else None):
        return _run(debias_data, identity, config, out, dev, num_workers, stop_after_epoch, discard_other_settings)


def _run(data: DebiasData, identity: dict[str, Any], config: DebiasConfig, out: Path, device: torch.device,
         num_workers: int, stop_after_epoch: int | None, discard_other_settings: bool) -> dict[str, Any]:
    method, seed = identity["method"], identity["seed"]
    ckpt_path = out / "checkpoint.pt"
    checkpoint = None
    if ckpt_path.is_file():
        # our own file; it holds numpy RNG states and result dataclasses, which weights_only refuses
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if checkpoint["identity"] != identity:
            if not discard_other_settings:
                raise ValueError(f"{ckpt_path}: a checkpoint of other settings; use another folder or delete it")
            print(f"{ckpt_path}: a checkpoint of other settings, discarded; training starts afresh")
            ckpt_path.unlink()
            checkpoint = None

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    backbone = build_backbone(config, config.init_weights)
    feature_tap = TAPS[config.backbone][-1]
    sample = data.splits["train"].images
    if sample is None:
        sample = next(data.splits["train"].batches([np.arange(2)]))[1]
    adversary = None
    if method == "adversarial":
        adversary = adversary_mlp(_tap_size(backbone, config.adv_layer, sample), config.adv_hidden, data.n_bias)
    model = DebiasNet(backbone, data.n_classes, feature_tap=feature_tap, adv_tap=config.adv_layer,
                      adversary=adversary, adv_lambda=config.adv_lambda,
                      pseudo_k=config.cf_k if method == "clusterfix" else None).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=config.epochs)
                 if config.schedule == "cosine" else torch.optim.lr_scheduler.LambdaLR(optimiser, lambda _: 1.0))

    n_groups = len(data.group_names)
    state: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    if method == "groupdro":
        counts = torch.as_tensor(np.bincount(data.groups("train"), minlength=n_groups), dtype=torch.float32)
        state["q"] = torch.full((n_groups,), 1.0 / n_groups, device=device)
        state["adjustment"] = (None if config.dro_adjustment == 0
                               else (config.dro_adjustment / counts.clamp(min=1).sqrt()).to(device))
    elif method == "clusterfix":
        setup = checkpoint["clusterfix"] if checkpoint else _clusterfix_setup(data, config, seed, device, num_workers)
        ids = torch.as_tensor(setup["ids"]["train"])
        state.update(
            setup=setup, ids=ids, weights=torch.ones(len(ids)), n_total=len(ids),
            sizes=torch.bincount(ids, minlength=data.n_classes * config.cf_k),
        )
        extra["clusters"] = _cluster_summary(data, setup["ids"]["train"], config.cf_k)

    start, history, best = 0, [], None
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimiser.load_state_dict(checkpoint["optimiser"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        for key, value in checkpoint["method_state"].items():
            state[key] = value.to(device) if key == "q" else value
        start, history, best = checkpoint["epoch"], checkpoint["history"], checkpoint["best"]
        _set_rng_states(checkpoint["rng"])

    for epoch in range(start + 1, config.epochs + 1):
        batches = epoch_batches(data, method, config, seed, epoch)
        train_stats = _train_epoch(model, data, method, config, batches, optimiser, state, device, num_workers)
        scheduler.step()
        val, val_predicted = _evaluate(model, data, "val", device, num_workers)
        test, _ = _evaluate(model, data, "test", device, num_workers)
        record = {"epoch": epoch, **train_stats, "val_worst_group_acc": val.worst, "val_avg_acc": val.average,
                  "test_worst_group_acc": test.worst, "test_avg_acc": test.average}
        if method == "clusterfix":
            names = [str(i) for i in range(data.n_classes * config.cf_k)]
            record["val_worst_cluster_acc"] = group_accuracy(
                val_predicted, data.splits["val"].y, state["setup"]["ids"]["val"], names).worst
            # a diagnostic from the true groups (never used in training or selection): whom the weights favour
            groups = data.groups("train")
            record["train_group_weight"] = {name: float(state["weights"][torch.as_tensor(groups == g)].mean())
                                            for g, name in enumerate(data.group_names) if (groups == g).any()}
        history.append(record)
        if best is None or val.worst > best["val"].worst:
            best = {"epoch": epoch, "val": val, "test": test,
                    "weights": copy.deepcopy({k: v.cpu() for k, v in model.state_dict().items()})}
        method_state = {k: v for k, v in state.items() if k in ("q", "weights")}
        _save({"identity": identity, "epoch": epoch, "model": model.state_dict(), "optimiser": optimiser.state_dict(),
               "scheduler": scheduler.state_dict(), "method_state": method_state, "history": history, "best": best,
               "rng": _rng_states(), "clusterfix": state.get("setup")}, ckpt_path)
        if stop_after_epoch is not None and epoch == stop_after_epoch and epoch < config.epochs:
            return {"stopped_after_epoch": epoch}

    assert best is not None
    weights = best["weights"]
    _save({k[len("backbone."):]: v for k, v in weights.items() if k.startswith("backbone.")}, out / "model.pt")
    _save({k: v for k, v in weights.items() if not k.startswith("backbone.")}, out / "heads.pt")
    val, test = best["val"], best["test"]
    metrics = {
        **{k: identity[k] for k in ("dataset", "method", "seed")},
        "worst_group_acc": test.worst, "avg_acc": test.average, "group_acc": test.as_dict(),
        "group_count": dict(zip(test.names, map(int, test.count))), "empty_groups": list(test.empty),
        "best_epoch": best["epoch"], "epochs": config.epochs,
        "val_worst_group_acc": val.worst, "val_avg_acc": val.average, "val_group_acc": val.as_dict(),
        "train_group_count": data.group_counts()["train"], "history": history, "config": identity["config"],
        "device": device.type, "sbssl_version": sbssl.__version__, **extra,
    }
    write_json_atomic(out / "metrics.json", metrics)
    ckpt_path.unlink()
    return metrics
