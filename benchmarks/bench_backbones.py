"""Benchmark the embedding stage on a Vision Transformer: bare forward pass vs the full extraction of its
default layers into HDF5, and the job's peak memory.

:func:`vit_extraction_vs_bare` runs in a child process (its peak RSS is the child's ru_maxrss from wait4) and
prints, for one zoo-style model (default: a timm ViT-L/14 at 224 px, 257 tokens x 1024 channels per layer,
pooling ``flatten``, the worst case for memory and disk):
- images/s of the bare forward pass (model calls only, on batches preprocessed beforehand),
- images/s of the full extraction (decode + the model's own transform + one forward per batch + every default
  layer + LZ4 HDF5), and their ratio (target >= 0.85),
- peak RSS of the job (target <= 3 GB) and bytes on disk per image.

Weights: ``--weights file`` (default) saves the random model as a safetensors file first and builds the model
the way a pretrained checkpoint is built (meta device, the file's tensors become the parameters);
``--weights random`` builds it with its seeded init.

    .venv/bin/python benchmarks/bench_backbones.py --limit 16
    .venv/bin/python benchmarks/bench_backbones.py --source open_clip --architecture ViT-L-14 --limit 16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from child_process import bare_forward_seconds, run_child  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _write_images(root: Path, n: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = rng.integers(150, 640, size=2)
        folder = root / "generated" / f"concept{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")


def vit_extraction_vs_bare(config: dict) -> dict:
    """One measurement (run in a child process): bare forward vs full extraction of ``config["source"]``
    ``config["architecture"]`` on the images of ``config["manifest"]``; returns the figures as a dict."""
    import torch

    from sbssl.backbones import build_backbone, embedding_settings
    from sbssl.embed import embed_layers, resolve_device
    from sbssl.layers import model_layers
    from sbssl.models import ModelDefinition, WeightsSpec
    from sbssl.stimuli import distinct_images, load_image, read_manifest

    torch.set_num_threads(config["threads"])
    device = resolve_device(config["device"])
    work = Path(config["work"])
    definition = ModelDefinition("bench_vit", config["architecture"], None, 0, source=config["source"],
                                 pooling=config["pooling"])  # fmt: skip
    weights = None
    if config["weights"] == "file":  # written by the "prepare" child, so its memory is not counted here
        weights = work / "weights.safetensors"
        fmt = {"timm": "timm", "open_clip": "open_clip", "torchvision": "torchvision"}[config["source"]]
        definition = ModelDefinition("bench_vit", config["architecture"], WeightsSpec(weights.as_uri(), fmt), None,
                                     source=config["source"], pooling=config["pooling"])  # fmt: skip
    t0 = time.perf_counter()
    pooling, preprocessing = embedding_settings(definition)
    backbone = build_backbone(definition, weights, preprocessing=preprocessing)
    build_s = time.perf_counter() - t0
    model = backbone.module.to(device)
    layers = {layer.slug: layer.module for layer in model_layers(definition)}
    rows = distinct_images(read_manifest(config["manifest"]))
    images = [(sha, Path(config["root"]) / path) for sha, path in zip(rows["sha256"], rows["path"])]
    size = config["batch_size"]
    attrs = {"model": "bench_vit", "weights_sha256": "bench"}
    example = backbone.transform(load_image(images[0][1]))
    with torch.inference_mode():  # warm-up, timed in neither figure
        model(example[None].expand(size, *example.shape).to(device))

    def bare(group: list) -> float:
        return bare_forward_seconds(model, group, backbone.transform, size, device)

    def full(group: list, folder: Path):
        paths = {slug: folder / f"{slug}.h5" for slug in layers}
        return embed_layers(backbone, group, paths, attrs=attrs, layers=layers, preprocessing=preprocessing,
                            pooling=pooling, batch_size=size, device=str(device), progress=False)  # fmt: skip

    # bare and full alternate every few batches, so other load on a shared machine hits both alike
    step = size * config["group_batches"]
    bare_s = full_s = 0.0
    disk = 0
    for g0 in range(0, len(images), step):
        group = images[g0 : g0 + step]
        bare_s += bare(group)
        report = full(group, work / f"run{g0}")
        full_s += report.seconds
        disk += sum(report.bytes_on_disk.values())
        for path in (work / f"run{g0}").iterdir():
            path.unlink()
    return {"n": len(images), "bare_s": bare_s, "full_s": full_s, "build_s": build_s, "bytes": disk,
            "layers": layers, "pooling": pooling, "preprocessing": preprocessing, "device": str(device),
            "shape": list(example.shape)}  # fmt: skip


def _prepare(config: dict) -> dict:
    """Save the seeded random model as a safetensors checkpoint in the library's key layout (own child)."""
    from safetensors.torch import save_file

    from sbssl.backbones import build_backbone
    from sbssl.models import ModelDefinition

    definition = ModelDefinition("bench_vit", config["architecture"], None, 0, source=config["source"])
    state = build_backbone(definition).module.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, Path(config["work"]) / "weights.safetensors")
    return {"tensors": len(state)}


def _run_child(mode: str, config_path: Path) -> tuple[dict, float]:
    """Run ``mode`` of this script in a child process: its figures and its peak RSS in MB."""
    return run_child(__file__, mode, config_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="timm")
    parser.add_argument("--architecture", default="vit_large_patch14_clip_224")
    parser.add_argument("--pooling", default="flatten")
    parser.add_argument("--weights", choices=["file", "random"], default="file")
    parser.add_argument("--limit", type=int, default=16, help="generated images (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--group-batches", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run = vit_extraction_vs_bare if args.child == "measure" else _prepare
        print(json.dumps(run(json.loads(Path(args.config).read_text()))))
        return

    from sbssl.stimuli import build_manifest, write_manifest

    with tempfile.TemporaryDirectory(prefix="bench_backbones.") as tmp:
        work = Path(tmp)
        _write_images(work / "stimuli", args.limit)
        write_manifest(build_manifest(work / "stimuli"), work / "manifest.csv")
        config = {"manifest": str(work / "manifest.csv"), "root": str(work / "stimuli"), "work": str(work),
                  "source": args.source, "architecture": args.architecture, "pooling": args.pooling,
                  "weights": args.weights, "batch_size": args.batch_size, "threads": args.threads,
                  "device": args.device, "group_batches": args.group_batches}  # fmt: skip
        (work / "config.json").write_text(json.dumps(config))
        if args.weights == "file":
            _run_child("prepare", work / "config.json")
        figures, rss = _run_child("measure", work / "config.json")
    n = figures["n"]
    bare_ips, full_ips = n / figures["bare_s"], n / figures["full_s"]
    print(f"model               : {args.source} {args.architecture} ({args.weights} weights, built in "
          f"{figures['build_s']:.1f} s), input {figures['shape']}, {figures['preprocessing']} preprocessing")
    layers = ", ".join(f"{k}={v}" for k, v in figures["layers"].items())
    print(f"layers              : {layers}; {figures['pooling']}, float32, LZ4")
    print(f"setup               : {n} generated images, batch {args.batch_size}, {args.threads} torch threads, "
          f"device {figures['device']}")
    print(f"bare forward        : {bare_ips:7.3f} img/s")
    print(f"full extraction     : {full_ips:7.3f} img/s")
    print(f"ratio full / bare   : {full_ips / bare_ips:7.3f}  (target >= 0.85)")
    print(f"peak RSS            : {rss:7.0f} MB  (target <= 3000 MB)")
    print(f"bytes on disk       : {figures['bytes'] / n / 1e6:7.2f} MB per image, all layers")


if __name__ == "__main__":
    main()
