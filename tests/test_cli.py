from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from sbssl.cli import build_parser, main

SUBCOMMANDS = ["manifest", "fetch-weights", "test-embeddings", "embed", "summarize"]


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
