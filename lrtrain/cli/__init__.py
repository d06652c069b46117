"""The ``lrtrain`` console script: one subcommand per module listed in ``SUBCOMMANDS``.

Each subcommand module defines ``add_parser(subparsers)`` that registers its parser with
``set_defaults(func=...)``. Errors are one line on stderr (``lrtrain <command>: error: ...``), exit
status 2, no traceback: argument ranges are checked while parsing (:mod:`.args`); a ``ValueError``, a
missing or unreadable file or a missing optional dependency raised while the command runs is reported
the same way. ``main`` returns the exit status (also for argparse's own exits: ``--help`` gives 0).
"""
from __future__ import annotations

import importlib
import sys

from .args import ArgumentParser, CLIError, one_line

SUBCOMMANDS = ("demo", "bench")
# Errors of the user's input or environment (bad values the library refuses, data files, optional
# packages): reported in one line. Anything else is a bug and keeps its traceback.
USER_ERRORS = (CLIError, ValueError, OSError, ImportError)


def main(argv=None) -> int:
    parser = ArgumentParser(prog="lrtrain", description="Low-rank training for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"lrtrain.cli.{name}").add_parser(sub)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or an error already printed in one line (2)
        return e.code if isinstance(e.code, int) else 2
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        msg = one_line(e) or type(e).__name__
        if isinstance(e, OSError) and e.strerror and e.filename:
            msg = f"{e.filename}: {e.strerror}"
        sys.stdout.flush()
        sys.stderr.write(f"lrtrain {args.command}: error: {msg}\n")
        return 2
