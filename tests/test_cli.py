from __future__ import annotations

import subprocess
import sys

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
