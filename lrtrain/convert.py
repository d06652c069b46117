"""Model conversion: ``lowrank`` swaps nn.Linear / nn.Conv2d for factorized layers, ``densify`` undoes it."""
from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field

from torch import nn

from .layers import LowRankConv2d, LowRankLinear
from .layers.factors import FactorizedMixin

__all__ = ["lowrank", "densify", "summary", "Summary", "active_parameters"]


@dataclass
class Summary:
    """What a conversion did: per converted layer its name, shape and rank; parameter counts."""

    layers: list = field(default_factory=list)  # (name, "out x in_flat", rank, capacity)
    skipped: list = field(default_factory=list)  # (name, reason)
    params_before: int = 0  # all-dense parameter count
    params_after: int = 0  # allocated parameters (factors at their capacity)
    params_active: int = 0  # parameters in use at the current ranks

    def __str__(self) -> str:
        lines = [f"lrtrain: {len(self.layers)} layer(s) factorized, parameters {self.params_before:,} -> "
                 f"{self.params_active:,} active at the current ranks ({self.params_active / max(self.params_before, 1):.1%}), "
                 f"{self.params_after:,} allocated ({self.params_after / max(self.params_before, 1):.1%})"]
        lines += [f"  {n:<40s} {shape:>14s}  rank {r} (capacity {c})" for n, shape, r, c in self.layers]
        lines += [f"  {n:<40s} left dense: {why}" for n, why in self.skipped]
        return "\n".join(lines)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def active_parameters(model: nn.Module) -> int:
    """Parameters in use: factorized layers at their active rank, every other parameter whole."""
    total = _count(model)
    for m in model.modules():
        if isinstance(m, FactorizedMixin):
            total += m.num_parameters_active() - sum(p.numel() for p in m.parameters(recurse=False))
    return total


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def lowrank(model: nn.Module, rank: int | None = None, tau: float | None = None, include=None, exclude=None,
            min_features: int = 16, max_rank: int | None = None, capacity: int | None = None,
            inplace: bool = True, verbose: bool = False) -> nn.Module:
    """Replace the nn.Linear and nn.Conv2d layers of ``model`` by LowRankLinear / LowRankConv2d.

    Each layer is initialized from the truncated SVD of its weight (``from_dense``): rank
    ``min(rank, min(out, in))``, or chosen by the tolerance ``tau``, or the smaller of both.
    ``include`` / ``exclude``: glob patterns on qualified module names (``"encoder.*.fc1"``).
    Left dense: layers with min(out, in) < ``min_features``, layers where the factorization would not
    save parameters (r(out + in) + r² ≥ out·in), grouped convolutions, and the out_proj of
    nn.MultiheadAttention (which reads its weight directly). Capacity (allocated width of U, V) per layer:
    ``capacity`` if given, else ``max_rank`` if given, else min(2·rank, min(out, in)) (each clipped to
    [rank, min(out, in)]); ``max_rank`` defaults to the capacity. Returns the model (a converted copy if
    ``inplace=False``); ``verbose`` prints :func:`summary`-style report of the conversion.
    """
    if rank is None and tau is None:
        raise ValueError("lowrank: give rank (an int >= 1) or tau (a float >= 0)")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    if tau is not None and not tau >= 0:
        raise ValueError(f"tau must be >= 0, got {tau!r}")
    if not inplace:
        model = copy.deepcopy(model)
    report = Summary(params_before=_count(model))
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, FactorizedMixin) or not isinstance(child, (nn.Linear, nn.Conv2d)):
                continue
            if include is not None and not _matches(name, include) or exclude is not None and _matches(name, exclude):
                report.skipped.append((name, "excluded by include/exclude"))
                continue
            new, why = _convert(child, parent, rank, tau, max_rank, capacity, min_features)
            if new is not None:
                setattr(parent, child_name, new)
                report.layers.append((name, f"{new.U.shape[0]} x {new.V.shape[0]}", new.rank, new.capacity))
            else:
                report.skipped.append((name, why))
    report.params_after, report.params_active = _count(model), active_parameters(model)
    model.lrtrain_summary = report
    if verbose:
        print(report)
    return model


def _convert(child, parent, rank, tau, max_rank, capacity, min_features):
    """(new layer, None) or (None, why it stays dense) for an nn.Linear / nn.Conv2d ``child``."""
    if isinstance(parent, nn.MultiheadAttention):
        return None, "used by nn.MultiheadAttention"
    if isinstance(child, nn.Conv2d) and (child.groups != 1 or child.padding_mode != "zeros" or isinstance(child.padding, str)):
        return None, "grouped / non-zero-padded / string-padded conv"
    w = child.weight
    out_f, in_f = w.shape[0], w[0].numel()
    if min(out_f, in_f) < min_features:
        return None, f"min(out, in) = {min(out_f, in_f)} < min_features = {min_features}"
    r = min(rank, out_f, in_f) if rank is not None else min(out_f, in_f)
    if rank is not None and r * (out_f + in_f) + r * r >= out_f * in_f:
        return None, f"rank {r} would not save parameters"
    cls = LowRankLinear if isinstance(child, nn.Linear) else LowRankConv2d
    full = min(out_f, in_f)
    clip = lambda v: None if v is None else max(min(v, full), r)  # noqa: E731
    cap, mr = clip(capacity), clip(max_rank)
    if cap is not None and mr is not None:
        mr = min(mr, cap)
    new = cls.from_dense(child, rank=r, tau=tau, max_rank=mr, capacity=cap)
    if new.rank * (out_f + in_f) + new.rank ** 2 >= out_f * in_f:
        return None, f"rank {new.rank} (from tau) would not save parameters"
    return new, None


def densify(model: nn.Module, inplace: bool = True) -> nn.Module:
    """Replace every factorized layer of ``model`` by the equivalent dense nn.Linear / nn.Conv2d."""
    if not inplace:
        model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, FactorizedMixin):
                setattr(parent, child_name, child.to_dense())
    return model


def summary(model: nn.Module) -> Summary:
    """Current state of a model: each factorized layer's shape and rank, parameters vs. all-dense."""
    report = Summary(params_after=_count(model), params_active=active_parameters(model))
    dense = report.params_after
    for name, m in model.named_modules():
        if isinstance(m, FactorizedMixin):
            report.layers.append((name, f"{m.U.shape[0]} x {m.V.shape[0]}", m.rank, m.capacity))
            dense += m.num_parameters_dense() - sum(p.numel() for p in m.parameters())
    report.params_before = dense
    return report
