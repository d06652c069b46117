"""Honest gradients: torch optimizers other than DLRT refuse factor parameters.

``U.grad``, ``S.grad`` and ``V.grad`` of a factorized layer hold DLRT's coordinates (∂L/∂K, ∂L/∂S, ∂L/∂L
with K = U S, L = V Sᵀ; see :mod:`lrtrain.layers.factors`), not ∂L/∂U and ∂L/∂V, and an update that is
not the DLRT step breaks the orthonormality of U and V. A global optimizer step pre-hook (installed on
import of lrtrain) makes any other ``torch.optim.Optimizer`` raise at its step, before it changes anything,
when its param groups hold such a parameter (a factor is recognized by its link to its layer,
:mod:`lrtrain.layers.links`). Each optimizer is checked again only when its number of parameters changes.
"""
from __future__ import annotations

import weakref

from torch.optim.optimizer import register_optimizer_step_pre_hook

from ..layers.links import factor_of

__all__ = ["install"]

_checked: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_handle = None


def _refuse_factor_params(optimizer, args, kwargs):
    from .dlrt import DLRT

    if isinstance(optimizer, DLRT):
        return None
    n = sum(len(g["params"]) for g in optimizer.param_groups)
    if _checked.get(optimizer) == n:
        return None
    for g in optimizer.param_groups:
        for p in g["params"]:
            hit = factor_of(p)
            if hit is not None:
                layer, role = hit
                raise RuntimeError(
                    f"{type(optimizer).__name__} was given the factor {role} of a {type(layer).__name__}: its .grad "
                    "holds DLRT's coordinates (dL/dK, dL/dS, dL/dL), not dL/d" + role + ", and only lrtrain.DLRT "
                    "steps factors correctly. Use lrtrain.DLRT for the factorized layers (other parameters may "
                    "stay with any optimizer), or lrtrain.densify(model) to train dense.")
    _checked[optimizer] = n
    return None


def install() -> None:
    """Register the hook once per process."""
    global _handle
    if _handle is None:
        _handle = register_optimizer_step_pre_hook(_refuse_factor_params)
