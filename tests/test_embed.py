from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import resnet50

from sbssl.backbones import MODEL_PREPROCESSING
from sbssl.cli import build_parser, main
from sbssl.embed import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PREPROCESSING,
    embed_layers,
    embed_model,
    embedding_attrs,
    permute_positions,
)
from sbssl.layers import LAYERS, RESNET50_SHAPES
from sbssl.provenance import provenance
from sbssl.similarity import read_similarity
from sbssl.stimuli import build_manifest, load_image, sha256_file, write_manifest

torch.set_num_threads(2)  # the CI box is shared; more threads only add contention


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
    assert sorted(action.choices) == sorted([*PREPROCESSING, *MODEL_PREPROCESSING])


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
def flat32(model, images, tmp_path_factory):
    """One extraction with the defaults (flatten, float32) of the 3 images in batches of 2, with its
    forward-call count."""
    folder = tmp_path_factory.mktemp("flat32")
    counter = ForwardCounter(model)
    try:
        report = embed_layers(model, images, out_paths(folder), attrs=ATTRS, batch_size=2, progress=False)
    finally:
        counter.remove()
    return folder, report, counter


def test_one_forward_pass_per_batch_captures_all_six_layers(flat32, images):
    folder, report, counter = flat32
    assert counter.calls == 2 and counter.images == 3  # ceil(3 / 2) forward calls, each image once
    assert report.batches == 2 and report.forward_passes == 3 and report.n_images == 3
    assert report.computed_layers == LAYERS and report.reused_layers == ()
    for layer, (c, h, w) in RESNET50_SHAPES.items():
        with h5py.File(folder / f"{layer}.h5") as f:
            assert f["embeddings"].shape == (3, c * h * w)
            assert f["embeddings"].dtype == np.float32  # the default: float16 shifts p-values
            assert f["embeddings"].chunks[1] == min(c * h * w, 65_536)  # whole rows, or a row's column tiles
            assert f["embeddings"].id.get_create_plist().get_filter(0)[0] == hdf5plugin.LZ4_ID
            assert [s.decode() for s in f["sha256"][()]] == [sha for sha, _ in images]
        assert report.bytes_on_disk[layer] == (folder / f"{layer}.h5").stat().st_size
    assert RESNET50_SHAPES["layer1"][0] * RESNET50_SHAPES["layer1"][1] * RESNET50_SHAPES["layer1"][2] == 802_816
    assert not list(folder.glob(".*"))  # no temporary files left


def test_hooked_layers_equal_running_the_children_by_hand(flat32, model, images):
    folder, _, _ = flat32
    reference = reference_layers(model, images)
    for layer in LAYERS:
        with h5py.File(folder / f"{layer}.h5") as f:
            stored = f["embeddings"][()]
        expected = reference[layer].reshape(3, -1)  # flatten in (C, H, W) order
        # Only batch-dependent float32 rounding (batches of 2 here, one batch of 3 in the reference).
        np.testing.assert_allclose(stored, expected, rtol=1e-4, atol=1e-5)
        assert np.abs(expected).max() > 0.1  # real activations, not an all-zero map


def test_attributes_record_the_request(flat32):
    folder, _, _ = flat32
    with h5py.File(folder / "layer2.h5") as f:
        attrs = dict(f.attrs)
    assert {k: attrs[k] for k in ("model", "weights_sha256", "preprocessing", "layer", "pooling", "dtype")} == {
        **ATTRS, "preprocessing": "sbssl", "layer": "layer2", "pooling": "flatten", "dtype": "float32",
    }  # fmt: skip
    assert attrs["permute"] == "none" and attrs["permuted_images"] == 0
    assert {k: attrs[k] for k in ("sbssl_version", "code_digest")} == provenance("embed")
    import json

    versions = json.loads(attrs["versions"])
    assert versions["torch"] == torch.__version__ and set(versions) >= {"torchvision", "h5py", "numpy", "sbssl"}


