"""Model conversion: ``lowrank`` swaps nn.Linear / nn.Conv2d (and Hugging Face's ``Conv1D``) for factorized
layers, ``densify`` undoes it. Which modules convert, and how, is said by the layer kinds
(:mod:`lrtrain.layers.kinds`); this module walks the model, applies the conversion options and reports.
"""
from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

from . import validation
from .layers.factors import ROLES, FactorizedMixin, dense_capacity
from .layers.kinds import kind_of

_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)

__all__ = ["lowrank", "densify", "summary", "Summary", "active_parameters"]

# Called with every model ``lowrank`` converted (after the swap): how other modules of lrtrain adapt a converted
# model without convert importing them (lrtrain.hf registers the one that makes a transformers model's own
# save_pretrained write lrtrain's checkpoint).
CONVERTED_HOOKS: list = []


@dataclass
class Summary:
    """What a conversion did: per converted layer its name, shape and rank; parameter counts."""

    layers: list = field(default_factory=list)  # (name, "out x in_flat", rank, capacity)
    skipped: list = field(default_factory=list)  # (name, reason)
    params_before: int = 0  # all-dense parameter count
    params_after: int = 0  # allocated parameters (factors at their capacity)
    params_active: int = 0  # parameters in use at the current ranks
    # (name, allocated, dense) per entry of ``layers``: the layer's parameters at its capacity (U, S, V, bias)
    # and those of the dense layer it replaces (weight, bias)
    layer_params: list = field(default_factory=list)

    @property
    def oversized(self) -> list:
        """Names of the layers that allocate more parameters than their dense layer (a capacity given
        explicitly, through ``capacity`` or ``max_rank``: the default capacity never does)."""
        return [n for n, alloc, dense in self.layer_params if alloc > dense]

    def __str__(self) -> str:
        lines = [f"lrtrain: {len(self.layers)} layer(s) factorized, parameters {self.params_before:,} -> "
                 f"{self.params_active:,} active at the current ranks ({self.params_active / max(self.params_before, 1):.1%}), "
                 f"{self.params_after:,} allocated ({self.params_after / max(self.params_before, 1):.1%})"]
        sizes = {n: (a, d) for n, a, d in self.layer_params}
        for n, shape, r, c in self.layers:
            line = f"  {n or '(the model itself)':<40s} {shape:>14s}  rank {r} (capacity {c})"
            if n in sizes:
                a, d = sizes[n]
                line += f", {a:,} allocated / {d:,} dense"
                if a > d:
                    line += f"  [capacity {c} allocates MORE than the dense layer]"
            lines.append(line)
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
    min(2·rank, min(out, in), c_dense) with c_dense the largest c allocating no more than the dense weight
    (c(out + in) + c² <= out·in), each at most min(out, in); ``max_rank`` defaults to the capacity. An explicit
    ``capacity`` / ``max_rank`` may allocate more than the dense layer: the summary says so for each such
    layer (``Summary.oversized``).

    The replacement keeps what the dense layer had: U, S and V require grad as its weight does (a frozen
    layer stays frozen, and DLRT leaves it alone), the bias as its bias; the training mode (``.training``);
    its forward hooks, forward pre-hooks and backward hooks (the handles that registered them still remove
    them). Other per-module state (state-dict hooks, attributes set on the module) is not carried over.

    Arguments are checked before anything changes: ``rank`` an int >= 1; ``tau`` a real number >= 0 (one of
    the two required); ``max_rank``, ``capacity`` ints >= rank (>= 1 with ``tau`` alone), ``max_rank`` <=
    ``capacity``; ``min_features`` an int >= 1; ``inplace``, ``verbose`` bools. So are the layers to convert:
    a weight or bias holding NaN or inf raises ValueError naming the layer before any layer is converted.
    Every factorized layer is built before the model is changed, so an error leaves ``model`` as it was.

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
        validation.integer("rank", rank, 1)
    tau = validation.tolerance(tau)
    lo = 1 if rank is None else rank
    if max_rank is not None:
        validation.integer("max_rank", max_rank, lo)
    if capacity is not None:
        validation.integer("capacity", capacity, lo)
        if max_rank is not None and max_rank > capacity:
            raise ValueError(f"max_rank must be an int in [{lo}, capacity = {capacity}], got {max_rank!r}")
    include, exclude = _patterns("include", include), _patterns("exclude", exclude)
    validation.integer("min_features", min_features, 1)
    validation.flag("inplace", inplace)
    validation.flag("verbose", verbose)
    if not inplace:
        model = copy.deepcopy(model)
    report = Summary(params_before=summary(model).params_before)
    aliases = _aliases(model)
    seen: dict = {}  # id -> module (kept alive, so an id is never reused while converting)
    entries = []  # in the order of the walk: [name, parent, attribute, module, outcome]

    def visit(name, child, parent, attr):
        """Record ``child``: outcome "convert" (a candidate), a reason it stays as it is, or nothing."""
        if id(child) in seen:  # a module registered under two parents: reported (and left) once
            return
        seen[id(child)] = child
        if isinstance(child, FactorizedMixin):
            why = "already factorized"
        elif kind_of(child) is None:
            mats = _matrices(child)
            if not mats:
                return
            kind = "embedding (a lookup table)" if isinstance(child, _EMBEDDINGS) else \
                f"module type {type(child).__name__} is not converted"
            why = f"{kind}: {', '.join(mats)} stay{'s' if len(mats) == 1 else ''} dense"
        elif include is not None and not _matches(name, include) or exclude is not None and _matches(name, exclude):
            why = "excluded by include/exclude"
        else:
            tied = _tied_to(name, child, aliases)  # converting would untie it (a copy of the shared weight)
            why = f"tied to {tied}" if tied is not None else _refusal(child, parent, rank, max_rank, capacity,
                                                                         min_features)
        entries.append([name, parent, attr, child, why or "convert"])

    if isinstance(model, FactorizedMixin) or kind_of(model) is not None:  # a single layer
        visit("", model, None, None)
    else:
        own = _matrices(model)
        if own:
            report.skipped.append(("", f"parameters of the model itself ({', '.join(own)}) are not converted"))
        for parent_name, parent in list(model.named_modules()):
            for child_name, child in list(parent.named_children()):
                visit(f"{parent_name}.{child_name}" if parent_name else child_name, child, parent, child_name)
    todo = [e for e in entries if e[4] == "convert"]
    for name, _, _, child, _ in todo:  # every weight checked before any layer is converted
        _check_finite(name, child)
    for e in todo:  # nothing in the model is changed before every new layer exists
        new, why = _build(e[3], rank, tau, max_rank, capacity)
        e[4] = new if new is not None else why
    for name, parent, attr, child, out in entries:
        if isinstance(out, str):
            report.skipped.append((name, out))
            continue
        _carry_over(child, out, trainable=child.weight.requires_grad)
        if parent is None:
            model = out
        else:
            setattr(parent, attr, out)
        report.layers.append((name, f"{out.U.shape[0]} x {out.V.shape[0]}", out.rank, out.capacity))
        report.layer_params.append((name, _count(out), out.num_parameters_dense()))
    report.params_after, report.params_active = _count(model), active_parameters(model)
    for hook in CONVERTED_HOOKS:
        hook(model)
    model.lrtrain_summary = report
    if verbose:
        print(report)
    return model


