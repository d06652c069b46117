"""The DLRT step as functions over explicit lists, in the style of torch.optim's functional ``adamw()``.

:func:`dlrt` steps one param group: the factorized layers (:class:`LayerSlots`: the layer, its U, S, V
and bias as :class:`~lrtrain.optim.params.Slot` s — working value, gradient and state dict each) and the
other parameters (Slots). It is :func:`compute_step` (every direction and layer update, nothing written)
followed by :func:`apply_step` (everything written in place); :class:`lrtrain.DLRT` calls the two halves
itself so that, with ``nonfinite="raise"``, no group is written before every group has been computed.

Per layer with active rank r, the base rule (:mod:`.base`) gives directions D_K, D_L, D_S in the
coordinates K = U S, L = V Sᵀ and S. Every ``refresh``-th step of a layer is a *basis update*
(:func:`lrtrain.update.update_layers`: augment, Galerkin core, truncate to rank k, rotate; the rule's
state is transported to the new bases); the steps in between are *fixed-basis* steps, S ← decay(S) − lr·D_S
with D_K, D_L summed (``deferred``) into the next basis update. Dense parameters (and layer biases, with
their layer) take the plain base update p ← decay(p) − lr·D.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from ..update import Importance, LayerResult, LayerStep, finite_flags, transport_state, update_layers
from ..update.budget import layer_parameters
from .base import make_rule
from .params import Slot, is_dtensor

__all__ = ["LayerSlots", "GroupStep", "dlrt", "compute_step", "apply_step", "refuse_nonfinite", "finite_gradients",
           "projected_s_direction", "s_moments"]


@dataclass
class LayerSlots:
    """One factorized layer in a step: the layer (its ``rank``, ``max_rank``; ``_set_rank`` is called with
    the new rank) and the Slots of U (m×c), S (c×c), V (n×c) and of its bias (None: no gradient)."""

    layer: torch.nn.Module
    U: Slot
    S: Slot
    V: Slot
    bias: Slot | None = None


@dataclass
class _FixedBasisStep:
    """A layer's fixed-basis step: its new S block (r×r) and the deferred K/L steps X_K (m×r), X_L (n×r)."""

    S: torch.Tensor
    X_K: torch.Tensor
    X_L: torch.Tensor


@dataclass
class _LayerPlan:
    """What :func:`apply_step` writes for one layer: the rank r it was computed at, its update (a basis
    update's LayerResult or a fixed-basis step), the rule's new state per role, and whether it is finite."""

    slots: LayerSlots
    rank: int
    result: LayerResult | _FixedBasisStep
    states: dict
    finite: bool = True


@dataclass
class _DensePlan:
    """A dense parameter's direction and new state; ``owner`` is the index of the layer whose bias it is."""

    slot: Slot
    direction: torch.Tensor
    state: dict
    owner: int | None = None
    finite: bool = True


@dataclass
class GroupStep:
    """A computed, unwritten step of one param group (:func:`compute_step`)."""

    group: dict
    rule: object
    layers: list = field(default_factory=list)
    dense: list = field(default_factory=list)

    @property
    def finite(self) -> bool:
        return all(p.finite for p in self.layers) and all(d.finite for d in self.dense)


def dlrt(layers: list, params: list, group: dict, *, guide=None, backend: str = "auto", nonfinite: str = "skip") -> int:
    """One DLRT step of one param group (hyperparameters ``group``, as validated by
    :func:`lrtrain.validation.dlrt_group`). Returns the number of layers whose update was non-finite and
    skipped (``nonfinite="raise"``: FloatingPointError instead, before anything is written)."""
    step = compute_step(layers, params, group, guide=guide, backend=backend)
    refuse_nonfinite([step], nonfinite)
    return apply_step(step)


def refuse_nonfinite(steps: list, nonfinite: str) -> None:
    """With ``nonfinite="raise"``: FloatingPointError when any computed step is not finite (nothing is written)."""
    if nonfinite == "raise" and not all(s.finite for s in steps):
        raise FloatingPointError("DLRT: a layer's update was non-finite (learning rate too large?); nothing was updated")


