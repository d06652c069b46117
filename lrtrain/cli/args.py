"""Argument types with ranges for the console script, the one-line error convention, and
:func:`command_line`, the command that reproduces a run (written into reports).

Every CLI error is one line on stderr, ``lrtrain <command>: error: <message>``, exit status 2
(argparse's convention), no traceback: bad arguments are refused by the types below while parsing;
errors the library raises later (``ValueError``, missing or malformed data files) are turned into the
same one-line form by :func:`lrtrain.cli.main`. Output options are checked while parsing too
(:func:`output_dir`: not an existing file, a writable place; :func:`file_name`: a name, not a path), so a
refused run writes nothing.
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


def _float(text: str, ok, what: str, why: str = "") -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number {what}, got {text!r}") from None
    if not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"must be a finite number {what}{why}, got {text}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return _float(text, lambda v: v > 0, "> 0")


def nonneg_float(text: str) -> float:
    """A finite number >= 0."""
    return _float(text, lambda v: v >= 0, ">= 0")


def relative_tolerance(text: str) -> float:
    """A relative truncation tolerance τ: a finite number in [0, 1) (τ >= 1 discards every singular value)."""
    return _float(text, lambda v: 0 <= v < 1, ">= 0 and < 1",
                  " (a relative tolerance >= 1 discards every singular value: rank 1 everywhere)")


def name_problem(name) -> str | None:
    """Why ``name`` is not a plain file name (None if it is one): empty, a path separator, '..', a NUL."""
    if not isinstance(name, str) or not name.strip():
        return "must not be empty"
    seps = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if any(c in name for c in seps):
        return "is a file name, not a path: no path separator"
    if ".." in name or name == ".":
        return "is a file name, not a path: no '.' or '..'"
    if "\0" in name:
        return "must not contain a NUL character"
    return None


def file_name(text: str) -> str:
    """A file name (no directory part): not empty, no path separator, no '..'; written inside --out."""
    why = name_problem(text)
    if why is not None:
        raise argparse.ArgumentTypeError(f"{why}, got {text!r} (the file is written inside --out)")
    return text


def output_dir(text: str) -> str:
    """An output directory: an existing directory or a path whose nearest existing ancestor is a writable
    directory (so a run is refused before it starts, not when it writes its results)."""
    if not text:
        raise argparse.ArgumentTypeError("expected a directory, got ''")
    if os.path.exists(text):
        if not os.path.isdir(text):
            raise argparse.ArgumentTypeError(f"{text!r} exists and is not a directory")
        probe = text
    else:
        probe = os.path.dirname(os.path.abspath(text))
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe):
            raise argparse.ArgumentTypeError(f"{text!r}: {probe!r} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text!r}: {probe!r} is not writable")
    return text


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
