"""The ``lrtrain`` console script: one subcommand per module listed in ``SUBCOMMANDS``.

Each subcommand module defines ``add_parser(subparsers)`` that registers its parser with
``set_defaults(func=...)``.
"""
from __future__ import annotations

import argparse
import importlib

SUBCOMMANDS = ("demo", "bench")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lrtrain", description="Low-rank training for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"lrtrain.cli.{name}").add_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)
