"""DLRT: a drop-in ``torch.optim.Optimizer`` that trains factorized layers with adaptive rank.

Each step, for every factorized layer in the parameter list (found through the layers, see
:mod:`.params`), the base rule (SGD or AdamW, :mod:`.base`) gives directions D_K, D_L, D_S in the
coordinates K = U S, L = V Sᵀ and S at the layer's active rank r. Every ``refresh``-th step of a layer
is a *basis update* (:mod:`.step`): it augments the bases with the directions the optimizer steps,
projects the step onto them, truncates by the τ rule (plus ``spare`` directions of room to grow) to a
new rank k ≤ max_rank ≤ capacity, and rotates the optimizer state. The steps in between are
*fixed-basis* steps: S ← decay(S) - lr·D_S with U and V unchanged, while D_K and D_L are summed
(``deferred``) and enter the next basis update as its K- and L-steps (at that step's learning rate):

    X_K = Σ_{steps since the last basis update} D_K,   Ŝ's coupling blocks -lr·Q_Uᵀ X_K, -lr·X_Lᵀ Q_V

so no part of the optimizer's step is dropped, only delayed. ``refresh=1`` updates the basis every step.
Factors and state are written **in place** into their fixed-capacity buffers (leading k columns; the
rest zero) and the layer's active rank becomes k. Other parameters get the plain base update. One
forward and one backward per step.

Distributed: every quantity the step reads (gradients all-reduced by DDP, or full tensors gathered
from FSDP2 shards; parameters identical on every replica) is the same on every process, and the step is
a deterministic function of them (no randomness; each layer's update runs in one thread with a fixed
schedule), so every replica computes the same ranks and factors. Low precision: bfloat16/float16
parameters are stepped through fp32 master copies kept in the optimizer state. An enclosing
``torch.autocast`` does not reach the step.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
import warnings

import torch
from torch.optim import Optimizer

from ..ext import check_backend, finite_flags, update_layers
from .base import BASES, make_rule
from .params import LOW_PRECISION, Slot, find_layers, fsdp1_kind, is_dtensor
from .step import LayerStep, transport_state

__all__ = ["DLRT", "DEFAULT_REFRESH"]

# Basis update interval by default (DLRT(refresh=...)); chosen by measurement, see README "Basis refresh".
DEFAULT_REFRESH = 1


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
        spare: singular directions kept beyond the τ-rank at each basis update (>= 0; default 1): the
            rank's room to grow (see :mod:`.step`). A layer's rank is its τ-rank + spare, at most max_rank.
        refresh: basis update interval in steps (>= 1): 1 updates every layer's bases at every step;
            k > 1 takes k - 1 fixed-basis steps (S only, the K/L steps deferred) in between.
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
                 weight_decay: float = 0.0, tau: float = 0.1, min_rank: int = 1, spare: int = 1,
                 refresh: int = DEFAULT_REFRESH, nonfinite: str = "skip", guide=None, backend: str = "auto"):
        if not isinstance(nonfinite, str) or nonfinite not in ("skip", "raise"):
            raise ValueError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
        if guide is not None and not callable(getattr(guide, "adjust", None)):
            raise TypeError(f"guide must be None or have a method adjust(layer, item, param_group), "
                            f"got {type(guide).__name__}")
        self.backend = check_backend(backend)
        self.nonfinite = nonfinite
        self.guide = guide
        self.skipped_steps = 0
        defaults = dict(lr=lr, base=base, momentum=momentum, dampening=dampening, nesterov=nesterov,
                        betas=betas, eps=eps, weight_decay=weight_decay, tau=tau, min_rank=min_rank, spare=spare,
                        refresh=refresh)
        _validate_group(defaults)  # every argument checked before torch sees the params
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
            _check_trainable(layer)
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
        """As in torch.optim, but everything is validated first (hyperparameters as in the constructor; each
        state tensor finite, floating point and shaped like its parameter; group and parameter counts), and
        a refused dict (ValueError) leaves the optimizer as it was. A loaded group lacking a hyperparameter
        takes the optimizer's default."""
        state_dict = dict(state_dict)
        skipped = _validated_skipped(state_dict.pop("skipped_steps", 0))
        state_dict["param_groups"] = self._validated_groups(state_dict.get("param_groups"))
        self._validate_state(state_dict)
        old = self.__dict__.get("state"), self.__dict__.get("param_groups")
        try:
            super().load_state_dict(state_dict)
        except BaseException:
            self.__dict__.update(state=old[0], param_groups=old[1])
            raise
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

    def _validated_groups(self, saved) -> list:
        """The loaded param groups, each completed from the defaults and validated (on copies)."""
        if not isinstance(saved, (list, tuple)):
            raise ValueError(f"state_dict['param_groups'] must be a list, got {type(saved).__name__}")
        if len(saved) != len(self.param_groups):
            raise ValueError(f"state_dict: {len(saved)} param group(s), the optimizer has {len(self.param_groups)}")
        out = []
        for i, (g, mine) in enumerate(zip(saved, self.param_groups)):
            if not isinstance(g, dict) or not isinstance(g.get("params"), (list, tuple)):
                raise ValueError(f"state_dict: param group {i} is not a dict with a 'params' list")
            if len(g["params"]) != len(mine["params"]):
                raise ValueError(f"state_dict: param group {i} has {len(g['params'])} parameter(s), "
                                 f"the optimizer's has {len(mine['params'])}")
            g = {**self.defaults, **g}
            try:
                _validate_group(g)
            except (ValueError, TypeError) as e:
                raise ValueError(f"state_dict: param group {i}: {e}") from None
            out.append(g)
        return out

    def _validate_state(self, state_dict) -> None:
        state = state_dict.get("state")
        if not isinstance(state, dict):
            raise ValueError(f"state_dict['state'] must be a dict, got {type(state).__name__}")
        params = {i: p for g_saved, g in zip(state_dict["param_groups"], self.param_groups)
                  for i, p in zip(g_saved["params"], g["params"])}
        layers, _ = find_layers([p for g in self.param_groups for p in g["params"]])
        role = {id(getattr(l, r)): r for l in layers for r in "USV"}
        for idx, st in state.items():
            if idx not in params:
                raise ValueError(f"state_dict: state for parameter index {idx!r}, which no param group lists")
            if not isinstance(st, dict):
                raise ValueError(f"state_dict: state of parameter {idx!r} must be a dict")
            p = params[idx]
            for key, v in st.items():
                where = f"state_dict: state[{idx!r}][{key!r}]"
                if key == "basis_age":
                    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                        raise ValueError(f"{where} must be an int >= 0, got {v!r}")
                    continue
                if key == "step":
                    n = v.item() if torch.is_tensor(v) and v.numel() == 1 else v
                    if isinstance(n, bool) or not isinstance(n, (int, float)) or not (n >= 0 and float(n).is_integer()):
                        raise ValueError(f"{where} must be an integer >= 0, got {v!r}")
                    continue
                if not torch.is_tensor(v):
                    raise ValueError(f"{where} must be a tensor, got {type(v).__name__}")
                if not v.is_floating_point():
                    raise ValueError(f"{where} must be floating point, got {v.dtype}")
                want = tuple(p.shape) if key != "bias_mass" else (2, *p.shape) if role.get(id(p)) == "S" else (2, p.shape[-1])
                if tuple(v.shape) != want:
                    raise ValueError(f"{where} has shape {tuple(v.shape)}; it must be {want}"
                                     + (" (its parameter's shape)" if key != "bias_mass" else ""))
                local = v.to_local() if is_dtensor(v) else v
                if not bool(torch.isfinite(local).all()):
                    raise ValueError(f"{where} is not finite (NaN or inf)")
                if key == "exp_avg_sq" and bool((local < 0).any()):
                    raise ValueError(f"{where} (a second moment) must be >= 0")
                if key == "bias_mass" and bool(((local < 0) | (local > 1.001)).any()):
                    raise ValueError(f"{where} (bias-correction weights) must be in [0, 1] (up to rounding)")

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
            dropped = self._drop_nonfinite(plans)
            pending = [self._compute_group(g, *plan) for g, plan in zip(self.param_groups, plans)]
            if self.nonfinite == "raise" and any(not all(p["finite"]) for p in pending):
                raise FloatingPointError("DLRT: a layer's update was non-finite (learning rate too large?); "
                                         "nothing was updated")
            # Nothing is written (skipped_steps included) before every update has been computed.
            if dropped:
                warnings.warn(f"DLRT: non-finite gradients, skipped the step of {dropped} layer(s)/parameter(s)",
                              RuntimeWarning)
                self.skipped_steps += dropped
            for p in pending:
                self._apply_group(p)
        return loss

    def _plan(self, group):
        """(layers, plain): factorized layers and plain params of ``group`` that have gradients."""
        layers, plain = find_layers(group["params"])
        stepped = []
        for l in layers:
            grads = [getattr(l, r).grad for r in "USV"]
            if all(g is None for g in grads):
                continue  # not used since the last zero_grad: no step, as for a plain parameter
            _check_trainable(l)
            if any(g is None for g in grads):
                missing = [r for r, g in zip("USV", grads) if g is None]
                raise ValueError(f"params: {_name(l)} has gradients for some factors but not for "
                                 f"{', '.join(missing)}; U, S and V are stepped together (zero_grad all three)")
            stepped.append(l)
        return stepped, [p for p in plain if p.grad is not None]

    def _drop_nonfinite(self, plans) -> int:
        """Remove every layer / param with a non-finite gradient (one host sync for all of them); returns
        how many were removed (the caller warns and counts them once the step is sure to go through)."""
        units = []
        for gi, (layers, plain) in enumerate(plans):
            units += [(gi, "layer", l, [g for g in (l.U.grad, l.S.grad, l.V.grad, _grad(l.bias)) if g is not None])
                      for l in layers]
            units += [(gi, "plain", p, [p.grad]) for p in plain]
        if not units:
            return 0
        flags = _finite([g for u in units for g in u[3]])
        bad, i = [], 0
        for u in units:
            if not all(flags[i:i + len(u[3])]):
                bad.append(u)
            i += len(u[3])
        if not bad:
            return 0
        if self.nonfinite == "raise":
            raise FloatingPointError(f"non-finite gradients in {len(bad)} layer(s)/parameter(s); nothing was updated")
        for gi, kind, obj, _ in bad:
            lst = plans[gi][0] if kind == "layer" else plans[gi][1]
            lst[:] = [o for o in lst if o is not obj]
        return len(bad)

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
            for s, two in ((sU, False), (sV, False), (sS, True)):
                st = _active_state(s.state, keys, r, two)
                if "bias_mass" in rule.square_keys:  # stored by _apply_group, with the moments
                    s.mass = _mass(s.state, s.value, two, group, r)
                    st["bias_mass"] = _active(s.mass, r, two)
                states.append(st)
        dirs, new_states = rule.directions(grads, decay, states, group) if layers else ([], [])

        refresh = group["refresh"]
        items, fixed, where = [], [], []
        for j, (l, (sU, sS, sV, r)) in enumerate(zip(layers, slots)):
            D_K, D_L, D_S = dirs[3 * j: 3 * j + 3]
            S_step = rule.decayed(sS.value[:r, :r], group)
            if "deferred" in sU.state:  # add the K/L steps deferred by the fixed-basis steps since the last update
                D_K = D_K + sU.state["deferred"][:, :r]
                D_L = D_L + sV.state["deferred"][:, :r]
            if sS.state.get("basis_age", 0) + 1 < refresh:
                where.append(("fixed", len(fixed)))
                fixed.append(_FixedBasisStep(S_step - lr * D_S, D_K, D_L))
                continue
            item = LayerStep(sU.value[:, :r], S_step, sV.value[:, :r], D_K, D_L, D_K, D_L, D_S, l.max_rank,
                             spare=group["spare"])
            if self.guide is not None:
                self.guide.adjust(l, item, group)
            where.append(("update", len(items)))
            items.append(item)
        updated = update_layers(items, lr, group["tau"], group["min_rank"], backend=self.backend) if items else []
        results = [updated[i] if kind == "update" else fixed[i] for kind, i in where]
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
            new = dict(zip("VS", pend["new_states"][3 * j + 1: 3 * j + 3]), U=pend["new_states"][3 * j])
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
    """The active block of a fixed buffer: buf[..., :r], or buf[..., :r, :r] for two-sided S-coordinates."""
    return buf[..., :r, :r] if two_sided else buf[..., :r]


