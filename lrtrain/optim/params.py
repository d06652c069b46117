"""How DLRT reads and writes parameters: plain, low precision (fp32 masters) and FSDP2 (DTensor) alike.

* :func:`find_layers` -- the factorized layers whose U, S, V are in a parameter list, found through the
  parameters themselves (each factor links to its layer, :mod:`lrtrain.layers.links`; FSDP2's DTensor
  factors too), so only the layers of the parameters given are found.
* :func:`fsdp1_kind` -- whether a parameter belongs to FSDP1 (``FullyShardedDataParallel``), which DLRT
  refuses: its flat parameters hide U, S, V, and its original-parameter views (``use_orig_params=True``)
  are 1-D shards of a flat buffer.
* :class:`Slot` -- one parameter's working value for the step: the parameter itself; its fp32 master copy
  (kept in the optimizer state under ``"master"``) when the parameter is bfloat16/float16; for a DTensor
  factor, the full (all-gathered) tensor. ``commit()`` writes the working value back in place: the
  master into the low-precision parameter, the local shard of a full tensor into the DTensor.
"""
from __future__ import annotations

import torch

from ..layers.factors import ROLES
from ..layers.links import factor_of

__all__ = ["find_layers", "Slot", "is_dtensor", "fsdp1_kind", "LOW_PRECISION"]

LOW_PRECISION = (torch.bfloat16, torch.float16)


def is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" or type(getattr(t, "data", None)).__name__ == "DTensor"


def fsdp1_kind(p) -> str | None:
    """``"flat"`` for an FSDP1 FlatParameter (``use_orig_params=False``), ``"orig"`` for an original
    parameter that FSDP1 manages as a view into one (``use_orig_params=True``), else None.

    FlatParameters are plain ``nn.Parameter`` objects flagged ``_is_flat_param`` (their type name is not
    "FlatParameter"); FSDP1 marks the original parameters it flattens with ``_fsdp_flattened``.
    """
    if getattr(p, "_is_flat_param", False):
        return "flat"
    if getattr(p, "_fsdp_flattened", False):
        return "orig"
    return None


def find_layers(params) -> tuple[list, list]:
    """Split ``params`` into factorized layers (each with all of U, S, V in ``params``; a layer's bias
    joins it when present) and the other parameters. A layer with only some of U, S, V raises."""
    params = list(params)
    ids = {id(p): i for i, p in enumerate(params)}
    found = {}  # id(layer) -> layer, each layer once
    for p in params:
        hit = factor_of(p)
        if hit is not None:
            found.setdefault(id(hit[0]), hit[0])
    layers, taken = [], set()
    for layer in found.values():
        present = [r for r in ROLES if id(getattr(layer, r)) in ids]
        if len(present) != len(ROLES):
            missing = [r for r in ROLES if r not in present]
            raise ValueError(f"params: a factorized layer is partly missing (no {', '.join(missing)}); pass all of U, S and V")
        layers.append(layer)
        taken.update(id(getattr(layer, r)) for r in ROLES)
        if layer.bias is not None and id(layer.bias) in ids:
            taken.add(id(layer.bias))
    layers.sort(key=lambda l: ids[id(l.U)])  # the order of the U's: every replica alike
    return layers, [p for p in params if id(p) not in taken]


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if is_dtensor(t) else t


class Slot:
    """Working value (``value``) and gradient (``grad``) of parameter ``p`` for one step; see module doc.

    ``full=True`` (factors): DTensors are gathered to full tensors; ``full=False`` (plain parameters):
    the rule runs on the DTensor itself.
    """

    def __init__(self, p: torch.nn.Parameter, state: dict, full: bool):
        self.p, self.state = p, state
        self.gathered = full and is_dtensor(p)
        self.low = low = p.dtype in LOW_PRECISION
        if low and "master" not in state:
            state["master"] = _full(p.detach()).float() if self.gathered else p.detach().float()
        self.value = state["master"] if low else (_full(p.detach()) if self.gathered else p.detach())
        g = p.grad
        g = _full(g) if self.gathered else g
        self.grad = g.float() if low else g
        self.mass = None  # Adam bias masses of a factor (set by DLRT; stored in ``state`` when the step is applied)

    def commit(self) -> None:
        """Write ``value`` (updated in place by the caller) back into the parameter."""
        if self.value.data_ptr() == self.p.data_ptr() and not self.gathered:
            return  # the parameter itself was updated in place
        p = self.p.detach()
        if self.gathered:
            from torch.distributed.tensor import DTensor, Replicate

            mesh = p.device_mesh
            full = DTensor.from_local(self.value.to(p.dtype), mesh, [Replicate()] * mesh.ndim, run_check=False)
            p.to_local().copy_(full.redistribute(mesh, p.placements).to_local())
        elif self.low:
            p.copy_(self.value)
        # else: value is the parameter itself (a DTensor plain param stays one, and elementwise rules run
        # on its local shard), already updated in place
