"""One-pass, multi-layer embedding extraction into the per-(model, layer) HDF5 cache.

Every distinct image goes through the model once: forward hooks on the requested modules capture all layers
of a batch in a single forward pass (hooks measured as lean as ``create_feature_extractor`` and need no
re-tracing), and each batch is streamed to disk, so memory stays flat whatever the number of images. The next
batch is decoded and the previous one compressed in threads while the model computes.

Measured with ``benchmarks/bench_embed.py`` on the 664 distinct iEAT images, random ResNet-50, 2 shared CPU
cores: full extraction (six flattened layers, float16, LZF) at 0.88x the images/s of bare model calls, one
forward pass per image, peak RSS 1.6 GB (of which ~0.9 GB is importing torch), 2.15 MB/image on disk.

Cache file format (team contract): ``embeddings`` (n_images, dim) float16|float32, row-chunked, LZF-compressed
(LZF measured at ~12 ms/image on a CPU against ~45 ms for gzip level 1, for 2.3 vs 2.0 MB/image at all six
flattened layers); ``sha256`` (n_images,) UTF-8; attrs model, weights_sha256, preprocessing, layer, pooling,
dtype, versions (JSON).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import cv2
import h5py
import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision import transforms
from tqdm import tqdm

import sbssl
from sbssl.io import atomic_path
from sbssl.layers import LAYERS
from sbssl.similarity import plain_attrs, read_sha256, write_sha256
from sbssl.stimuli import load_image, sha256_file

if TYPE_CHECKING:
    from sbssl.models import ModelSpec

#: Side of the square network input, pixels.
INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

POOLINGS = ("flatten", "mean")
DTYPES = {"float16": torch.float16, "float32": torch.float32}
#: Attributes that identify what a cache file holds; a cached file must match all of them to be reused.
CACHE_KEYS = ("model", "weights_sha256", "preprocessing", "layer", "pooling", "dtype")
#: Target size of one HDF5 chunk (whole rows): large enough for fast LZF, small enough for the chunk cache.
_CHUNK_BYTES = 2**20


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


#: Named preprocessing presets: RGB PIL image -> float32 tensor (3, 224, 224). The name is recorded in
#: every output file.
PREPROCESSING: dict[str, Callable[[Image.Image], torch.Tensor]] = {
    "standard": _STANDARD,
    "sbssl": _preprocess_sbssl,
}


def _preset(name: str) -> Callable[[Image.Image], torch.Tensor]:
    try:
        return PREPROCESSING[name]
    except KeyError:
        raise ValueError(f"unknown preprocessing {name!r}; choose one of {sorted(PREPROCESSING)}") from None


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


def embed_layers(
    model: torch.nn.Module | Callable[[], torch.nn.Module],
    images: Sequence[tuple[str, str | os.PathLike[str]]],
    out_paths: Mapping[str, str | os.PathLike[str]],
    *,
    attrs: Mapping[str, str],
    layers: Sequence[str] = LAYERS,
    preprocessing: str = "sbssl",
    pooling: str = "flatten",
    batch_size: int = 16,
    device: str = "auto",
    dtype: str = "float16",
    progress: bool = True,
) -> EmbeddingReport:
    """Embed images with ``model`` and write one HDF5 cache file per layer, in one forward pass per batch.

    model: the network, or a zero-argument callable that builds it (called only when some layer must be
        computed, so a full cache hit loads no weights).
    images: (sha256, path) of each distinct image, in the row order of the outputs.
    out_paths: layer -> .h5 path, one per entry of ``layers`` (module names of ``model``, e.g. ``layer1``).
    attrs: identity of the model, stored and checked on reuse; must hold ``model`` (slug) and
        ``weights_sha256`` (hex digest, or e.g. ``random-init-seed-1`` for a random model).
    pooling: ``flatten`` keeps the whole map (C*H*W values per image, 802,816 at layer1, C-major order);
        ``mean`` averages each channel over space (C values).
    dtype: stored type, ``float16`` (default) or ``float32``; the forward pass itself runs in float32.
    device: ``auto`` (CUDA when present), ``cpu``, ``cuda:0``, ... The model is moved there and set to eval.

    Cache: a layer whose file exists with the same identifying attrs (:data:`CACHE_KEYS`) and the same
    sha256 list is reused; when every layer is reused the model is not run at all. A file made for another
    image list is recomputed. A file whose attrs differ from the request raises ValueError naming the file
    and attribute. Each file is written under a temporary name and renamed when all batches are done.
    """
    start = time.perf_counter()
    for key in ("model", "weights_sha256"):
        if not attrs.get(key):
            raise ValueError(f"attrs must name {key!r} (got {dict(attrs)!r})")
    layers = tuple(layers)
    if not layers or len(set(layers)) != len(layers):
        raise ValueError(f"layers must be a non-empty list without repeats, got {list(layers)}")
    if set(out_paths) != set(layers):
        raise ValueError(f"out_paths names layers {sorted(out_paths)}, but layers are {list(layers)}")
    transform = _preset(preprocessing)
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

    wanted = {
        layer: {
            **{k: str(v) for k, v in attrs.items()},
            "preprocessing": preprocessing,
            "layer": layer,
            "pooling": pooling,
            "dtype": dtype,
        }
        for layer in layers
    }
    todo = tuple(layer for layer in layers if not _reusable(Path(out_paths[layer]), wanted[layer], hashes))
    dev = resolve_device(device)
    batches = 0
    if todo:
        batches = _extract(
            model if isinstance(model, torch.nn.Module) else model(), images, {layer: (Path(out_paths[layer]), wanted[layer]) for layer in todo},
            transform=transform, pooling=pooling, batch_size=batch_size, device=dev, dtype=dtype,
            progress=progress,
        )
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


def _reusable(path: Path, wanted: Mapping[str, str], hashes: list[str]) -> bool:
    """True when ``path`` is a valid cache for this request; False when absent or made for other images.

    Raises ValueError when the file's identifying attributes differ from the request: reusing it would
    silently mix models or settings, and overwriting it would silently discard a deliberate result.
    """
    if not path.exists():
        return False
    try:
        with h5py.File(path, "r") as f:
            stored = plain_attrs(f.attrs)
            cached_hashes = read_sha256(f) if "sha256" in f else None
            rows = f["embeddings"].shape[0] if "embeddings" in f else None
    except OSError as exc:
        raise ValueError(f"{path}: not a readable HDF5 embeddings file ({exc}); delete it to recompute") from None
    for key in CACHE_KEYS:
        if str(stored.get(key)) != wanted[key]:
            raise ValueError(
                f"{path}: cached embeddings have {key}={stored.get(key)!r} but this run asks for "
                f"{key}={wanted[key]!r}; delete the file (or its folder) to recompute, or change the config "
                "to match"
            )
    if cached_hashes is None or rows is None:
        raise ValueError(f"{path}: embeddings file lacks the 'embeddings'/'sha256' datasets; delete it to recompute")
    return cached_hashes == hashes and rows == len(hashes)


def _extract(
    model: torch.nn.Module,
    images: Sequence[tuple[str, str | os.PathLike[str]]],
    outputs: Mapping[str, tuple[Path, Mapping[str, str]]],
    *,
    transform: Callable[[Image.Image], torch.Tensor],
    pooling: str,
    batch_size: int,
    device: torch.device,
    dtype: str,
    progress: bool,
) -> int:
    """Run the forward passes and stream every captured layer into its file; return the number of batches."""
    modules = dict(model.named_modules())
    unknown = [layer for layer in outputs if layer not in modules]
    if unknown:
        raise ValueError(f"model has no module(s) {unknown}; known top-level modules: {list(dict(model.named_children()))}")
    model.eval().to(device)
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(_module, _inputs, output):
            captured[name] = output

        return hook

    torch_dtype = DTYPES[dtype]
    n = len(images)
    model_name = next(iter(outputs.values()))[1]["model"]
    versions = json.dumps(library_versions(), sort_keys=True)
    batches = [images[b0 : b0 + batch_size] for b0 in range(0, n, batch_size)]

    def load(chunk: Sequence[tuple[str, str | os.PathLike[str]]]) -> torch.Tensor:
        return torch.stack([transform(_load_checked(sha, path)) for sha, path in chunk])

    def write(b0: int, rows: Mapping[str, np.ndarray]) -> None:
        for layer, values in rows.items():
            if layer not in datasets:
                datasets[layer] = _create_embeddings(files[layer], n, values.shape[1], values.dtype)
            datasets[layer][b0 : b0 + len(values)] = values

    with contextlib.ExitStack() as stack:
        for layer in outputs:
            stack.enter_context(modules[layer].register_forward_hook(keep(layer)))
        files: dict[str, h5py.File] = {}
        datasets: dict[str, h5py.Dataset] = {}
        for layer, (path, wanted) in outputs.items():
            tmp = stack.enter_context(atomic_path(path))
            # A chunk cache larger than one chunk lets small rows (mean pooling) fill chunks across batches.
            files[layer] = stack.enter_context(h5py.File(tmp, "w", rdcc_nbytes=4 * _CHUNK_BYTES))
            files[layer].attrs.update({**wanted, "versions": versions})
            write_sha256(files[layer], [sha for sha, _ in images])
        bar = stack.enter_context(tqdm(total=n, unit="img", desc=f"embed {model_name}", disable=not progress))
        # Decoding the next batch and compressing the previous one run in threads while the model computes
        # (PIL, OpenCV, torch and LZF release the GIL); at most one batch waits in each, so memory stays flat.
        loader = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="sbssl-load"))
        writer = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="sbssl-write"))
        next_batch = loader.submit(load, batches[0])
        written = None
        with torch.inference_mode():
            for k, chunk in enumerate(batches):
                batch = next_batch.result()
                if k + 1 < len(batches):
                    next_batch = loader.submit(load, batches[k + 1])
                captured.clear()
                model(batch.to(device))
                rows = {}
                for layer in outputs:
                    out = captured[layer]
                    out = out.flatten(1) if pooling == "flatten" or out.ndim < 3 else out.mean(dim=tuple(range(2, out.ndim)))
                    values = out.to(torch_dtype)
                    # A row sum is non-finite exactly when the row holds inf/nan (float32 sums cannot overflow
                    # from float16 values), and it is far cheaper than an element-wise check.
                    if not bool(torch.isfinite(values.sum(dim=1, dtype=torch.float32)).all()):
                        raise ValueError(
                            f"non-finite {layer} embeddings for images {[sha for sha, _ in chunk]} (model "
                            f"{model_name}, dtype {dtype}); use dtype float32 if float16 overflowed"
                        )
                    rows[layer] = values.cpu().numpy()
                captured.clear()
                if written is not None:
                    written.result()
                written = writer.submit(write, k * batch_size, rows)
                bar.update(len(chunk))
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


def _create_embeddings(f: h5py.File, n: int, dim: int, dtype: np.dtype) -> h5py.Dataset:
    rows_per_chunk = max(1, min(n, _CHUNK_BYTES // (dim * dtype.itemsize)))
    return f.create_dataset(
        "embeddings", shape=(n, dim), dtype=dtype, chunks=(rows_per_chunk, dim), compression="lzf"
    )



def embedding_attrs(spec: ModelSpec, weights_path: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """The model identity stored in (and checked against) cache files: ``model`` (zoo slug) and
    ``weights_sha256`` (hex digest of the weights file, or ``random-init-seed-<seed>`` for a random model)."""
    if spec.weights is None:
        return {"model": spec.name, "weights_sha256": f"random-init-seed-{spec.init_seed}"}
    if weights_path is None:
        raise ValueError(f"model {spec.name!r} needs its weights file (fetch it with `sbssl fetch-weights`)")
    return {"model": spec.name, "weights_sha256": sha256_file(weights_path)}


def embed_model(
    spec: ModelSpec,
    weights_path: str | os.PathLike[str] | None,
    manifest_path: str | os.PathLike[str],
    stimuli_root: str | os.PathLike[str],
    out_paths: Mapping[str, str | os.PathLike[str]],
    **options,
) -> EmbeddingReport:
    """Embed the distinct images of a stimuli manifest with a zoo model: :func:`embed_layers` on
    ``sbssl.stimuli.distinct_images`` (paths resolved under ``stimuli_root``), the model built with
    ``sbssl.models.build_model`` only when something must be computed. ``options`` go to :func:`embed_layers`
    (layers, preprocessing, pooling, batch_size, device, dtype, progress)."""
    from sbssl.models import build_model
    from sbssl.stimuli import distinct_images, read_manifest

    root = Path(stimuli_root)
    images = [(row.sha256, root / row.path) for row in distinct_images(read_manifest(manifest_path)).itertuples()]
    return embed_layers(
        lambda: build_model(spec, weights_path), images, out_paths, attrs=embedding_attrs(spec, weights_path),
        **options,
    )
