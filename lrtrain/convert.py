"""Model conversion: ``lowrank`` swaps nn.Linear / nn.Conv2d (and Hugging Face's ``Conv1D``) for factorized
layers, ``densify`` undoes it. Which modules convert, and how, is said by the layer kinds
(:mod:`lrtrain.layers.kinds`); this module walks the model, applies the conversion options and reports.
"""
from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field

from torch import nn

from .layers.factors import FactorizedMixin, _check_bool, _check_int, _check_tau
from .layers.kinds import kind_of

_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)

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
        lines += [f"  {n or '(the model itself)':<40s} {shape:>14s}  rank {r} (capacity {c})" for n, shape, r, c in self.layers]
        lines += [f"  {n or '(the model itself)':<40s} {'' if why == 'already factorized' else 'left dense: '}{why}" for n, why in self.skipped]
        return "\n".join(lines)


def _count(model: nn.Module) -> int:
    """Parameters of ``model``, each shared parameter counted once (as ``model.parameters()`` yields it)."""
    return sum(p.numel() for p in model.parameters())


def _aliases(model: nn.Module) -> dict:
    """id(tensor) -> every qualified name of that parameter / buffer in ``model`` (shared ones have several)."""
    names: dict = {}
    for n, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        names.setdefault(id(t), []).append(n)
    return names


def _tied_to(name: str, module: nn.Module, aliases: dict) -> str | None:
    """Another name of one of ``module``'s own parameters (a weight tied elsewhere), or None if none is shared."""
    for pname, p in module.named_parameters(recurse=False):
        own = f"{name}.{pname}" if name else pname
        others = [n for n in aliases.get(id(p), []) if n != own]
        if others:
            return others[0]
    return None


def _matrices(module: nn.Module) -> list:
    """Names of ``module``'s own parameters with two or more dimensions (weight matrices, kernels)."""
    return [n for n, p in module.named_parameters(recurse=False) if p.dim() >= 2]


def _check_module(model) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def active_parameters(model: nn.Module) -> int:
    """Parameters in use: factorized layers at their active rank, every other parameter whole."""
    _check_module(model)
    total = _count(model)
    for m in model.modules():
        if isinstance(m, FactorizedMixin):
            total += m.num_parameters_active() - sum(p.numel() for p in m.parameters(recurse=False))
    return total


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _patterns(name: str, value):
    """None, one glob pattern (a str) or a list / tuple / set of them -> tuple of patterns (or None)."""
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(p, str) for p in value):
        return tuple(value)
    raise ValueError(f"{name} must be a glob pattern (str) or a list of them, got {value!r}")


def lowrank(model: nn.Module, rank: int | None = None, tau: float | None = None, include=None, exclude=None,
            min_features: int = 16, max_rank: int | None = None, capacity: int | None = None,
            inplace: bool = True, verbose: bool = False) -> nn.Module:
    """Replace the nn.Linear, nn.Conv2d and transformers ``Conv1D`` layers of ``model`` by LowRankLinear /
    LowRankConv2d (a Conv1D, y = x W + b with W stored (in, out), becomes a LowRankLinear of Wᵀ).

    Each layer is initialized from the truncated SVD of its weight (``from_dense``): rank
    ``min(rank, min(out, in))``, or chosen by the tolerance ``tau``, or the smaller of both; never above
    ``max_rank`` or ``capacity`` when those are given.
    ``include`` / ``exclude``: one glob pattern (a str is ONE pattern) or a list of them, matched against
    qualified module names (``"encoder.*.fc1"``); ``include`` keeps only the layers some pattern matches.
    Left dense: layers with min(out, in) < ``min_features``, layers where the factorization would not
    save parameters (r(out + in) + r² ≥ out·in), grouped / non-zero-padded / 'same'-padded convolutions,
    the out_proj of nn.MultiheadAttention (which reads its weight directly), and layers whose weight or bias
    is tied to (is the same parameter as) another module's, e.g. GPT-2's ``lm_head`` tied to the token
    embedding: reported as "tied to <name>" (converting would silently untie them). Every other module
    with a weight matrix (embeddings, unknown layer types) is kept and listed in the report too.
    Capacity (allocated width of U, V) per layer: ``capacity`` if given, else ``max_rank`` if given, else
    min(2·rank, min(out, in)), each at most min(out, in); ``max_rank`` defaults to the capacity.

    Arguments are checked before anything changes: ``rank`` an int >= 1; ``tau`` a real number >= 0 (one of
    the two required); ``max_rank``, ``capacity`` ints >= rank (>= 1 with ``tau`` alone), ``max_rank`` <=
    ``capacity``; ``min_features`` an int >= 1; ``inplace``, ``verbose`` bools.

    Returns the model (a converted copy if ``inplace=False``), with ``model.lrtrain_summary`` (a
    :class:`Summary` of this call); ``verbose`` prints it. Layers that are already factorized are listed
    in ``skipped`` as "already factorized": a second call on a converted model changes nothing and its
    summary reports 0 layers factorized. When ``model`` itself is an nn.Linear / nn.Conv2d / Conv1D, the
    converted layer is returned (the argument is never modified in that case: use the return value).
    """
    _check_module(model)
    if rank is None and tau is None:
        raise ValueError("lowrank: give rank (an int >= 1) or tau (a float >= 0)")
    if rank is not None:
        _check_int("rank", rank, 1)
    tau = _check_tau(tau)
    lo = 1 if rank is None else rank
    if max_rank is not None:
        _check_int("max_rank", max_rank, lo)
    if capacity is not None:
        _check_int("capacity", capacity, lo)
        if max_rank is not None and max_rank > capacity:
            raise ValueError(f"max_rank must be an int in [{lo}, capacity = {capacity}], got {max_rank!r}")
    include, exclude = _patterns("include", include), _patterns("exclude", exclude)
    _check_int("min_features", min_features, 1)
    _check_bool("inplace", inplace)
    _check_bool("verbose", verbose)
    if not inplace:
        model = copy.deepcopy(model)
    report = Summary(params_before=summary(model).params_before)
    args = (rank, tau, max_rank, capacity, min_features)
    aliases = _aliases(model)
    seen: dict = {}  # id -> module (kept alive, so an id is never reused while converting)

    def visit(name, child, parent):
        """The converted layer, or None (reason recorded) when ``child`` stays as it is."""
        if id(child) in seen:  # a module registered under two parents: reported (and left) once
            return None
        seen[id(child)] = child
        if isinstance(child, FactorizedMixin):
            report.skipped.append((name, "already factorized"))
            return None
        if kind_of(child) is None:
            mats = _matrices(child)
            if mats:
                kind = "embedding (a lookup table)" if isinstance(child, _EMBEDDINGS) else \
                    f"module type {type(child).__name__} is not converted"
                report.skipped.append((name, f"{kind}: {', '.join(mats)} stay{'s' if len(mats) == 1 else ''} dense"))
            return None
        if include is not None and not _matches(name, include) or exclude is not None and _matches(name, exclude):
            report.skipped.append((name, "excluded by include/exclude"))
            return None
        tied = _tied_to(name, child, aliases)
        if tied is not None:  # converting would untie it (a copy of the shared weight): leave it dense
            report.skipped.append((name, f"tied to {tied}"))
            return None
        new, why = _convert(child, parent, *args)
        if new is None:
            report.skipped.append((name, why))
        else:
            report.layers.append((name, f"{new.U.shape[0]} x {new.V.shape[0]}", new.rank, new.capacity))
        return new

    if isinstance(model, FactorizedMixin) or kind_of(model) is not None:  # a single layer
        new = visit("", model, None)
        if new is not None:
            model = new
    else:
        own = _matrices(model)
        if own:
            report.skipped.append(("", f"parameters of the model itself ({', '.join(own)}) are not converted"))
        for parent_name, parent in list(model.named_modules()):
            for child_name, child in list(parent.named_children()):
                new = visit(f"{parent_name}.{child_name}" if parent_name else child_name, child, parent)
                if new is not None:
                    setattr(parent, child_name, new)
    report.params_after, report.params_active = _count(model), active_parameters(model)
    model.lrtrain_summary = report
    if verbose:
        print(report)
    return model


