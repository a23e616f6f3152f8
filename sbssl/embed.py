"""One-pass, multi-layer embedding extraction into the per-(model, layer) HDF5 cache.

Every distinct image goes through the model once: forward hooks on the requested modules capture all layers
of a batch in a single forward pass (no re-tracing, unlike ``create_feature_extractor``), and each batch is
streamed to disk, so memory stays flat whatever the number of images. The next batch is decoded and the
previous one compressed in threads while the model computes. Each hook pools/flattens and copies its module's
output at once: a module's output may be modified in place later in the forward pass (the residual add and
ReLU after ``layer1.0.bn3``), and the full map is freed as soon as the forward moves on.

Memory is bounded by the model's parameters, one batch of activations and the pooled rows of a few batches
(being computed, copied and written while the next is decoded): a full map is reduced and
copied in its hook and freed as the forward pass moves on, and rows go to disk batch by batch. A ViT-L/14 at
224 px (257 x 1024 floats per image and layer, six layers, flatten) peaks at 2.6 GB RSS with batches of 16 on
the CPU: 0.8 GB for Python, torch and the libraries, 1.2 GB of float32 weights, the rest one batch
(``benchmarks/bench_backbones.py``); smaller batches lower only the last part.

Embeddings are stored as float32 by default. float16 (opt-in) halves the disk space but is not neutral: it
moves permutation p-values and effect sizes (``benchmarks/bench_precision.py`` measures by how much).

The file format is that of :mod:`sbssl.storage`. A cache file is reused only when it is readable, was
written by the current code (``code_digest`` of :func:`sbssl.provenance.provenance` for the embed stage) and
matches the request (:data:`CACHE_KEYS` and the image list); an unreadable file or one from other code is
recomputed.

The pixel-permutation control (paper section 4.2: "we randomly permute the pixels of the target images") is
the ``permute`` option of :func:`embed_layers`: the spatial positions of the network INPUT tensor (3, 224,
224), after preprocessing, are shuffled, all three channels moved together. Permuting the image file at its
source resolution instead would let the preprocessing's resizing average neighbouring shuffled pixels, so
what the network sees would depend on each file's size (a 32 px CIFAR image is upscaled 7x into blocks of a
shuffled pixel, a 600 px photo is averaged into near-uniform noise); on the input tensor every image keeps
exactly its 224 x 224 colour multiset, whatever its source size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import cv2
import h5py
import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision import transforms
from tqdm import tqdm

import sbssl
from sbssl.backbones import MODEL_PREPROCESSING, Backbone, hook_tensor, pool_output
from sbssl.io import atomic_path
from sbssl.layers import LAYERS
from sbssl.models import POOLINGS
from sbssl.provenance import provenance
from sbssl.storage import create_embeddings, read_embeddings_header, write_sha256
from sbssl.stimuli import load_image, sha256_file

if TYPE_CHECKING:
    from sbssl.models import ModelDefinition, ModelSpec

#: Side of the square network input, pixels.
INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DTYPES = {"float16": torch.float16, "float32": torch.float32}
#: Attributes that identify what a cache file holds; a cached file must match all of them to be reused.
#: Every key of the caller's ``attrs`` (e.g. ``architecture``) identifies the file too.
CACHE_KEYS = ("model", "weights_sha256", "preprocessing", "layer", "module", "pooling", "dtype", "permute")
#: HDF5 chunk cache of an output file: larger than one chunk, so small rows (mean pooling) fill chunks
#: across batches.
_CHUNK_CACHE_BYTES = 2**22

_log = logging.getLogger(__name__)


#: torchvision's ImageNet evaluation transform: short side resized to 256 (bilinear, antialiased), centre
#: crop 224, scaled to [0, 1], normalised with the ImageNet mean/std.
_STANDARD = transforms.Compose(
    [
        transforms.Resize(256, interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
        transforms.CenterCrop(INPUT_SIZE),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]
)


def _preprocess_sbssl(image: Image.Image) -> torch.Tensor:
    """The SB-SSL/iEAT preprocessing (iEAT ``utils.resize``): the top-left square of side min(width, height),
    resized to 224x224 with OpenCV's INTER_AREA (area averaging down, area-weighted blending up; a 32 px
    CIFAR image becomes 7x7 pixel blocks), kept as uint8, then scaled to [0, 1]; no normalisation.

    OpenCV itself is used because Pillow has no equivalent: its BOX filter weighs whole pixels, and on the
    iEAT stimuli it differs from INTER_AREA by up to 188 grey levels.
    """
    pixels = np.asarray(image)
    side = min(pixels.shape[:2])
    square = np.ascontiguousarray(pixels[:side, :side])
    resized = cv2.resize(square, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_AREA)
    # In numpy: the same float32 values as torch's permute().float().div(), ~50x faster on a busy CPU.
    return torch.from_numpy(resized.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0))


#: Named image preprocessing presets: RGB PIL image -> float32 tensor (3, 224, 224). The name is recorded in
#: every output file. The presets that need the model (its library's transform, iEAT's iGPT tokens) are
#: sbssl.backbones.MODEL_PREPROCESSING, given by the built :class:`sbssl.backbones.Backbone`.
PREPROCESSING: dict[str, Callable[[Image.Image], torch.Tensor]] = {
    "standard": _STANDARD,
    "sbssl": _preprocess_sbssl,
}


def _check_preset(name: str) -> None:
    if name not in PREPROCESSING and name not in MODEL_PREPROCESSING:
        known = sorted([*PREPROCESSING, *MODEL_PREPROCESSING])
        raise ValueError(f"unknown preprocessing {name!r}; choose one of {known}")


def _transform(name: str, built: torch.nn.Module | Backbone) -> Callable[[Image.Image], torch.Tensor]:
    """The preset ``name``: an image preset, or the transform the built backbone carries for a model preset."""
    if name in PREPROCESSING:
        return PREPROCESSING[name]
    if not isinstance(built, Backbone) or built.transform is None:
        raise ValueError(
            f"preprocessing {name!r} is the model's own: pass a sbssl.backbones.Backbone built with it "
            "(build_backbone(..., preprocessing=...)), not a bare module"
        )
    return built.transform


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else is passed to :class:`torch.device`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def library_versions() -> dict[str, str]:
    """Versions of the libraries that determine the embedding values (stored as the ``versions`` attr)."""
    import PIL

    return {
        "sbssl": sbssl.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "h5py": h5py.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "opencv": cv2.__version__,
    }


@dataclass(frozen=True)
class EmbeddingReport:
    """What one :func:`embed_layers` call did.

    n_images: distinct images requested. forward_passes: images actually pushed through the model (0 when
    every layer came from the cache). batches: forward calls made (one per batch, all layers at once).
    seconds: wall time of the call. computed_layers / reused_layers: which outputs were (re)written and which
    were valid cache hits. bytes_on_disk: file size per requested layer after the call.
    """

    model: str
    n_images: int
    forward_passes: int
    batches: int
    seconds: float
    device: str
    computed_layers: tuple[str, ...]
    reused_layers: tuple[str, ...]
    bytes_on_disk: dict[str, int] = field(default_factory=dict)

    @property
    def cached(self) -> bool:
        """True when nothing was computed (all layers reused)."""
        return not self.computed_layers


def permutation_id(permute: Mapping[str, int] | None) -> str:
    """The ``permute`` attribute of a request: ``none``, or ``input-pixels sha256:<hex>`` where the digest
    covers the sorted (image sha256, seed) pairs, so a different image set or seed is a different cache."""
    if not permute:
        return "none"
    text = "".join(f"{sha} {seed}\n" for sha, seed in sorted(permute.items()))
    return f"input-pixels sha256:{hashlib.sha256(text.encode()).hexdigest()}"


def permute_positions(image: torch.Tensor, sha256: str, seed: int) -> torch.Tensor:
    """Shuffle the H*W spatial positions of one network input ``image`` (C, H, W), all C channels moved
    together, so every channel keeps its multiset of values; returns a new tensor.

    The permutation is numpy's ``default_rng([seed, int(sha256, 16)]).permutation(H * W)``: it depends on
    the image and the seed only, not on batching or the order of the images.
    """
    channels, height, width = image.shape
    order = torch.from_numpy(np.random.default_rng([seed, int(sha256, 16)]).permutation(height * width))
    return image.reshape(channels, height * width)[:, order].reshape(channels, height, width)


def _check_permute(permute: Mapping[str, int] | None, hashes: Sequence[str]) -> dict[str, int]:
    if not permute:
        return {}
    unknown = sorted(set(permute) - set(hashes))
    if unknown:
        raise ValueError(
            f"permute names {len(unknown)} image(s) that are not among the images to embed (first: {unknown[0]}); "
            "build it from the same manifest"
        )
    bad = {sha: seed for sha, seed in permute.items() if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0}
    if bad:
        sha, seed = next(iter(bad.items()))
        raise ValueError(f"permute seeds must be non-negative integers; image {sha} has {seed!r}")
    return {sha: int(seed) for sha, seed in permute.items()}


def embed_layers(
    model: torch.nn.Module | Backbone | Callable[[], torch.nn.Module | Backbone],
    images: Sequence[tuple[str, str | os.PathLike[str]]],
    out_paths: Mapping[str, str | os.PathLike[str]],
    *,
    attrs: Mapping[str, Any],
    layers: Sequence[str] | Mapping[str, str] = LAYERS,
    preprocessing: str = "sbssl",
    pooling: str = "flatten",
    batch_size: int = 16,
    device: str = "auto",
    dtype: str = "float32",
    permute: Mapping[str, int] | None = None,
    progress: bool = True,
) -> EmbeddingReport:
    """Embed images with ``model`` and write one HDF5 cache file per layer, in one forward pass per batch.

    model: the network, a :class:`sbssl.backbones.Backbone` (network + the transform of a model preset), or a
        zero-argument callable that builds either (called only when some layer must be computed, so a full
        cache hit loads no weights).
    images: (sha256, path) of each distinct image, in the row order of the outputs.
    out_paths: layer -> .h5 path, one per entry of ``layers``.
    layers: slug -> module path of ``model`` (e.g. ``{"block6": "blocks.5"}``), or a sequence of module paths
        that are their own slugs (``layer1``, ``layer1.0.bn3``). Stored as the ``layer`` (slug) and ``module``
        attributes.
    preprocessing: an image preset of :data:`PREPROCESSING`, or ``model`` / ``igpt``
        (sbssl.backbones.MODEL_PREPROCESSING), which need ``model`` to be (or build) a Backbone carrying it.
    attrs: identity of the model, stored (as str) and checked on reuse (every key); must hold ``model`` (slug)
        and ``weights_sha256`` (hex digest, or e.g. ``random-init-seed-1`` for a random model).
    pooling: ``flatten`` keeps the whole map (C*H*W values per image, 802,816 at layer1, C-major order);
        ``mean`` averages each channel over space (C values); ``cls``, ``tokens_mean``, ``patch_mean`` reduce
        a (B, T, C) token map (:func:`sbssl.backbones.pool_output`). Hooked outputs that are tuples or
        ModelOutputs give their hidden-states tensor (:func:`sbssl.backbones.hook_tensor`).
    dtype: stored type, ``float32`` (default) or ``float16`` (half the disk, but it shifts p-values; see the
        module docstring); the forward pass itself runs in full float32 (no TF32 on CUDA).
    permute: image sha256 -> seed: these images' network inputs get their spatial positions shuffled
        (:func:`permute_positions`, the pixel-permutation control); the others are embedded as usual. Stored
        as the ``permute`` attribute (:func:`permutation_id`) and the count ``permuted_images``.
    device: ``auto`` (CUDA when present), ``cpu``, ``cuda:0``, ... The model is moved there and set to eval.

    Cache: a layer whose file is readable, was written by the current embedding code and has the same
    identifying attrs (:data:`CACHE_KEYS` and the keys of ``attrs``) and the same sha256 list is reused; when every layer is reused the
    model is not run at all. An unreadable file (truncated, corrupt), one written by other code and one made
    for another image list are recomputed. A file of the current code whose attrs differ from the request
    raises ValueError naming the file and attribute. Each file is written under a temporary name and renamed
    when all batches are done.
    """
    start = time.perf_counter()
    for key in ("model", "weights_sha256"):
        if not attrs.get(key):
            raise ValueError(f"attrs must name {key!r} (got {dict(attrs)!r})")
    modules = dict(layers) if isinstance(layers, Mapping) else {layer: layer for layer in layers}
    layers = tuple(layers)
    if not layers or len(set(layers)) != len(layers):
        raise ValueError(f"layers must be a non-empty list without repeats, got {list(layers)}")
    if set(out_paths) != set(layers):
        raise ValueError(f"out_paths names layers {sorted(out_paths)}, but layers are {list(layers)}")
    _check_preset(preprocessing)
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {list(POOLINGS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    hashes = [str(sha) for sha, _ in images]
    if not hashes:
        raise ValueError("no images to embed")
    if len(set(hashes)) != len(hashes):
        dup = next(sha for sha in hashes if hashes.count(sha) > 1)
        raise ValueError(f"image {dup} is listed more than once; embed distinct images (one row per sha256)")
    permute = _check_permute(permute, hashes)

    wanted = {
        layer: {
            **{k: str(v) for k, v in attrs.items()},
            "preprocessing": preprocessing,
            "layer": layer,
            "module": modules[layer],
            "pooling": pooling,
            "dtype": dtype,
            "permute": permutation_id(permute),
            "permuted_images": len(permute),
            **provenance("embed"),
        }
        for layer in layers
    }
    identity = (*CACHE_KEYS, *(key for key in attrs if key not in CACHE_KEYS))
    todo = tuple(
        layer for layer in layers if not _reusable(Path(out_paths[layer]), wanted[layer], identity, hashes)
    )
    dev = resolve_device(device)
    batches = 0
    if todo:
        built = model if isinstance(model, (torch.nn.Module, Backbone)) else model()
        network = built.module if isinstance(built, Backbone) else built
        batches = _extract(
            network, images, {layer: (Path(out_paths[layer]), wanted[layer]) for layer in todo},
            transform=_transform(preprocessing, built), pooling=pooling, batch_size=batch_size, device=dev,
            dtype=dtype, permute=permute, progress=progress,
        )  # fmt: skip
    return EmbeddingReport(
        model=str(attrs["model"]),
        n_images=len(hashes),
        forward_passes=len(hashes) if todo else 0,
        batches=batches,
        seconds=time.perf_counter() - start,
        device=str(dev),
        computed_layers=todo,
        reused_layers=tuple(layer for layer in layers if layer not in todo),
        bytes_on_disk={layer: Path(out_paths[layer]).stat().st_size for layer in layers},
    )


def _reusable(path: Path, wanted: Mapping[str, Any], identity: Sequence[str], hashes: list[str]) -> bool:
    """True when ``path`` is a valid cache for this request; False when absent, unreadable, written by other
    code or made for other images (all recomputed).

    Raises ValueError when a file of the current code has identifying attributes that differ from the request:
    reusing it would silently mix models or settings, and overwriting it would silently discard a deliberate
    result.
    """
    if not path.exists():
        return False
    try:
        header = read_embeddings_header(path)
    except ValueError as exc:
        _log.warning("recomputing %s: %s", path, exc)
        return False
    stored = header.attrs
    if stored.get("code_digest") != wanted["code_digest"]:
        _log.warning(
            "recomputing %s: written by other code (code_digest %s, current %s)",
            path, stored.get("code_digest"), wanted["code_digest"],
        )  # fmt: skip
        return False
    for key in identity:
        if str(stored.get(key)) != wanted[key]:
            raise ValueError(
                f"{path}: cached embeddings have {key}={stored.get(key)!r} but this run asks for "
                f"{key}={wanted[key]!r}; delete the file (or its folder) to recompute, or change the config "
                "to match"
            )
    return header.sha256 == hashes


@contextlib.contextmanager
def _full_float32() -> Iterator[None]:
    """Full float32 arithmetic on CUDA while inside: PyTorch lets cuDNN convolutions use TF32 by default on
    Ampere and later GPUs (a 10-bit mantissa, as coarse as float16 storage), so a GPU would otherwise compute
    other embeddings than a CPU. The global flags are restored on exit."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _extract(
    model: torch.nn.Module,
    images: Sequence[tuple[str, str | os.PathLike[str]]],
    outputs: Mapping[str, tuple[Path, Mapping[str, Any]]],
    *,
    transform: Callable[[Image.Image], torch.Tensor],
    pooling: str,
    batch_size: int,
    device: torch.device,
    dtype: str,
    permute: Mapping[str, int],
    progress: bool,
) -> int:
    """Run the forward passes and stream every captured layer into its file; return the number of batches.
    Each output's attrs name its ``module``."""
    modules = dict(model.named_modules())
    unknown = [wanted["module"] for _, wanted in outputs.values() if wanted["module"] not in modules]
    if unknown:
        raise ValueError(f"model has no module(s) {unknown}; known top-level modules: {list(dict(model.named_children()))}")
    model.eval().to(device)
    torch_dtype = DTYPES[dtype]
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(_module, _inputs, output):
            # Reduce and copy now: later in-place operations of the forward pass (e.g. ``out += identity``
            # after ``layer1.0.bn3``) would otherwise change what is stored, and the full map can be freed.
            captured[name] = pool_output(hook_tensor(output), pooling, name).to(torch_dtype, copy=True)

        return hook

    n = len(images)
    model_name = next(iter(outputs.values()))[1]["model"]
    versions = json.dumps(library_versions(), sort_keys=True)
    batches = [images[b0 : b0 + batch_size] for b0 in range(0, n, batch_size)]

    def prepare(sha: str, path: str | os.PathLike[str]) -> torch.Tensor:
        tensor = transform(_load_checked(sha, path))
        if sha not in permute:
            return tensor
        if tensor.ndim != 3 or not tensor.is_floating_point():
            raise ValueError(f"the pixel-permutation control needs (C, H, W) image inputs, not {tuple(tensor.shape)} "
                             f"{tensor.dtype} (model {model_name})")  # fmt: skip
        return permute_positions(tensor, sha, permute[sha])

    cuda = device.type == "cuda"

    def load(chunk: Sequence[tuple[str, str | os.PathLike[str]]]) -> torch.Tensor:
        batch = torch.stack([prepare(sha, path) for sha, path in chunk])
        # Page-locked memory: the copy to the GPU then runs asynchronously (non_blocking below).
        return batch.pin_memory() if cuda else batch

    def write(b0: int, rows: Mapping[str, np.ndarray]) -> None:
        for layer, values in rows.items():
            if layer not in datasets:
                datasets[layer] = create_embeddings(files[layer], n, values.shape[1], values.dtype)
            datasets[layer][b0 : b0 + len(values)] = values

    with contextlib.ExitStack() as stack:
        for layer, (_, wanted) in outputs.items():
            stack.enter_context(modules[wanted["module"]].register_forward_hook(keep(layer)))
        files: dict[str, h5py.File] = {}
        datasets: dict[str, h5py.Dataset] = {}
        for layer, (path, wanted) in outputs.items():
            tmp = stack.enter_context(atomic_path(path))
            files[layer] = stack.enter_context(h5py.File(tmp, "w", rdcc_nbytes=_CHUNK_CACHE_BYTES))
            files[layer].attrs.update({**wanted, "versions": versions})
            write_sha256(files[layer], [sha for sha, _ in images])
        bar = stack.enter_context(tqdm(total=n, unit="img", desc=f"embed {model_name}", disable=not progress))
        # Decoding the next batch and compressing the previous one run in threads while the model computes
        # (PIL, OpenCV, torch and h5py's writes release the GIL); at most one batch waits in each, so memory stays flat.
        loader = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="sbssl-load"))
        writer = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="sbssl-write"))
        # On CUDA the captured layers go to the host on a stream of their own, into two alternating sets of
        # page-locked buffers, while the GPU computes the next batch; the batch is checked and handed to the
        # writer once its copy is done. On the CPU the layers are host tensors already.
        copier = torch.cuda.Stream(device) if cuda else None
        host: list[dict[str, torch.Tensor]] = [{}, {}]
        flags: list[torch.Tensor] = [torch.empty(len(outputs), dtype=torch.bool, pin_memory=True) for _ in host] if cuda else []

        def start_copy(k: int, chunk: Sequence[tuple[str, Any]]) -> tuple:
            values = dict(captured)
            captured.clear()
            # A row sum is non-finite exactly when the row holds inf/nan (float32 sums cannot overflow from
            # float16 values), and it is far cheaper than an element-wise check.
            finite = torch.stack([torch.isfinite(v.sum(dim=1, dtype=torch.float32)).all() for v in values.values()])
            if not cuda:
                return k, chunk, values, finite, None
            slot = host[k % 2]
            copier.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(copier):
                for layer, v in values.items():
                    if layer not in slot:
                        slot[layer] = torch.empty((batch_size, v.shape[1]), dtype=v.dtype, pin_memory=True)
                    slot[layer][: len(v)].copy_(v, non_blocking=True)
                flags[k % 2].copy_(finite, non_blocking=True)
                done = torch.cuda.Event()
                done.record(copier)
            return k, chunk, values, flags[k % 2], done  # values stay referenced until the copy is done

        def finish(k: int, chunk: Sequence[tuple[str, Any]], values: dict, finite: torch.Tensor, done: Any):
            if done is not None:
                done.synchronize()
            for layer, ok in zip(values, finite.tolist()):
                if not ok:
                    raise ValueError(
                        f"non-finite {layer} embeddings for images {[sha for sha, _ in chunk]} (model "
                        f"{model_name}, dtype {dtype}); use dtype float32 if float16 overflowed"
                    )
            rows = {layer: (host[k % 2][layer][: len(v)] if cuda else v).numpy() for layer, v in values.items()}
            return writer.submit(write, k * batch_size, rows)

        next_batch = loader.submit(load, batches[0])
        written = pending = None
        with torch.inference_mode(), _full_float32():
            for k, chunk in enumerate(batches):
                batch = next_batch.result()
                if k + 1 < len(batches):
                    next_batch = loader.submit(load, batches[k + 1])
                captured.clear()
                model(batch.to(device, non_blocking=True))
                if written is not None:
                    written.result()  # CUDA: the write of batch k - 2 is done, so its host buffers are free
                current = start_copy(k, chunk)
                if cuda:  # the previous batch is finished while this one computes
                    if pending is not None:
                        written = finish(*pending)
                    pending = current
                else:
                    written = finish(*current)
                bar.update(len(chunk))
            if pending is not None:
                if written is not None:
                    written.result()
                written = finish(*pending)
        written.result()
    return len(batches)


