"""Which compiled backends of the fused DLRT update exist and are active.

``lrtrain.ext._cpu`` (C++/OpenMP, csrc/cpu/) is built by every ``pip install``; ``lrtrain.ext._cuda``
(csrc/cuda/) only where torch has CUDA and a CUDA toolkit was found at build time. A module that is
missing or fails to import is simply not available (the reference path runs instead); the import error
is kept in :func:`load_errors`. ``LRTRAIN_DISABLE_EXT=1`` (read at every call) deactivates both.
"""
from __future__ import annotations

import importlib
import os

import torch

__all__ = ["BACKENDS", "NAMES", "available", "module", "load_errors", "disabled"]

BACKENDS = ("cpu", "cuda")
NAMES = ("auto", "reference") + BACKENDS

_modules: dict = {}
_errors: dict = {}


def disabled() -> bool:
    """True when ``LRTRAIN_DISABLE_EXT`` is set to a true value (1/true/yes/on)."""
    return os.environ.get("LRTRAIN_DISABLE_EXT", "").strip().lower() in ("1", "true", "yes", "on")


def _load(name: str):
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(f"lrtrain.ext._{name}")
        except ImportError as e:  # not built here (e.g. no CUDA toolkit) or built against another torch
            _modules[name] = None
            _errors[name] = f"{type(e).__name__}: {e}"
    return _modules[name]


def module(name: str):
    """The compiled module of backend ``name`` if it is active, else None."""
    if disabled():
        return None
    mod = _load(name)
    if mod is None or (name == "cuda" and not torch.cuda.is_available()):
        return None
    return mod


def available() -> dict:
    """Active compiled backends, e.g. ``{"cpu": True, "cuda": False}`` (all False under LRTRAIN_DISABLE_EXT=1)."""
    return {name: module(name) is not None for name in BACKENDS}


def load_errors() -> dict:
    """Why a backend module did not import ({} when everything that was tried imported)."""
    for name in BACKENDS:
        _load(name)
    return dict(_errors)
