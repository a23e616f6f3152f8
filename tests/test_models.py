from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import torch
import yaml

from sbssl.download import HashMismatchError, digest_cache_path
from sbssl.models import (
    RESNET_FORMATS,
    LockedWeights,
    ModelDefinition,
    ModelSpec,
    WeightsSpec,
    build_model,
    convert_checkpoint,
    fetch_weights,
    load_checkpoint,
    load_zoo,
    model_definition_dict,
    model_definition_from_dict,
    read_weights_lock,
    verify_weights,
)

ZOO = Path(__file__).resolve().parents[1] / "config" / "models.yaml"
RANDOM = ModelSpec("random_9", "resnet50", None, 9, title="Random 9", family="random")


@pytest.fixture(scope="module")
def original() -> dict[str, torch.Tensor]:
    """One random ResNet-50 state_dict (seed 9) that every generated checkpoint is made from."""
    return build_model(RANDOM).state_dict()


def _backbone(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


def _prefixed(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


class _HistoryBuffer:
    """Like mmengine's log buffer that MMSelfSup 1.x files keep in ``message_hub`` (a class torch refuses)."""

    def __init__(self) -> None:
        self.values = np.array([0.5, 0.25])
        self.count = np.int64(2)


# Each builder writes the layout the source project publishes (see shared/models/zoo.md).
LAYOUTS: dict[str, Callable[[dict[str, torch.Tensor]], Any]] = {
    # MMSelfSup 1.x: the whole algorithm, backbone.* plus neck, head and a momentum encoder
    "mmselfsup": lambda sd: {
        "meta": {"epoch": 200, "mmselfsup_version": "1.0.0", "seed": np.int64(0)},
        "message_hub": {"log_scalars": {"train/loss": _HistoryBuffer()}},
        "state_dict": {
            **_prefixed(_backbone(sd), "backbone."),
            **_prefixed(_backbone(sd), "momentum_encoder.module.0."),
            "neck.mlp.0.weight": torch.randn(2048, 2048),
            "head.predictor.weight": torch.randn(128, 2048),
        },
    },
    # MMSelfSup 0.x / OpenSelfSup extract_backbone_weights.py output
    "openselfsup": lambda sd: {"state_dict": _backbone(sd), "author": "OpenSelfSup"},
    # VISSL training checkpoint with trunk and heads
    "vissl": lambda sd: {
        "phase_idx": 104,
        "iteration": 1000,
        "type": "consolidated",
        "classy_state_dict": {
            "base_model": {
                "model": {
                    "trunk": _prefixed(_backbone(sd), "_feature_blocks."),
                    "heads": {"0.clf.0.weight": torch.randn(1000, 2048)},
                },
                "meta": {"phase": 104},
            }
        },
    },
    "vissl_converted": lambda sd: {"model_state_dict": _prefixed(_backbone(sd), "_feature_blocks.")},
    "torchvision": lambda sd: dict(sd),
    # official MoCo: query and key encoders, each with a 128-d fc projection, plus the queue
    "moco": lambda sd: {
        "epoch": 200,
        "arch": "resnet50",
        "state_dict": {
            **_prefixed(_backbone(sd), "module.encoder_q."),
            "module.encoder_q.fc.weight": torch.randn(128, 2048),
            "module.encoder_q.fc.bias": torch.randn(128),
            **_prefixed(_backbone(sd), "module.encoder_k."),
            "module.queue": torch.randn(128, 64),
            "module.queue_ptr": torch.zeros(1, dtype=torch.long),
        },
    },
    # official SwAV: flat DataParallel keys with the projection head and prototypes
    "swav": lambda sd: {
        **_prefixed(_backbone(sd), "module."),
        "module.projection_head.0.weight": torch.randn(2048, 2048),
        "module.prototypes.weight": torch.randn(3000, 128),
    },
}


def test_every_resnet_format_has_a_layout_test() -> None:
    assert set(LAYOUTS) == set(RESNET_FORMATS)  # the library formats: tests/test_backbones.py


@pytest.mark.parametrize("fmt", sorted(LAYOUTS))
def test_fetch_convert_build_round_trip(fmt: str, original: dict[str, torch.Tensor], tmp_path: Path) -> None:
    source = tmp_path / "published" / f"ckpt_{fmt}.pth"
    source.parent.mkdir()
    # MMSelfSup's publish_model.py writes the legacy (non-zip) serialization
    torch.save(LAYOUTS[fmt](original), source, _use_new_zipfile_serialization=fmt != "mmselfsup")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    spec = ModelSpec(
        f"m_{fmt}", "resnet50", WeightsSpec(url=source.as_uri(), format=fmt, sha256_prefix=digest[:8]), None,
        title=fmt, family="contrastive", imagenet_top1=50.0,
    )
    lock = tmp_path / "weights.lock"
    path = fetch_weights(spec, tmp_path / "pretrains", lock, progress=False)
    assert path == tmp_path / "pretrains" / f"m_{fmt}.pth"
    assert read_weights_lock(lock) == {spec.name: LockedWeights(source.as_uri(), digest)}
    model = build_model(spec, path)
    assert not model.training
    loaded = model.state_dict()
    expected = original if fmt == "torchvision" else _backbone(original)
    for key, tensor in expected.items():
        assert torch.equal(loaded[key], tensor), key
    if fmt != "torchvision":  # no classifier in the file: fc is torchvision's init, seeded, not the original's
        assert not torch.equal(loaded["fc.weight"], original["fc.weight"])
        assert torch.equal(loaded["fc.weight"], build_model(spec, path).state_dict()["fc.weight"])


def test_module_prefix_is_stripped_for_any_format(original: dict[str, torch.Tensor]) -> None:
    converted = convert_checkpoint({"state_dict": _prefixed(original, "module.")}, "torchvision")
    assert converted.keys() == original.keys()
    converted = convert_checkpoint({"state_dict": _prefixed(_backbone(original), "backbone.")}, "openselfsup")
    assert converted.keys() == _backbone(original).keys()


def test_wrong_layout_for_the_format(original: dict[str, torch.Tensor]) -> None:
    with pytest.raises(ValueError, match="classy_state_dict"):
        convert_checkpoint(dict(original), "vissl")
    with pytest.raises(ValueError, match="backbone"):
        convert_checkpoint({"state_dict": _backbone(original)}, "mmselfsup")
    with pytest.raises(ValueError, match="encoder_q"):
        convert_checkpoint({"state_dict": _backbone(original)}, "moco")
    with pytest.raises(ValueError, match="unknown checkpoint format 'caffe'"):
        convert_checkpoint(dict(original), "caffe")
    with pytest.raises(ValueError, match="non-tensor.*epoch"):
        convert_checkpoint({**original, "epoch": 3}, "torchvision")


def _tv_spec(path: Path) -> ModelSpec:
    return ModelSpec("tv", "resnet50", WeightsSpec(path.as_uri(), "torchvision"), None, title="TV", family="supervised",
                     imagenet_top1=76.1)


def test_missing_unexpected_and_misshaped_keys_are_named(original: dict[str, torch.Tensor], tmp_path: Path) -> None:
    broken = dict(original)
    del broken["layer4.2.bn3.weight"]
    broken["extra.weight"] = torch.zeros(1)
    broken["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    path = tmp_path / "broken.pth"
    torch.save(broken, path)
    with pytest.raises(ValueError) as info:
        build_model(_tv_spec(path), path)
    message = str(info.value)
    assert "broken.pth" in message
    assert "missing (1): layer4.2.bn3.weight" in message
    assert "unexpected (1): extra.weight" in message
    assert "conv1.weight (64, 3, 3, 3) != (64, 3, 7, 7)" in message


def test_missing_batchnorm_counters_are_allowed(original: dict[str, torch.Tensor], tmp_path: Path) -> None:
    # trained-looking statistics: a BatchNorm without its counter keeps every loaded value
    rng = torch.Generator().manual_seed(0)
    old_style = {k: v + torch.rand(v.shape, generator=rng) if k.endswith(("running_var", "running_mean", "bn1.weight"))
                 else v for k, v in original.items() if not k.endswith("num_batches_tracked")}  # fmt: skip
    path = tmp_path / "old.pth"
    torch.save(old_style, path)
    loaded = build_model(_tv_spec(path), path).state_dict()
    for key in ("layer1.0.bn1.running_var", "layer1.0.bn1.running_mean", "layer1.0.bn1.weight", "bn1.bias"):
        assert torch.equal(loaded[key], old_style[key]), key
    assert int(loaded["layer1.0.bn1.num_batches_tracked"]) == 0


class _Exploit:
    """Pickles as a call that would write a file when unpickled without weights_only."""

    def __init__(self, source: Path, marker: Path) -> None:
        self.source, self.marker = source, marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (shutil.copyfile, (str(self.source), str(self.marker)))


def test_checkpoints_are_loaded_weights_only(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    source = tmp_path / "any-file"
    source.write_text("x")
    weights = {"conv1.weight": torch.ones(1)}
    torch.save({"state_dict": weights, "payload": _Exploit(source, marker)}, path)
    # the refused global becomes an inert stand-in: the weights load, the payload's call never happens
    assert load_checkpoint(path, "torchvision") == weights
    assert not marker.exists()
    # where the refused object sits among the weights, it is not a tensor and is rejected
    torch.save({"conv1.weight": _Exploit(source, marker)}, path)
    with pytest.raises(ValueError, match=r"evil\.pth: 'torchvision' checkpoint has non-tensor entries.*conv1"):
        load_checkpoint(path, "torchvision")
    assert not marker.exists()
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        (tmp_path / "junk.pth").write_bytes(b"junk")
        load_checkpoint(tmp_path / "junk.pth", "torchvision")
    with pytest.raises(FileNotFoundError, match="fetch-weights"):
        load_checkpoint(tmp_path / "absent.pth", "torchvision")


def test_random_models_are_deterministic_per_seed_and_differ_across_seeds(original: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(1234)
    before = torch.rand(3)
    torch.manual_seed(1234)
    again = build_model(RANDOM).state_dict()
    assert torch.equal(torch.rand(3), before)  # the caller's RNG stream is untouched
    assert all(torch.equal(again[k], original[k]) for k in original)
    other = build_model(replace(RANDOM, init_seed=10)).state_dict()
    assert not torch.equal(other["conv1.weight"], original["conv1.weight"])
    assert not torch.equal(other["layer4.2.conv3.weight"], original["layer4.2.conv3.weight"])


def test_build_model_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="randomly initialised"):
        build_model(RANDOM, tmp_path / "x.pth")
    spec = _tv_spec(tmp_path / "x.pth")
    with pytest.raises(ValueError, match="needs its weights file"):
        build_model(spec)
    with pytest.raises(ValueError, match="no weights"):
        fetch_weights(RANDOM, tmp_path, tmp_path / "weights.lock")
    with pytest.raises(ValueError, match="no weights"):
        verify_weights(RANDOM, tmp_path / "x.pth", tmp_path / "weights.lock")
    # a definition builds the same model as its zoo entry
    assert torch.equal(build_model(RANDOM.definition).state_dict()["conv1.weight"],
                       build_model(RANDOM).state_dict()["conv1.weight"])


# --- the zoo ------------------------------------------------------------------------------------------------


def test_shipped_zoo() -> None:
    zoo = load_zoo(ZOO)
    ssl = ["rotation", "relative_loc", "jigsaw", "cluster_fit", "odc", "swav", "npid", "moco_v1", "moco_v2",
           "simclr", "byol"]
    assert list(zoo) == ssl + ["supervised", "random_1", "random_2", "random_3", "vit_random"]
    groups = {name: spec.meta_group for name, spec in zoo.items() if spec.meta_group}
    assert groups == {
        **dict.fromkeys(["npid", "moco_v1", "moco_v2", "simclr", "byol"], "contrastive"),
        **dict.fromkeys(["jigsaw", "rotation", "odc", "relative_loc", "cluster_fit"], "non_contrastive"),
    }
    families = {name: spec.family for name, spec in zoo.items()}
    assert [families[n] for n in ("rotation", "relative_loc", "jigsaw")] == ["geometric"] * 3
    assert [families[n] for n in ("cluster_fit", "odc", "swav")] == ["clustering"] * 3
    assert {families[n] for n in ("npid", "moco_v1", "moco_v2", "simclr", "byol")} == {"contrastive"}
    assert [zoo[f"random_{i}"].init_seed for i in (1, 2, 3)] == [1, 2, 3]
    assert all(zoo[f"random_{i}"].weights is None and zoo[f"random_{i}"].imagenet_top1 is None for i in (1, 2, 3))
    assert zoo["supervised"].weights == WeightsSpec(
        "https://download.pytorch.org/models/resnet50-0676ba61.pth", "torchvision", sha256_prefix="0676ba61"
    )
    vit = zoo["vit_random"]
    assert (vit.source, vit.architecture, vit.init_seed) == ("timm", "vit_tiny_patch16_224", 0)
    assert vit.pooling == "tokens_mean"
    from sbssl.backbones import default_layers

    assert list(vit.layers) == [(d.slug, d.module) for d in default_layers(vit)]  # listed as the defaults
    for name in ssl + ["supervised"]:
        spec = zoo[name]
        assert spec.architecture == "resnet50" and spec.init_seed is None and spec.source == "torchvision"
        assert spec.imagenet_top1 is not None and 30 < spec.imagenet_top1 < 80
        w = spec.weights
        assert w is not None and w.url.startswith("https://")
        # every file is verifiable except VISSL's, which publish no hash
        assert w.sha256_prefix or w.md5_prefix or w.format == "vissl", name
        if w.sha256_prefix:  # publishers embed the prefix in the file name
            assert w.sha256_prefix in w.url.rsplit("/", 1)[1], name


def test_model_definition_round_trips_through_plain_params() -> None:
    zoo = load_zoo(ZOO)
    for name, spec in zoo.items():
        params = model_definition_dict(spec)
        assert json.loads(json.dumps(params)) == params  # what Snakemake stores and compares
        assert model_definition_from_dict(name, params) == spec.definition
        assert spec.definition == ModelDefinition(name, spec.architecture, spec.weights, spec.init_seed, spec.source,
                                                  spec.layers, spec.pooling, spec.preprocessing)  # fmt: skip
    assert model_definition_dict(zoo["random_2"]) == {"architecture": "resnet50", "init_seed": 2}
    assert model_definition_dict(zoo["supervised"]) == {"architecture": "resnet50", "weights": {
        "url": "https://download.pytorch.org/models/resnet50-0676ba61.pth", "format": "torchvision",
        "sha256_prefix": "0676ba61"}}


def test_schema_enums_are_the_module_constants() -> None:
    from sbssl.models import FAMILIES, FORMATS, META_GROUPS, POOLINGS, PREPROCESSINGS, SOURCES, zoo_schema

    defs = zoo_schema()["$defs"]
    assert tuple(defs["model"]["properties"]["family"]["enum"]) == FAMILIES
    assert [g for g in defs["model"]["properties"]["meta_group"]["enum"] if g] == list(META_GROUPS)
    assert tuple(defs["source"]["enum"]) == SOURCES
    assert tuple(defs["weights"]["properties"]["format"]["enum"]) == FORMATS
    assert tuple(defs["pooling"]["enum"]) == POOLINGS
    assert tuple(defs["preprocessing"]["enum"]) == PREPROCESSINGS
    # the definition's keys are the same in both places
    assert set(defs["definition"]["properties"]) == set(defs["model"]["properties"]) - {
        "title", "family", "meta_group", "imagenet_top1"}


def test_labels_are_not_part_of_the_definition() -> None:
    byol = load_zoo(ZOO)["byol"]
    relabelled = replace(byol, title="BYOL (new)", family="clustering", meta_group=None, imagenet_top1=1.0)
    assert model_definition_dict(relabelled) == model_definition_dict(byol)
    assert relabelled.definition == byol.definition
    assert "name" not in model_definition_dict(byol)  # the job's wildcard, given separately
    reformatted = replace(byol, weights=replace(byol.weights, format="openselfsup"))
    assert model_definition_dict(reformatted) != model_definition_dict(byol)


@pytest.mark.parametrize(
    "name, data, pattern",
    [
        ("byol", {"architecture": "resnet50", "init_seed": 1, "title": "BYOL"}, r"'byol', key 'title': not a defin"),
        ("byol", {"architecture": "vit", "init_seed": 1}, r"'byol', key 'architecture': 'vit' is not a torchvision"),
        ("byol", {"architecture": "resnet50"}, r"'byol', key 'weights': give exactly one"),
        ("x", {"architecture": "resnet50", "weights": {"url": "http://a/b.pth", "format": "torchvision"}},
         r"'x', key 'weights.url': 'http://a/b.pth' is not an https://, file:// or hf://"),
        ("Bad", {"architecture": "resnet50", "init_seed": 1}, r"model name 'Bad'"),
        ("x", ["resnet50"], r"'x', key '-': expected a mapping"),
    ],
)
def test_model_definition_from_dict_validates(name: str, data: Any, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        model_definition_from_dict(name, data)


def _write_zoo(tmp_path: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    data = yaml.safe_load(ZOO.read_text())
    edit(data)
    path = tmp_path / "zoo.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda d: d["models"]["byol"].update(colour="red"), r"model 'byol', key 'colour': unknown key"),
        (lambda d: d["models"]["npid"].update(family="magic"), r"model 'npid', key 'family': 'magic'"),
        (lambda d: d["models"]["odc"].update(meta_group="other"), r"model 'odc', key 'meta_group'"),
        (lambda d: d["models"]["swav"].update(init_seed=4), r"model 'swav', key 'weights': give exactly one"),
        (lambda d: d["models"]["random_1"].pop("init_seed"), r"model 'random_1', key 'weights': give exactly one"),
        (lambda d: d["models"]["moco_v2"]["weights"].update(sha256="abc"), r"'moco_v2', key 'weights.sha256'"),
        (lambda d: d["models"]["simclr"]["weights"].update(format="caffe"), r"'simclr', key 'weights.format'"),
        (lambda d: d["models"]["jigsaw"]["weights"].pop("url"), r"'jigsaw', key 'weights.url': is required"),
        (lambda d: d["models"]["odc"]["weights"].update(url="http://x.org/odc.pth"),
         r"'odc', key 'weights.url': 'http://x.org/odc.pth' is not an https://, file:// or hf:// URL \(plain http"),
        (lambda d: d["models"]["byol"].pop("architecture"), r"'byol', key 'architecture': is required"),
        (lambda d: d["models"]["rotation"].update(imagenet_top1=470), r"'rotation', key 'imagenet_top1'"),
        (lambda d: d["models"]["random_2"].update(init_seed="two"), r"'random_2', key 'init_seed'"),
        (lambda d: d["models"].update({"Bad Name": d["models"]["byol"]}), r"model name 'Bad Name'"),
        (lambda d: d.update(extra=1), r"unknown top-level key"),
        (lambda d: d.pop("models"), r"top-level 'models:'"),
    ],
)
def test_zoo_validation_names_model_and_key(
    tmp_path: Path, edit: Callable[[dict[str, Any]], None], pattern: str
) -> None:
    path = _write_zoo(tmp_path, edit)
    with pytest.raises(ValueError, match=pattern) as info:
        load_zoo(path)
    assert str(path) in str(info.value)


def test_fetch_weights_command(
    original: dict[str, torch.Tensor], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sbssl.cli import main

    source = tmp_path / "resnet50-published.pth"
    torch.save(original, source)
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text(yaml.safe_dump({"models": {
        "tv": {"title": "TV", "family": "supervised", "architecture": "resnet50", "imagenet_top1": 76.1,
               "weights": {"url": source.as_uri(), "format": "torchvision",
                           "sha256": hashlib.sha256(source.read_bytes()).hexdigest()}},
        "random_1": {"title": "Random 1", "family": "random", "architecture": "resnet50", "init_seed": 1},
    }}))
    dest = tmp_path / "pretrains"
    lock = tmp_path / "config" / "weights.lock"
    args = ["fetch-weights", "--zoo", str(zoo), "--model", "tv", "random_1", "--dest", str(dest), "--quiet",
            "--lock", str(lock)]
    assert main(args) == 0
    assert sorted(p.name for p in dest.iterdir()) == ["tv.pth", "tv.pth.digest.json"]
    assert list(read_weights_lock(lock)) == ["tv"]
    assert (dest / "tv.pth").read_bytes() == source.read_bytes()
    assert "random_1: random initialisation" in capsys.readouterr().out
    assert main(["fetch-weights", "--zoo", str(zoo), "--model", "byol", "--dest", str(dest)]) == 2
    assert "'byol'" in capsys.readouterr().err


def test_zoo_refuses_a_repeated_key(tmp_path: Path) -> None:
    text = ZOO.read_text()
    path = tmp_path / "zoo.yaml"
    # a second 'byol:' entry would silently replace the first with a plain YAML loader
    second = "  byol:\n    title: Other\n    family: random\n    architecture: resnet50\n    init_seed: 5\n"
    path.write_text(text + second)
    with pytest.raises(ValueError, match=r"(?s)zoo.yaml.*'byol' a second time"):
        load_zoo(path)


# --- verified weights: the lock and the per-use check ---------------------------------------------------------


def _checkpoint(tmp_path: Path, seed: int, name: str) -> Path:
    """A valid torchvision-format ResNet-50 checkpoint (random init, ``seed``)."""
    path = tmp_path / "published" / name
    path.parent.mkdir(exist_ok=True)
    torch.save(build_model(replace(RANDOM, init_seed=seed)).state_dict(), path)
    return path


def _definition(url: str, **digests: str) -> ModelDefinition:
    return ModelDefinition("tv", "resnet50", WeightsSpec(url, "torchvision", **digests), None)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two different valid checkpoints (seeds 1 and 2) in one folder."""
    folder = tmp_path_factory.mktemp("ckpt")
    return _checkpoint(folder, 1, "a.pth"), _checkpoint(folder, 2, "b.pth")


def test_first_fetch_locks_the_digest_and_a_different_valid_checkpoint_then_fails(
    checkpoints: tuple[Path, Path], tmp_path: Path
) -> None:
    good, other = checkpoints
    lock, pretrains = tmp_path / "config" / "weights.lock", tmp_path / "pretrains"
    definition = _definition(good.as_uri())  # no digest in the zoo, as for the VISSL entries
    path = fetch_weights(definition, pretrains, lock, progress=False)
    assert read_weights_lock(lock) == {"tv": LockedWeights(good.as_uri(), _sha(good))}
    text = lock.read_text()
    assert text.startswith("# Full sha256")
    assert text.endswith(f"\ntv:\n  url: {good.as_uri()}\n  sha256: {_sha(good)}\n")
    assert verify_weights(definition, path, lock) == _sha(good)
    # someone puts another valid checkpoint in place: it loads fine, but it is not this model's file
    shutil.copyfile(other, path)
    assert build_model(definition, path) is not None
    with pytest.raises(HashMismatchError) as info:
        verify_weights(definition, path, lock)
    message = str(info.value)
    assert str(path) in message and _sha(good) in message and _sha(other) in message
    assert "Delete" in message and "fetch it again" in message and str(lock) in message
    # fetching again replaces the wrong file with the locked one
    assert fetch_weights(definition, pretrains, lock, progress=False).read_bytes() == good.read_bytes()


def test_a_different_valid_checkpoint_fails_the_zoo_digest_without_a_lock(
    checkpoints: tuple[Path, Path], tmp_path: Path
) -> None:
    good, other = checkpoints
    path = tmp_path / "pretrains" / "tv.pth"
    path.parent.mkdir()
    shutil.copyfile(other, path)
    lock = tmp_path / "weights.lock"
    for digests in ({"sha256_prefix": _sha(good)[:8]}, {"sha256": _sha(good)},
                    {"md5_prefix": hashlib.md5(good.read_bytes()).hexdigest()[:8]}):
        with pytest.raises(HashMismatchError, match=r"tv\.pth: not the checkpoint of model 'tv'"):
            verify_weights(_definition(good.as_uri(), **digests), path, lock)
    assert not lock.exists()  # nothing is locked for a file that failed


def test_changed_zoo_url_or_digest_needs_the_lock_entry_deleted(
    checkpoints: tuple[Path, Path], tmp_path: Path
) -> None:
    good, other = checkpoints
    lock, pretrains = tmp_path / "weights.lock", tmp_path / "pretrains"
    path = fetch_weights(_definition(good.as_uri()), pretrains, lock, progress=False)
    moved = _definition(other.as_uri())
    for call in (lambda: fetch_weights(moved, pretrains, lock, progress=False),
                 lambda: verify_weights(moved, path, lock)):
        with pytest.raises(ValueError, match=r"the zoo's weights URL .*b\.pth differs .*a\.pth.*delete the entry 'tv'"):
            call()
    with pytest.raises(ValueError, match=r"the zoo's weights sha256 0{64} differs"):
        verify_weights(_definition(good.as_uri(), sha256="0" * 64), path, lock)
    assert path.read_bytes() == good.read_bytes()
    # deleting the entry deliberately accepts the new source
    lock.write_text("")
    assert fetch_weights(moved, pretrains, lock, progress=False).read_bytes() == other.read_bytes()
    assert read_weights_lock(lock)["tv"] == LockedWeights(other.as_uri(), _sha(other))


def test_verification_hashes_each_file_version_once(
    checkpoints: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sbssl.download

    good, _ = checkpoints
    lock = tmp_path / "weights.lock"
    path = fetch_weights(_definition(good.as_uri()), tmp_path, lock, progress=False)
    hashed = []
    real = sbssl.download._hash_file
    monkeypatch.setattr(sbssl.download, "_hash_file", lambda p, a: hashed.append(p) or real(p, a))
    for _ in range(3):
        assert verify_weights(_definition(good.as_uri()), path, lock) == _sha(good)
    assert hashed == []  # cached by the fetch
    assert json.loads(digest_cache_path(path).read_text())["sha256"] == _sha(good)
    path.touch()  # a new mtime: hashed again, once
    for _ in range(2):
        verify_weights(_definition(good.as_uri()), path, lock)
    assert hashed == [path]


def test_lock_file_errors_name_file_model_and_key(tmp_path: Path) -> None:
    lock = tmp_path / "weights.lock"
    assert read_weights_lock(lock) == {}
    lock.write_text("byol:\n  url: https://x/y.pth\n  sha256: abc\n")
    with pytest.raises(ValueError, match=r"weights.lock: model 'byol', key 'sha256': 'abc' is not a digest"):
        read_weights_lock(lock)
    lock.write_text(f"byol:\n  url: https://x/y.pth\n  sha256: {'a' * 64}\n  note: x\n")
    with pytest.raises(ValueError, match=r"model 'byol', key '-': expected exactly the keys"):
        read_weights_lock(lock)
    lock.write_text(f"byol:\n  url: https://x/y.pth\n  sha256: {'a' * 64}\nbyol:\n  url: u\n  sha256: {'b' * 64}\n")
    with pytest.raises(ValueError, match=r"(?s)weights.lock.*'byol' a second time"):
        read_weights_lock(lock)


def _verify_in_child(args: tuple[str, str, str]) -> str:
    name, url, lock = args
    path = Path(url.removeprefix("file://"))
    weights = WeightsSpec(url, "torchvision", sha256_prefix=_sha(path)[:8])
    return verify_weights(ModelDefinition(name, "resnet50", weights, None), path, lock)


def test_concurrent_first_uses_keep_every_lock_entry(tmp_path: Path) -> None:
    import multiprocessing

    files = []
    for i in range(12):
        f = tmp_path / f"m{i}.pth"
        f.write_bytes(f"checkpoint {i}".encode())
        files.append(f)
    lock = tmp_path / "config" / "weights.lock"
    with multiprocessing.get_context("fork").Pool(6) as pool:
        digests = pool.map(_verify_in_child, [(f"m{i}", f.as_uri(), str(lock)) for i, f in enumerate(files)])
    entries = read_weights_lock(lock)
    assert list(entries) == sorted(f"m{i}" for i in range(12))  # none lost, written sorted
    assert [entries[f"m{i}"].sha256 for i in range(12)] == digests == [_sha(f) for f in files]


@pytest.fixture()
def server() -> Iterator[Any]:
    from test_download import Server  # the scripted 127.0.0.1 server of the download tests

    srv = Server()
    yield srv
    srv.close()


def test_fetch_over_http_reuses_verified_files_and_never_trusts_unverifiable_ones(
    checkpoints: tuple[Path, Path], server: Any, tmp_path: Path
) -> None:
    good, other = checkpoints
    server.files["/tv.pth"] = good.read_bytes()
    definition = _definition(server.base + "/tv.pth")  # no zoo digest
    lock, pretrains = tmp_path / "weights.lock", tmp_path / "pretrains"
    # a file already there before the first fetch cannot be checked: refused for use, downloaded again by fetch
    pretrains.mkdir()
    shutil.copyfile(other, pretrains / "tv.pth")
    with pytest.raises(ValueError, match=r"tv\.pth: model 'tv' has no digest in the zoo and no entry in .*fetch"):
        verify_weights(definition, pretrains / "tv.pth", lock)
    path = fetch_weights(definition, pretrains, lock, progress=False)
    assert path.read_bytes() == good.read_bytes() and server.hits["/tv.pth"] == 1
    # locked and verified: no second request
    fetch_weights(definition, pretrains, lock, progress=False)
    assert server.hits["/tv.pth"] == 1
    # the server now serves another file: a damaged local copy is not replaced by it
    server.files["/tv.pth"] = other.read_bytes()
    path.write_bytes(b"damaged")
    with pytest.raises(HashMismatchError, match=rf"sha256 expected {_sha(good)}, got {_sha(other)}"):
        fetch_weights(definition, pretrains, lock, progress=False)
    assert server.hits["/tv.pth"] == 2 and path.read_bytes() == b"damaged"
    # a zoo URL that differs from the lock fails before any request
    with pytest.raises(ValueError, match="differs from the one locked"):
        fetch_weights(_definition(server.base + "/moved.pth"), pretrains, lock, progress=False)
    assert server.hits["/moved.pth"] == 0


def test_fetch_retries_a_transient_server_error(checkpoints: tuple[Path, Path], server: Any, tmp_path: Path) -> None:
    good, _ = checkpoints
    server.files["/tv.pth"] = good.read_bytes()
    server.fail_first["/tv.pth"] = 1
    path = fetch_weights(_definition(server.base + "/tv.pth", sha256_prefix=_sha(good)[:8]), tmp_path,
                         tmp_path / "weights.lock", retries=1, progress=False)
    assert path.read_bytes() == good.read_bytes() and server.hits["/tv.pth"] == 2