def _refusal(child, parent, rank, max_rank, capacity, min_features) -> str | None:
    """Why the dense ``child`` (of a layer kind) stays dense, as far as that is known before its SVD; None if
    it is a candidate."""
    if isinstance(parent, nn.MultiheadAttention):
        return "used by nn.MultiheadAttention"
    kind = kind_of(child)
    why = kind.refusal(child)
    if why is not None:
        return why
    out_f, in_f = kind.weight_matrix(child).shape
    full = min(out_f, in_f)
    if full < min_features:
        return f"min(out, in) = {full} < min_features = {min_features}"
    r = min(v for v in (rank, max_rank, capacity, full) if v is not None)
    if rank is not None and r * (out_f + in_f) + r * r >= out_f * in_f:
        return f"rank {r} would not save parameters"
    return None


def _check_finite(name: str, child: nn.Module) -> None:
    """ValueError naming the layer when its weight or bias holds NaN or inf (the SVD would fail or give a
    non-finite S)."""
    for pname in ("weight", "bias"):
        t = getattr(child, pname, None)
        if t is not None and not t.is_meta and not bool(torch.isfinite(t.detach()).all()):
            raise ValueError(f"lowrank: the {pname} of layer {name or '(the model itself)'!r} "
                             f"({type(child).__name__}) holds non-finite values (NaN or inf); nothing was converted")


