"""One random model per source through embedding, similarity and an association test, each stored embedding
checked against the library's own forward call on the same preprocessed batch; checkpoints in each library's
layout; hub snapshots; default layers and depths; iEAT's iGPT recipe against a step-by-step reference."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from sbssl.backbones import (
    IEATImageGPT,
    build_backbone,
    default_layers,
    embedding_settings,
    hook_tensor,
    igpt_context,
    layer_depths,
    pool_output,
)
from sbssl.embed import embed_model
from sbssl.layers import LAYERS, RESNET50_DEPTHS, model_layers, model_layer_slugs
from sbssl.models import (
    ModelSpec,
    WeightsSpec,
    fetch_weights,
    load_zoo,
    read_weights_lock,
    tree_digests,
    verify_weights,
    weights_path,
)
from sbssl.similarity import cosine_similarities, read_similarity
from sbssl.stats import association_test_from_similarity
from sbssl.stimuli import build_manifest, distinct_images, load_image, write_manifest

torch.set_num_threads(2)

CONCEPTS = ("c/x", "c/y", "c/a", "c/b")


@pytest.fixture(scope="module")
def stimuli(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[Path]]:
    """8 distinct images (2 per concept, several sizes and aspect ratios) and their manifest."""
    root = tmp_path_factory.mktemp("stimuli")
    rng = np.random.default_rng(0)
    sizes = [(40, 60), (64, 64), (90, 50), (33, 33)]
    for k, concept in enumerate(CONCEPTS):
        (root / concept).mkdir(parents=True)
        for i in range(2):
            h, w = sizes[(k + i) % len(sizes)]
            Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(root / concept / f"{i}.png")
    manifest = root.parent / f"{root.name}_manifest.csv"
    write_manifest(build_manifest(root), manifest)
    return root, manifest


def _images(stimuli) -> list[tuple[str, Path]]:
    root, manifest = stimuli
    from sbssl.stimuli import read_manifest

    return [(row.sha256, root / row.path) for row in distinct_images(read_manifest(manifest)).itertuples()]


def _pipeline(spec, weights, stimuli, tmp_path: Path, layers: list[str], lock: Path | None = None):
    """embed_model -> cosine_similarities -> association test for each layer; returns the stored rows and the
    transform-free images list in row order."""
    root, manifest = stimuli
    out = {slug: tmp_path / "emb" / f"{slug}.h5" for slug in layers}
    report = embed_model(spec, weights, manifest, root, out, lock_path=lock, batch_size=3, progress=False)
    assert report.computed_layers == tuple(layers) and report.n_images == 8 and report.batches == 3
    rows = {}
    from sbssl.stimuli import read_manifest

    table = read_manifest(manifest)
    for slug in layers:
        sim_path = cosine_similarities(out[slug], tmp_path / "sim" / f"{slug}.h5")
        sim = read_similarity(sim_path)
        assert sim.attrs["layer"] == slug and sim.attrs["model"] == spec.name
        idx = [sim.indices(table.loc[table["concept"] == c, "sha256"].tolist()) for c in CONCEPTS]
        result = association_test_from_similarity(sim.matrix, *idx, permutations=100, seed=0)
        assert np.isfinite(result.effect_size) and 0 < result.p_value <= 1 and result.exact
        with h5py.File(out[slug]) as f:
            rows[slug] = f["embeddings"][()]
            attrs = dict(f.attrs)
        assert attrs["module"] == dict(report_modules(spec, weights))[slug]
    return rows


def report_modules(spec, weights) -> list[tuple[str, str]]:
    folder = Path(weights) if weights is not None and Path(weights).is_dir() else None
    return [(layer.slug, layer.module) for layer in model_layers(spec, folder)]


def _batch(transform, stimuli) -> torch.Tensor:
    return torch.stack([transform(load_image(path)) for _, path in _images(stimuli)])


def _spec(name: str, source: str, architecture: str, *, seed: int | None = 3, weights=None, **extra) -> ModelSpec:
    return ModelSpec(name, architecture, weights, seed, source=source, title=name, family="random", **extra)


# --- one random model per source ---------------------------------------------------------------------------


def test_torchvision_convnext(stimuli, tmp_path):
    spec = _spec("convnext_random", "torchvision", "convnext_tiny")
    assert model_layer_slugs(spec) == ["stage1", "stage2", "stage3", "stage4", "pool"]
    assert embedding_settings(spec) == ("flatten", "sbssl")
    rows = _pipeline(spec, None, stimuli, tmp_path, ["stage1", "pool"])
    import torchvision

    from sbssl.embed import PREPROCESSING

    torch.manual_seed(3)
    reference = torchvision.models.convnext_tiny(weights=None).eval()
    x = _batch(PREPROCESSING["sbssl"], stimuli)
    with torch.inference_mode():
        stage1 = reference.features[1](reference.features[0](x))
        pooled = reference.avgpool(reference.features(x))
    np.testing.assert_allclose(rows["stage1"], stage1.flatten(1).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rows["pool"], pooled.flatten(1).numpy(), rtol=1e-4, atol=1e-5)


def test_timm_vit(stimuli, tmp_path):
    spec = _spec("vit_random", "timm", "vit_tiny_patch16_224", pooling="cls")
    assert [(l.slug, l.module) for l in model_layers(spec)] == [
        ("embed", "norm_pre"), ("block3", "blocks.2"), ("block6", "blocks.5"), ("block9", "blocks.8"),
        ("block12", "blocks.11"), ("final", "norm"),
    ]  # fmt: skip
    rows = _pipeline(spec, None, stimuli, tmp_path, ["block6", "final"])
    import timm
    from timm.data import create_transform, resolve_data_config

    torch.manual_seed(3)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    x = _batch(create_transform(**resolve_data_config({}, model=reference)), stimuli)
    with torch.inference_mode():
        final = reference.forward_features(x)
        ((patches, prefix),) = reference.forward_intermediates(
            x, indices=[5], return_prefix_tokens=True, norm=False, output_fmt="NLC", intermediates_only=True
        )
    np.testing.assert_allclose(rows["final"], final[:, 0].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rows["block6"], prefix[:, 0].numpy(), rtol=1e-4, atol=1e-5)
    assert patches.shape[1] == 196


def test_open_clip_image_tower(stimuli, tmp_path):
    spec = _spec("clip_random", "open_clip", "ViT-S-32", pooling="patch_mean")
    assert model_layer_slugs(spec) == ["embed", "block3", "block6", "block9", "block12", "final"]
    rows = _pipeline(spec, None, stimuli, tmp_path, ["final"])
    import open_clip

    torch.manual_seed(3)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-S-32", pretrained=None)
    visual = model.visual.eval()
    visual.output_tokens = True
    with torch.inference_mode():
        _, tokens = visual(_batch(preprocess, stimuli))  # the patch tokens after ln_post
    np.testing.assert_allclose(rows["final"], tokens.mean(dim=1).numpy(), rtol=1e-4, atol=1e-5)


def _hf_vit_folder(folder: Path, cls_name: str = "ViTConfig") -> Path:
    import transformers

    config = getattr(transformers, cls_name)(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    config.save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_huggingface_vit(stimuli, tmp_path):
    folder = _hf_vit_folder(tmp_path / "vit_config")
    spec = _spec("hf_vit_random", "huggingface", str(folder), pooling="tokens_mean")
    assert [(l.slug, l.module) for l in model_layers(spec)] == [
        ("embed", "embeddings"), ("block1", "layers.0"), ("block2", "layers.1"), ("block3", "layers.2"),
        ("block4", "layers.3"), ("final", "layernorm"),
    ]  # fmt: skip
    assert embedding_settings(spec) == ("tokens_mean", "model")
    rows = _pipeline(spec, None, stimuli, tmp_path, ["embed", "block2", "final"])
    import transformers

    torch.manual_seed(3)
    reference = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(folder)).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    pixels = processor(images=[load_image(p) for _, p in _images(stimuli)], return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        out = reference(pixels, output_hidden_states=True)
    # hidden_states[k] is the input of layer k: [0] the embeddings, [2] the output of layers.1
    np.testing.assert_allclose(rows["embed"], out.hidden_states[0].mean(1).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rows["block2"], out.hidden_states[2].mean(1).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rows["final"], out.last_hidden_state.mean(1).numpy(), rtol=1e-4, atol=1e-5)


# --- checkpoints in each library's layout -------------------------------------------------------------------


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("source, architecture, fmt, suffix", [
    ("timm", "vit_tiny_patch16_224", "timm", "safetensors"),
    ("open_clip", "ViT-S-32", "open_clip", "pth"),
    ("torchvision", "convnext_tiny", "torchvision", "safetensors"),
])  # fmt: skip
def test_checkpoints_in_the_library_layout_load_strictly(source, architecture, fmt, suffix, tmp_path):
    original = build_backbone(_spec("src", source, architecture, seed=11)).module
    state = original.state_dict()
    if source == "open_clip":  # a whole CLIP model's state dict: the text tower is left out on loading
        import open_clip

        with torch.random.fork_rng():
            torch.manual_seed(11)
            whole = open_clip.create_model(architecture, pretrained=None)
        state = {**{f"visual.{k}": v for k, v in state.items()},
                 **{k: v for k, v in whole.state_dict().items() if not k.startswith("visual.")}}  # fmt: skip
    file = tmp_path / f"published.{suffix}"
    if suffix == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, file)
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, file)
    spec = _spec("pre", source, architecture, seed=None, weights=WeightsSpec(file.as_uri(), fmt, sha256=_sha(file)))
    path = fetch_weights(spec, tmp_path / "pretrains", tmp_path / "weights.lock", progress=False)
    assert path == weights_path(spec, tmp_path / "pretrains") and path.name == "pre.pth"
    loaded = build_backbone(spec, path).module
    assert not loaded.training
    ours = loaded.state_dict()
    assert set(ours) == set(original.state_dict())
    assert all(torch.equal(ours[k], v) for k, v in original.state_dict().items())
    assert all(not t.is_meta for t in (*loaded.parameters(), *loaded.buffers()))
    # a checkpoint missing a backbone tensor is named
    broken = {k: v for k, v in state.items() if "blocks.3." not in k and "resblocks.3." not in k and "features.3." not in k}
    bad = tmp_path / "broken.pth"
    torch.save(broken, bad)
    bad_spec = replace(spec, weights=WeightsSpec(bad.as_uri(), fmt))
    with pytest.raises(ValueError, match=rf"broken\.pth: does not match {source} .*missing \(\d+\): "):
        build_backbone(bad_spec, bad)


def test_sbssl_small_cnn_from_a_debias_checkpoint(stimuli, tmp_path):
    from sbssl.networks import SmallCNN

    torch.manual_seed(4)
    trained = SmallCNN().eval()
    file = tmp_path / "model.pt"
    torch.save(trained.state_dict(), file)  # what `sbssl debias` writes: the backbone's flat state dict
    spec = _spec("debiased", "sbssl", "small_cnn", seed=None, weights=WeightsSpec(file.as_uri(), "state_dict", sha256=_sha(file)))
    assert model_layer_slugs(spec) == ["conv1", "conv2", "pool"]
    assert embedding_settings(spec) == ("flatten", "model")
    lock = tmp_path / "weights.lock"
    rows = _pipeline(spec, file, stimuli, tmp_path, ["conv1", "pool"], lock=lock)
    # the model's transform is the training images' form: 8 x 8 box-averaged RGB in [0, 1]
    images = _images(stimuli)
    x = torch.stack([
        torch.from_numpy(np.asarray(load_image(p).resize((8, 8), Image.Resampling.BOX), dtype=np.float32) / 255)
        .permute(2, 0, 1) for _, p in images
    ])  # fmt: skip
    with torch.inference_mode():
        taps = trained(x)
    np.testing.assert_allclose(rows["conv1"], taps["conv1"].flatten(1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rows["pool"], taps["pool"].numpy(), rtol=1e-5, atol=1e-6)
    assert rows["conv1"].shape == (8, 32 * 8 * 8)
    with pytest.raises(ValueError, match="sbssl has no network 'big_cnn'"):
        build_backbone(_spec("x", "sbssl", "big_cnn"))


def test_torchvision_classifier_absent_from_the_checkpoint_is_seeded(tmp_path):
    original = build_backbone(_spec("src", "torchvision", "convnext_tiny", seed=5)).module.state_dict()
    file = tmp_path / "backbone.pth"
    torch.save({k: v for k, v in original.items() if not k.startswith("classifier.2.")}, file)
    spec = _spec("pre", "torchvision", "convnext_tiny", seed=None, weights=WeightsSpec(file.as_uri(), "torchvision"))
    first, second = build_backbone(spec, file).module.state_dict(), build_backbone(spec, file).module.state_dict()
    assert torch.equal(first["classifier.2.weight"], second["classifier.2.weight"])
    assert not torch.equal(first["classifier.2.weight"], original["classifier.2.weight"])
    assert torch.equal(first["features.0.0.weight"], original["features.0.0.weight"])


def test_huggingface_model_folder_fetch_verify_and_build(tmp_path):
    import transformers

    published = _hf_vit_folder(tmp_path / "published" / "vit", "Dinov2Config")
    torch.manual_seed(4)
    model = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(published))
    model.save_pretrained(published)
    digest = tree_digests(published)["sha256"]
    spec = _spec("dino", "huggingface", "facebook/dinov2-tiny-test", seed=None,
                 weights=WeightsSpec(published.as_uri(), "huggingface"))  # fmt: skip
    lock = tmp_path / "weights.lock"
    folder = fetch_weights(spec, tmp_path / "pretrains", lock, progress=False)
    assert folder == tmp_path / "pretrains" / "dino" and folder.is_dir()
    assert read_weights_lock(lock)["dino"].sha256 == digest == tree_digests(folder)["sha256"]
    assert verify_weights(spec, folder, lock) == digest
    assert [(l.slug, l.module) for l in model_layers(spec, folder)][:2] == [("embed", "embeddings"),
                                                                          ("block1", "encoder.layer.0")]
    built = build_backbone(spec, folder, preprocessing="model")
    assert all(torch.equal(built.module.state_dict()[k], v) for k, v in model.state_dict().items())
    assert built.transform(Image.new("RGB", (50, 40))).shape == (3, 32, 32)
    # any changed, added or renamed file is a different model folder
    (folder / "extra.txt").write_text("x")
    with pytest.raises(ValueError, match=r"not the checkpoint of model 'dino'"):
        verify_weights(spec, folder, lock)
    (folder / "extra.txt").unlink()
    assert verify_weights(spec, folder, lock) == digest


def test_hub_snapshot_is_fetched_at_its_revision_and_locked(tmp_path, monkeypatch):
    import huggingface_hub

    published = _hf_vit_folder(tmp_path / "hub" / "vit")
    calls = []

    def snapshot_download(**kwargs):  # the hub client, offline: copies the "remote" folder
        calls.append(kwargs)
        shutil.copytree(published, kwargs["local_dir"])
        (Path(kwargs["local_dir"]) / ".cache" / "huggingface").mkdir(parents=True)  # the client's metadata
        return str(kwargs["local_dir"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    url = "hf://owner/vit-test@0123456789abcdef0123456789abcdef01234567"
    spec = _spec("hubvit", "huggingface", "owner/vit-test", seed=None, weights=WeightsSpec(url, "huggingface"))
    lock = tmp_path / "weights.lock"
    folder = fetch_weights(spec, tmp_path / "pretrains", lock, progress=False)
    assert calls[0]["repo_id"] == "owner/vit-test" and calls[0]["revision"] == "0123456789abcdef0123456789abcdef01234567"
    assert "*.safetensors" in calls[0]["allow_patterns"] and "*.h5" not in calls[0]["allow_patterns"]
    assert read_weights_lock(lock)["hubvit"].url == url
    assert read_weights_lock(lock)["hubvit"].sha256 == tree_digests(published)["sha256"]  # hidden files left out
    assert fetch_weights(spec, tmp_path / "pretrains", lock, progress=False) == folder and len(calls) == 1
    assert not list((tmp_path / "pretrains").glob(".*"))  # no staging folder left


def test_zoo_entries_of_every_source(tmp_path):
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text(
        "models:\n"
        "  vit:\n    title: ViT\n    family: random\n    source: timm\n    architecture: vit_tiny_patch16_224\n"
        "    init_seed: 0\n    layers:\n      block6: blocks.5\n      final: {module: norm, title: Last, depth: 1}\n"
        "    pooling: cls\n"
        "  clip:\n    title: CLIP\n    family: contrastive\n    source: open_clip\n    architecture: ViT-B-32\n"
        "    weights:\n      url: https://huggingface.co/x/y/resolve/abc/open_clip_model.safetensors\n"
        "      format: open_clip\n"
        "  dino:\n    title: DINO\n    family: contrastive\n    source: huggingface\n    architecture: facebook/dino-vitb16\n"
        "    weights: {url: 'hf://facebook/dino-vitb16@6c50221fcbec4e37f855748fe9a125ab3a1b6d89', format: huggingface}\n"
        "    preprocessing: model\n"
        "  convnext:\n    title: ConvNeXt\n    family: supervised\n    architecture: convnext_tiny\n    init_seed: 2\n"
    )  # fmt: skip
    models = load_zoo(zoo)
    assert models["vit"].definition.layers == (("block6", "blocks.5"), ("final", "norm"))
    assert [(l.slug, l.title, round(l.depth, 3)) for l in model_layers(models["vit"])] == [
        ("block6", "Block 6", 0.509), ("final", "Last", 1.0)]
    assert models["convnext"].source == "torchvision"
    from sbssl.models import model_definition_dict, model_definition_from_dict

    for name, spec in models.items():
        params = model_definition_dict(spec)
        assert json.loads(json.dumps(params)) == params
        assert model_definition_from_dict(name, params) == spec.definition
    assert model_definition_dict(models["vit"]) == {
        "architecture": "vit_tiny_patch16_224", "source": "timm", "init_seed": 0,
        "layers": {"block6": "blocks.5", "final": "norm"}, "pooling": "cls"}  # fmt: skip
    # a hub entry without a fetched folder cannot derive its default layers: the error says what to do
    with pytest.raises(ValueError, match="not a Hugging Face model folder"):
        model_layers(models["dino"])


@pytest.mark.parametrize("source, extra, pattern", [
    ("keras", "", r"model 'm', key 'source': 'keras' is not one of"),
    ("timm", "    pooling: max\n", r"model 'm', key 'pooling': 'max' is not one of"),
    ("timm", "    preprocessing: igpt\n", r"model 'm', key 'preprocessing': igpt is iEAT's recipe"),
    ("timm", "    layers:\n      Block6: blocks.5\n", r"model 'm', key 'layers'"),
    ("timm", "    layers:\n      b6: {module: blocks.5, depth: 2}\n", r"model 'm', key 'layers.b6'"),
])  # fmt: skip
def test_zoo_errors_of_the_new_keys(tmp_path, source, extra, pattern):
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text(f"models:\n  m:\n    title: M\n    family: random\n    source: {source}\n"
                   f"    architecture: vit_tiny_patch16_224\n    init_seed: 0\n{extra}")  # fmt: skip
    with pytest.raises(ValueError, match=pattern) as info:
        load_zoo(zoo)
    assert str(zoo) in str(info.value)


def test_weights_format_must_fit_the_source(tmp_path):
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text("models:\n  m:\n    title: M\n    family: random\n    source: timm\n    architecture: vit_tiny_patch16_224\n"
                   "    weights: {url: 'https://x/y.pth', format: mmselfsup}\n")  # fmt: skip
    with pytest.raises(ValueError, match=r"key 'weights.format': 'mmselfsup' is not a timm checkpoint format"):
        load_zoo(zoo)
    zoo.write_text("models:\n  m:\n    title: M\n    family: random\n    source: huggingface\n    architecture: a/b\n"
                   "    weights: {url: 'hf://a/b', format: huggingface}\n")  # fmt: skip
    with pytest.raises(ValueError, match=r"key 'weights.url'.*hf://<owner>/<name>@<revision>"):
        load_zoo(zoo)


# --- layers, depth, hook outputs, pooling ---------------------------------------------------------------------


def test_resnet50_layers_keep_the_paper_slugs_titles_and_depths():
    spec = _spec("r", "torchvision", "resnet50")
    assert [(l.slug, l.module, l.title) for l in model_layers(spec)] == [
        ("maxpool", "maxpool", "Block 1"), ("layer1", "layer1", "Block 2"), ("layer2", "layer2", "Block 3"),
        ("layer3", "layer3", "Block 4"), ("layer4", "layer4", "Block 5"), ("avgpool", "avgpool", "GAP"),
    ]  # fmt: skip
    assert [d.slug for d in default_layers(spec)] == list(LAYERS)
    # the table that keeps the paper's models free of torch is what the trace computes
    assert layer_depths(spec, list(LAYERS)) == pytest.approx(RESNET50_DEPTHS, abs=1e-12)


def test_depths_are_increasing_and_end_at_one():
    for source, architecture in [("timm", "vit_tiny_patch16_224"), ("torchvision", "convnext_tiny"),
                                 ("open_clip", "ViT-S-32")]:  # fmt: skip
        layers = model_layers(_spec("m", source, architecture))
        depths = [layer.depth for layer in layers]
        assert depths == sorted(depths) and depths[-1] == 1.0 and 0 <= depths[0] < 0.25, (source, depths)
        assert len(set(depths)) == len(depths)


def test_hook_outputs_and_pooling():
    tokens = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    assert torch.equal(hook_tensor((tokens, "attention")), tokens)
    from transformers.modeling_outputs import BaseModelOutput

    assert torch.equal(hook_tensor(BaseModelOutput(last_hidden_state=tokens)), tokens)
    assert torch.equal(pool_output(tokens, "cls"), tokens[:, 0])
    assert torch.equal(pool_output(tokens, "tokens_mean"), tokens.mean(1))
    assert torch.equal(pool_output(tokens, "patch_mean"), tokens[:, 1:].mean(1))
    assert torch.equal(pool_output(tokens, "flatten"), tokens.reshape(2, 12))
    fmap = torch.rand(2, 5, 3, 3)
    assert torch.equal(pool_output(fmap, "mean"), fmap.mean(dim=(2, 3)))
    assert torch.equal(pool_output(fmap[:, :, 0, 0], "cls"), fmap[:, :, 0, 0])  # (B, C) passes
    with pytest.raises(ValueError, match=r"layer stage1: cls pooling needs a \(batch, tokens, channels\)"):
        pool_output(fmap, "cls", "stage1")
    with pytest.raises(TypeError, match="without any tensor"):
        hook_tensor((None, "x"))


# --- iEAT's iGPT recipe ------------------------------------------------------------------------------------------


def _igpt_folder(folder: Path, n_layer: int = 4) -> Path:
    """A small random ImageGPT (every weight random, norm gains and biases included) with 512 clusters in its
    image processor config, as the hub's openai/imagegpt-* folders have."""
    import transformers

    config = transformers.ImageGPTConfig(vocab_size=513, n_positions=1024, n_embd=16, n_layer=n_layer, n_head=2)
    torch.manual_seed(8)
    model = transformers.ImageGPTModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.ndim == 1 and p.shape[0] == 16 else 0.0))
    model.save_pretrained(folder)
    clusters = np.random.default_rng(1).uniform(-1, 1, size=(512, 3)).astype(np.float32)
    transformers.ImageGPTImageProcessor(clusters=clusters).save_pretrained(folder)
    return folder


