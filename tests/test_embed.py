from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import resnet50

from sbssl.cli import build_parser, main
from sbssl.embed import IMAGENET_MEAN, IMAGENET_STD, PREPROCESSING, embed_layers
from sbssl.layers import LAYERS
from sbssl.similarity import read_similarity
from sbssl.stimuli import build_manifest, load_image, sha256_file, write_manifest

torch.set_num_threads(2)  # the CI box is shared; more threads only add contention

#: Flattened size per image of each layer of a ResNet-50 at 224x224: (C, H, W).
SHAPES = {
    "maxpool": (64, 56, 56),
    "layer1": (256, 56, 56),
    "layer2": (512, 28, 28),
    "layer3": (1024, 14, 14),
    "layer4": (2048, 7, 7),
    "avgpool": (2048, 1, 1),
}
ATTRS = {"model": "random_test", "weights_sha256": "random-init-seed-7"}


def save(array: np.ndarray, path: Path) -> Path:
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


# --- preprocessing presets -------------------------------------------------------------------------------


def test_sbssl_preset_takes_the_top_left_square_and_area_averages():
    # 672 wide x 448 high; the top-left 448x448 square is made of constant 2x2 blocks, the rest is 255 and
    # must not leak in. Area-resizing 448 -> 224 averages each 2x2 block exactly.
    yy, xx = np.mgrid[0:448, 0:672]
    pattern = np.stack([((yy // 2) * 7 + (xx // 2) * 3 + 50 * c) % 250 for c in range(3)], axis=-1)
    pattern[:, 448:] = 255
    out = PREPROCESSING["sbssl"](Image.fromarray(pattern.astype(np.uint8)))
    assert out.dtype == torch.float32 and out.shape == (3, 224, 224)
    i, j = np.mgrid[0:224, 0:224]
    expected = np.stack([(i * 7 + j * 3 + 50 * c) % 250 for c in range(3)]) / 255.0
    np.testing.assert_array_equal(out.numpy(), expected.astype(np.float32))


def test_sbssl_preset_crops_the_top_of_a_tall_image():
    tall = np.zeros((300, 224, 3), dtype=np.uint8)
    tall[:224] = (10, 20, 30)
    tall[224:] = (200, 200, 200)
    out = PREPROCESSING["sbssl"](Image.fromarray(tall)).numpy()
    np.testing.assert_array_equal(out, np.broadcast_to(np.array([10, 20, 30], np.float32)[:, None, None] / 255, out.shape))


def test_sbssl_preset_upscales_a_cifar_image_by_pixel_replication():
    # The 32 px CIFAR stimuli grow 7x; an area filter replicates each pixel into a 7x7 block (as OpenCV's
    # INTER_AREA does for integer factors).
    small = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3))
    out = PREPROCESSING["sbssl"](Image.fromarray(small.astype(np.uint8))).numpy()
    expected = np.repeat(np.repeat(small, 7, axis=0), 7, axis=1).transpose(2, 0, 1) / 255.0
    np.testing.assert_array_equal(out, expected.astype(np.float32))


@pytest.mark.parametrize("side", [300, 200])
def test_sbssl_preset_non_integer_factor_is_an_area_average(side):
    img = np.random.default_rng(side).integers(0, 256, size=(side, side, 3)).astype(np.float64)
    # Reference: each output pixel averages the input area it covers, fractional pixel overlaps weighted.
    edges = np.arange(225) * side / 224
    pixel = np.arange(side)
    weights = np.clip(np.minimum(edges[1:, None], pixel + 1) - np.maximum(edges[:-1, None], pixel), 0, None)
    weights /= weights.sum(axis=1, keepdims=True)
    expected = np.stack([weights @ img[..., c] @ weights.T for c in range(3)]) / 255.0
    out = PREPROCESSING["sbssl"](Image.fromarray(img.astype(np.uint8))).numpy()
    if side > 224:
        np.testing.assert_allclose(out, expected, atol=1 / 255 + 1e-6)  # rounded to uint8 before scaling
    else:
        # OpenCV's upscaling places a few blend boundaries one pixel off (float rounding of the grid); the
        # paper's embeddings were made with exactly that, so it is kept, and only most pixels agree.
        assert np.mean(np.abs(out - expected) <= 1 / 255 + 1e-6) > 0.95
    assert np.median(np.abs(out - expected)) < 0.5 / 255


def test_standard_preset_resizes_centre_crops_and_normalises():
    # 512 high x 1024 wide: red left half, blue right half. Resize(256) -> 256x512, centre crop keeps
    # columns 144..367 of the resized image, so the crop's left edge is red and its right edge blue.
    img = np.zeros((512, 1024, 3), dtype=np.uint8)
    img[:, :512] = (255, 0, 0)
    img[:, 512:] = (0, 0, 255)
    out = PREPROCESSING["standard"](Image.fromarray(img)).numpy()
    assert out.shape == (3, 224, 224)
    mean, std = np.array(IMAGENET_MEAN)[:, None], np.array(IMAGENET_STD)[:, None]
    red, blue = (np.array([1.0, 0, 0])[:, None] - mean) / std, (np.array([0, 0, 1.0])[:, None] - mean) / std
    np.testing.assert_allclose(out[:, :, :100].reshape(3, -1).min(axis=1), red[:, 0], atol=1e-5)
    np.testing.assert_allclose(out[:, :, :100].reshape(3, -1).max(axis=1), red[:, 0], atol=1e-5)
    np.testing.assert_allclose(out[:, :, 124:].reshape(3, -1).min(axis=1), blue[:, 0], atol=1e-5)
    np.testing.assert_allclose(out[:, :, 124:].reshape(3, -1).max(axis=1), blue[:, 0], atol=1e-5)


def test_cli_offers_exactly_the_registered_presets():
    action = next(a for a in build_parser()._subparsers._group_actions[0].choices["embed"]._actions if a.dest == "preprocessing")
    assert sorted(action.choices) == sorted(PREPROCESSING)


# --- extraction ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(7)
    return resnet50(weights=None).eval()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[tuple[str, Path]]:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(3)
    paths = [
        save(rng.integers(0, 256, size=(240, 320, 3)), folder / "a.png"),
        save(np.tile(np.linspace(0, 255, 64), (48, 1))[..., None].repeat(3, axis=-1), folder / "b.png"),
        save(rng.integers(0, 256, size=(32, 32, 3)), folder / "c.png"),
    ]
    return [(sha256_file(p), p) for p in paths]


class ForwardCounter:
    """Counts calls of a module's forward (a real hook on the real model, not a mock)."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self.images = 0
        self._handle = module.register_forward_pre_hook(self._count)

    def _count(self, _module, inputs):
        self.calls += 1
        self.images += len(inputs[0])

    def remove(self):
        self._handle.remove()


def out_paths(folder: Path, layers=LAYERS) -> dict[str, Path]:
    return {layer: folder / f"{layer}.h5" for layer in layers}


def reference_layers(model: torch.nn.Module, images) -> dict[str, np.ndarray]:
    """Every layer of the batch computed by running the model's children by hand (float32)."""
    x = torch.stack([PREPROCESSING["sbssl"](load_image(p)) for _, p in images])
    out = {}
    with torch.inference_mode():
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        out["maxpool"] = h
        for name in ("layer1", "layer2", "layer3", "layer4"):
            h = getattr(model, name)(h)
            out[name] = h
        out["avgpool"] = model.avgpool(h)
    return {name: t.numpy() for name, t in out.items()}


@pytest.fixture(scope="module")
def flat16(model, images, tmp_path_factory):
    """One float16/flatten extraction of the 3 images in batches of 2, with its forward-call count."""
    folder = tmp_path_factory.mktemp("flat16")
    counter = ForwardCounter(model)
    try:
        report = embed_layers(model, images, out_paths(folder), attrs=ATTRS, batch_size=2, progress=False)
    finally:
        counter.remove()
    return folder, report, counter


def test_one_forward_pass_per_batch_captures_all_six_layers(flat16, images):
    folder, report, counter = flat16
    assert counter.calls == 2 and counter.images == 3  # ceil(3 / 2) forward calls, each image once
    assert report.batches == 2 and report.forward_passes == 3 and report.n_images == 3
    assert report.computed_layers == LAYERS and report.reused_layers == ()
    for layer, (c, h, w) in SHAPES.items():
        with h5py.File(folder / f"{layer}.h5") as f:
            assert f["embeddings"].shape == (3, c * h * w)
            assert f["embeddings"].dtype == np.float16
            assert f["embeddings"].chunks[1] == c * h * w  # row-chunked
            assert f["embeddings"].compression == "lzf"
            assert [s.decode() for s in f["sha256"][()]] == [sha for sha, _ in images]
        assert report.bytes_on_disk[layer] == (folder / f"{layer}.h5").stat().st_size
    assert SHAPES["layer1"][0] * SHAPES["layer1"][1] * SHAPES["layer1"][2] == 802_816
    assert not list(folder.glob(".*"))  # no temporary files left


def test_hooked_layers_equal_running_the_children_by_hand(flat16, model, images):
    folder, _, _ = flat16
    reference = reference_layers(model, images)
    for layer in LAYERS:
        with h5py.File(folder / f"{layer}.h5") as f:
            stored = f["embeddings"][()].astype(np.float32)
        expected = reference[layer].reshape(3, -1)  # flatten in (C, H, W) order
        # float16 keeps 11 significant bits: relative error <= 2^-11, plus a batch-dependent fp32 ulp.
        np.testing.assert_allclose(stored, expected, rtol=2e-3, atol=1e-6)
        assert np.abs(expected).max() > 0.1  # real activations, not an all-zero map


def test_attributes_record_the_request(flat16):
    folder, _, _ = flat16
    with h5py.File(folder / "layer2.h5") as f:
        attrs = dict(f.attrs)
    assert {k: attrs[k] for k in ("model", "weights_sha256", "preprocessing", "layer", "pooling", "dtype")} == {
        **ATTRS, "preprocessing": "sbssl", "layer": "layer2", "pooling": "flatten", "dtype": "float16",
    }  # fmt: skip
    import json

    versions = json.loads(attrs["versions"])
    assert versions["torch"] == torch.__version__ and set(versions) >= {"torchvision", "h5py", "numpy", "sbssl"}


def test_mean_pooling_float32_is_the_spatial_mean_of_the_map(model, images, tmp_path):
    layers = ("maxpool", "layer3", "avgpool")
    report = embed_layers(
        model, images, out_paths(tmp_path, layers), attrs=ATTRS, layers=layers, pooling="mean", dtype="float32",
        batch_size=4, progress=False,
    )  # fmt: skip
    assert report.batches == 1
    reference = reference_layers(model, images)
    for layer in layers:
        with h5py.File(tmp_path / f"{layer}.h5") as f:
            stored = f["embeddings"][()]
            assert f.attrs["pooling"] == "mean" and f.attrs["dtype"] == "float32"
        assert stored.dtype == np.float32 and stored.shape == (3, SHAPES[layer][0])
        np.testing.assert_allclose(stored, reference[layer].mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)


def test_cache_hit_does_no_work(flat16, model, images):
    folder, _, _ = flat16
    before = {p: p.stat().st_mtime_ns for p in folder.iterdir()}
    built = []

    def factory():
        built.append(1)
        return model

    counter = ForwardCounter(model)
    try:
        report = embed_layers(factory, images, out_paths(folder), attrs=ATTRS, batch_size=2, progress=False)
    finally:
        counter.remove()
    assert report.cached and report.forward_passes == 0 and report.batches == 0
    assert report.reused_layers == LAYERS
    assert counter.calls == 0 and built == []  # the model was not even built
    assert {p: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_only_missing_layers_are_computed(flat16, model, images, tmp_path):
    folder, _, _ = flat16
    for layer in LAYERS:
        shutil.copy(folder / f"{layer}.h5", tmp_path / f"{layer}.h5")
    (tmp_path / "layer3.h5").unlink()
    counter = ForwardCounter(model)
    try:
        report = embed_layers(model, images, out_paths(tmp_path), attrs=ATTRS, batch_size=2, progress=False)
    finally:
        counter.remove()
    assert report.computed_layers == ("layer3",) and counter.images == 3
    with h5py.File(tmp_path / "layer3.h5") as new, h5py.File(folder / "layer3.h5") as old:
        np.testing.assert_array_equal(new["embeddings"][()], old["embeddings"][()])


def test_a_different_image_list_is_recomputed(flat16, model, images, tmp_path):
    folder, _, _ = flat16
    shutil.copy(folder / "avgpool.h5", tmp_path / "avgpool.h5")
    report = embed_layers(
        model, images[:2], out_paths(tmp_path, ["avgpool"]), attrs=ATTRS, layers=["avgpool"], progress=False
    )
    assert report.computed_layers == ("avgpool",) and report.forward_passes == 2
    with h5py.File(tmp_path / "avgpool.h5") as f:
        assert f["embeddings"].shape == (2, 2048)


@pytest.mark.parametrize(
    ("change", "attr"),
    [
        ({"preprocessing": "standard"}, "preprocessing"),
        ({"pooling": "mean"}, "pooling"),
        ({"dtype": "float32"}, "dtype"),
        ({"attrs": {**ATTRS, "weights_sha256": "cd" * 32}}, "weights_sha256"),
    ],
)
def test_mismatched_cache_is_an_error_not_a_reuse(flat16, model, images, change, attr):
    folder, _, _ = flat16
    before = (folder / "maxpool.h5").stat().st_mtime_ns
    kwargs = {"attrs": ATTRS, **change}
    with pytest.raises(ValueError, match=rf"maxpool\.h5: cached embeddings have {attr}=.*delete the file"):
        embed_layers(model, images, out_paths(folder), progress=False, **kwargs)
    assert (folder / "maxpool.h5").stat().st_mtime_ns == before


def test_failure_midway_leaves_no_output(model, images, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    batch = [*images[:2], (sha256_file(broken), broken)]
    with pytest.raises(ValueError, match="broken.png"):
        embed_layers(model, batch, out_paths(tmp_path), attrs=ATTRS, batch_size=2, progress=False)
    assert list(tmp_path.iterdir()) == [broken]


def test_changed_file_is_detected(model, images, tmp_path):
    with pytest.raises(ValueError, match="content changed since the manifest"):
        embed_layers(model, [("0" * 64, images[0][1])], out_paths(tmp_path, ["avgpool"]), attrs=ATTRS,
                     layers=["avgpool"], progress=False)  # fmt: skip


def test_bad_requests(model, images, tmp_path):
    with pytest.raises(ValueError, match="unknown preprocessing 'imagenet'"):
        embed_layers(model, images, out_paths(tmp_path), attrs=ATTRS, preprocessing="imagenet")
    with pytest.raises(ValueError, match=r"no module\(s\) \['block9'\]"):
        embed_layers(model, images, out_paths(tmp_path, ["block9"]), attrs=ATTRS, layers=["block9"], progress=False)
    with pytest.raises(ValueError, match="listed more than once"):
        embed_layers(model, [images[0], images[0]], out_paths(tmp_path), attrs=ATTRS)
    with pytest.raises(ValueError, match="weights_sha256"):
        embed_layers(model, images, out_paths(tmp_path), attrs={"model": "m"})
    with pytest.raises(ValueError, match="out_paths names layers"):
        embed_layers(model, images, out_paths(tmp_path, ["layer1"]), attrs=ATTRS)
    assert list(tmp_path.iterdir()) == []


# --- end to end on real stimuli ----------------------------------------------------------------------------


def test_end_to_end_real_stimuli_one_pass_then_nothing(shared_dir, tmp_path, capsys):
    """A random ResNet-50 on 6 distinct real iEAT images (JPEG, the JPEG named .png, a duplicate, WebP,
    32 px CIFAR images): all six layers and similarities in one pass per batch; a second run does no work."""
    source = shared_dir / "ieat" / "stimuli"
    picks = [
        "valence/unpleasant/corpse3_google.png",
        "valence/unpleasant/coffin1_google.jpg",
        "valence/unpleasant/coffin4_google.jpg",  # same bytes as coffin1: embedded once
        "insect-flower/flower/daisy4_google.webp",
        "insect-flower/flower/daffodil2_google.jpg",
        "valence/pleasant/baby1_cifar.png",
        "valence/pleasant/baby2_cifar.png",
    ]
    root = tmp_path / "stimuli"
    for rel in picks:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / rel, root / rel)
    manifest = tmp_path / "manifest.csv"
    write_manifest(build_manifest(root), manifest)
    args = ["embed", "--manifest", str(manifest), "--stimuli", str(root), "--model", "random_1",
            "--out-dir", str(tmp_path / "emb"), "--similarity-dir", str(tmp_path / "sim"), "--batch-size", "4",
            "--quiet"]  # fmt: skip
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "random_1: 6 distinct images, 6 images embedded" in first
    files = sorted((tmp_path / "emb" / "random_1").iterdir()) + sorted((tmp_path / "sim" / "random_1").iterdir())
    assert [f.name for f in files] == sorted(f"{layer}.h5" for layer in LAYERS) * 2
    for layer in LAYERS:
        sim = read_similarity(tmp_path / "sim" / "random_1" / f"{layer}.h5")
        with h5py.File(tmp_path / "emb" / "random_1" / f"{layer}.h5") as f:
            x = f["embeddings"][()].astype(np.float64)
            assert f.attrs["weights_sha256"] == "random-init-seed-1"
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        np.testing.assert_allclose(sim.matrix, unit @ unit.T, atol=1e-12)
        assert sim.matrix.shape == (6, 6) and sim.attrs["layer"] == layer and sim.attrs["model"] == "random_1"
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    assert main(args) == 0
    assert "all layers cached, nothing computed" in capsys.readouterr().out
    assert {f: f.stat().st_mtime_ns for f in files} == mtimes