def _load_checked(sha256: str, path: str | os.PathLike[str]) -> Image.Image:
    """Decode an image after checking its bytes still have the manifest's hash (a stale manifest would
    otherwise store one image's embedding under another's hash)."""
    actual = sha256_file(path)
    if actual != sha256:
        raise ValueError(
            f"{path}: file content changed since the manifest was made (sha256 {actual}, manifest says "
            f"{sha256}); rebuild the stimuli manifest"
        )
    return load_image(path)


def embedding_attrs(
    model: ModelDefinition,
    weights_path: str | os.PathLike[str] | None = None,
    *,
    lock_path: str | os.PathLike[str] | None = None,
) -> dict[str, str]:
    """The model identity stored in (and checked against) cache files: ``model`` (zoo slug), ``source``,
    ``architecture`` and ``weights_sha256`` (full hex digest of the weights file or folder, or
    ``random-init-seed-<seed>`` for a random model).

    model: a :class:`sbssl.models.ModelDefinition`. A weights file is checked with
    :func:`sbssl.models.verify_weights` against the zoo's digests and the weights lock ``lock_path`` (required
    for a pretrained model), which gives its sha256.
    """
    base = {"model": model.name, "source": model.source, "architecture": model.architecture}
    if model.weights is None:
        if weights_path is not None:
            raise ValueError(f"model {model.name!r} is randomly initialised; do not pass weights ({weights_path})")
        return {**base, "weights_sha256": f"random-init-seed-{model.init_seed}"}
    if weights_path is None:
        raise ValueError(f"model {model.name!r} needs its weights file (fetch it with `sbssl fetch-weights`)")
    if lock_path is None:
        raise ValueError(f"model {model.name!r}: give the weights lock (config key weights_lock) to verify {weights_path}")
    from sbssl.models import verify_weights

    return {**base, "weights_sha256": verify_weights(model, weights_path, lock_path)}


