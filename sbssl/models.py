"""The model zoo (``config/models.yaml``), verified weight downloads, checkpoint conversion, model building.

Every model is a torchvision ResNet-50. Checkpoints from the SSL libraries are converted into torchvision's
state_dict key names (``conv1.weight``, ``layer1.0.bn1.running_mean``, ...), then loaded strictly: every
backbone tensor must be present with the right shape, nothing unknown may be left over, and only the
classifier ``fc.*`` (and the ``num_batches_tracked`` counters, unused in eval mode) may be absent.
Checkpoints are always read with ``torch.load(..., weights_only=True)``: a downloaded pickle never runs code.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import yaml

if TYPE_CHECKING:  # torch is imported lazily: loading the zoo must stay cheap for the DAG and the figures
    import torch

FAMILIES = ("geometric", "clustering", "contrastive", "supervised", "random")
META_GROUPS = ("contrastive", "non_contrastive")
ARCHITECTURES = ("resnet50",)
#: Checkpoint layouts :func:`convert_checkpoint` understands (see its docstring).
FORMATS = ("mmselfsup", "openselfsup", "vissl", "vissl_converted", "torchvision", "moco", "swav")

_SLUG = re.compile(r"^[a-z0-9_]+$")
_HEX = re.compile(r"^[0-9a-f]+$")
_MODEL_KEYS = {"title", "family", "meta_group", "imagenet_top1", "architecture", "weights", "init_seed"}
_WEIGHTS_KEYS = {"url", "sha256", "sha256_prefix", "md5_prefix", "format"}


@dataclass(frozen=True)
class WeightsSpec:
    """Where a checkpoint comes from and how to check and read it.

    ``sha256`` is the full digest when known; ``sha256_prefix`` / ``md5_prefix`` are the digest prefixes that
    publishers put in file names or READMEs. ``format`` is one of :data:`FORMATS`.
    """

    url: str
    format: str
    sha256: str | None = None
    sha256_prefix: str | None = None
    md5_prefix: str | None = None


@dataclass(frozen=True)
class ModelSpec:
    """One zoo entry. ``weights`` is None exactly for random models, which have an ``init_seed`` instead."""

    name: str
    title: str
    family: str
    meta_group: str | None
    imagenet_top1: float | None
    architecture: str
    weights: WeightsSpec | None
    init_seed: int | None


def _fail(path: Path, name: str, key: str, problem: str) -> ValueError:
    return ValueError(f"{path}: model {name!r}, key {key!r}: {problem}")


def _hex_digest(path: Path, name: str, key: str, value: Any, length: int | None) -> str | None:
    if value is None:
        return None
    text = str(value).lower()
    if not _HEX.match(text) or (length is not None and len(text) != length) or len(text) < 4:
        want = f"{length} hex digits" if length else "at least 4 hex digits"
        raise _fail(path, name, key, f"{value!r} is not a digest ({want})")
    return text


def _weights_spec(path: Path, name: str, raw: Any) -> WeightsSpec:
    if not isinstance(raw, Mapping):
        raise _fail(path, name, "weights", "must be a mapping with url, format and a hash")
    unknown = set(raw) - _WEIGHTS_KEYS
    if unknown:
        raise _fail(path, name, f"weights.{sorted(unknown)[0]}", f"unknown key; allowed: {sorted(_WEIGHTS_KEYS)}")
    for key in ("url", "format"):
        if not raw.get(key):
            raise _fail(path, name, f"weights.{key}", "is required")
    url = str(raw["url"])
    if not url.startswith(("https://", "http://", "file://")):
        raise _fail(path, name, "weights.url", f"{url!r} is not an http(s):// or file:// URL")
    if raw["format"] not in FORMATS:
        raise _fail(path, name, "weights.format", f"{raw['format']!r} is not one of {list(FORMATS)}")
    return WeightsSpec(
        url=url,
        format=str(raw["format"]),
        sha256=_hex_digest(path, name, "weights.sha256", raw.get("sha256"), 64),
        sha256_prefix=_hex_digest(path, name, "weights.sha256_prefix", raw.get("sha256_prefix"), None),
        md5_prefix=_hex_digest(path, name, "weights.md5_prefix", raw.get("md5_prefix"), None),
    )


def _model_spec(path: Path, name: Any, raw: Any) -> ModelSpec:
    if not isinstance(name, str) or not _SLUG.match(name):
        raise ValueError(f"{path}: model name {name!r} must be a slug (lower-case letters, digits, _)")
    if not isinstance(raw, Mapping):
        raise _fail(path, name, "-", "the entry must be a mapping")
    unknown = set(raw) - _MODEL_KEYS
    if unknown:
        raise _fail(path, name, sorted(unknown)[0], f"unknown key; allowed: {sorted(_MODEL_KEYS)}")
    for key in ("title", "family", "architecture"):
        if not raw.get(key):
            raise _fail(path, name, key, "is required")
    if raw["family"] not in FAMILIES:
        raise _fail(path, name, "family", f"{raw['family']!r} is not one of {list(FAMILIES)}")
    if raw["architecture"] not in ARCHITECTURES:
        raise _fail(path, name, "architecture", f"{raw['architecture']!r} is not one of {list(ARCHITECTURES)}")
    meta_group = raw.get("meta_group")
    if meta_group is not None and meta_group not in META_GROUPS:
        raise _fail(path, name, "meta_group", f"{meta_group!r} is not one of {list(META_GROUPS)} (or absent)")
    top1 = raw.get("imagenet_top1")
    if top1 is not None and (isinstance(top1, bool) or not isinstance(top1, (int, float)) or not 0 <= top1 <= 100):
        raise _fail(path, name, "imagenet_top1", f"{top1!r} is not a percentage in [0, 100] (or null)")
    has_weights, seed = raw.get("weights") is not None, raw.get("init_seed")
    if has_weights == (seed is not None):
        raise _fail(path, name, "weights", "give exactly one of weights (pretrained) or init_seed (random)")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise _fail(path, name, "init_seed", f"{seed!r} is not a non-negative integer")
    return ModelSpec(
        name=name,
        title=str(raw["title"]),
        family=str(raw["family"]),
        meta_group=meta_group,
        imagenet_top1=None if top1 is None else float(top1),
        architecture=str(raw["architecture"]),
        weights=_weights_spec(path, name, raw["weights"]) if has_weights else None,
        init_seed=seed,
    )


def load_zoo(path: str | os.PathLike[str]) -> dict[str, ModelSpec]:
    """Read and validate a zoo file (top key ``models:``); return ``{name: ModelSpec}`` in file order.

    Errors name the file, the model and the key at fault.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"model zoo {file} not found")
    with open(file, encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    if not isinstance(data, Mapping) or not isinstance(data.get("models"), Mapping) or not data["models"]:
        raise ValueError(f"{file}: expected a top-level 'models:' mapping of model name -> entry")
    extra = set(data) - {"models"}
    if extra:
        raise ValueError(f"{file}: unknown top-level key(s) {sorted(extra)}; only 'models' is allowed")
    return {str(name): _model_spec(file, name, raw) for name, raw in data["models"].items()}


def model_spec_from_dict(data: Mapping[str, Any]) -> ModelSpec:
    """Rebuild a ModelSpec from ``dataclasses.asdict(spec)`` (how the workflow hands a spec to a job)."""
    fields = set(ModelSpec.__dataclass_fields__)
    if set(data) != fields:
        raise ValueError(f"not a model spec: keys {sorted(data)}, expected {sorted(fields)}")
    weights = data["weights"]
    return ModelSpec(**{**data, "weights": None if weights is None else WeightsSpec(**weights)})


def fetch_weights(
    spec: ModelSpec, dest_dir: str | os.PathLike[str], *, retries: int = 3, timeout: float = 60, progress: bool = True
) -> Path:
    """Download ``spec``'s checkpoint to ``dest_dir/<name>.pth``, verified against every known digest.

    A present file that verifies is not downloaded again (see :func:`sbssl.download.download`).
    """
    from sbssl.download import download

    if spec.weights is None:
        raise ValueError(f"model {spec.name!r} is randomly initialised (init_seed {spec.init_seed}); it has no weights")
    w = spec.weights
    return download(
        w.url, Path(dest_dir) / f"{spec.name}.pth", sha256=w.sha256, sha256_prefix=w.sha256_prefix,
        md5_prefix=w.md5_prefix, retries=retries, timeout=timeout, progress=progress,
    )


def _strip(state: Mapping[str, Any], prefix: str, *, keep_others: bool) -> dict[str, Any]:
    """Keys starting with ``prefix`` without it; other keys kept as they are or dropped."""
    out = {}
    for key, value in state.items():
        if key.startswith(prefix):
            out[key[len(prefix) :]] = value
        elif keep_others:
            out[key] = value
    return out


def _get(obj: Any, keys: tuple[str, ...], fmt: str) -> Any:
    """``obj[k0][k1]...`` with an error naming the missing level."""
    for depth, key in enumerate(keys):
        if not isinstance(obj, Mapping) or key not in obj:
            found = sorted(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
            where = "".join(f"[{k!r}]" for k in keys[:depth]) or "the top level"
            raise ValueError(f"not a {fmt!r} checkpoint: no {key!r} under {where} (found {found})")
        obj = obj[key]
    return obj


def convert_checkpoint(obj: Any, fmt: str) -> dict[str, "torch.Tensor"]:
    """Turn a loaded checkpoint object into a torchvision ResNet-50 state_dict (tensors, torchvision keys).

    Formats (the layouts in ``shared/models/zoo.md``):

    - ``mmselfsup``: MMSelfSup 1.x / mmpretrain algorithm checkpoint, ``{'state_dict': {'backbone.conv1.weight',
      ..., 'neck.*', 'head.*', momentum/target encoders}}``: only ``backbone.*`` is kept, prefix removed.
    - ``openselfsup``: MMSelfSup 0.x / OpenSelfSup backbone file, ``{'state_dict': {'conv1.weight', ...}}``
      (a ``backbone.`` prefix, if present, is handled as for ``mmselfsup``).
    - ``vissl``: VISSL training checkpoint, ``['classy_state_dict']['base_model']['model']['trunk']`` with
      ``_feature_blocks.`` prefixed keys (heads dropped).
    - ``vissl_converted``: ``{'model_state_dict': {'_feature_blocks.conv1.weight', ...}}``.
    - ``torchvision``: a flat state_dict (``fc.*`` included).
    - ``moco``: official MoCo, ``{'state_dict': {'module.encoder_q.*', 'module.encoder_k.*', 'module.queue'}}``:
      the query encoder without its ``fc`` projection head.
    - ``swav``: official SwAV, flat (or under ``'state_dict'``) ``module.*`` keys; ``projection_head.*`` and
      ``prototypes.*`` dropped.

    In every format a ``module.`` prefix left by DataParallel is removed. Non-tensor entries are an error.
    """
    import torch

    if fmt in ("mmselfsup", "openselfsup", "torchvision", "swav"):
        state = obj["state_dict"] if isinstance(obj, Mapping) and "state_dict" in obj else obj
    elif fmt == "vissl":
        state = _get(obj, ("classy_state_dict", "base_model", "model", "trunk"), fmt)
    elif fmt == "vissl_converted":
        state = _get(obj, ("model_state_dict",), fmt)
    elif fmt == "moco":
        state = _get(obj, ("state_dict",), fmt)
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}; expected one of {list(FORMATS)}")
    if not isinstance(state, Mapping):
        raise ValueError(f"not a {fmt!r} checkpoint: expected a mapping of tensors, got {type(state).__name__}")
    if fmt == "moco":
        state = _strip(state, "module.encoder_q.", keep_others=False)
        if not state:
            raise ValueError("not a 'moco' checkpoint: no 'module.encoder_q.' keys under ['state_dict']")
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    state = _strip(state, "module.", keep_others=True)
    if fmt in ("mmselfsup", "openselfsup"):
        if any(k.startswith("backbone.") for k in state):
            state = _strip(state, "backbone.", keep_others=False)
        elif fmt == "mmselfsup":
            raise ValueError(f"not a 'mmselfsup' checkpoint: no 'backbone.' keys (found {sorted(state)[:8]})")
    elif fmt in ("vissl", "vissl_converted"):
        state = _strip(state, "_feature_blocks.", keep_others=True)
    elif fmt == "swav":
        state = {k: v for k, v in state.items() if not k.startswith(("projection_head.", "prototypes."))}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{fmt!r} checkpoint has non-tensor entries where weights were expected: {bad[:8]}")
    return dict(state)


class _Inert:
    """Stands in for any non-tensor object class in a checkpoint (logs, numpy metadata): it keeps the
    arguments it is given and runs nothing, so the unpickler never imports or calls code named by the file."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state


# torch's weights_only unpickler names the first global it refuses in its error message.
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+) was not an allowed global")
_MAX_INERT_GLOBALS = 64


def load_checkpoint(path: str | os.PathLike[str], fmt: str) -> dict[str, "torch.Tensor"]:
    """``torch.load`` (CPU, ``weights_only=True``) then :func:`convert_checkpoint`; errors name the file.

    Published checkpoints carry training metadata besides the weights (MMSelfSup 1.x keeps mmengine's
    ``message_hub`` log buffers and numpy values). The weights_only unpickler refuses such classes; each
    refused global is then mapped to an inert stand-in (:class:`_Inert`) and the load retried, so the
    tensors load while no code named by the file is ever imported or run. The converted result must
    consist of tensors only, so a stand-in can never end up among the weights.
    """
    import pickle
    import struct

    import torch

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {file} not found (fetch it with `sbssl fetch-weights`)")
    inert: list[tuple[Any, str]] = []
    while True:
        try:
            with torch.serialization.safe_globals(inert):
                obj = torch.load(file, map_location="cpu", weights_only=True)
            break
        except pickle.UnpicklingError as exc:
            refused = _REFUSED_GLOBAL.search(str(exc))
            # builtins are printed bare ("getattr") but allowlisted by their full name
            name = "" if refused is None else refused.group(1)
            name = name if "." in name or not name else f"builtins.{name}"
            if not name or len(inert) >= _MAX_INERT_GLOBALS or name in {n for _, n in inert}:
                raise ValueError(
                    f"{file}: refused to unpickle (weights_only=True never runs code from a downloaded file): {exc}"
                ) from exc
            inert.append((_Inert, name))
        except (RuntimeError, EOFError, struct.error, UnicodeDecodeError) as exc:
            raise ValueError(f"{file}: not a readable PyTorch checkpoint ({exc}); delete it and fetch again") from exc
    try:
        return convert_checkpoint(obj, fmt)
    except ValueError as exc:
        raise ValueError(f"{file}: {exc}") from exc


def build_model(spec: ModelSpec, weights_path: str | os.PathLike[str] | None = None) -> "torch.nn.Module":
    """A torchvision ``resnet50`` in eval mode: seeded random init, or ``weights_path`` loaded strictly.

    Random models are torchvision's own init seeded with ``init_seed``; a classifier absent from a checkpoint
    is initialised with seed 0. Both happen inside a forked RNG, leaving the caller's global torch RNG untouched.
    Missing or unexpected keys and shape mismatches raise ValueError listing the keys by name.
    """
    import torch
    from torchvision.models import resnet50

    if spec.architecture not in ARCHITECTURES:
        raise ValueError(f"model {spec.name!r}: architecture {spec.architecture!r} is not supported")
    if spec.weights is None:
        if weights_path is not None:
            raise ValueError(f"model {spec.name!r} is randomly initialised; do not pass weights ({weights_path})")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.init_seed if spec.init_seed is not None else 0)
            return resnet50(weights=None).eval()
    if weights_path is None:
        raise ValueError(f"model {spec.name!r} needs its weights file (fetch it with `sbssl fetch-weights`)")
    state = load_checkpoint(weights_path, spec.weights.format)
    # Build without running the random init (slow, and overwritten anyway): allocate, then fill below.
    with torch.device("meta"):
        model = resnet50(weights=None)
    model = model.to_empty(device="cpu")
    expected = model.state_dict()
    optional = {k for k in expected if k.startswith("fc.") or k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(state) - optional)
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
        raise ValueError(
            f"{weights_path}: does not match torchvision resnet50 as format {spec.weights.format!r} "
            f"for model {spec.name!r}: " + "; ".join(parts)
        )
    # What the file may lack gets defined values: a seeded classifier (unused by the embeddings, but
    # reproducible) and zeroed BatchNorm counters; the checkpoint then overwrites whatever it has.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model.fc.reset_parameters()
    for name, buffer in model.named_buffers():
        if name.endswith("num_batches_tracked"):
            buffer.zero_()
    model.load_state_dict(state, strict=False)  # strictness checked above, allowing only fc/counters absent
    return model.eval()