def test_mean_pooling_float16_is_the_spatial_mean_of_the_map(model, images, tmp_path):
    layers = ("maxpool", "layer3", "avgpool")
    report = embed_layers(
        model, images, out_paths(tmp_path, layers), attrs=ATTRS, layers=layers, pooling="mean", dtype="float16",
        batch_size=4, progress=False,
    )  # fmt: skip
    assert report.batches == 1
    reference = reference_layers(model, images)
    for layer in layers:
        with h5py.File(tmp_path / f"{layer}.h5") as f:
            stored = f["embeddings"][()]
            assert f.attrs["pooling"] == "mean" and f.attrs["dtype"] == "float16"
        assert stored.dtype == np.float16 and stored.shape == (3, RESNET50_SHAPES[layer][0])
        # float16 keeps 11 significant bits: relative error <= 2^-11.
        np.testing.assert_allclose(stored, reference[layer].mean(axis=(2, 3)), rtol=1e-3, atol=1e-6)


def test_a_module_modified_in_place_later_is_stored_as_it_left_the_module(model, images, tmp_path):
    # Bottleneck.forward does `out = self.bn3(out); out += identity; out = self.relu(out)`: the bn3 output
    # is modified in place after the hook has seen it, so the hook must keep a copy.
    block = model.layer1[0]
    report = embed_layers(
        model, images, {"layer1.0.bn3": tmp_path / "bn3.h5"}, attrs=ATTRS, layers=["layer1.0.bn3"], batch_size=3,
        progress=False,
    )  # fmt: skip
    assert report.computed_layers == ("layer1.0.bn3",)
    x = torch.stack([PREPROCESSING["sbssl"](load_image(p)) for _, p in images])
    with torch.inference_mode():
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        h = block.relu(block.bn1(block.conv1(h)))
        h = block.relu(block.bn2(block.conv2(h)))
        expected = block.bn3(block.conv3(h)).flatten(1).numpy()
    with h5py.File(tmp_path / "bn3.h5") as f:
        stored = f["embeddings"][()]
    assert (expected < 0).mean() > 0.1  # a ReLU applied in place afterwards would have zeroed these
    np.testing.assert_allclose(stored, expected, rtol=1e-4, atol=1e-5)


def test_the_forward_pass_runs_in_full_float32(model, images, tmp_path):
    # TF32 (PyTorch's default for cuDNN convolutions on recent GPUs) keeps 10 mantissa bits, like float16.
    seen = []
    handle = model.register_forward_pre_hook(
        lambda *_: seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
    )
    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = True
    try:
        embed_layers(model, images[:1], out_paths(tmp_path, ["avgpool"]), attrs=ATTRS, layers=["avgpool"], progress=False)
        assert seen == [(False, False)]
        assert torch.backends.cudnn.allow_tf32 is True  # restored afterwards
    finally:
        handle.remove()
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_cache_hit_does_no_work(flat32, model, images):
    folder, _, _ = flat32
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


def test_only_missing_layers_are_computed(flat32, model, images, tmp_path):
    folder, _, _ = flat32
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


def test_a_different_image_list_is_recomputed(flat32, model, images, tmp_path):
    folder, _, _ = flat32
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
        ({"dtype": "float16"}, "dtype"),
        ({"attrs": {**ATTRS, "weights_sha256": "cd" * 32}}, "weights_sha256"),
    ],
)
def test_mismatched_cache_is_an_error_not_a_reuse(flat32, model, images, change, attr):
    folder, _, _ = flat32
    before = (folder / "maxpool.h5").stat().st_mtime_ns
    kwargs = {"attrs": ATTRS, **change}
    with pytest.raises(ValueError, match=rf"maxpool\.h5: cached embeddings have {attr}=.*delete the file"):
        embed_layers(model, images, out_paths(folder), progress=False, **kwargs)
    assert (folder / "maxpool.h5").stat().st_mtime_ns == before


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_cache_file_is_recomputed(flat32, model, images, tmp_path):
    folder, _, _ = flat32
    shutil.copy(folder / "avgpool.h5", tmp_path / "avgpool.h5")
    truncate(tmp_path / "avgpool.h5")
    with pytest.raises(OSError):
        h5py.File(tmp_path / "avgpool.h5", "r")  # really unreadable
    report = embed_layers(
        model, images, out_paths(tmp_path, ["avgpool"]), attrs=ATTRS, layers=["avgpool"], batch_size=2, progress=False
    )
    assert report.computed_layers == ("avgpool",)
    with h5py.File(tmp_path / "avgpool.h5") as new, h5py.File(folder / "avgpool.h5") as old:
        np.testing.assert_array_equal(new["embeddings"][()], old["embeddings"][()])