def embed_model(
    model: ModelSpec | ModelDefinition,
    weights_path: str | os.PathLike[str] | None,
    manifest_path: str | os.PathLike[str],
    stimuli_root: str | os.PathLike[str],
    out_paths: Mapping[str, str | os.PathLike[str]],
    *,
    lock_path: str | os.PathLike[str] | None = None,
    layers: Sequence[str] | None = None,
    pooling: str | None = None,
    preprocessing: str | None = None,
    **options: Any,
) -> EmbeddingReport:
    """Embed the distinct images of a stimuli manifest with a zoo model: :func:`embed_layers` on
    ``sbssl.stimuli.distinct_images`` (paths resolved under ``stimuli_root``), the weights verified first
    (:func:`embedding_attrs`, with ``lock_path``), the model built with :func:`sbssl.backbones.build_backbone`
    only when something must be computed.

    out_paths: layer slug -> .h5 path, for some or all of the model's layers (:func:`sbssl.layers.model_layers`;
        each slug is hooked at its module path). layers: the same slugs (optional; checked against out_paths).
    pooling, preprocessing: None (the default) = the zoo entry's, else the architecture's default
        (:func:`sbssl.backbones.embedding_settings`); a value overrides both for this call.
    ``options`` go to :func:`embed_layers` (batch_size, device, dtype, permute, progress)."""
    from sbssl.backbones import build_backbone, embedding_settings
    from sbssl.layers import model_layers
    from sbssl.models import ModelSpec
    from sbssl.stimuli import distinct_images, read_manifest

    definition = model.definition if isinstance(model, ModelSpec) else model
    folder = Path(weights_path) if weights_path is not None and Path(weights_path).is_dir() else None
    known = {layer.slug: layer.module for layer in model_layers(model, folder)}
    slugs = list(out_paths) if layers is None else list(layers)
    unknown = [slug for slug in slugs if slug not in known]
    if unknown:
        raise ValueError(f"model {definition.name!r} has no layer(s) {unknown}; its layers: {list(known)}")
    default_pooling, default_preprocessing = embedding_settings(definition, folder)
    pooling = pooling or default_pooling
    preprocessing = preprocessing or default_preprocessing
    root = Path(stimuli_root)
    images = [(row.sha256, root / row.path) for row in distinct_images(read_manifest(manifest_path)).itertuples()]
    attrs = embedding_attrs(definition, weights_path, lock_path=lock_path)
    return embed_layers(
        lambda: build_backbone(definition, weights_path, preprocessing=preprocessing), images, out_paths, attrs=attrs,
        layers={slug: known[slug] for slug in slugs}, pooling=pooling, preprocessing=preprocessing, **options,
    )  # fmt: skip
