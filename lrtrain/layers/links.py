"""How a factor parameter names its layer: the link that lets DLRT, the optimizer guard and the EMA find a
factorized layer from the tensors they are given, with no registry of layers.

Each current U, S, V of a factorized layer carries ``p._lrtrain_factor``, a :class:`FactorLink`: a weak
reference to the layer and the role ("U", "S" or "V"). A link is trusted only while it is true, i.e. while
``getattr(layer, role) is p``; a parameter that its layer replaced (``set_capacity``, FSDP2's
``fully_shard``) or that outlived its layer resolves to None.

Detached views (``p.detach()``: new tensor objects, no attributes; this is what
``torch.optim.swa_utils.AveragedModel`` hands to its averaging function) reach the layer through the
parameter's storage, which they share: a plain (non-subclass) parameter's ``untyped_storage()`` carries the
same link (torch keeps a storage's Python object, with its attributes, for as long as the storage lives).
A DTensor has no storage of its own and is linked through the parameter only.

:class:`lrtrain.layers.FactorizedMixin` sets the links: on every assignment of U, S or V (its
``__setattr__``: ``self.U = ...``, FSDP2's ``fully_shard``, ``load_state_dict(assign=True)``), after
``Module._apply`` (``.to()``, ``.double()``: new Parameter objects, new storages, or swapped contents), and
after deep copies and unpickling (``__setstate__``). A copied or unpickled link points nowhere: the layer's
copy links its own parameters, and ``torch.load(..., weights_only=True)`` of a pickled factor parameter
gives a parameter linked to nothing.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

__all__ = ["FactorLink", "link", "factor_of", "factor_of_view", "replaced"]

LINK_ATTR = "_lrtrain_factor"


class FactorLink:
    """The factorized layer (held weakly; None once it is gone) and the role a factor parameter has in it."""

    __slots__ = ("_ref", "role")

    def __init__(self, layer: nn.Module | None, role: str):
        self._ref = None if layer is None else weakref.ref(layer)
        self.role = role

    @property
    def layer(self) -> nn.Module | None:
        return None if self._ref is None else self._ref()

    def __reduce__(self):  # copy.deepcopy and pickle (torch.save of a bare parameter): a link to nothing
        return FactorLink, (None, self.role)


# torch.load(weights_only=True) of a pickled factor parameter meets the link in the parameter's state.
torch.serialization.add_safe_globals([FactorLink])


def link(p: torch.Tensor, layer: nn.Module, role: str) -> None:
    """Mark ``p`` (and, for a plain parameter, its storage) as the factor ``role`` of ``layer``."""
    ln = FactorLink(layer, role)
    setattr(p, LINK_ATTR, ln)
    if type(p) is nn.Parameter:
        setattr(p.untyped_storage(), LINK_ATTR, ln)


def _resolve(ln) -> tuple[nn.Module, str, torch.Tensor] | None:
    if not isinstance(ln, FactorLink):
        return None
    layer = ln.layer
    return None if layer is None else (layer, ln.role, getattr(layer, ln.role))


def factor_of(p) -> tuple[nn.Module, str] | None:
    """(layer, role) when ``p`` is the current factor ``role`` of the live factorized ``layer``, else None."""
    hit = _resolve(getattr(p, LINK_ATTR, None))
    return None if hit is None or hit[2] is not p else hit[:2]


def replaced(p) -> tuple[nn.Module, str] | None:
    """(layer, role) when ``p`` was the factor ``role`` of a layer that is alive but now holds another
    parameter there (FSDP2's ``fully_shard``, ``set_capacity``), else None."""
    hit = _resolve(getattr(p, LINK_ATTR, None))
    return None if hit is None or hit[2] is p else hit[:2]


def factor_of_view(t: torch.Tensor) -> tuple[nn.Module, str] | None:
    """(layer, role) when ``t`` views all of a live layer's current factor ``role`` (same storage, start and
    shape: a ``p.detach()``), else None. Plain tensors only (a DTensor resolves to None)."""
    if type(t) not in (torch.Tensor, nn.Parameter):
        return None
    hit = _resolve(getattr(t.untyped_storage(), LINK_ATTR, None))
    if hit is None or type(hit[2]) is not nn.Parameter:
        return None
    p = hit[2]
    same = p.untyped_storage() is t.untyped_storage() and p.data_ptr() == t.data_ptr() and p.shape == t.shape
    return hit[:2] if same else None
