from __future__ import annotations

import hashlib
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import yaml

from sbssl.models import (
    FORMATS,
    ModelSpec,
    WeightsSpec,
    build_model,
    convert_checkpoint,
    fetch_weights,
    load_checkpoint,
    load_zoo,
    model_spec_from_dict,
)

ZOO = Path(__file__).resolve().parents[1] / "config" / "models.yaml"
RANDOM = ModelSpec("random_9", "Random 9", "random", None, None, "resnet50", None, 9)


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


def test_every_format_has_a_layout_test() -> None:
    assert set(LAYOUTS) == set(FORMATS)


@pytest.mark.parametrize("fmt", sorted(LAYOUTS))
def test_fetch_convert_build_round_trip(fmt: str, original: dict[str, torch.Tensor], tmp_path: Path) -> None:
    source = tmp_path / "published" / f"ckpt_{fmt}.pth"
    source.parent.mkdir()
    # MMSelfSup's publish_model.py writes the legacy (non-zip) serialization
    torch.save(LAYOUTS[fmt](original), source, _use_new_zipfile_serialization=fmt != "mmselfsup")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    spec = ModelSpec(
        f"m_{fmt}", fmt, "contrastive", None, 50.0, "resnet50",
        WeightsSpec(url=source.as_uri(), format=fmt, sha256_prefix=digest[:8]), None,
    )
    path = fetch_weights(spec, tmp_path / "pretrains", progress=False)
    assert path == tmp_path / "pretrains" / f"m_{fmt}.pth"
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
    return ModelSpec("tv", "TV", "supervised", None, 76.1, "resnet50", WeightsSpec(path.as_uri(), "torchvision"), None)


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
    old_style = {k: v for k, v in original.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save(old_style, path)
    loaded = build_model(_tv_spec(path), path).state_dict()
    assert torch.equal(loaded["layer1.0.bn1.running_var"], original["layer1.0.bn1.running_var"])


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
        fetch_weights(RANDOM, tmp_path)


# --- the zoo ------------------------------------------------------------------------------------------------


def test_shipped_zoo() -> None:
    zoo = load_zoo(ZOO)
    ssl = ["rotation", "relative_loc", "jigsaw", "cluster_fit", "odc", "swav", "npid", "moco_v1", "moco_v2",
           "simclr", "byol"]
    assert list(zoo) == ssl + ["supervised", "random_1", "random_2", "random_3"]
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
    for name in ssl + ["supervised"]:
        spec = zoo[name]
        assert spec.architecture == "resnet50" and spec.init_seed is None
        assert spec.imagenet_top1 is not None and 30 < spec.imagenet_top1 < 80
        w = spec.weights
        assert w is not None and w.url.startswith("https://")
        # every file is verifiable except VISSL's, which publish no hash
        assert w.sha256_prefix or w.md5_prefix or w.format == "vissl", name
        if w.sha256_prefix:  # publishers embed the prefix in the file name
            assert w.sha256_prefix in w.url.rsplit("/", 1)[1], name


def test_model_spec_round_trips_through_asdict() -> None:
    from dataclasses import asdict

    zoo = load_zoo(ZOO)
    assert all(model_spec_from_dict(asdict(spec)) == spec for spec in zoo.values())
    with pytest.raises(ValueError, match="not a model spec"):
        model_spec_from_dict({"name": "x"})


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
    args = ["fetch-weights", "--zoo", str(zoo), "--model", "tv", "random_1", "--dest", str(dest), "--quiet"]
    assert main(args) == 0
    assert sorted(p.name for p in dest.iterdir()) == ["tv.pth"]
    assert (dest / "tv.pth").read_bytes() == source.read_bytes()
    assert "random_1: random initialisation" in capsys.readouterr().out
    assert main(["fetch-weights", "--zoo", str(zoo), "--model", "byol", "--dest", str(dest)]) == 2
    assert "'byol'" in capsys.readouterr().err