def _convert(child, parent, rank, tau, max_rank, capacity, min_features):
    """(new layer, None) or (None, why it stays dense) for a dense ``child`` of a layer kind."""
    if isinstance(parent, nn.MultiheadAttention):
        return None, "used by nn.MultiheadAttention"
    kind = kind_of(child)
    why = kind.refusal(child)
    if why is not None:
        return None, why
    out_f, in_f = kind.weight_matrix(child).shape
    full = min(out_f, in_f)
    if full < min_features:
        return None, f"min(out, in) = {full} < min_features = {min_features}"
    # The largest rank this layer may start at: rank, max_rank, capacity, min(out, in) (tau may pick less).
    r = min(v for v in (rank, max_rank, capacity, full) if v is not None)
    if rank is not None and r * (out_f + in_f) + r * r >= out_f * in_f:
        return None, f"rank {r} would not save parameters"
    cap = None if capacity is None else min(capacity, full)
    mr = None if max_rank is None else min(max_rank, full)
    new = kind.from_dense(child, rank=r, tau=tau, max_rank=mr, capacity=cap)
    if new.rank * (out_f + in_f) + new.rank ** 2 >= out_f * in_f:
        return None, f"rank {new.rank}{' (from tau)' if tau is not None else ''} would not save parameters"
    return new, None


def _to_dense(layer: FactorizedMixin) -> nn.Module:
    """The dense layer a factorized one came from (by its kind: nn.Linear, nn.Conv2d or a Conv1D)."""
    kind = kind_of(layer)
    if kind is None:
        raise TypeError(f"factorized layer of unknown type {type(layer).__name__}")
    return kind.to_dense(layer)


def densify(model: nn.Module, inplace: bool = True) -> nn.Module:
    """Replace every factorized layer of ``model`` by the equivalent dense nn.Linear / nn.Conv2d (a transformers
    Conv1D for layers converted from one). A layer registered under several parents stays one shared module."""
    _check_module(model)
    _check_bool("inplace", inplace)
    if not inplace:
        model = copy.deepcopy(model)
    if isinstance(model, FactorizedMixin):
        return _to_dense(model)
    done: dict = {}
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, FactorizedMixin):
                if id(child) not in done:
                    done[id(child)] = (child, _to_dense(child))  # keep child alive: ids stay unique
                setattr(parent, child_name, done[id(child)][1])
    return model


def summary(model: nn.Module) -> Summary:
    """Current state of a model: each factorized layer's shape and rank, parameters vs. all-dense."""
    _check_module(model)
    report = Summary(params_after=_count(model), params_active=active_parameters(model))
    dense = report.params_after
    for name, m in model.named_modules():
        if isinstance(m, FactorizedMixin):
            report.layers.append((name, f"{m.U.shape[0]} x {m.V.shape[0]}", m.rank, m.capacity))
            dense += m.num_parameters_dense() - sum(p.numel() for p in m.parameters())
    report.params_before = dense
    return report
