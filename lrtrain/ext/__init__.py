"""Kernel dispatch for the DLRT layer update.

``update_layers(items, lr, tau, min_rank)`` runs the layer update of :mod:`lrtrain.optim.step` for all
layers of a param group. Without a compiled backend it is the pure-PyTorch reference.
``LRTRAIN_DISABLE_EXT=1`` forces the reference path.
"""
from __future__ import annotations

from ..optim.step import reference_update_layers

__all__ = ["available", "update_layers"]


def available() -> dict:
    """Compiled backends that are active: {} when only the reference path runs."""
    return {}


update_layers = reference_update_layers
