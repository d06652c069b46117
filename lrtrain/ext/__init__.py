"""Fused kernels for the DLRT layer update (C++/OpenMP on CPU, CUDA on GPU) and their dispatch.

``update_layers(items, lr, tau, min_rank, backend="auto")`` runs the layer update of
:mod:`lrtrain.optim.step` (the spec, implemented there in plain PyTorch as ``reference_update_layers``)
for all layers of a param group. ``backend``: ``"auto"`` (the compiled backend of each layer's device when
active, else the reference), ``"reference"``, ``"cpu"`` or ``"cuda"`` (that backend; ValueError when it is
not active). :func:`available` tells which compiled backends are active; ``LRTRAIN_DISABLE_EXT=1`` forces
the reference path. Importing this package never requires a compiled module.
"""
from __future__ import annotations

from .backends import BACKENDS, NAMES, available, load_errors
from .dispatch import FusedResult, check_backend, finite_flags, update_layers

__all__ = ["available", "update_layers", "finite_flags", "check_backend", "load_errors", "FusedResult",
           "BACKENDS", "NAMES"]