@dataclass
class _FixedBasisStep:
    """A layer's fixed-basis step: its new S block (r×r) and the deferred K/L steps X_K (m×r), X_L (n×r)."""

    S: torch.Tensor
    X_K: torch.Tensor
    X_L: torch.Tensor


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


def _name(layer) -> str:
    return f"{type(layer).__name__}({layer.extra_repr()})" if hasattr(layer, "extra_repr") else type(layer).__name__


def _check_trainable(layer) -> None:
    """DLRT steps U, S and V together (the step rotates all three): a frozen factor is refused."""
    frozen = [r for r in "USV" if not getattr(layer, r).requires_grad]
    if frozen:
        raise ValueError(f"params: {_name(layer)} has frozen factor(s) {', '.join(frozen)} (requires_grad=False); "
                         "DLRT steps U, S and V together: unfreeze them, or leave the whole layer's U, S, V "
                         "out of the optimizer to freeze the layer")


def _number(key: str, v, lo: float, hi: float = float("inf"), hi_open: bool = False) -> float:
    """v (the value of argument ``key``) as a finite float in [lo, hi] (or [lo, hi)); TypeError / ValueError
    naming the argument and its range."""
    rng = f"in [{lo:g}, {hi:g})" if hi_open else f">= {lo:g}" if hi == float("inf") else f"in [{lo:g}, {hi:g}]"
    x = v.item() if torch.is_tensor(v) and v.numel() == 1 and not v.dtype.is_complex else v
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{key} must be {rng} (a finite real number), got {v!r} ({type(v).__name__})")
    x = float(x)
    if not (math.isfinite(x) and lo <= x and (x < hi if hi_open else x <= hi)):
        raise ValueError(f"{key} must be {rng} (a finite real number), got {v!r}")
    return x


