"""The ``sbssl`` command: the package's functions outside the Snakemake DAG.

Each subcommand is one ``_cmd_<name>(args) -> int`` function plus one block in :func:`build_parser`.
Heavy imports (torch, pandas) happen inside the ``_cmd_`` functions so ``sbssl --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from sbssl import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sbssl",
        description="Audit vision models for social biases with image embedding association tests (iEAT).",
    )
    parser.add_argument("--version", action="version", version=f"sbssl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Subcommand blocks follow; keep one block per command.
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"sbssl {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