def _build(child, rank, tau, max_rank, capacity):
    """(new layer, None) or (None, why it stays dense) for a candidate ``child`` (see :func:`_refusal`)."""
    kind = kind_of(child)
    out_f, in_f = kind.weight_matrix(child).shape
    full = min(out_f, in_f)
    # The largest rank this layer may start at: rank, max_rank, capacity, min(out, in) (tau may pick less).
    r = min(v for v in (rank, max_rank, capacity, full) if v is not None)
    cap = None if capacity is None else min(capacity, full)
    mr = None if max_rank is None else min(max_rank, full)
    new = kind.from_dense(child, rank=r, tau=tau, max_rank=mr, capacity=cap)
    if new.rank * (out_f + in_f) + new.rank ** 2 >= out_f * in_f:
        return None, f"rank {new.rank}{' (from tau)' if tau is not None else ''} would not save parameters"
    if capacity is None and max_rank is None:  # the default capacity: never more than the dense weight
        fit = dense_capacity(out_f, in_f)  # >= new.rank, which saves parameters
        if new.capacity > fit:
            new.set_capacity(fit)
    return new, None


# Per-module state a replacement layer takes over: the forward (pre-)hooks, with their kwargs / always-call
# flags, and the (full) backward hooks. The dicts themselves are shared, so the handles that registered them
# keep working on the replacement.
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def _carry_over(old: nn.Module, new: nn.Module, trainable: bool) -> None:
    """What the layer ``new`` keeps of the layer ``old`` it replaces: requires_grad of its weight (all of
    ``trainable``) and bias, the training mode, and the hooks (:data:`_HOOK_DICTS`)."""
    bias = getattr(old, "bias", None)
    for pname, p in new.named_parameters(recurse=False):
        p.requires_grad_(bias.requires_grad if pname == "bias" and bias is not None else trainable)
    new.train(old.training)
    for attr in _HOOK_DICTS:
        if hasattr(old, attr):
            setattr(new, attr, getattr(old, attr))
    if hasattr(old, "_is_full_backward_hook"):
        new._is_full_backward_hook = old._is_full_backward_hook


def _to_dense(layer: FactorizedMixin) -> nn.Module:
    """The dense layer a factorized one came from (by its kind: nn.Linear, nn.Conv2d or a Conv1D)."""
    kind = kind_of(layer)
    if kind is None:
        raise TypeError(f"factorized layer of unknown type {type(layer).__name__}")
    return kind.to_dense(layer)


def densify(model: nn.Module, inplace: bool = True) -> nn.Module:
    """Replace every factorized layer of ``model`` by the equivalent dense nn.Linear / nn.Conv2d (a transformers
    Conv1D for layers converted from one). A layer registered under several parents stays one shared module.

    Each dense layer keeps what its factorized layer had: its weight requires grad unless all of U, S, V are
    frozen, its bias as the layer's bias; the training mode; the forward (pre-)hooks and backward hooks.
    Every dense layer is built before the model changes."""
    _check_module(model)
    validation.flag("inplace", inplace)
    if not inplace:
        model = copy.deepcopy(model)
    if isinstance(model, FactorizedMixin):
        return _densified(model)
    done: dict = {}
    swaps = []
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, FactorizedMixin):
                if id(child) not in done:
                    done[id(child)] = (child, _densified(child))  # keep child alive: ids stay unique
                swaps.append((parent, child_name, done[id(child)][1]))
    for parent, child_name, dense in swaps:
        setattr(parent, child_name, dense)
    return model


def _densified(layer: FactorizedMixin) -> nn.Module:
    dense = _to_dense(layer)
    _carry_over(layer, dense, trainable=any(getattr(layer, r).requires_grad for r in ROLES))
    return dense


def summary(model: nn.Module) -> Summary:
    """Current state of a model: each factorized layer's shape and rank, parameters vs. all-dense."""
    _check_module(model)
    report = Summary(params_after=_count(model), params_active=active_parameters(model))
    dense = report.params_after
    for name, m in model.named_modules():
        if isinstance(m, FactorizedMixin):
            report.layers.append((name, f"{m.U.shape[0]} x {m.V.shape[0]}", m.rank, m.capacity))
            own = sum(p.numel() for p in m.parameters())
            report.layer_params.append((name, own, m.num_parameters_dense()))
            dense += m.num_parameters_dense() - own
    report.params_before = dense
    return report