def compute_step(layers: list, params: list, group: dict, *, guide=None, backend: str = "auto") -> GroupStep:
    """Directions and layer updates of one group; nothing is written yet (see :func:`apply_step`).

    ``guide`` (optional) is called as ``guide.adjust(layer, item, group)`` before each basis update and may
    lower ``item.augment`` / ``item.max_rank`` and replace ``item.G_K`` / ``item.G_L``."""
    rule = make_rule(group["base"])
    lr = group["lr"]
    keys = rule.linear_keys + rule.square_keys
    # A layer's bias takes the plain base update, but only together with its (finite) factors.
    owners = [j for j, ls in enumerate(layers) if ls.bias is not None]
    dense = list(params) + [layers[j].bias for j in owners]
    owner = [None] * len(params) + owners
    ddirs, dstates = rule.directions([s.grad for s in dense], [s.value for s in dense],
                                     [_active_state(s.state, keys, None) for s in dense], group) if dense else ([], [])

    grads, decay, states = [], [], []
    for ls in layers:
        r = ls.layer.rank
        sU, sS, sV = ls.U, ls.S, ls.V
        grads += [sU.grad[:, :r], sV.grad[:, :r], sS.grad[:r, :r]]
        decay += [None, None, sS.value[:r, :r]]
        for s, two in ((sU, False), (sV, False), (sS, True)):
            st = _active_state(s.state, keys, r, two)
            if "bias_mass" in rule.square_keys:  # stored by apply_step, with the moments
                s.mass = _mass(s.state, s.value, two, group, r)
                st["bias_mass"] = _active(s.mass, r, two)
            states.append(st)
    dirs, new_states = rule.directions(grads, decay, states, group) if layers else ([], [])

    refresh = group["refresh"]
    plans, items = [], []
    for j, ls in enumerate(layers):
        sU, sS, sV = ls.U, ls.S, ls.V
        r = ls.layer.rank
        if sS.state.get("rank", r) != r:
            raise ValueError(f"DLRT: the optimizer state of a {type(ls.layer).__name__} was made at rank "
                             f"{sS.state['rank']}, the layer has rank {r}: load the model and the optimizer from the "
                             "same checkpoint (or build a new optimizer); nothing was updated")
        D_K, D_L, D_S = dirs[3 * j: 3 * j + 3]
        new = {"U": new_states[3 * j], "V": new_states[3 * j + 1], "S": new_states[3 * j + 2]}
        if group["s_direction"] == "projected":
            D_S = projected_s_direction(sU.value[:, :r], sV.value[:, :r], D_K, D_L)
        S_step = rule.decayed(sS.value[:r, :r], group)
        if "deferred" in sU.state:  # add the K/L steps deferred by the fixed-basis steps since the last update
            D_K = D_K + sU.state["deferred"][:, :r]
            D_L = D_L + sV.state["deferred"][:, :r]
        if sS.state.get("basis_age", 0) + 1 < refresh:
            plans.append(_LayerPlan(ls, r, _FixedBasisStep(S_step - lr * D_S, D_K, D_L), new))
            continue
        item = LayerStep(sU.value[:, :r], S_step, sV.value[:, :r], D_K, D_L, D_K, D_L, D_S, ls.layer.max_rank,
                         spare=group["spare"],
                         importance=s_moments(new["S"], grads[3 * j + 2], group) if group["rank_rule"] == "importance"
                         else None)
        if guide is not None:
            guide.adjust(ls.layer, item, group)
        plans.append(_LayerPlan(ls, r, item, new))
        items.append(item)
    budget = None
    if group["budget"] is not None and items:  # the group's layers share b·Σ mn, less what the others hold now
        held = sum(layer_parameters(p.slots.U.value.shape[0], p.slots.V.value.shape[0], p.rank)
                   for p in plans if not isinstance(p.result, LayerStep))
        budget = int(group["budget"] * sum(ls.U.value.shape[0] * ls.V.value.shape[0] for ls in layers)) - held
    updated = iter(update_layers(items, lr, group["tau"], group["min_rank"], backend=backend, budget=budget)
                   if items else [])
    for plan in plans:
        if isinstance(plan.result, LayerStep):
            plan.result = next(updated)
    for plan, ok in zip(plans, finite_flags([p.result for p in plans])):
        plan.finite = ok
    # A direction can be non-finite where the gradient is not (AdamW with eps = 0 on a zero coordinate: 0/0).
    dplans = [_DensePlan(s, d, st, j, ok) for s, d, st, j, ok in
              zip(dense, ddirs, dstates, owner, finite_gradients(ddirs) if ddirs else [])]
    for d in dplans:
        if d.owner is not None and not d.finite:  # a bias goes with its layer
            plans[d.owner].finite = False
    return GroupStep(group, rule, plans, dplans)