def test_a_cache_file_from_other_code_is_recomputed(flat32, model, images, tmp_path):
    folder, _, _ = flat32
    shutil.copy(folder / "avgpool.h5", tmp_path / "avgpool.h5")
    with h5py.File(tmp_path / "avgpool.h5", "a") as f:
        f.attrs["code_digest"] = "0000000000000000"
        f.attrs["pooling"] = "mean"  # other code may have written anything: no mismatch error either
    report = embed_layers(
        model, images, out_paths(tmp_path, ["avgpool"]), attrs=ATTRS, layers=["avgpool"], batch_size=2, progress=False
    )
    assert report.computed_layers == ("avgpool",)
    with h5py.File(tmp_path / "avgpool.h5") as f:
        assert f.attrs["code_digest"] == provenance("embed")["code_digest"] and f.attrs["pooling"] == "flatten"


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


# --- the pixel-permutation control on the network input ----------------------------------------------------


def test_permute_positions_moves_whole_pixels_and_is_seeded():
    image = torch.rand(3, 224, 224)
    sha = "ab" * 32
    out = permute_positions(image, sha, 5)
    assert out.shape == image.shape and not torch.equal(out, image)
    for c in range(3):  # the multiset of values of each channel is kept
        assert torch.equal(out[c].flatten().sort().values, image[c].flatten().sort().values)
    # all three channels move together: each output position holds one input pixel's (r, g, b)
    pixels = {tuple(v) for v in image.reshape(3, -1).T.tolist()}
    assert all(tuple(v) in pixels for v in out.reshape(3, -1).T.tolist())
    assert torch.equal(permute_positions(image, sha, 5), out)
    assert not torch.equal(permute_positions(image, sha, 6), out)
    assert not torch.equal(permute_positions(image, "cd" * 32, 5), out)


class InputRecorder:
    """Records the network input of each image (a real forward pre-hook on the model)."""

    def __init__(self, model: torch.nn.Module):
        self.batches: list[torch.Tensor] = []
        self._handle = model.register_forward_pre_hook(lambda _m, inputs: self.batches.append(inputs[0].clone()))

    def by_image(self, images) -> dict[str, torch.Tensor]:
        rows = torch.cat(self.batches)
        self._handle.remove()
        return {sha: rows[i] for i, (sha, _) in enumerate(images)}


def test_permute_shuffles_only_the_chosen_images_inputs(model, images, tmp_path):
    layers = ["layer4", "avgpool"]
    target = images[0][0]

    def run(folder, imgs, batch_size, permute):
        recorder = InputRecorder(model)
        embed_layers(model, imgs, out_paths(folder, layers), attrs=ATTRS, layers=layers, batch_size=batch_size,
                     permute=permute, progress=False)  # fmt: skip
        return recorder.by_image(imgs)

    plain = run(tmp_path / "plain", images, 2, None)
    permuted = run(tmp_path / "perm", images, 2, {target: 3})
    again = run(tmp_path / "again", images[::-1], 3, {target: 3})  # other order, other batches
    assert not torch.equal(permuted[target], plain[target])
    assert torch.equal(permuted[target], permute_positions(plain[target], target, 3))
    assert all(torch.equal(again[sha], permuted[sha]) for sha, _ in images)
    for sha, _ in images[1:]:
        assert torch.equal(permuted[sha], plain[sha])
    for layer in layers:
        with h5py.File(tmp_path / "plain" / f"{layer}.h5") as f, h5py.File(tmp_path / "perm" / f"{layer}.h5") as g:
            a, b = f["embeddings"][()], g["embeddings"][()]
            assert g.attrs["permute"].startswith("input-pixels sha256:") and g.attrs["permuted_images"] == 1
        assert not np.array_equal(a[0], b[0])  # the permuted image's embedding changed
        assert a[1:].tobytes() == b[1:].tobytes()  # the others are byte-identical
    # Same seed, same bytes; and the permutation is part of the cache identity.
    rerun = tmp_path / "rerun"
    run(rerun, images, 2, {target: 3})
    with h5py.File(rerun / "avgpool.h5") as f, h5py.File(tmp_path / "perm" / "avgpool.h5") as g:
        assert f["embeddings"][()].tobytes() == g["embeddings"][()].tobytes()
        assert f.attrs["permute"] == g.attrs["permute"]
    with pytest.raises(ValueError, match=r"layer4\.h5: cached embeddings have permute='input-pixels.*asks for permute='none'"):
        embed_layers(model, images, out_paths(rerun, layers), attrs=ATTRS, layers=layers, progress=False)
    with pytest.raises(ValueError, match="layer4\\.h5: cached embeddings have permute=.*asks for permute='input-pixels"):
        embed_layers(model, images, out_paths(rerun, layers), attrs=ATTRS, layers=layers, permute={target: 4},
                     progress=False)  # fmt: skip


