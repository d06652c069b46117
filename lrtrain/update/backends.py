"""Which compiled backends of the fused layer update exist and are active, and the contract they are called by.

``lrtrain.update._cpu`` (C++/OpenMP, csrc/cpu/) is built by every ``pip install``; ``lrtrain.update._cuda``
(csrc/cuda/) only where torch has CUDA and a CUDA toolkit was found at build time. A module is active only
when it imports *and* matches what this Python code expects:

* the constants it was compiled with (``constants()``) equal :func:`lrtrain.update.constants.compiled`;
* the torch it was built against (``TORCH_VERSION``) is the running torch (a later ``pip install`` that
  upgraded torch under it would otherwise run it on another ABI);
* its argument contract (``UPDATE_ARGS``, ``LAYER_INPUTS``) names the fields of :class:`UpdateArgs` and of
  :class:`lrtrain.update.spec.LayerStep`'s tensors, in order.

A module that fails one of these is refused with one warning (the reference update runs instead; the
reason is kept in :func:`load_errors`). ``LRTRAIN_DISABLE_EXT=1`` (read at every call) deactivates both.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import warnings
from dataclasses import dataclass

import torch

from . import constants
from .spec import LAYER_INPUTS

__all__ = ["BACKENDS", "NAMES", "UpdateArgs", "available", "module", "load_errors", "disabled", "native_args"]

BACKENDS = ("cpu", "cuda")
NAMES = ("auto", "reference") + BACKENDS

_modules: dict = {}
_errors: dict = {}


@dataclass
class UpdateArgs:
    """One fused call's settings (the C++ ``lrtrain::UpdateArgs``, field for field): per-layer rank caps
    (``constants.NO_RANK_CAP``: none), new columns per side (``constants.AUGMENT_ALL``: r), the step's lr,
    the rank rule's τ, min_rank and spare, and the Jacobi sweep limit."""

    max_rank: list
    augment: int
    lr: float
    tau: float
    min_rank: int
    spare: int
    max_sweeps: int = constants.MAX_SWEEPS


def native_args(mod, args: UpdateArgs):
    """``args`` as the compiled module's ``UpdateArgs`` object."""
    out = mod.UpdateArgs()
    for f in dataclasses.fields(UpdateArgs):
        setattr(out, f.name, getattr(args, f.name))
    return out


def disabled() -> bool:
    """True when ``LRTRAIN_DISABLE_EXT`` is set to a true value (1/true/yes/on)."""
    return os.environ.get("LRTRAIN_DISABLE_EXT", "").strip().lower() in ("1", "true", "yes", "on")


def mismatch(mod) -> str | None:
    """Why compiled module ``mod`` cannot serve this Python code, or None when it can."""
    built = getattr(mod, "TORCH_VERSION", None)
    if built != torch.__version__:
        return f"built against torch {built}, running torch {torch.__version__}: rebuild lrtrain " \
               "(pip install --no-build-isolation -e .)"
    got, want = dict(mod.constants()), constants.compiled()
    if got != want:
        diff = ", ".join(f"{k}: compiled {got.get(k)!r}, lrtrain.update.constants {want.get(k)!r}"
                         for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k))
        return f"compiled with other constants ({diff}): rebuild lrtrain"
    fields = tuple(f.name for f in dataclasses.fields(UpdateArgs))
    if tuple(mod.UPDATE_ARGS) != fields or tuple(mod.LAYER_INPUTS) != LAYER_INPUTS:
        return f"its arguments {tuple(mod.UPDATE_ARGS)} / {tuple(mod.LAYER_INPUTS)} are not {fields} / " \
               f"{LAYER_INPUTS}: rebuild lrtrain"
    return None


def _load(name: str):
    if name not in _modules:
        try:
            mod = importlib.import_module(f"lrtrain.update._{name}")
        except ImportError as e:  # not built here (e.g. no CUDA toolkit) or built against another torch
            _modules[name] = None
            _errors[name] = f"{type(e).__name__}: {e}"
            return None
        why = mismatch(mod)
        if why is not None:
            _errors[name] = f"refused lrtrain.update._{name}: {why}"
            warnings.warn(f"lrtrain: {_errors[name]}; using the reference update", RuntimeWarning, stacklevel=3)
            mod = None
        _modules[name] = mod
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
    """Why a backend module is not active ({} when everything that was tried imported and matched)."""
    for name in BACKENDS:
        _load(name)
    return dict(_errors)