def projected_s_direction(U: torch.Tensor, V: torch.Tensor, D_K: torch.Tensor, D_L: torch.Tensor) -> torch.Tensor:
    """D_S = ½ (Uᵀ D_K + D_Lᵀ V) (r×r): the part of the K-step (W ← W - lr·D_K Vᵀ) and of the L-step
    (W ← W - lr·U D_Lᵀ) inside span(U) ⊗ span(V), averaged. The base rule normalizes D_K and D_L per entry
    of the m×r and n×r coordinates, so this S-step moves a singular value about √m times as fast as the
    base rule's own S direction (normalized per entry of r×r): as fast as dense AdamW moves it."""
    return 0.5 * (U.mT @ D_K + D_L.mT @ V)


def s_moments(state: dict, G_S: torch.Tensor, group: dict) -> Importance:
    """The importance rule's inputs from the S-state the base rule returned this step: AdamW's moments
    divided by their bias masses; for SGD (no second moment) G_S² and the momentum buffer scaled to a mean,
    buf·(1 - μ)/(1 - dampening) (the buffer sums (1 - dampening)·g with weights μᵏ), or G_S without momentum."""
    if "exp_avg_sq" in state:
        w = state["bias_mass"]
        return Importance(state["exp_avg"] / w[0], state["exp_avg_sq"] / w[1])
    if "momentum_buffer" in state and group["dampening"] < 1:
        return Importance(state["momentum_buffer"] * ((1 - group["momentum"]) / (1 - group["dampening"])), G_S.square())
    return Importance(G_S, G_S.square())


def apply_step(step: GroupStep) -> int:
    """Write a computed group step in place: factors and state into their fixed-capacity buffers (leading k
    columns, the rest zero), the layers' new ranks, the dense updates. A layer whose update is not finite is
    left untouched (with its bias), and so is a dense parameter whose direction is not, with a warning;
    returns how many were."""
    rule, group = step.rule, step.group
    keys = rule.linear_keys + rule.square_keys
    skipped = 0
    for plan in step.layers:
        if not plan.finite:
            warnings.warn("DLRT: a layer's update was non-finite (learning rate too large?); step skipped",
                          RuntimeWarning)
            skipped += 1
            continue
        ls, r, res, new = plan.slots, plan.rank, plan.result, plan.states
        sU, sS, sV = ls.U, ls.S, ls.V
        for s in (sU, sS, sV):
            if s.mass is not None:
                s.state.setdefault("bias_mass", s.mass)
        if isinstance(res, _FixedBasisStep):  # S and the moments in place, the K/L steps deferred
            _active(sS.value, r, True).copy_(res.S)
            sS.commit()
            for role, s, two in (("U", sU, False), ("S", sS, True), ("V", sV, False)):
                for key, v in new[role].items():
                    if key == "step":
                        s.state["step"] = v
                    else:
                        _active(_buffer(s.state, key, s.value), r, two).copy_(v)
            _buffer(sU.state, "deferred", sU.value)[:, :r].copy_(res.X_K)
            _buffer(sV.state, "deferred", sV.value)[:, :r].copy_(res.X_L)
            sS.state["basis_age"] = sS.state.get("basis_age", 0) + 1
            sS.state["rank"] = r
            continue
        k = res.S.shape[0]
        slots = {"U": (sU, res.U, False), "S": (sS, res.S, True), "V": (sV, res.V, False)}
        # Moments are transported straight into their fixed buffers (leading k columns / k × k block).
        out = {role: {key: _active(_buffer(s.state, key, s.value), k, two) for key in keys if key in new[role]}
               for role, (s, _, two) in slots.items()}
        transport_state(new, res.R_U, res.R_V, rule.linear_keys, rule.square_keys, out=out)
        for role, (s, value, two) in slots.items():
            _write_active(s.value, value, k, r, two)
            s.commit()
            for key in out[role]:
                _zero_unused(s.state[key], k, r, two)
            if "step" in new[role]:
                s.state["step"] = new[role]["step"]
            if "deferred" in s.state:
                s.state["deferred"].zero_()
        sS.state["basis_age"] = 0
        sS.state["rank"] = k  # the rank this state belongs to (checked at load and at the next step)
        ls.layer._set_rank(k)
    lr = group["lr"]
    for d in step.dense:
        if d.owner is None and not d.finite:
            warnings.warn("DLRT: a parameter's update direction was non-finite (eps = 0?); step skipped", RuntimeWarning)
            skipped += 1
            continue
        if d.owner is None or step.layers[d.owner].finite:
            s = d.slot
            s.value.copy_(rule.decayed(s.value, group).sub(d.direction, alpha=lr))
            s.commit()
            s.state.update(d.state)
    return skipped


