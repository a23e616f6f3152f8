"""The backbone registry: one entry per model library; no other sbssl module knows a library's API.

A zoo entry names its ``source`` and the library's own model name (``architecture``). The source's entry
(:data:`REGISTRY`) builds the network (:func:`build_backbone`: eval mode, a seeded random init for
``init_seed``, or the verified weights loaded strictly), builds a weightless skeleton on PyTorch's meta device
(default layers and relative depth are read from it, :func:`default_layers`, :func:`layer_depths`), and gives
the library's own image transform (preprocessing ``model``):

- ``torchvision``: ``torchvision.models.get_model(architecture, weights=None)``; checkpoints in torchvision's
  key layout (or one of the ResNet layouts of :func:`sbssl.models.convert_checkpoint`); ``model`` transform =
  the ``standard`` ImageNet evaluation transform.
- ``timm``: ``timm.create_model(architecture, pretrained=False)`` (a ``name.tag`` architecture selects timm's
  pretrained config: classifier size and input normalisation); checkpoints in timm's layout; ``model``
  transform = ``timm.data.create_transform`` of the model's resolved data config.
- ``open_clip``: the image tower (``.visual``) of ``open_clip.create_model(architecture, pretrained=None)``;
  checkpoints are open_clip state dicts of the whole CLIP model (``visual.*`` keys kept) or of the tower;
  ``model`` transform = open_clip's evaluation preprocess of the architecture.
- ``sbssl``: the networks of :mod:`sbssl.networks` (``small_cnn``: the debiasing branch's colored-digits
  network); checkpoints are flat state dicts (format ``state_dict``, what ``sbssl debias`` writes as
  ``model.pt``); ``model`` transform (its default) = the image box-resized to the 8 x 8 training size, RGB in
  [0, 1] (as the training images); default layers ``conv1``, ``conv2``, ``pool``.
- ``huggingface``: ``transformers.AutoModel`` from a model folder (``config.json`` + weights): the fetched
  weights folder, or for a random model the ``architecture`` folder; ``model`` transform = the folder's
  image processor. MAE checkpoints (``vit_mae``) are built as a plain ``ViTModel``: ``ViTMAEModel`` drops
  75% of the patches at random in every forward pass (Brinkmann et al. 2023 did the same). ImageGPT is
  wrapped for iEAT's recipe (below).

Checkpoint files are read by :func:`sbssl.models.load_checkpoint` (safetensors with the safetensors
library, pickles only with ``weights_only=True``) and loaded strictly: every tensor of the network must be
in the file with its shape, nothing else may be, except the classifier (initialised with seed 0) and
BatchNorm's ``num_batches_tracked`` counters (zero). Floating-point tensors are cast to float32.

Default layers (:func:`default_layers`), by the structure of the skeleton's forward pass on the meta device:

- ResNets (children ``maxpool``, ``layer1``..``layer4``, ``avgpool``): the paper's six layers.
- Transformers (the longest list of >= 2 blocks of one class whose outputs are token maps (B, T, C)):
  ``embed`` (the last module to finish before the first block starts: patch embedding with class token and
  position embedding), ``block<k>`` for k = the blocks at each quarter of the depth (D/4, D/2, 3D/4, D,
  rounded; 1-based), and ``final`` (the norm module run right after the last block, when there is one).
- Other CNNs: ``stage<i>``, one per spatial resolution of the (B, C, H, W) outputs below the input's, the
  outermost module that produces it last (a stage output), and ``pool`` (the outermost module giving a
  1 x 1 map: the global average pool) when there is one. Channels-last maps (Swin) and attention maps are not
  spatial maps: give such models ``layers:`` explicitly.
- ImageGPT (iEAT's recipe): ``l<l>`` = iEAT's feature of hidden state l, at each quarter of the blocks
  (l <= n_layer - 2, as the recipe needs block l + 1).

Relative depth (:func:`layer_depths`): how many of the network's leaf modules (modules without submodules, each
counted once, in the order the forward pass finishes them) have run when the layer's module finishes, as a
share of those run when the model's last default layer finishes; 0 = the input side, 1 = the last default
layer (the global pool, the final norm). For iEAT's ImageGPT layers: l / n_layer (the share of blocks run).

Hook outputs (:func:`hook_tensor`): a tensor is taken as is; a tuple or list gives its first tensor (the
hidden states of a transformer layer that also returns attention weights or caches); a ``ModelOutput`` (a
mapping) gives ``last_hidden_state`` or else its first tensor. Pooling (:func:`pool_output`, per model):
``flatten`` (every value, C-major), ``mean`` (channel means over the spatial positions of a (B, C, ...) map),
``cls`` (token 0 of a (B, T, C) map), ``tokens_mean`` (the mean over all T tokens), ``patch_mean`` (the mean
over tokens 1..T-1, i.e. without the class token, as Brinkmann et al. 2023). A (B, C) output is stored as it
is whatever the pooling; token poolings of a (B, C, H, W) map are an error.

iEAT's iGPT recipe (preprocessing ``igpt``; Steed & Caliskan's ``ieat/models.py``, ``OpenAIExtractor`` and
``ieat/utils.py``): the top-left square of the image, resized to n_px x n_px (32) with OpenCV's INTER_AREA
(uint8), scaled to [-1, 1] (x / 127.5 - 1), each pixel quantised to the nearest of the 512 colour clusters
(squared distance in float64 against float32 clusters, as iEAT), the start token (512) prepended and the
last pixel dropped (:func:`igpt_context`). The network runs with iEAT's layer norm in place of every iGPT norm,
and the feature of layer l is that norm with block l + 1's gain applied to hidden state l (the input of block
l, ``hidden_states[l]`` in transformers), averaged over the 1024 positions by ``tokens_mean`` pooling
(:class:`IEATImageGPT`). Two points differ from a literal reading of the iGPT paper's n^l = layer_norm(h^l):
iEAT indexes block l + 1's norm for hidden state l (so l = 20 of iGPT-L uses block 21's gain), and iEAT's norm
(``ln_mod``) divides x by sqrt(var(x) + eps), the variance centred by the mean, where iGPT's own norm (OpenAI's
``norm``, transformers' ``ImageGPTLayerNorm``) divides by sqrt(mean(x^2) + eps); iEAT replaced every norm of
the network so, hidden states included. Both are reproduced here, so that iGPT weights give iEAT's published
embeddings. The clusters are the ``clusters`` of the model folder's ``preprocessor_config.json`` (the
Hugging Face image processor) or its ``kmeans_centers.npy`` (OpenAI's file); a random model without them gets
seeded uniform clusters in [-1, 1]^3.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from sbssl.models import ModelDefinition, ModelSpec, load_checkpoint

#: Preprocessing presets that need the built model (its library's transform, iEAT's iGPT tokens).
MODEL_PREPROCESSING = ("model", "igpt")
#: The six ResNet layers, as torchvision module names (the paper's blocks 1-5 and GAP).
RESNET_LAYERS = ("maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool")

Transform = Callable[[Image.Image], torch.Tensor]


@dataclass(frozen=True)
class Backbone:
    """A built model: ``module`` (eval mode, CPU) and, when a model preset was asked for, ``transform``
    (RGB PIL image -> the model's input for one image: a float (3, H, W) tensor, or for ``igpt`` the (1024,)
    long tensor of iEAT's context)."""

    module: nn.Module
    transform: Transform | None = None


@dataclass(frozen=True)
class DefaultLayer:
    """One default layer of an architecture: wildcard slug, module path, display title."""

    slug: str
    module: str
    title: str


@dataclass(frozen=True)
class Source:
    """A registry entry. ``make(definition, config_dir)``: the network with its constructor's init (called
    under a fixed seed, on the device in effect: the meta device for skeletons); ``load(definition,
    weights_path)``: the network with the weights loaded; ``transform(definition, module, config_dir)``: the
    library's own image transform; ``example(definition, module)``: an input batch of one (any device);
    ``optional(definition, module)``: key prefixes a checkpoint may lack (the classifier)."""

    make: Callable[[ModelDefinition, Path | None], nn.Module]
    load: Callable[[ModelDefinition, Path], nn.Module]
    transform: Callable[[ModelDefinition, nn.Module, Path | None], Transform]
    example: Callable[[ModelDefinition, nn.Module], torch.Tensor]


# --- hook outputs and pooling ----------------------------------------------------------------------------------


def hook_tensor(output: Any) -> torch.Tensor:
    """The tensor a forward hook stores: see the module docstring (tuples, ModelOutputs)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if isinstance(output.get("last_hidden_state"), torch.Tensor):
            return output["last_hidden_state"]
        values = list(output.values())
    elif isinstance(output, (tuple, list)):
        values = list(output)
    else:
        raise TypeError(f"a hooked module returned {type(output).__name__}, not a tensor, tuple or ModelOutput")
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"a hooked module returned a {type(output).__name__} without any tensor")


def pool_output(output: torch.Tensor, pooling: str, layer: str = "?") -> torch.Tensor:
    """Reduce one layer's batch output to (B, D) rows (see the module docstring); ``layer`` names it in errors.

    flatten: (B, ...) -> (B, prod(...)); mean: (B, C, *spatial) -> (B, C); cls / tokens_mean / patch_mean:
    (B, T, C) -> (B, C). (B, C) outputs pass unchanged.
    """
    if pooling == "flatten" or output.ndim <= 2:
        return output.flatten(1)
    if pooling == "mean":
        return output.mean(dim=tuple(range(2, output.ndim)))
    if pooling in ("cls", "tokens_mean", "patch_mean"):
        if output.ndim != 3:
            raise ValueError(
                f"layer {layer}: {pooling} pooling needs a (batch, tokens, channels) output, got shape "
                f"{tuple(output.shape)}; use flatten or mean for feature maps"
            )
        if pooling == "cls":
            return output[:, 0]
        if pooling == "patch_mean":
            if output.shape[1] < 2:
                raise ValueError(f"layer {layer}: patch_mean needs a class token and patches, got 1 token")
            return output[:, 1:].mean(dim=1)
        return output.mean(dim=1)
    raise ValueError(f"unknown pooling {pooling!r}")


# --- iEAT's iGPT recipe ----------------------------------------------------------------------------------------


def igpt_context(image: Image.Image, clusters: np.ndarray, n_px: int = 32) -> torch.Tensor:
    """iEAT's iGPT input for one RGB image: (n_px * n_px,) int64 token ids, the start token ``len(clusters)``
    first and the last pixel dropped (see the module docstring for each step)."""
    import cv2

    pixels = np.asarray(image.convert("RGB"))
    side = min(pixels.shape[:2])
    square = np.ascontiguousarray(pixels[:side, :side])
    small = cv2.resize(square, (n_px, n_px), interpolation=cv2.INTER_AREA)
    scaled = small.reshape(-1, 3) / 127.5 - 1  # uint8 / float -> float64, as iEAT
    centres = np.asarray(clusters)
    # iEAT's expanded squared distance: |x|^2 (float64) - 2 x.c (float64) + |c|^2 (in the clusters' float32)
    distance = (scaled**2).sum(axis=1)[:, None] - 2 * (scaled @ centres.T) + (centres**2).sum(axis=1)[None, :]
    tokens = np.argmin(distance, axis=1)
    context = np.concatenate([[len(centres)], tokens[:-1]])
    return torch.from_numpy(context.astype(np.int64))


class IEATLayerNorm(nn.Module):
    """iEAT's norm (``ln_mod``): x / sqrt(std(x)^2 + eps) * g with the biased std over the last axis, which
    centres by the mean, where iGPT's own norm uses the mean square. ``weight`` is shared with the norm it
    replaces (same parameter, same state_dict key)."""

    def __init__(self, weight: nn.Parameter, eps: float) -> None:
        super().__init__()
        self.weight = weight
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / torch.sqrt(torch.std(x, dim=-1, unbiased=False, keepdim=True) ** 2 + self.eps) * self.weight


class _HiddenFeature(nn.Module):
    """iEAT's feature of one hidden state: the given norm applied to it. The norm is held by reference, not
    registered again, so parameters and state_dict keys stay those of the wrapped model."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.__dict__["_norm"] = norm

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.__dict__["_norm"](hidden)


class IEATImageGPT(nn.Module):
    """A transformers ``ImageGPTModel`` run as iEAT ran iGPT: every norm is :class:`IEATLayerNorm`, and
    submodule ``hidden.<l>`` (l = 0 .. n_layer - 2) outputs iEAT's feature of hidden state l, i.e. block l + 1's
    norm applied to the input of block l, (B, T, C); hook it and pool with ``tokens_mean``.

    Input: (B, T) int64 token ids (:func:`igpt_context`); output: the last hidden state.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        for block in model.h:
            block.ln_1 = IEATLayerNorm(block.ln_1.weight, block.ln_1.eps)
            block.ln_2 = IEATLayerNorm(block.ln_2.weight, block.ln_2.eps)
        model.ln_f = IEATLayerNorm(model.ln_f.weight, model.ln_f.eps)
        self.model = model
        self.hidden = nn.ModuleDict({str(l): _HiddenFeature(model.h[l + 1].ln_1) for l in range(len(model.h) - 1)})
        for l in range(len(model.h) - 1):
            model.h[l].register_forward_pre_hook(functools.partial(self._feature, str(l)), with_kwargs=True)

    def _feature(self, key: str, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.hidden[key](args[0] if args else kwargs["hidden_states"])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).last_hidden_state


def _igpt_clusters(definition: ModelDefinition, folder: Path | None) -> np.ndarray:
    """The colour clusters (K, 3) float32 of an ImageGPT model (see the module docstring)."""
    if folder is not None:
        processor = folder / "preprocessor_config.json"
        if processor.is_file():
            clusters = json.loads(processor.read_text(encoding="utf-8")).get("clusters")
            if clusters is not None:
                return np.asarray(clusters, dtype=np.float32)
        if (folder / "kmeans_centers.npy").is_file():
            return np.load(folder / "kmeans_centers.npy", allow_pickle=False).astype(np.float32)
    if definition.init_seed is None:
        raise ValueError(
            f"model {definition.name!r}: no colour clusters in {folder} (preprocessor_config.json 'clusters' or "
            "kmeans_centers.npy); iEAT's iGPT recipe quantises pixels to them"
        )
    rng = np.random.default_rng([definition.init_seed, 512])
    return rng.uniform(-1, 1, size=(512, 3)).astype(np.float32)


# --- loading checkpoints strictly ------------------------------------------------------------------------------


def _load_state(
    make: Callable[[], nn.Module],
    state: Mapping[str, torch.Tensor],
    optional: Sequence[str],
    *,
    what: str,
    definition: ModelDefinition,
    path: Path,
) -> nn.Module:
    """Build with ``make`` and load ``state`` strictly (see the module docstring); errors name the keys.

    The network is built on the meta device and the checkpoint's tensors become its parameters (no second
    copy in memory, no random init to overwrite), unless it has non-persistent buffers, which only its
    constructor can compute: then it is built on the CPU (seeded) and filled.
    """
    with torch.device("meta"):
        skeleton = make()
    expected = skeleton.state_dict()
    allowed = tuple(optional)
    missing = sorted(
        k for k in set(expected) - set(state)
        if not (allowed and k.startswith(allowed)) and not k.endswith("num_batches_tracked")
    )
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or wrong_shape:
        parts = [
            f"{label} ({len(keys)}): {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
            if keys
        ]
        fmt = definition.weights.format if definition.weights else "?"
        raise ValueError(
            f"{path}: does not match {what} as format {fmt!r} for model {definition.name!r}: " + "; ".join(parts)
        )
    typed = {
        k: v.to(expected[k].dtype) if v.is_floating_point() and v.dtype != expected[k].dtype else v
        for k, v in state.items()
    }
    persistent = set(expected)
    if any(name not in persistent for name, _ in skeleton.named_buffers()):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = make()
        model.load_state_dict(typed, strict=False, assign=True)
        _zero_counters(model, typed)
        return model.eval()
    model = skeleton
    model.load_state_dict(typed, strict=False, assign=True)
    # What the file may lack is still on the meta device: BatchNorm counters (zero; unused in eval mode) and
    # whole classifier modules (their own init under seed 0).
    for name, module in model.named_modules():
        for key, buffer in list(module.named_buffers(recurse=False)):
            if key == "num_batches_tracked" and buffer.is_meta:
                module.register_buffer(key, torch.zeros((), dtype=torch.long))
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if not any(t.is_meta for t in own):
            continue
        if not all(t.is_meta for t in own) or not hasattr(module, "reset_parameters"):
            raise ValueError(f"{path}: model {definition.name!r}: the checkpoint gives only part of module {name!r}")
        module.to_empty(device="cpu", recurse=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            module.reset_parameters()
    return model.eval()


def _zero_counters(model: nn.Module, loaded: Mapping[str, torch.Tensor]) -> None:
    for name, buffer in model.named_buffers():
        if name.endswith("num_batches_tracked") and name not in loaded:
            buffer.zero_()


def _classifier_prefixes(module: nn.Module) -> tuple[str, ...]:
    """The last ``nn.Linear`` of a network (its classifier), as a state_dict key prefix."""
    linears = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    return (f"{linears[-1]}.",) if linears else ()


def _seeded(make: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``make()`` under ``torch.manual_seed(seed)`` in a forked RNG (the caller's stream is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make().eval()


# --- the sources -------------------------------------------------------------------------------------------------


def _image_example(size: Any) -> torch.Tensor:
    height, width = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    return torch.zeros(1, 3, int(height), int(width))


def _torchvision_make(definition: ModelDefinition, _folder: Path | None) -> nn.Module:
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(definition.architecture)
    except ValueError:
        raise ValueError(
            f"model {definition.name!r}: torchvision has no model {definition.architecture!r} "
            "(see torchvision.models.list_models())"
        ) from None
    return builder(weights=None)


def _torchvision_load(definition: ModelDefinition, path: Path) -> nn.Module:
    assert definition.weights is not None
    state = load_checkpoint(path, definition.weights.format)
    make = functools.partial(_torchvision_make, definition, None)
    with torch.device("meta"):
        optional = _classifier_prefixes(make())
    return _load_state(make, state, optional, what=f"torchvision {definition.architecture}", definition=definition,
                       path=path)  # fmt: skip


def _torchvision_transform(_definition: ModelDefinition, _module: nn.Module, _folder: Path | None) -> Transform:
    from sbssl.embed import PREPROCESSING

    return PREPROCESSING["standard"]


def _torchvision_example(_definition: ModelDefinition, _module: nn.Module) -> torch.Tensor:
    return _image_example(224)


def _timm_make(definition: ModelDefinition, _folder: Path | None) -> nn.Module:
    import timm

    try:
        return timm.create_model(definition.architecture, pretrained=False)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ValueError(f"model {definition.name!r}: timm has no model {definition.architecture!r}") from None
        raise


def _timm_load(definition: ModelDefinition, path: Path) -> nn.Module:
    state = load_checkpoint(path, "timm")
    make = functools.partial(_timm_make, definition, None)
    with torch.device("meta"):
        skeleton = make()
    classifier = skeleton.pretrained_cfg.get("classifier") or ()
    optional = tuple(f"{c}." for c in ((classifier,) if isinstance(classifier, str) else classifier))
    return _load_state(make, state, optional, what=f"timm {definition.architecture}", definition=definition, path=path)


def _timm_transform(_definition: ModelDefinition, module: nn.Module, _folder: Path | None) -> Transform:
    from timm.data import create_transform, resolve_data_config

    return create_transform(**resolve_data_config({}, model=module))


def _timm_example(_definition: ModelDefinition, module: nn.Module) -> torch.Tensor:
    return _image_example(module.pretrained_cfg.get("input_size", (3, 224, 224)))


def _open_clip_make(definition: ModelDefinition, _folder: Path | None) -> nn.Module:
    import open_clip

    device = torch.get_default_device()
    root = logging.getLogger()  # open_clip warns on the root logger that no pretrained weights were loaded
    was, root.disabled = root.disabled, True
    try:
        model = open_clip.create_model(definition.architecture, pretrained=None, device=device)
    except RuntimeError as exc:
        if "not found" in str(exc).lower():
            raise ValueError(f"model {definition.name!r}: open_clip has no model {definition.architecture!r}") from None
        raise
    finally:
        root.disabled = was
    visual = model.visual
    transformer = getattr(visual, "transformer", None)
    if transformer is not None and getattr(transformer, "batch_first", True) is False:
        raise ValueError(f"model {definition.name!r}: this open_clip version runs the tower sequence-first; "
                         "token poolings assume batch-first outputs")  # fmt: skip
    return visual


def _open_clip_load(definition: ModelDefinition, path: Path) -> nn.Module:
    state = load_checkpoint(path, "open_clip")
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    make = functools.partial(_open_clip_make, definition, None)
    return _load_state(make, state, (), what=f"open_clip {definition.architecture} image tower", definition=definition,
                       path=path)  # fmt: skip


def _open_clip_transform(_definition: ModelDefinition, module: nn.Module, _folder: Path | None) -> Transform:
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**module.preprocess_cfg), is_train=False)


def _open_clip_example(_definition: ModelDefinition, module: nn.Module) -> torch.Tensor:
    return _image_example(module.preprocess_cfg["size"])


def _hf_folder(definition: ModelDefinition, folder: Path | None) -> Path:
    """The model folder whose config builds a Hugging Face model."""
    if folder is None:
        folder = Path(definition.architecture)
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"model {definition.name!r}: {folder} is not a Hugging Face model folder (no config.json); a random "
            "model's architecture must be a local folder, a pretrained model's weights a fetched folder"
        )
    return folder


def _hf_class(config: Any) -> Any:
    import transformers

    if config.model_type == "vit_mae":  # see the module docstring
        return transformers.ViTModel
    return transformers.AutoModel


def _is_imagegpt(config: Any) -> bool:
    return config.model_type == "imagegpt"


def _hf_config(folder: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder, local_files_only=True)


def _hf_make(definition: ModelDefinition, folder: Path | None) -> nn.Module:
    folder = _hf_folder(definition, folder)
    config = _hf_config(folder)
    cls = _hf_class(config)
    if cls.__name__ == "AutoModel":
        model = cls.from_config(config)
    else:
        model = cls(cls.config_class(**config.to_dict()))
    return IEATImageGPT(model) if _is_imagegpt(config) else model


def _hf_load(definition: ModelDefinition, path: Path) -> nn.Module:
    from transformers.utils import logging as hf_logging

    folder = _hf_folder(definition, path)
    config = _hf_config(folder)
    hf_logging.disable_progress_bar()
    model = _hf_class(config).from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    return (IEATImageGPT(model) if _is_imagegpt(config) else model).eval()


def _hf_transform(definition: ModelDefinition, module: nn.Module, folder: Path | None) -> Transform:
    from transformers import AutoImageProcessor

    folder = _hf_folder(definition, folder)
    if isinstance(module, IEATImageGPT):
        raise ValueError(f"model {definition.name!r}: ImageGPT takes iEAT's tokens: use preprocessing igpt")
    if not (folder / "preprocessor_config.json").is_file():
        raise ValueError(f"model {definition.name!r}: {folder} has no image processor (preprocessor_config.json); "
                         "use preprocessing sbssl or standard")  # fmt: skip
    processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    return lambda image: processor(images=image, return_tensors="pt")["pixel_values"][0]


def _hf_example(_definition: ModelDefinition, module: nn.Module) -> torch.Tensor:
    if isinstance(module, IEATImageGPT):
        return torch.zeros(1, module.model.config.n_positions, dtype=torch.long)
    config = module.config
    return _image_example(getattr(config, "image_size", 224))


def _sbssl_make(definition: ModelDefinition, _folder: Path | None) -> nn.Module:
    from sbssl.networks import ARCHITECTURES

    try:
        return ARCHITECTURES[definition.architecture]()
    except KeyError:
        raise ValueError(f"model {definition.name!r}: sbssl has no network {definition.architecture!r}; "
                         f"known: {sorted(ARCHITECTURES)}") from None


def _sbssl_load(definition: ModelDefinition, path: Path) -> nn.Module:
    assert definition.weights is not None
    state = load_checkpoint(path, definition.weights.format)
    return _load_state(functools.partial(_sbssl_make, definition, None), state, (),
                       what=f"sbssl {definition.architecture}", definition=definition, path=path)


def _sbssl_transform(_definition: ModelDefinition, _module: nn.Module, _folder: Path | None) -> Transform:
    from sbssl.networks import SMALL_CNN_INPUT

    def transform(image: Image.Image) -> torch.Tensor:
        # as the training images: RGB in [0, 1] at the training size (each pixel the mean of its area)
        small = image.resize((SMALL_CNN_INPUT, SMALL_CNN_INPUT), Image.Resampling.BOX)
        return torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()

    return transform


def _sbssl_example(_definition: ModelDefinition, _module: nn.Module) -> torch.Tensor:
    from sbssl.networks import SMALL_CNN_INPUT

    return _image_example(SMALL_CNN_INPUT)


#: source -> its registry entry. A new library is one entry here (and its name in sbssl.models.SOURCES).
REGISTRY: dict[str, Source] = {
    "torchvision": Source(_torchvision_make, _torchvision_load, _torchvision_transform, _torchvision_example),
    "timm": Source(_timm_make, _timm_load, _timm_transform, _timm_example),
    "open_clip": Source(_open_clip_make, _open_clip_load, _open_clip_transform, _open_clip_example),
    "huggingface": Source(_hf_make, _hf_load, _hf_transform, _hf_example),
    "sbssl": Source(_sbssl_make, _sbssl_load, _sbssl_transform, _sbssl_example),
}


def _source(definition: ModelDefinition) -> Source:
    try:
        return REGISTRY[definition.source]
    except KeyError:
        known = sorted(REGISTRY)
        raise ValueError(f"model {definition.name!r}: unknown source {definition.source!r}; known: {known}") from None


def _as_definition(model: ModelSpec | ModelDefinition) -> ModelDefinition:
    return model.definition if isinstance(model, ModelSpec) else model


def build_backbone(
    model: ModelSpec | ModelDefinition,
    weights_path: str | Path | None = None,
    *,
    preprocessing: str | None = None,
) -> Backbone:
    """Build a zoo model in eval mode on the CPU, with the transform of a model preset when asked for.

    model: the zoo entry or its definition. weights_path: the verified checkpoint file or model folder of a
    pretrained model (:func:`sbssl.models.fetch_weights`), None for a random one (``init_seed``: the
    constructor's own init under ``torch.manual_seed(init_seed)``, in a forked RNG so the caller's stream is
    untouched). preprocessing: ``model`` or ``igpt`` attach that transform (:class:`Backbone`); other values
    (the image presets of :mod:`sbssl.embed`) attach none. The file is not hashed here: callers verify it
    (:func:`sbssl.models.verify_weights`).
    """
    definition = _as_definition(model)
    source = _source(definition)
    if definition.weights is None:
        if weights_path is not None:
            raise ValueError(f"model {definition.name!r} is randomly initialised; do not pass weights ({weights_path})")
        assert definition.init_seed is not None
        module = _seeded(functools.partial(source.make, definition, None), definition.init_seed)
        folder = None
    else:
        if weights_path is None:
            raise ValueError(f"model {definition.name!r} needs its weights file (fetch it with `sbssl fetch-weights`)")
        module = source.load(definition, Path(weights_path)).eval()
        folder = Path(weights_path) if Path(weights_path).is_dir() else None
    transform = None
    if preprocessing == "igpt":
        if not isinstance(module, IEATImageGPT):
            raise ValueError(f"model {definition.name!r}: preprocessing igpt is iEAT's recipe for ImageGPT models only")
        clusters = _igpt_clusters(definition, folder if folder is not None else _local_folder(definition))
        n_px = int(round(module.model.config.n_positions**0.5))
        if len(clusters) + 1 != module.model.config.vocab_size:
            raise ValueError(f"model {definition.name!r}: {len(clusters)} colour clusters, but the vocabulary has "
                             f"{module.model.config.vocab_size} tokens (clusters + start token)")  # fmt: skip
        transform = functools.partial(igpt_context, clusters=clusters, n_px=n_px)
    elif preprocessing == "model":
        transform = source.transform(definition, module, folder if folder is not None else _local_folder(definition))
    elif preprocessing is not None and isinstance(module, IEATImageGPT):
        raise ValueError(f"model {definition.name!r}: ImageGPT takes iEAT's tokens: use preprocessing igpt, "
                         f"not {preprocessing!r}")  # fmt: skip
    return Backbone(module=module, transform=transform)


def _local_folder(definition: ModelDefinition) -> Path | None:
    """The architecture as a local model folder (Hugging Face random models), else None."""
    folder = Path(definition.architecture)
    return folder if definition.source == "huggingface" and folder.is_dir() else None


def embedding_settings(model: ModelSpec | ModelDefinition, config_dir: str | Path | None = None) -> tuple[str, str]:
    """``(pooling, preprocessing)`` of a zoo model: the entry's own, else its architecture's default:
    ``flatten`` (the paper's whole map) everywhere except ImageGPT (``tokens_mean``); ``sbssl`` (the paper's)
    for torchvision, ``igpt`` for ImageGPT, the library's own transform (``model``) for the other sources,
    whose networks expect their own input normalisation. config_dir: a Hugging Face model's folder (its
    fetched weights) when the architecture is a hub id."""
    definition = _as_definition(model)
    pooling, preprocessing = "flatten", ("sbssl" if definition.source == "torchvision" else "model")
    if definition.source == "huggingface" and (definition.pooling is None or definition.preprocessing is None):
        folder = Path(config_dir) if config_dir is not None else _local_folder(definition)
        if folder is not None and (folder / "config.json").is_file() and _is_imagegpt(_hf_config(folder)):
            pooling, preprocessing = "tokens_mean", "igpt"
    return definition.pooling or pooling, definition.preprocessing or preprocessing


# --- default layers and relative depth from a meta-device trace ----------------------------------------------


@dataclass(frozen=True)
class _Trace:
    """The skeleton's forward pass on the meta device: module names in the order they finished (first time),
    their output shapes, and how many leaf modules had finished by then."""

    order: tuple[str, ...]
    shapes: Mapping[str, tuple[int, ...]]
    leaves_done: Mapping[str, int]
    input_shape: tuple[int, ...]
    blocks: tuple[str, ...]  # module paths of a transformer's blocks
    embed: str | None  # the last module finished before the first block started
    final: str | None  # the norm finished right after the last block
    depth: int  # number of blocks (transformers)
    kind: str  # resnet | transformer | cnn | imagegpt


def _block_list(module: nn.Module) -> tuple[str, ...]:
    """Module paths of the longest list of >= 2 blocks of one class with parameters (empty if none)."""
    best: tuple[str, ...] = ()
    for name, child in module.named_modules():
        if isinstance(child, (nn.ModuleList, nn.Sequential)) and len(child) >= 2:
            kinds = {type(c) for c in child.children()}
            first = next(iter(child.children()))
            if len(kinds) == 1 and any(True for _ in first.parameters()) and len(child) > len(best):
                best = tuple(f"{name}.{key}" if name else key for key in child._modules)
    return best


def _trace_module(definition: ModelDefinition, module: nn.Module) -> _Trace:
    names = dict(module.named_modules())
    if isinstance(module, IEATImageGPT):
        return _Trace((), {}, {}, (), (), None, None, len(module.model.h), "imagegpt")
    if all(n in names for n in RESNET_LAYERS) and "fc" in names:
        kind = "resnet"
    else:
        kind = "cnn"
    blocks = _block_list(module)
    depth = len(blocks)
    order: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}
    leaves_done: dict[str, int] = {}
    leaves: set[str] = set()
    started: dict[str, int] = {}
    leaf_names = {n for n, m in names.items() if n and not list(m.children())}

    def finished(name: str, _m: nn.Module, _i: Any, output: Any) -> None:
        if name in shapes:
            return
        if name in leaf_names:
            leaves.add(name)
        try:
            shapes[name] = tuple(hook_tensor(output).shape)
        except TypeError:
            shapes[name] = ()
        order.append(name)
        leaves_done[name] = len(leaves)

    handles = [m.register_forward_hook(functools.partial(finished, n)) for n, m in names.items() if n]
    if blocks:
        first = names[blocks[0]]

        def first_starts(*_: Any) -> None:
            started.setdefault("first", len(order))

        handles.append(first.register_forward_pre_hook(first_starts))
    example = _source(definition).example(definition, module).to("meta")
    try:
        with torch.no_grad():
            module(example)
    finally:
        for handle in handles:
            handle.remove()
    embed = final = None
    if blocks and all(len(shapes.get(b, ())) == 3 for b in blocks) and kind != "resnet":
        kind = "transformer"
        before = order[: started.get("first", 0)]
        embed = before[-1] if before and len(shapes[before[-1]]) == 3 else None
        last = blocks[-1]
        for name in order[order.index(last) + 1 :]:
            if last.startswith(f"{name}."):
                continue  # a container of the blocks
            final = name if "norm" in type(names[name]).__name__.lower() else None
            break
    return _Trace(tuple(order), shapes, leaves_done, tuple(example.shape), blocks, embed, final, depth, kind)


def _quarters(depth: int) -> list[int]:
    """1-based block counts at each quarter of ``depth`` blocks (rounded half up), without repeats."""
    return sorted({max(1, int(depth * q / 4 + 0.5)) for q in range(1, 5)})


@functools.lru_cache(maxsize=64)
def _skeleton_trace(definition: ModelDefinition, config_dir: Path | None) -> tuple[tuple[DefaultLayer, ...], _Trace]:
    source = _source(definition)
    with torch.device("meta"):
        module = source.make(definition, config_dir)
    trace = _trace_module(definition, module)
    if definition.source == "sbssl":
        from sbssl.networks import LAYERS

        titles = {"conv1": "Conv 1", "conv2": "Conv 2", "pool": "GAP"}
        layers = tuple(DefaultLayer(slug, m, titles.get(slug, slug)) for slug, m in LAYERS[definition.architecture])
    elif trace.kind == "resnet":
        titles = ("Block 1", "Block 2", "Block 3", "Block 4", "Block 5", "GAP")
        layers = tuple(DefaultLayer(m, m, t) for m, t in zip(RESNET_LAYERS, titles))
    elif trace.kind == "imagegpt":
        picks = sorted({min(k, trace.depth - 2) for k in _quarters(trace.depth)})
        layers = tuple(DefaultLayer(f"l{l}", f"hidden.{l}", f"Layer {l}") for l in picks)
    elif trace.kind == "transformer":
        found = [DefaultLayer("embed", trace.embed, "Embedding")] if trace.embed else []
        found += [DefaultLayer(f"block{k}", trace.blocks[k - 1], f"Block {k}") for k in _quarters(trace.depth)]
        if trace.final:
            found.append(DefaultLayer("final", trace.final, "Final norm"))
        layers = tuple(found)
    else:
        layers = _cnn_layers(trace)
    return layers, trace


def _cnn_layers(trace: _Trace) -> tuple[DefaultLayer, ...]:
    """Stage outputs and the global pool (see the module docstring)."""
    in_hw = trace.input_shape[-2:]
    groups: dict[tuple[int, ...], list[str]] = {}
    for name in trace.order:
        shape = trace.shapes[name]
        # square maps smaller than the (square) input: channels-last (B, H, W, C) tensors are left out
        # (attention maps inside windows have another batch size)
        if len(shape) == 4 and shape[0] == trace.input_shape[0] and shape[-1] == shape[-2] and shape[-2:] != in_hw:
            groups.setdefault(shape[-2:], []).append(name)
    picks = []
    for hw, names in groups.items():
        fewest = min(n.count(".") for n in names)
        pick = [n for n in names if n.count(".") == fewest][-1]
        picks.append((trace.order.index(pick), hw, pick))
    picks.sort()
    layers, stage = [], 0
    for _, hw, module in picks:
        if hw == (1, 1):
            layers.append(DefaultLayer("pool", module, "GAP"))
        else:
            stage += 1
            layers.append(DefaultLayer(f"stage{stage}", module, f"Stage {stage}"))
    if not layers:
        raise ValueError("no (B, C, H, W) feature maps found; give the model's layers explicitly in the zoo")
    return tuple(layers)


def default_layers(
    model: ModelSpec | ModelDefinition, config_dir: str | Path | None = None
) -> tuple[DefaultLayer, ...]:
    """The default layers of a zoo model's architecture (see the module docstring), in forward order.

    config_dir: where a Hugging Face model's config is (its fetched weights folder); defaults to the
    architecture when that is a local folder. Builds a skeleton on the meta device (no weights, no init;
    imports the library), cached per definition.
    """
    definition = _as_definition(model)
    return _skeleton_trace(_architecture_only(definition), _config_dir(definition, config_dir))[0]


def layer_depths(
    model: ModelSpec | ModelDefinition, modules: Sequence[str], config_dir: str | Path | None = None
) -> dict[str, float]:
    """Relative depth in [0, 1] of each module path (see the module docstring)."""
    definition = _as_definition(model)
    layers, trace = _skeleton_trace(_architecture_only(definition), _config_dir(definition, config_dir))
    if trace.kind == "imagegpt":  # hidden state l has run l of the n_layer blocks
        out = {}
        for module in modules:
            match = re.fullmatch(r"hidden\.(\d+)", module)
            if not match:
                raise ValueError(f"model {definition.name!r}: iEAT's ImageGPT layers are hidden.<l>, not {module!r}")
            out[module] = int(match.group(1)) / trace.depth
        return out
    end = trace.leaves_done[layers[-1].module] or 1
    unknown = [m for m in modules if m not in trace.leaves_done]
    if unknown:
        raise ValueError(f"model {definition.name!r}: no module {unknown[0]!r} runs in the forward pass of "
                         f"{definition.source} {definition.architecture}")  # fmt: skip
    return {m: min(1.0, trace.leaves_done[m] / end) for m in modules}


def _architecture_only(definition: ModelDefinition) -> ModelDefinition:
    """The part of a definition a skeleton depends on (so the trace cache is shared across models)."""
    return ModelDefinition(name="skeleton", architecture=definition.architecture, weights=None, init_seed=0,
                           source=definition.source)  # fmt: skip


def _config_dir(definition: ModelDefinition, config_dir: str | Path | None) -> Path | None:
    if definition.source != "huggingface":
        return None
    return Path(config_dir) if config_dir is not None else None


def module_exists(model: nn.Module, path: str) -> bool:
    """True when ``path`` names a submodule of ``model``."""
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True