def test_permute_must_name_images_being_embedded(model, images, tmp_path):
    with pytest.raises(ValueError, match="permute names 1 image.*not among the images"):
        embed_layers(model, images, out_paths(tmp_path), attrs=ATTRS, permute={"0" * 64: 1}, progress=False)
    with pytest.raises(ValueError, match="non-negative integers"):
        embed_layers(model, images, out_paths(tmp_path), attrs=ATTRS, permute={images[0][0]: -1}, progress=False)


# --- model identity ------------------------------------------------------------------------------------------


def test_embedding_attrs_of_a_random_model():
    from sbssl.models import ModelDefinition

    definition = ModelDefinition(name="random_9", architecture="resnet50", weights=None, init_seed=9)
    assert embedding_attrs(definition) == {
        "model": "random_9", "source": "torchvision", "architecture": "resnet50", "weights_sha256": "random-init-seed-9",
    }  # fmt: skip
    with pytest.raises(ValueError, match="randomly initialised; do not pass weights"):
        embedding_attrs(definition, "x.pth")


def test_embedding_attrs_verify_the_weights_file(tmp_path):
    import hashlib

    from sbssl.models import ModelDefinition, WeightsSpec

    checkpoint = tmp_path / "m.pth"
    checkpoint.write_bytes(b"not really a checkpoint, but hashed like one")
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    weights = WeightsSpec(url="https://example.org/m.pth", format="torchvision", sha256=digest)
    definition = ModelDefinition(name="m", architecture="resnet50", weights=weights, init_seed=None)
    lock = tmp_path / "weights.lock"
    assert embedding_attrs(definition, checkpoint, lock_path=lock)["weights_sha256"] == digest
    assert digest in lock.read_text()  # first use recorded in the lock
    checkpoint.write_bytes(b"another file")
    with pytest.raises(ValueError, match=r"m\.pth: not the checkpoint of model 'm'"):
        embedding_attrs(definition, checkpoint, lock_path=lock)
    with pytest.raises(ValueError, match="give the weights lock"):
        embedding_attrs(definition, checkpoint)
    with pytest.raises(ValueError, match="needs its weights file"):
        embedding_attrs(definition, None, lock_path=lock)


def test_embed_model_with_a_definition_and_the_control_permutation(images, tmp_path):
    from sbssl.models import ModelDefinition

    root = tmp_path / "stimuli"
    (root / "cat" / "concept").mkdir(parents=True)
    for _, path in images:
        shutil.copy(path, root / "cat" / "concept" / path.name)
    manifest = tmp_path / "manifest.csv"
    write_manifest(build_manifest(root), manifest)
    definition = ModelDefinition(name="random_7", architecture="resnet50", weights=None, init_seed=7)
    out = {"avgpool": tmp_path / "avgpool.h5"}
    report = embed_model(definition, None, manifest, root, out, layers=["avgpool"], permute={images[1][0]: 0},
                         progress=False)  # fmt: skip
    assert report.n_images == 3 and report.computed_layers == ("avgpool",)
    with h5py.File(out["avgpool"]) as f:
        assert f.attrs["architecture"] == "resnet50" and f.attrs["weights_sha256"] == "random-init-seed-7"
        assert f.attrs["permuted_images"] == 1 and f["embeddings"].dtype == np.float32


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


# --- slugs, module paths, model presets ---------------------------------------------------------------------