def _active(buf: torch.Tensor, r: int, two_sided: bool) -> torch.Tensor:
    """The active block of a fixed buffer: buf[..., :r], or buf[..., :r, :r] for two-sided S-coordinates."""
    return buf[..., :r, :r] if two_sided else buf[..., :r]


def _mass(state: dict, like: torch.Tensor, two_sided: bool, group: dict, r: int) -> torch.Tensor:
    """A factor's Adam ``bias_mass`` (see :mod:`.base`) at full capacity, (2, c) or (2, c, c) for S: the
    state's, or a new one (not stored here). A state that has a step count but no masses (a checkpoint of an
    older lrtrain) starts from the plain Adam weights 1 - βᵗ on its active block."""
    if "bias_mass" in state:
        return state["bias_mass"]
    c = like.shape[-1]
    w = like.new_zeros((2, c, c) if two_sided else (2, c))
    t = int(state.get("step", 0))
    if t:
        b1, b2 = group["betas"]
        _active(w, r, two_sided)[0] = 1.0 - b1 ** t
        _active(w, r, two_sided)[1] = 1.0 - b2 ** t
    return w


def _active_state(state: dict, keys, r: int | None, two_sided: bool = False) -> dict:
    """The rule's view of a parameter's state: moment buffers cut to the active block (r None: whole)."""
    out = {key: state[key] if r is None else _active(state[key], r, two_sided) for key in keys if key in state}
    if "step" in state:
        out["step"] = state["step"]
    return out


def _buffer(state: dict, key: str, like: torch.Tensor) -> torch.Tensor:
    """state[key], allocated (zeros shaped like the parameter's working value) on first use."""
    if key not in state:
        state[key] = torch.zeros_like(like)
    return state[key]


def _zero_unused(buf: torch.Tensor, k: int, r: int, two_sided: bool) -> None:
    """Zero what falls out of use when the rank goes from r to k (buf is zero beyond its leading r)."""
    if k >= r:
        return
    if two_sided:
        buf[..., k:r, :r].zero_()
        buf[..., :k, k:r].zero_()
    else:
        buf[..., k:r].zero_()


def _write_active(buf: torch.Tensor, new: torch.Tensor, k: int, r: int, two_sided: bool) -> None:
    """buf's active block at rank k = new; the part that falls out of use (rank r before) is zeroed."""
    _active(buf, k, two_sided).copy_(new)
    _zero_unused(buf, k, r, two_sided)


def finite_gradients(grads) -> list:
    """Whether each gradient is finite; one host sync. The 2-norms screen all of them at once; a
    non-finite norm is re-checked with max |g|, which does not overflow on large finite entries."""
    out: list = [None] * len(grads)
    local = [i for i, g in enumerate(grads) if not is_dtensor(g)]
    if local:
        for i, n in zip(local, torch._foreach_norm([grads[i] for i in local])):
            out[i] = n
    for i, g in enumerate(grads):
        if out[i] is None:  # DTensor: the max over all shards
            out[i] = _max_abs_dtensor(g)
    dev = out[0].device
    flags = torch.isfinite(torch.stack([o.double().to(dev) for o in out])).tolist()
    for i, ok in enumerate(flags):
        if not ok and not is_dtensor(grads[i]):
            flags[i] = bool(torch.isfinite(torch.linalg.vector_norm(grads[i], float("inf"))))
    return flags


def _max_abs_dtensor(g) -> torch.Tensor:
    """max |g| over every shard of DTensor ``g`` (NaN reported as inf), the same on every rank.

    NaN becomes inf *before* the max-reduction across ranks: a MAX all-reduce may drop a NaN (gloo keeps
    ``a`` in ``max(a, NaN)``), which would hide a NaN in one rank's shard from every rank.
    """
    from torch.distributed.tensor import DTensor, Partial, Replicate

    local = g.to_local()
    n = torch.linalg.vector_norm(local, float("inf")).double() if local.numel() else local.new_zeros((), dtype=torch.float64)
    n = torch.nan_to_num(n, nan=float("inf"))
    placements = [Replicate() if p.is_replicate() else Partial("max") for p in g.placements]
    return DTensor.from_local(n, g.device_mesh, placements, run_check=False).full_tensor()
