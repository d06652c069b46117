"""DLRT: a drop-in ``torch.optim.Optimizer`` that trains factorized layers with adaptive rank.

Each step, for every factorized layer in the parameter list (found through the layers, see
:mod:`.params`), the base rule (SGD or AdamW, :mod:`.base`) gives directions in the coordinates
K = U S, L = V Sᵀ and S at the layer's active rank r; the layer update (:mod:`.step`) augments the bases,
projects the step onto them, truncates by the τ rule to a new rank k ≤ max_rank ≤ capacity, and rotates
the optimizer state. Factors and state are written **in place** into their fixed-capacity buffers
(leading k columns; the rest zero) and the layer's active rank becomes k. Other parameters get the plain
base update. One forward and one backward per step.

Distributed: every quantity the step reads (gradients all-reduced by DDP, or full tensors gathered
from FSDP2 shards; parameters identical on every replica) is the same on every process, and the step is
a deterministic function of them (no randomness; each layer's update runs in one thread with a fixed
schedule), so every replica computes the same ranks and factors. Low precision: bfloat16/float16
parameters are stepped through fp32 master copies kept in the optimizer state. An enclosing
``torch.autocast`` does not reach the step.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch.optim import Optimizer

from ..ext import check_backend, finite_flags, update_layers
from .base import make_rule
from .params import LOW_PRECISION, Slot, find_layers, fsdp1_kind, is_dtensor
from .step import LayerStep, transport_state

__all__ = ["DLRT"]


class DLRT(Optimizer):
    """Rank-adaptive dynamical low-rank training.

    Args:
        params: iterable of parameters or param groups (as in ``torch.optim``); a factorized layer's
            U, S and V must all be in the same group.
        lr: learning rate (>= 0).
        base: ``"adamw"`` or ``"sgd"``: the update applied in factor coordinates and to other params.
        momentum, dampening, nesterov: SGD options.
        betas, eps: AdamW options.
        weight_decay: λ >= 0. On factorized layers it acts on S only (‖W‖_F = ‖S‖_F).
        tau: relative truncation tolerance τ >= 0 (see :mod:`lrtrain.rank.truncation`).
        min_rank: smallest rank a layer may truncate to (>= 1).
        nonfinite: ``"skip"`` (warn, count in ``skipped_steps``, leave that layer untouched) or
            ``"raise"`` (FloatingPointError before anything is updated).
        guide: optional rank guide (e.g. :class:`lrtrain.CollapseMonitor`): before each layer's update
            DLRT calls ``guide.adjust(layer, item, param_group)``, which may lower
            ``item.augment`` (new basis columns per side) and ``item.max_rank`` for that step, and replace
            the augmentation directions ``item.G_K`` / ``item.G_L`` (same shapes; see :mod:`lrtrain.rank.guided`).
        backend: who runs the layer updates: ``"auto"`` (the fused C++/CUDA kernels of
            :mod:`lrtrain.ext` where active for the layer's device, else the reference), ``"reference"``
            (pure PyTorch), ``"cpu"`` or ``"cuda"`` (that fused backend; ValueError if it is not active).
    """

    def __init__(self, params, lr: float = 1e-3, base: str = "adamw", momentum: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, tau: float = 0.1, min_rank: int = 1, nonfinite: str = "skip",
                 guide=None, backend: str = "auto"):
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
        self.backend = check_backend(backend)
        self.nonfinite = nonfinite
        self.guide = guide
        self.skipped_steps = 0
        defaults = dict(lr=lr, base=base, momentum=momentum, dampening=dampening, nesterov=nesterov,
                        betas=tuple(betas), eps=eps, weight_decay=weight_decay, tau=tau, min_rank=min_rank)
        super().__init__(params, defaults)
        self._check_factors()
        self._ready = True

    # ------------------------------------------------------------------ groups and validation
    def add_param_group(self, param_group: dict) -> None:
        """As in torch.optim, but the group is validated first: a refused group leaves nothing behind."""
        super().add_param_group(param_group)
        try:
            _validate_group(self.param_groups[-1])
            if getattr(self, "_ready", False):
                self._check_factors()
        except Exception:
            self.param_groups.pop()
            raise

    def _check_factors(self) -> None:
        """Each factorized layer's U, S, V (and bias) must all be present, in one param group, with the
        shapes the layer allocated (FSDP1 flat or sharded views are refused)."""
        group_of = {}
        for gi, g in enumerate(self.param_groups):
            for p in g["params"]:
                kind = fsdp1_kind(p)
                if kind == "flat":
                    raise ValueError("params: FSDP1 flat parameters (FullyShardedDataParallel, use_orig_params=False) "
                                     "hide the factorized layers' U, S, V; DLRT does not support FSDP1: wrap the "
                                     "model with torch.distributed.fsdp.fully_shard (FSDP2) instead")
                if kind == "orig":
                    raise ValueError("params: a parameter managed by FSDP1 (FullyShardedDataParallel, "
                                     "use_orig_params=True) is a view into FSDP1's flat buffer (a 1-D shard when "
                                     "sharded); DLRT does not support FSDP1: wrap the model with "
                                     "torch.distributed.fsdp.fully_shard (FSDP2) instead")
                if getattr(p, "_lrtrain_retired", False):
                    raise ValueError("params: a factor parameter replaced by set_capacity(); build the optimizer "
                                     "again from model.parameters()")
                group_of[id(p)] = gi
        layers, _ = find_layers([p for g in self.param_groups for p in g["params"]])
        for layer in layers:
            groups = sorted({group_of[id(getattr(layer, r))] for r in "USV"})
            if len(groups) > 1:
                raise ValueError("params: a factorized layer's U, S and V are split across param groups "
                                 f"{groups}; put all three in one group")
            c = layer.S.shape[-1]
            if layer.U.dim() != 2 or layer.S.shape != (c, c) or layer.U.shape[1] != c or layer.V.shape[1] != c:
                raise ValueError("params: a factorized layer's U, S, V do not have their allocated shapes "
                                 "(FSDP1 flattens or shards them: use fully_shard, FSDP2)")

    # ------------------------------------------------------------------ state dict
    def state_dict(self):
        sd = super().state_dict()
        sd["skipped_steps"] = self.skipped_steps
        return sd

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        skipped = int(state_dict.pop("skipped_steps", 0))
        super().load_state_dict(state_dict)
        self.skipped_steps = skipped
        # torch casts loaded state to each parameter's dtype; the fp32 masters and moments of a
        # bfloat16/float16 parameter stay fp32.
        params = [p for g in self.param_groups for p in g["params"]]
        saved = [i for g in state_dict["param_groups"] for i in g["params"]]
        for idx, p in zip(saved, params):
            if p.dtype in LOW_PRECISION and idx in state_dict["state"]:
                for key, v in state_dict["state"][idx].items():
                    if torch.is_tensor(v) and key != "step":
                        self.state[p][key] = v.to(device=p.device, copy=True)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """One optimization step (``closure`` re-evaluates the loss, as in torch.optim)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with _autocast_off():
            plans = [self._plan(g) for g in self.param_groups]
            self._drop_nonfinite(plans)
            pending = [self._compute_group(g, *plan) for g, plan in zip(self.param_groups, plans)]
            if self.nonfinite == "raise" and any(not all(p["finite"]) for p in pending):
                raise FloatingPointError("DLRT: a layer's update was non-finite (learning rate too large?); "
                                         "nothing was updated")
            for p in pending:
                self._apply_group(p)
        return loss

    def _plan(self, group):
        """(layers, plain): factorized layers and plain params of ``group`` that have gradients."""
        layers, plain = find_layers(group["params"])
        return [l for l in layers if l.U.grad is not None], [p for p in plain if p.grad is not None]

    def _drop_nonfinite(self, plans) -> None:
        """Remove every layer / param with a non-finite gradient (one host sync for all of them)."""
        units = []
        for gi, (layers, plain) in enumerate(plans):
            units += [(gi, "layer", l, [g for g in (l.U.grad, l.S.grad, l.V.grad, _grad(l.bias)) if g is not None])
                      for l in layers]
            units += [(gi, "plain", p, [p.grad]) for p in plain]
        if not units:
            return
        flags = _finite([g for u in units for g in u[3]])
        bad, i = [], 0
        for u in units:
            if not all(flags[i:i + len(u[3])]):
                bad.append(u)
            i += len(u[3])
        if not bad:
            return
        if self.nonfinite == "raise":
            raise FloatingPointError(f"non-finite gradients in {len(bad)} layer(s)/parameter(s); nothing was updated")
        warnings.warn(f"DLRT: non-finite gradients, skipped the step of {len(bad)} layer(s)/parameter(s)", RuntimeWarning)
        self.skipped_steps += len(bad)
        for gi, kind, obj, _ in bad:
            lst = plans[gi][0] if kind == "layer" else plans[gi][1]
            lst[:] = [o for o in lst if o is not obj]

    def _compute_group(self, group, layers, plain) -> dict:
        """Directions and layer updates of one group; nothing is written yet (see :meth:`_apply_group`)."""
        rule = make_rule(group["base"])
        lr = group["lr"]
        keys = rule.linear_keys + rule.square_keys
        # A layer's bias takes the plain base update, but only together with its (finite) factors.
        owner = [None] * len(plain) + [j for j, l in enumerate(layers) if _grad(l.bias) is not None]
        plain = plain + [layers[j].bias for j in owner[len(plain):]]
        pslots = [Slot(p, self.state[p], full=False) for p in plain]
        pdirs, pstates = rule.directions([s.grad for s in pslots], [s.value for s in pslots],
                                         [_active_state(s.state, keys, None) for s in pslots], group) if pslots else ([], [])

        slots, grads, decay, states = [], [], [], []
        for l in layers:
            r = l.rank
            sU, sS, sV = (Slot(getattr(l, role), self.state[getattr(l, role)], full=True) for role in "USV")
            slots.append((sU, sS, sV, r))
            grads += [sU.grad[:, :r], sV.grad[:, :r], sS.grad[:r, :r]]
            decay += [None, None, sS.value[:r, :r]]
            states += [_active_state(s.state, keys, r, two) for s, two in ((sU, False), (sV, False), (sS, True))]
        dirs, new_states = rule.directions(grads, decay, states, group) if layers else ([], [])

        items = []
        for j, (l, (sU, sS, sV, r)) in enumerate(zip(layers, slots)):
            D_K, D_L, D_S = dirs[3 * j: 3 * j + 3]
            item = LayerStep(sU.value[:, :r], rule.decayed(sS.value[:r, :r], group), sV.value[:, :r],
                             grads[3 * j], grads[3 * j + 1], D_K, D_L, D_S, l.max_rank)
            if self.guide is not None:
                self.guide.adjust(l, item, group)
            items.append(item)
        results = update_layers(items, lr, group["tau"], group["min_rank"], backend=self.backend) if items else []
        return dict(group=group, rule=rule, layers=layers, slots=slots, results=results,
                    new_states=new_states, finite=finite_flags(results), pslots=pslots, pdirs=pdirs,
                    pstates=pstates, owner=owner)

    def _apply_group(self, pend: dict) -> None:
        rule, group = pend["rule"], pend["group"]
        keys = rule.linear_keys + rule.square_keys
        for j, (l, (sU, sS, sV, r), res) in enumerate(zip(pend["layers"], pend["slots"], pend["results"])):
            if not pend["finite"][j]:
                warnings.warn("DLRT: a layer's update was non-finite (learning rate too large?); step skipped",
                              RuntimeWarning)
                self.skipped_steps += 1
                continue
            k = res.S.shape[0]
            slots = {"U": (sU, res.U, False), "S": (sS, res.S, True), "V": (sV, res.V, False)}
            new = dict(zip("VS", pend["new_states"][3 * j + 1: 3 * j + 3]), U=pend["new_states"][3 * j])
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
            l._set_rank(k)
        lr = group["lr"]
        for s, d, st, j in zip(pend["pslots"], pend["pdirs"], pend["pstates"], pend["owner"]):
            if j is None or pend["finite"][j]:
                s.value.copy_(rule.decayed(s.value, group).sub(d, alpha=lr))
                s.commit()
                s.state.update(st)


def _grad(p):
    return None if p is None else p.grad


def _active(buf: torch.Tensor, r: int, two_sided: bool) -> torch.Tensor:
    """The active block of a fixed buffer: buf[:, :r], or buf[:r, :r] for two-sided S-coordinates."""
    return buf[:r, :r] if two_sided else buf[:, :r]


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
        buf[k:r, :r].zero_()
        buf[:k, k:r].zero_()
    else:
        buf[:, k:r].zero_()


def _write_active(buf: torch.Tensor, new: torch.Tensor, k: int, r: int, two_sided: bool) -> None:
    """buf's active block at rank k = new; the part that falls out of use (rank r before) is zeroed."""
    _active(buf, k, two_sided).copy_(new)
    _zero_unused(buf, k, r, two_sided)


def _finite(grads) -> list:
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


def _autocast_off():
    """Disable autocast on CPU (and CUDA where present) for the optimizer step."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast("cpu", enabled=False))
    if torch.cuda.is_available():
        stack.enter_context(torch.autocast("cuda", enabled=False))
    return stack


def _validate_group(g: dict) -> None:
    make_rule(g["base"])
    if not g["lr"] >= 0:
        raise ValueError(f"lr must be >= 0, got {g['lr']!r}")
    if not g["tau"] >= 0:
        raise ValueError(f"tau must be >= 0, got {g['tau']!r}")
    if not g["weight_decay"] >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {g['weight_decay']!r}")
    if not 0 <= g["momentum"] < 1:
        raise ValueError(f"momentum must be in [0, 1), got {g['momentum']!r}")
    if not isinstance(g["min_rank"], int) or g["min_rank"] < 1:
        raise ValueError(f"min_rank must be an int >= 1, got {g['min_rank']!r}")
    b1, b2 = g["betas"]
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise ValueError(f"betas must be in [0, 1), got {g['betas']!r}")
    if not g["eps"] >= 0:
        raise ValueError(f"eps must be >= 0, got {g['eps']!r}")
