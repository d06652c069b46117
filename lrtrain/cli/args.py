"""Argument types with ranges for the console script, the one-line error convention, and
:func:`command_line`, the command that reproduces a run (written into reports).

Every CLI error is one line on stderr, ``lrtrain <command>: error: <message>``, exit status 2
(argparse's convention), no traceback: bad arguments are refused by the types below while parsing;
errors the library raises later (``ValueError``, missing or malformed data files) are turned into the
same one-line form by :func:`lrtrain.cli.main`.
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import sys


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but an error is one line (no usage block): ``PROG: error: MESSAGE``."""

    def error(self, message):  # noqa: D401 - argparse API
        fail(self.prog, f"{message} (see {self.prog} --help)")


class CLIError(Exception):
    """An error already worded for the user (raised inside a command, reported in one line)."""


def one_line(message: str) -> str:
    return " ".join(str(message).split())


def fail(prog: str, message: str):
    sys.stderr.write(f"{prog}: error: {one_line(message)}\n")
    raise SystemExit(2)


def _int(text: str, lo: int | None, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer {what}, got {text!r}") from None
    if lo is not None and value < lo:
        raise argparse.ArgumentTypeError(f"must be an integer {what}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _int(text, 1, ">= 1")


def nonneg_int(text: str) -> int:
    """An integer >= 0."""
    return _int(text, 0, ">= 0")


def _float(text: str, ok, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number {what}, got {text!r}") from None
    if not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"must be a finite number {what}, got {text}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return _float(text, lambda v: v > 0, "> 0")


def nonneg_float(text: str) -> float:
    """A finite number >= 0."""
    return _float(text, lambda v: v >= 0, ">= 0")


def data_spec(*keywords: str):
    """A data argument: one of ``keywords`` or an existing directory (of MNIST-format IDX files)."""
    def check(text: str) -> str:
        if text in keywords or os.path.isdir(text):
            return text
        what = "no such directory" if not os.path.exists(text) else "not a directory"
        raise argparse.ArgumentTypeError(f"{text!r}: {what} (give {' or '.join(map(repr, keywords))} or a "
                                         "directory of MNIST-format IDX files)")
    check.__name__ = "data"
    return check


def command_line(prefix: str, parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """``prefix`` and the options of ``args`` that differ from ``parser``'s defaults: the command that
    reproduces a run (attributes ``func``, ``command`` and names starting with ``_`` are not options)."""
    defaults = vars(parser.parse_args([]))
    parts = shlex.split(prefix)
    for key, value in vars(args).items():
        if key in ("func", "command") or key.startswith("_") or defaults.get(key, object()) == value:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif isinstance(value, (list, tuple)):
            parts += [flag] + [str(v) for v in value]
        elif value is not None and value is not False:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)