def _validated_skipped(v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"state_dict['skipped_steps'] must be an int >= 0, got {v!r}")
    return v


def _validate_group(g: dict) -> None:
    """Check every hyperparameter of a param group (the constructor's arguments); errors name the argument
    and its allowed range. Normalizes ``betas`` to a tuple of two floats."""
    for key in ("lr", "base", "momentum", "dampening", "nesterov", "betas", "eps", "weight_decay", "tau", "min_rank",
                "spare", "refresh"):
        if key not in g:
            raise ValueError(f"param group lacks {key!r}")
    if not isinstance(g["base"], str):
        raise TypeError(f"base must be one of {sorted(BASES)}, got {g['base']!r}")
    make_rule(g["base"])
    for key in ("lr", "tau", "weight_decay", "eps"):
        _number(key, g[key], 0.0)
    mu = _number("momentum", g["momentum"], 0.0, 1.0, hi_open=True)
    damp = _number("dampening", g["dampening"], 0.0, 1.0)
    if not isinstance(g["nesterov"], bool):
        raise TypeError(f"nesterov must be True or False, got {g['nesterov']!r}")
    if g["nesterov"] and (mu <= 0 or damp != 0):
        raise ValueError(f"nesterov=True requires momentum > 0 and dampening = 0, got momentum={g['momentum']!r}, "
                         f"dampening={g['dampening']!r}")
    for key, lo in (("min_rank", 1), ("spare", 0), ("refresh", 1)):
        v = g[key]
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{key} must be an int >= {lo}, got {v!r} ({type(v).__name__})")
        if v < lo:
            raise ValueError(f"{key} must be an int >= {lo}, got {v!r}")
    betas = g["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), each in [0, 1), got {betas!r}")
    try:
        g["betas"] = tuple(_number("betas", b, 0.0, 1.0, hi_open=True) for b in betas)
    except (TypeError, ValueError) as e:
        raise type(e)(f"betas must be in [0, 1) each (finite real numbers), got {betas!r}") from None