def test_every_preprocessing_name_is_a_preset_or_a_model_preset():
    from sbssl.backbones import MODEL_PREPROCESSING
    from sbssl.models import PREPROCESSINGS

    assert sorted([*PREPROCESSING, *MODEL_PREPROCESSING]) == sorted(PREPROCESSINGS)
    assert not set(PREPROCESSING) & set(MODEL_PREPROCESSING)


def test_a_slug_names_the_file_and_the_module_is_hooked(model, images, tmp_path):
    layers = {"block2_3": "layer1.2", "gap": "avgpool"}
    report = embed_layers(model, images, out_paths(tmp_path, layers), attrs=ATTRS, layers=layers, pooling="mean",
                          batch_size=3, progress=False)  # fmt: skip
    assert report.computed_layers == ("block2_3", "gap")
    x = torch.stack([PREPROCESSING["sbssl"](load_image(p)) for _, p in images])
    with torch.inference_mode():
        h = model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x)))))
    with h5py.File(tmp_path / "block2_3.h5") as f:
        assert (f.attrs["layer"], f.attrs["module"]) == ("block2_3", "layer1.2")
        np.testing.assert_allclose(f["embeddings"][()], h.mean(dim=(2, 3)).numpy(), rtol=1e-4, atol=1e-6)
    # the module is part of the file's identity
    with pytest.raises(ValueError, match=r"gap\.h5: cached embeddings have module='avgpool'.*asks for module='layer4'"):
        embed_layers(model, images, out_paths(tmp_path, ["gap"]), attrs=ATTRS, layers={"gap": "layer4"},
                     pooling="mean", progress=False)  # fmt: skip


def test_model_presets_need_a_backbone(model, images, tmp_path):
    with pytest.raises(ValueError, match="preprocessing 'model' is the model's own: pass a sbssl.backbones.Backbone"):
        embed_layers(model, images, out_paths(tmp_path, ["avgpool"]), attrs=ATTRS, layers=["avgpool"],
                     preprocessing="model", progress=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"unknown preprocessing 'imagenet'; choose one of \['igpt', 'model', 'sbssl', 'standard'\]"):
        embed_layers(model, images, out_paths(tmp_path, ["avgpool"]), attrs=ATTRS, layers=["avgpool"],
                     preprocessing="imagenet", progress=False)  # fmt: skip


def test_the_control_refuses_token_inputs(images, tmp_path):
    from sbssl.backbones import Backbone

    class Tokens(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(16, 4)

        def forward(self, ids):
            return self.embed(ids)

    backbone = Backbone(Tokens(), transform=lambda image: torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"pixel-permutation control needs \(C, H, W\) image inputs"):
        embed_layers(backbone, images, {"e": tmp_path / "e.h5"}, attrs=ATTRS, layers={"e": "embed"},
                     preprocessing="igpt", pooling="tokens_mean", permute={images[0][0]: 1}, progress=False)  # fmt: skip


def test_embed_model_takes_the_entrys_layers_pooling_and_preprocessing(images, tmp_path):
    from sbssl.models import ModelSpec

    root = tmp_path / "stimuli"
    (root / "cat" / "concept").mkdir(parents=True)
    for _, path in images:
        shutil.copy(path, root / "cat" / "concept" / path.name)
    manifest = tmp_path / "manifest.csv"
    write_manifest(build_manifest(root), manifest)
    spec = ModelSpec("vit_t", "vit_tiny_patch16_224", None, 1, source="timm", pooling="cls", title="ViT",
                     family="random")  # fmt: skip
    out = {"block6": tmp_path / "block6.h5"}
    report = embed_model(spec, None, manifest, root, out, batch_size=2, progress=False)
    assert report.computed_layers == ("block6",)
    with h5py.File(out["block6"]) as f:
        assert {k: f.attrs[k] for k in ("module", "pooling", "preprocessing", "source")} == {
            "module": "blocks.5", "pooling": "cls", "preprocessing": "model", "source": "timm"}
        assert f["embeddings"].shape == (3, 192)
    with pytest.raises(ValueError, match=r"model 'vit_t' has no layer\(s\) \['layer4'\]; its layers: \['embed', 'block3'"):
        embed_model(spec, None, manifest, root, {"layer4": tmp_path / "x.h5"}, progress=False)