def _reference_igpt(folder: Path, image: Image.Image, l: int) -> np.ndarray:
    """iEAT's recipe written out step by step (numpy preprocessing, a by-hand transformer forward)."""
    clusters = np.asarray(json.loads((folder / "preprocessor_config.json").read_text())["clusters"], np.float32)
    from safetensors.torch import load_file

    w = load_file(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    rgb = np.asarray(image.convert("RGB"))
    d = min(rgb.shape[:2])
    small = cv2.resize(np.ascontiguousarray(rgb[:d, :d]), (32, 32), interpolation=cv2.INTER_AREA)
    pixels = (small.astype(np.float64) / 127.5 - 1).reshape(-1, 3)
    tokens = ((pixels[:, None, :] - clusters[None, :, :].astype(np.float64)) ** 2).sum(-1).argmin(1)
    context = torch.tensor(np.concatenate([[512], tokens[:-1]]))

    def ieat_norm(x, gain):  # divides by the centred standard deviation, x itself is not centred
        var = ((x - x.mean(-1, keepdim=True)) ** 2).mean(-1, keepdim=True)
        return x / torch.sqrt(var + 1e-5) * gain

    key = "h.{}.{}".format
    h = w["wte.weight"][context] + w["wpe.weight"][:1024]
    n_head, n_embd = config["n_head"], config["n_embd"]
    mask = torch.tril(torch.ones(1024, 1024, dtype=torch.bool))
    for b in range(l):
        x = ieat_norm(h, w[key(b, "ln_1.weight")])
        q, k, v = (x @ w[key(b, "attn.c_attn.weight")] + w[key(b, "attn.c_attn.bias")]).split(n_embd, dim=-1)
        heads = [t.reshape(1024, n_head, -1).transpose(0, 1) for t in (q, k, v)]
        scores = heads[0] @ heads[1].transpose(-1, -2) / (n_embd // n_head) ** 0.5
        attn = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ heads[2]
        h = h + attn.transpose(0, 1).reshape(1024, n_embd) @ w[key(b, "attn.c_proj.weight")] + w[key(b, "attn.c_proj.bias")]
        x = ieat_norm(h, w[key(b, "ln_2.weight")])
        x = x @ w[key(b, "mlp.c_fc.weight")] + w[key(b, "mlp.c_fc.bias")]
        x = x * torch.sigmoid(1.702 * x)
        h = h + x @ w[key(b, "mlp.c_proj.weight")] + w[key(b, "mlp.c_proj.bias")]
    # hidden state l (the input of block l), normed with block l + 1's gain, mean over the 1024 positions
    return ieat_norm(h, w[key(l + 1, "ln_1.weight")]).mean(0).numpy()


def test_igpt_recipe_equals_the_step_by_step_reference(stimuli, tmp_path):
    published = _igpt_folder(tmp_path / "published")
    spec = _spec("igpt_test", "huggingface", "openai/imagegpt-test", seed=None,
                 weights=WeightsSpec(published.as_uri(), "huggingface"), layers=(("l1", "hidden.1"), ("l2", "hidden.2")))  # fmt: skip
    lock = tmp_path / "weights.lock"
    folder = fetch_weights(spec, tmp_path / "pretrains", lock, progress=False)
    assert embedding_settings(spec, folder) == ("tokens_mean", "igpt")
    rows = _pipeline(spec, folder, stimuli, tmp_path, ["l1", "l2"], lock=lock)
    images = _images(stimuli)
    for l in (1, 2):
        expected = np.stack([_reference_igpt(published, load_image(p), l) for _, p in images])
        np.testing.assert_allclose(rows[f"l{l}"], expected, rtol=1e-4, atol=1e-5)
    # iEAT's norm is not iGPT's own (transformers' ImageGPTLayerNorm divides by the root mean square)
    import transformers

    plain = transformers.ImageGPTModel.from_pretrained(published).eval()
    context = torch.stack([igpt_context(load_image(p), np.asarray(json.loads(
        (published / "preprocessor_config.json").read_text())["clusters"], np.float32)) for _, p in images])  # fmt: skip
    with torch.inference_mode():
        hidden = plain(input_ids=context, output_hidden_states=True).hidden_states[2]
        literal = plain.h[2].ln_1(hidden).mean(1).numpy()
    assert not np.allclose(rows["l2"], literal, rtol=1e-3)


def test_igpt_context_is_ieats_preprocessing():
    rng = np.random.default_rng(5)
    image = Image.fromarray(rng.integers(0, 256, size=(70, 40, 3), dtype=np.uint8))
    clusters = rng.uniform(-1, 1, size=(512, 3)).astype(np.float32)
    context = igpt_context(image, clusters).numpy()
    assert context.shape == (1024,) and context.dtype == np.int64 and context[0] == 512
    square = np.asarray(image)[:40, :40]  # the top-left square
    small = cv2.resize(np.ascontiguousarray(square), (32, 32), interpolation=cv2.INTER_AREA) / 127.5 - 1
    nearest = ((small.reshape(-1, 1, 3) - clusters[None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(context[1:], nearest[:-1])  # the last pixel is dropped


def test_random_igpt_gets_seeded_clusters_and_rejects_image_presets(tmp_path):
    import transformers

    folder = tmp_path / "igpt_config"
    transformers.ImageGPTConfig(vocab_size=513, n_positions=1024, n_embd=16, n_layer=4, n_head=2).save_pretrained(folder)
    spec = _spec("igpt_random", "huggingface", str(folder), seed=2)
    assert model_layer_slugs(spec) == ["l1", "l2"]  # quarters of 4 blocks, at most n_layer - 2
    one = build_backbone(spec, preprocessing="igpt")
    two = build_backbone(spec, preprocessing="igpt")
    assert isinstance(one.module, IEATImageGPT)
    image = Image.new("RGB", (20, 20), (200, 10, 10))
    assert torch.equal(one.transform(image), two.transform(image))
    with pytest.raises(ValueError, match="ImageGPT takes iEAT's tokens: use preprocessing igpt"):
        build_backbone(spec, preprocessing="sbssl")


STUDY_CONFIGS = {  # hub id fragment -> transformers config class of that checkpoint
    "beit": "BeitConfig", "dino-vit": "ViTConfig", "vit-mae": "ViTMAEConfig", "vit-msn": "ViTMSNConfig",
    "imagegpt": "ImageGPTConfig",
}


@pytest.mark.parametrize("zoo_file", ["vit_study_models.yaml", "ieat_models_zoo.yaml"])
def test_study_zoos_name_modules_that_exist(zoo_file, tmp_path):
    """Every layer of the study zoos is a module of the network this transformers version builds for that
    checkpoint's config (a tiny config of the same class and depth, built on the meta device)."""
    import transformers

    from sbssl.backbones import _hf_make

    zoo = load_zoo(Path(__file__).resolve().parents[1] / "config" / zoo_file)
    assert zoo and all(spec.weights is not None and spec.weights.url.startswith("hf://") for spec in zoo.values())
    for name, spec in zoo.items():
        cls = next(c for fragment, c in STUDY_CONFIGS.items() if fragment in spec.architecture)
        modules = [module for _, module in spec.layers]
        indices = [int(m.split(".")[1]) for m in modules if m.startswith(("layers.", "hidden."))]
        depth = max(indices) + (2 if cls == "ImageGPTConfig" else 1)
        if cls == "ImageGPTConfig":
            config = transformers.ImageGPTConfig(vocab_size=513, n_positions=64, n_embd=8, n_layer=depth, n_head=2)
        else:
            config = getattr(transformers, cls)(hidden_size=8, num_hidden_layers=depth, num_attention_heads=2,
                                                intermediate_size=16, image_size=32, patch_size=16)  # fmt: skip
        folder = tmp_path / name
        config.save_pretrained(folder)
        with torch.device("meta"):
            network = _hf_make(replace(spec.definition, weights=None, init_seed=0), folder)
        named = dict(network.named_modules())
        assert all(m in named for m in modules), (name, [m for m in modules if m not in named])
        assert [layer.depth for layer in model_layers(spec)] == sorted(layer.depth for layer in model_layers(spec))
