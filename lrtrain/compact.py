"""Memory that follows the rank: ``compact(model, optimizer, headroom=2)`` reallocates each factorized layer's
capacity to its active rank × headroom and carries DLRT's state to the new parameters exactly.

Fixed capacity is what lets DDP, FSDP2, torch.compile and EMA see parameters that never change (see
:mod:`lrtrain.layers.factors`), so shrinking it is this explicit call between steps, as AdaLoRA resizes only at
the end (``resize_modules_by_rank_pattern``). For a layer of rank r and capacity c, the new capacity is
c' = min(max(⌈headroom·r⌉, r), min(m, n)) and ``max_rank`` becomes min(max_rank, c'). Everything past the rank is
exactly zero (factors and state alike), so cutting buffers from c to c' columns (rows too for S-coordinates) is
exact: moments, second moments, per-direction bias masses, deferred K/L steps and fp32 masters keep their active
blocks bit for bit, and the steps after ``compact`` are the steps without it while the rank stays below c'.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import validation
from .layers.factors import FactorizedMixin
from .optim import DLRT
from .optim.params import find_layers, fsdp1_kind, is_dtensor

__all__ = ["compact"]


def _new_capacity(layer, headroom: float) -> int:
    full = min(layer.U.shape[0], layer.V.shape[0])
    return min(max(math.ceil(headroom * layer.rank), layer.rank), full)


def _cut(t: torch.Tensor, c: int, role: str) -> torch.Tensor:
    """State tensor ``t`` of a factor at capacity c: U/V-shaped (.., m, c) or (2, c) → its first c columns;
    S-shaped (.., c, c) → its leading c × c block."""
    if role == "S":
        return t[..., :c, :c].clone()
    return t[..., :c].clone()


def _refuse_wrapped(model: nn.Module) -> None:
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError("compact: model is wrapped in DistributedDataParallel, which registered hooks on the "
                         "parameters compact would replace; compact model.module before wrapping (then wrap it "
                         "again and build the optimizer), or keep the capacity")
    for p in model.parameters():
        if is_dtensor(p):
            raise ValueError("compact: the model is sharded (FSDP2 fully_shard / DTensor parameters); compact it "
                             "before fully_shard, then shard it and build the optimizer")
        if fsdp1_kind(p) is not None:
            raise ValueError("compact: the model is wrapped in FSDP1 (FullyShardedDataParallel); compact the "
                             "unwrapped module")


def compact(model: nn.Module, optimizer: DLRT | None = None, headroom: float = 2.0) -> dict:
    """Reallocate every factorized layer of ``model`` at capacity ⌈headroom·rank⌉ (see the module docstring),
    replacing its U, S, V by new, smaller parameters in ``optimizer``'s param groups with their state carried.

    Returns {layer name: (old capacity, new capacity)}. Refused (ValueError, nothing changed) for wrapped models
    (DDP, FSDP1, FSDP2), for an optimizer that is not a DLRT or holds only some of a layer's factors, and for
    headroom < 1. Layers whose capacity would not change are left as they are.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    headroom = validation.real("headroom", headroom, 1.0)
    _refuse_wrapped(model)
    if optimizer is not None and not isinstance(optimizer, DLRT):
        raise ValueError(f"optimizer must be an lrtrain.DLRT (or None), got {type(optimizer).__name__}")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, FactorizedMixin)]
    where = {}  # id(parameter) -> (group index, position) in the optimizer
    if optimizer is not None:
        for gi, g in enumerate(optimizer.param_groups):
            for pi, p in enumerate(g["params"]):
                where[id(p)] = (gi, pi)
        held, _ = find_layers([p for g in optimizer.param_groups for p in g["params"]])
        held = {id(l) for l in held}
        for name, layer in layers:
            inside = [r for r in "USV" if id(getattr(layer, r)) in where]
            if inside and id(layer) not in held:
                raise ValueError(f"compact: the optimizer holds only {', '.join(inside)} of layer {name!r}")
    plan = [(name, layer, _new_capacity(layer, headroom)) for name, layer in layers]
    plan = [(name, layer, c) for name, layer, c in plan if c != layer.capacity]
    report = {}
    with torch.no_grad():
        for name, layer, c in plan:
            old = {r: getattr(layer, r) for r in "USV"}
            trainable = {r: p.requires_grad for r, p in old.items()}
            states = {r: optimizer.state.pop(p, None) if optimizer is not None else None for r, p in old.items()}
            report[name] = (layer.capacity, c)
            layer.set_capacity(c, min(layer.max_rank, c))
            for r, p in old.items():
                new = getattr(layer, r)
                new.requires_grad_(trainable[r])
                if id(p) in where:
                    gi, pi = where[id(p)]
                    optimizer.param_groups[gi]["params"][pi] = new
                if states[r]:
                    optimizer.state[new] = {k: _cut(v, c, r) if torch.is_tensor(v) and k != "step" else v
                                            for k, v in states[r].items()}
    return report
