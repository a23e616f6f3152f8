"""Benchmark the embedding stage: bare forward pass vs the full one-pass, six-layer extraction into HDF5.

Prints, for one randomly initialised ResNet-50 (``random_1`` of the zoo) on the same images:
- images/s of the bare forward pass (model calls only, on batches preprocessed beforehand),
- images/s of the full extraction (decode + preprocess + one forward per batch + six layers + LZ4 HDF5),
- their ratio (target >= 0.85), forward passes (target = number of distinct images) and a second, cached run,
- peak RSS of the extraction job and of the similarity job (each run in its own child process; the figure is
  the child's ru_maxrss from wait4, target <= 3 GB), and bytes on disk per layer and in all;
- on CUDA: the GPU, its peak memory (allocated and reserved by PyTorch), and the largest difference between
  the GPU's and the CPU's embeddings of the first batch (the GPU path runs full float32, no TF32);
- the projected time of the 15-model study (embeddings and similarities of 15 models, plus the 10,530
  permutation tests at ``--tests-per-second``): with fewer than 664 images, the embedding and the measured
  similarity time are scaled linearly to 664 images, and the similarity products (664^2 x dim per layer,
  symmetric) are added at the float64 rate this machine's BLAS measured.

``make bench-gpu`` runs it with ``--device cuda --batch-size 64`` on all images. On a machine without a GPU,
``--device cpu --limit 16`` checks that it runs.

Images: the real iEAT stimuli at ../shared/ieat/stimuli when present (665 distinct images; ``--limit N``
takes N spread over the whole set), else ``--limit`` generated images (default 64).

    .venv/bin/python benchmarks/bench_embed.py --limit 64
    .venv/bin/python benchmarks/bench_embed.py --device cuda --batch-size 64
    .venv/bin/python benchmarks/bench_embed.py            # the full 665 images (CPU: ~2 min per 100 images)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from child_process import bare_forward_seconds, run_child  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
#: The full study: 15 models, the distinct iEAT images, 15 x 6 x 39 x 3 permutation tests.
STUDY_MODELS, STUDY_IMAGES, STUDY_TESTS = 15, 664, 10_530
DEFAULT_STIMULI = REPO.parent / "shared" / "ieat" / "stimuli"


def _images(args: argparse.Namespace, work: Path) -> tuple[Path, Path, str]:
    """Write the manifest of the benchmark images; return (manifest, stimuli root, description)."""
    from PIL import Image

    from sbssl.stimuli import build_manifest, distinct_images, write_manifest

    root = Path(args.stimuli) if args.stimuli else DEFAULT_STIMULI
    if root.is_dir():
        manifest = build_manifest(root)
        distinct = distinct_images(manifest)
        what = f"real stimuli at {root}: {len(distinct)} distinct images"
        if args.limit and args.limit < len(distinct):
            keep = set(distinct["sha256"].iloc[np.linspace(0, len(distinct) - 1, args.limit).astype(int)])
            manifest = manifest[manifest["sha256"].isin(keep)]
            what += f", {args.limit} of them spread over the set"
    else:
        root = work / "generated"
        rng = np.random.default_rng(0)
        for i in range(args.limit or 64):
            h, w = rng.integers(150, 640, size=2)
            folder = root / "generated" / f"concept{i % 4}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
        manifest = build_manifest(root)
        what = f"{len(manifest)} generated images ({DEFAULT_STIMULI} not found)"
    path = work / "manifest.csv"
    write_manifest(manifest, path)
    return path, root, what


def _child(mode: str, config: dict) -> dict:
    """Run one measurement in this process (called in a child) and return its figures."""
    layers = config["layers"]
    out = {layer: Path(config["work"]) / "embeddings" / f"{layer}.h5" for layer in layers}
    if mode == "similarity":  # no torch here: the similarity job's own footprint
        from sbssl.similarity import cosine_similarities
        from sbssl.storage import read_embeddings_header

        seconds = {}
        for layer, path in out.items():
            t0 = time.perf_counter()
            cosine_similarities(path, Path(config["work"]) / "similarity" / f"{layer}.h5")
            seconds[layer] = time.perf_counter() - t0
        # float64 products per second of this machine's BLAS, for the projection to the study's image count
        a = np.random.default_rng(0).standard_normal((512, 16_384))
        t0 = time.perf_counter()
        a @ a.T
        flops = 512 * 512 * 16_384 / (time.perf_counter() - t0)  # a @ a.T is a symmetric product: half of 2 n^2 k
        dims = {layer: read_embeddings_header(path).shape[1] for layer, path in out.items()}
        return {"seconds": seconds, "flops": flops, "dims": dims}

    import torch

    from sbssl.embed import PREPROCESSING, embed_layers, embedding_attrs, resolve_device
    from sbssl.models import build_model, load_zoo
    from sbssl.stimuli import distinct_images, read_manifest

    torch.set_num_threads(config["threads"])
    device = resolve_device(config["device"])
    spec = load_zoo(REPO / "config" / "models.yaml")["random_1"]
    model = build_model(spec).to(device)
    rows = distinct_images(read_manifest(config["manifest"]))
    images = [(sha, Path(config["root"]) / path) for sha, path in zip(rows["sha256"], rows["path"])]
    size = config["batch_size"]
    with torch.inference_mode():  # warm-up (allocator, oneDNN/cuDNN kernels), timed in neither figure
        model(torch.zeros(size, 3, 224, 224, device=device))
    def bare(group: list) -> float:
        return bare_forward_seconds(model, group, PREPROCESSING["sbssl"], size, device)

    def full(group: list, paths: dict):
        return embed_layers(
            model, group, paths, attrs=embedding_attrs(spec), layers=layers, batch_size=size, device=str(device),
            progress=False,
        )  # fmt: skip

    # Throughput: bare and full alternate every few batches, so the load of other processes on a shared
    # machine hits both alike; the full runs here write scratch files.
    scratch = {layer: Path(config["work"]) / "scratch" / f"{layer}.h5" for layer in layers}
    step = size * config["group_batches"]
    bare_s = full_s = 0.0
    for g0 in range(0, len(images), step):
        group = images[g0 : g0 + step]
        bare_s += bare(group)
        full_s += full(group, scratch).seconds
        for path in scratch.values():
            path.unlink()
    # One complete run over all images (forward passes, bytes, peak RSS), then a run that must be cached.
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    complete = full(images, out)
    gpu = {}
    if device.type == "cuda":
        gpu = {"name": torch.cuda.get_device_name(device), "total": torch.cuda.get_device_properties(device).total_memory,
               "allocated": torch.cuda.max_memory_allocated(device), "reserved": torch.cuda.max_memory_reserved(device),
               "max_diff": _gpu_vs_cpu(build_model(spec), images[:size], out, size)}  # fmt: skip
    cached = full(images, out)
    return {
        "n": len(images), "bare_s": bare_s, "full_s": full_s, "complete_s": complete.seconds,
        "forward_passes": complete.forward_passes, "batches": complete.batches, "bytes": complete.bytes_on_disk,
        "device": complete.device, "cached_forward_passes": cached.forward_passes, "cached_s": cached.seconds,
        "gpu": gpu,
    }  # fmt: skip


def _gpu_vs_cpu(model, images: list, gpu_files: dict, size: int) -> dict[str, float]:
    """Largest |GPU - CPU| / max|CPU| per layer over the first batch: the CPU embeds it again."""
    import h5py

    from sbssl.embed import embed_layers, embedding_attrs
    from sbssl.models import load_zoo

    spec = load_zoo(REPO / "config" / "models.yaml")["random_1"]
    cpu_files = {layer: path.with_name(f"cpu-{path.name}") for layer, path in gpu_files.items()}
    embed_layers(model, images, cpu_files, attrs=embedding_attrs(spec), layers=list(gpu_files), batch_size=size,
                 device="cpu", progress=False)  # fmt: skip
    diffs = {}
    for layer in gpu_files:
        with h5py.File(gpu_files[layer], "r") as g, h5py.File(cpu_files[layer], "r") as c:
            on_gpu, on_cpu = g["embeddings"][: len(images)], c["embeddings"][()]
        diffs[layer] = float(np.abs(on_gpu - on_cpu).max() / max(float(np.abs(on_cpu).max()), 1e-30))
        cpu_files[layer].unlink()
    return diffs


def _run_child(mode: str, config_path: Path) -> tuple[dict, float]:
    """Run ``mode`` of this script in a child process: its figures and its peak RSS in MB."""
    return run_child(__file__, mode, config_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stimuli", help=f"stimuli root (default: {DEFAULT_STIMULI} when present)")
    parser.add_argument("--limit", type=int, help="number of distinct images (default: all, or 64 generated)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--group-batches", type=int, default=6, help="batches per bare/full alternation (default: %(default)s)"
    )
    parser.add_argument("--work", help="folder for the outputs (default: a temporary folder, removed after)")
    parser.add_argument(
        "--tests-per-second", type=float, default=50.0,
        help="rate of the permutation stage for the projection (benchmarks/bench_dag.py; default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--vit", default="vit_large_patch14_clip_224",
        help="timm ViT measured after the ResNet-50 by benchmarks/bench_backbones.py ('none' skips it; default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, json.loads(Path(args.config).read_text()))))
        return

    from sbssl.layers import LAYERS

    with tempfile.TemporaryDirectory(prefix="bench_embed.", dir=args.work) as tmp:
        work = Path(tmp)
        manifest, root, what = _images(args, work)
        config = {"manifest": str(manifest), "root": str(root), "work": str(work), "layers": list(LAYERS),
                  "batch_size": args.batch_size, "threads": args.threads, "device": args.device, "group_batches": args.group_batches}  # fmt: skip
        config_path = work / "config.json"
        config_path.write_text(json.dumps(config))
        emb, rss_full = _run_child("embed", config_path)
        sim, rss_sim = _run_child("similarity", config_path)

    n = emb["n"]
    bare_ips, full_ips = n / emb["bare_s"], n / emb["full_s"]
    total = sum(emb["bytes"].values())
    print(f"images              : {what}")
    print(f"setup               : batch {args.batch_size}, {args.threads} torch threads, device {emb['device']}, "
          f"model random_1 (ResNet-50), layers {', '.join(LAYERS)}, flatten, float32, LZ4")  # fmt: skip
    print(f"bare forward        : {bare_ips:7.2f} img/s  (model calls only, on batches decoded beforehand)")
    print(f"full extraction     : {full_ips:7.2f} img/s  (decode, preprocess, 1 forward/batch, 6 layers, HDF5 writes)")
    print(f"ratio full / bare   : {full_ips / bare_ips:7.3f}  (target >= 0.85; alternating every "
          f"{args.group_batches} batches)")  # fmt: skip
    print(f"complete run        : {n / emb['complete_s']:7.2f} img/s, {emb['forward_passes']} forward passes for {n} "
          f"distinct images in {emb['batches']} batches (target = distinct images)")  # fmt: skip
    print(f"cached second run   : {emb['cached_forward_passes']} forward passes, {emb['cached_s']:.3f} s")
    print(f"peak RSS extraction : {rss_full:7.0f} MB  (target <= 3000 MB)")
    print(f"peak RSS similarity : {rss_sim:7.0f} MB  ({sum(sim['seconds'].values()):.1f} s for 6 layers: "
          + ", ".join(f"{k} {v:.1f}s" for k, v in sim["seconds"].items()) + ")")
    print(f"bytes on disk       : {total / 1e6:7.1f} MB per model ({total / n / 1e6:.2f} MB/image): "
          + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in emb["bytes"].items()))
    gpu = emb["gpu"]
    if gpu:
        print(f"GPU                 : {gpu['name']}, {gpu['total'] / 2**30:.0f} GiB; peak {gpu['allocated'] / 2**30:.2f} GiB "
              f"allocated, {gpu['reserved'] / 2**30:.2f} GiB reserved by PyTorch")  # fmt: skip
        print("GPU vs CPU          : largest |difference| / max|value|, first batch: "
              + ", ".join(f"{k} {v:.1e}" for k, v in gpu["max_diff"].items()))
    else:
        print(f"GPU                 : none used (device {emb['device']})")
    embed_s = emb["complete_s"] * STUDY_IMAGES / n
    similarity_s = sum(sim["seconds"].values()) * STUDY_IMAGES / n
    if n < STUDY_IMAGES:  # the products grow with the square of the image count
        similarity_s += sum(STUDY_IMAGES**2 * dim for dim in sim["dims"].values()) / sim["flops"]
    tests_s = STUDY_TESTS / args.tests_per_second
    study_s = STUDY_MODELS * (embed_s + similarity_s) + tests_s
    print(f"projected study     : {study_s / 60:7.1f} min on this machine ({emb['device']}): {STUDY_MODELS} models x "
          f"({embed_s:.0f} s embedding + {similarity_s:.0f} s similarities at {STUDY_IMAGES} images) + {STUDY_TESTS:,} "
          f"tests at {args.tests_per_second:g}/s ({tests_s:.0f} s); target on one H200-class GPU: < 10 min")  # fmt: skip
    if args.vit != "none":  # a transformer too: full extraction vs bare forward and peak RSS, in its own process
        print(f"\nViT ({args.vit}, its default layers, flatten; benchmarks/bench_backbones.py):", flush=True)
        subprocess.run(
            [sys.executable, str(Path(__file__).with_name("bench_backbones.py")), "--architecture", args.vit,
             "--limit", str(min(args.limit or 16, 64)), "--batch-size", str(min(args.batch_size, 8)),
             "--threads", str(args.threads), "--device", args.device],
            check=True,
        )  # fmt: skip


if __name__ == "__main__":
    main()
