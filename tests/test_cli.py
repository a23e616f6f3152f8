from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from sbssl.cli import build_parser, main

SUBCOMMANDS = [
    "manifest", "fetch-weights", "test-embeddings", "embed", "summarize", "leakage", "fetch-coco",
    "coco-annotations", "balanced-subset", "debias", "fetch-waterbirds",
]


def test_every_subcommand_is_listed_and_has_help(capsys):
    with pytest.raises(SystemExit) as top:
        main(["--help"])
    assert top.value.code == 0
    listing = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in listing
        with pytest.raises(SystemExit) as sub:
            main([name, "--help"])
        assert sub.value.code == 0
        assert f"usage: sbssl {name}" in capsys.readouterr().out


def test_parser_knows_exactly_these_subcommands():
    parser = build_parser()
    actions = [a for a in parser._subparsers._group_actions if a.choices]  # argparse keeps them here
    assert sorted(actions[0].choices) == sorted(SUBCOMMANDS)


def test_module_entry_point_and_bad_input_exit_code(tmp_path):
    version = subprocess.run([sys.executable, "-m", "sbssl", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("sbssl ")
    missing = tmp_path / "nowhere"
    proc = subprocess.run(
        [sys.executable, "-m", "sbssl", "manifest", "--stimuli", str(missing), "--out", str(tmp_path / "m.csv")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert str(missing) in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "m.csv").exists()


def test_summarize_the_published_rows_with_our_zoo(tmp_path, repo_dir, capsys):
    # The shipped rows through the command line, with config/models.yaml as zoo (same 15 paper models).
    out = tmp_path / "paper"
    rc = main([
        "summarize", "--results", str(repo_dir / "data/published/sbssl_published_results.csv.gz"),
        "--format", "sbssl-published", "--zoo", str(repo_dir / "config" / "models.yaml"),
        "--catalogue", str(repo_dir / "config" / "tests.yaml"), "--out", str(out),
    ])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "11232 per-test rows" in printed
    assert "meta-test at avgpool (alternative greater): paper-compatible p = 0.0493 (142 thresholds)" in printed
    assert "robust p = 0.0472 (137 thresholds)" in printed and "area-under-count-curve p = 0.0238" in printed
    counts = pd.read_csv(out / "counts.csv")
    byol = counts[(counts["model"] == "byol") & (counts["layer"] == "avgpool")]
    assert byol["n_biases"].tolist() == [18, 15, 10] and set(byol["alternative"]) == {"greater"}


def test_summarize_errors_name_the_file_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "tests.csv"
    pd.DataFrame({"model": ["a"], "layer": ["avgpool"]}).to_csv(bad, index=False)
    rc = main(["summarize", "--results", str(bad), "--zoo", "published", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and f"{bad}: missing column(s) family, test" in err and "Rebuild it" in err
    assert not (tmp_path / "out").exists()


def test_summarize_meta_test_layer_option(tmp_path, repo_dir, capsys):
    rc = main([
        "summarize", "--results", str(repo_dir / "data/published/sbssl_published_results.csv.gz"),
        "--format", "sbssl-published", "--zoo", "published", "--meta-test-layer", "layer4",
        "--heatmap-layer", "layer4", "--out", str(tmp_path),
    ])  # fmt: skip
    assert rc == 0
    meta = json.loads((tmp_path / "meta_test.json").read_text())
    assert meta["layer"] == "layer4" and meta["n_thresholds"] > 0 and meta["p_value"] != pytest.approx(0.0493, abs=1e-4)
    assert (tmp_path / "figures" / "heatmap_layer4.rst").read_text().startswith("Effect size d of every test")


# --- leakage, COCO, balanced subsets ------------------------------------------------------------------


@pytest.fixture(scope="module")
def ann_csv(tmp_path_factory):
    from sbssl.leakage import synthetic_annotations

    folder = tmp_path_factory.mktemp("leakage")
    table = synthetic_annotations(1200, n_labels=4, seed=2)
    table.to_csv(folder / "ANN.csv", index=False)
    # Logits that add a gender signal to every label: the model leaks more than its labels.
    sign = np.where(table["gender"] == "man", 1.0, -1.0)
    pred = table[["image_id"]].copy()
    for column in [c for c in table.columns if c.startswith("label_")]:
        pred[column] = 4.0 * (2 * table[column] - 1) + 3.0 * sign
    pred.to_csv(folder / "PRED.csv", index=False)
    return folder / "ANN.csv", folder / "PRED.csv", table


def test_leakage_writes_the_report(ann_csv, tmp_path, capsys):
    ann, pred, _ = ann_csv
    out = tmp_path / "leak"
    rc = main(["leakage", "--annotations", str(ann), "--predictions", str(pred), "--attribute", "gender",
               "--out", str(out), "--attacker", "logistic", "--rounds", "2", "--seed", "3"])
    assert rc == 0
    report = json.loads((out / "leakage.json").read_text())
    assert {"mean", "std"} <= set(report["lambda_D"]) and {"mean", "std"} <= set(report["lambda_M"])
    assert 0.5 <= report["lambda_D"]["mean"] < 0.8
    assert report["lambda_M"]["mean"] > 0.95  # the logits carry gender directly
    assert report["amplification"] == pytest.approx(report["lambda_M"]["mean"] - report["lambda_D_at_model_f1"])
    assert report["attacker"] == "logistic" and report["rounds"] == 2 and report["seed"] == 3
    assert report["sbssl_version"]
    curve = pd.read_csv(out / "natural_leakage.csv")
    assert curve["p"].iloc[0] == 0.0 and curve["leakage_mean"].iloc[0] == pytest.approx(report["lambda_D"]["mean"])
    assert (out / "natural_leakage.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert f"lambda_D = {report['lambda_D']['mean']:.3f}" in printed and "amplification = +" in printed


def test_leakage_bad_input_exits_2_naming_the_file(ann_csv, tmp_path, capsys):
    ann, pred, table = ann_csv
    one_value = tmp_path / "one.csv"
    table.assign(gender="man").to_csv(one_value, index=False)
    rc = main(["leakage", "--annotations", str(one_value), "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert rc == 2 and f"sbssl leakage: error: {one_value}: attribute 'gender' has one value only" in err
    short = tmp_path / "pred.csv"
    pd.read_csv(pred).drop(columns="label_l0").to_csv(short, index=False)
    rc = main(["leakage", "--annotations", str(ann), "--predictions", str(short), "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert rc == 2 and f"{short}: label column(s) ['label_l0'] missing" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_balanced_subset_command(ann_csv, tmp_path, capsys):
    from sbssl.leakage import balanced_subset, read_annotations

    ann, _, _ = ann_csv
    out = tmp_path / "ANN_alpha2.csv"
    assert main(["balanced-subset", "--annotations", str(ann), "--alpha", "2", "--out", str(out), "--seed", "1"]) == 0
    expected = balanced_subset(read_annotations(ann), 2, seed=1)
    written = read_annotations(out)
    assert written["image_id"].tolist() == expected["image_id"].tolist()
    assert f"{len(expected)} of 1200 images kept" in capsys.readouterr().out
    assert main(["balanced-subset", "--annotations", str(ann), "--alpha", "0.5", "--out", str(out)]) == 2
    assert "alpha must be a number >= 1" in capsys.readouterr().err


def _coco_json(path, images, annotations, categories=None):
    data = {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in images], "annotations": annotations}
    if categories is not None:
        data["categories"] = categories
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


def test_coco_annotations_command(tmp_path, capsys):
    cats = [{"id": 1, "name": "person"}, {"id": 2, "name": "dining table"}]
    files = {}
    for split, ids in (("train2014", [1, 2]), ("val2014", [11, 12, 13, 14])):
        texts = {i: ("a man eating" if i % 2 else "a woman eating") for i in ids}
        files[f"i_{split}"] = _coco_json(tmp_path / f"instances_{split}.json", ids,
                                         [{"id": i, "image_id": i, "category_id": 2} for i in ids], cats)
        files[f"c_{split}"] = _coco_json(tmp_path / f"captions_{split}.json", ids,
                                         [{"id": i, "image_id": i, "caption": t} for i, t in texts.items()])
    out = tmp_path / "ANN.csv"
    rc = main(["coco-annotations", "--instances", files["i_train2014"], files["i_val2014"],
               "--captions", files["c_train2014"], files["c_val2014"], "--out", str(out), "--seed", "0"])
    assert rc == 0
    table = pd.read_csv(out, dtype={"image_id": str})
    assert list(table.columns) == ["image_id", "split", "gender", "file_name", "label_dining_table"]
    assert table["split"].value_counts().to_dict() == {"train": 2, "val": 2, "test": 2}
    assert table.set_index("image_id").loc[["1", "2"], "gender"].tolist() == ["man", "woman"]
    assert "6 images, 1 labels, train 1 man / 1 woman" in capsys.readouterr().out
    # Files given in the wrong order: the captions file is not an instances file.
    rc = main(["coco-annotations", "--instances", files["c_train2014"], files["i_val2014"],
               "--captions", files["c_train2014"], files["c_val2014"], "--out", str(tmp_path / "x.csv")])
    assert rc == 2 and "captions_train2014.json: key(s) ['categories'] missing" in capsys.readouterr().err


def test_fetch_coco_refuses_http(tmp_path, capsys):
    rc = main(["fetch-coco", "--dest", str(tmp_path), "--lock", str(tmp_path / "data.lock"),
               "--url", "http://images.cocodataset.org/annotations/annotations_trainval2014.zip"])
    assert rc == 2 and "only https:// or file://" in capsys.readouterr().err


def test_debias_choices_are_the_packages_data_sets_and_methods():
    from sbssl.debias import DATASETS, METHODS

    parser = build_parser()
    debias = next(a for a in parser._subparsers._group_actions if a.choices).choices["debias"]
    choices = {a.dest: a.choices for a in debias._actions if a.choices}
    assert tuple(choices["dataset"]) == DATASETS and tuple(choices["method"]) == METHODS


def test_debias_trains_writes_metrics_and_weights_and_resumes_as_finished(tmp_path, capsys):
    import torch

    out = tmp_path / "run"
    argv = ["debias", "--dataset", "colored-digits", "--method", "erm", "--seed", "1", "--out", str(out),
            "--epochs", "2", "--option", "aligned=0.8"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["method"], metrics["seed"], metrics["epochs"]) == ("erm", 1, 2)
    assert metrics["config"]["aligned"] == 0.8  # --option reaches the settings
    assert len(metrics["group_acc"]) == 4  # (digit < 5, digit >= 5) x (red, green)
    assert metrics["worst_group_acc"] == min(metrics["group_acc"].values())
    assert f"worst-group accuracy {metrics['worst_group_acc']:.3f}" in capsys.readouterr().out
    state = torch.load(out / "model.pt", weights_only=True)
    assert {"conv1.0.weight", "conv2.0.weight"} <= set(state) and not any(k.startswith("head") for k in state)
    assert not (out / "checkpoint.pt").exists()
    # the same settings again: the finished run's metrics, nothing retrained
    assert main(argv) == 0 and json.loads((out / "metrics.json").read_text()) == metrics
    # other settings in the same folder: refused, naming the file, the run kept
    assert main([*argv[:-2], "--option", "aligned=0.7"]) == 2
    assert "a finished run with other settings" in capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text()) == metrics


def test_debias_bad_option_exits_2_naming_it(tmp_path, capsys):
    rc = main(["debias", "--dataset", "colored-digits", "--method", "erm", "--out", str(tmp_path / "r"),
               "--option", "adv_lamda=2"])
    assert rc == 2 and "unknown debias option(s) ['adv_lamda']" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_fetch_waterbirds_verifies_a_local_archive(tmp_path, capsys):
    import io
    import tarfile

    archive = tmp_path / "src" / "waterbirds.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        data = b"img_id,img_filename,y,split,place\n"
        info = tarfile.TarInfo("waterbird_complete95_forest2water2/metadata.csv")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    lock = tmp_path / "data.lock"
    argv = ["fetch-waterbirds", "--dest", str(tmp_path / "data"), "--lock", str(lock), "--url", archive.as_uri(), "--quiet"]
    assert main(argv) == 0
    folder = tmp_path / "data" / "waterbird_complete95_forest2water2"
    assert (folder / "metadata.csv").read_bytes() == data and str(folder) in capsys.readouterr().out
    assert "sha256" in lock.read_text()
    # the archive changed after its first fetch: refused against the lock
    with tarfile.open(archive, "w:gz") as tar:
        tar.addfile(tarfile.TarInfo("other"), io.BytesIO(b""))
    (tmp_path / "data" / "waterbirds.tar.gz").unlink()
    assert main(argv) == 2 and "sha256" in capsys.readouterr().err
