"""DLRT: a drop-in ``torch.optim.Optimizer`` that trains factorized layers with adaptive rank.

Each step, for every factorized layer in the parameter list (found by its U, S, V :class:`Factor`
parameters), the base rule (SGD or AdamW, :mod:`.base`) gives directions in the coordinates
K = U S, L = V Sᵀ and S; the layer update (:mod:`.step`) augments the bases, projects the step onto
them, truncates by the τ rule and rotates the optimizer state. Other parameters get the plain base
update. One forward and one backward per step.
"""
from __future__ import annotations

import warnings

import torch
from torch.optim import Optimizer

from ..layers.factors import factor_groups, replace_factor
from .base import make_rule
from ..ext import check_backend, finite_flags, update_layers
from .step import LayerStep, transport_state

__all__ = ["DLRT"]

_ROLES = ("U", "S", "V")


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
            DLRT calls ``guide.adjust(factor_group, item, param_group)``, which may lower
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
        super().add_param_group(param_group)
        _validate_group(self.param_groups[-1])
        if getattr(self, "_ready", False):
            self._check_factors()

    def _check_factors(self) -> None:
        """Each factorized layer's U, S, V (and bias) must all be present, in one param group."""
        seen: dict[int, int] = {}
        for gi, g in enumerate(self.param_groups):
            triples, _ = factor_groups(g["params"])
            for key, roles in triples.items():
                if key in seen and seen[key] != gi:
                    raise ValueError("params: a factorized layer's U, S and V are split across param groups "
                                     f"{seen[key]} and {gi}; put all three in one group")
                seen[key] = gi
        for g in self.param_groups:
            for roles in factor_groups(g["params"])[0].values():
                missing = [r for r in _ROLES if r not in roles]
                if missing:
                    raise ValueError(f"params: a factorized layer is partly missing (no {', '.join(missing)}); "
                                     "pass all of U, S and V")

    # ------------------------------------------------------------------ state dict
    def state_dict(self):
        sd = super().state_dict()
        sd["skipped_steps"] = self.skipped_steps
        return sd

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        self.skipped_steps = int(state_dict.pop("skipped_steps", 0))
        super().load_state_dict(state_dict)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """One optimization step (``closure`` re-evaluates the loss, as in torch.optim)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plans = [self._plan(g) for g in self.param_groups]
        self._drop_nonfinite(plans)
        for group, (layers, plain) in zip(self.param_groups, plans):
            self._step_group(group, layers, plain)
        return loss

    def _plan(self, group):
        """(layers, plain): factor triples and plain params of ``group`` that have gradients."""
        triples, plain = factor_groups(group["params"])
        layers = [t for t in triples.values() if t["U"].grad is not None]
        return layers, [p for p in plain if p.grad is not None]

    @staticmethod
    def _layer_grads(t: dict) -> list:
        """Gradients of a layer's U, S, V and (if it has one and it has a gradient) its bias."""
        return [t[r].grad for r in _ROLES] + ([t["bias"].grad] if "bias" in t and t["bias"].grad is not None else [])

    def _drop_nonfinite(self, plans) -> None:
        """Remove every layer / param with a non-finite gradient (one host sync for all of them)."""
        units = [(gi, "layer", t, self._layer_grads(t)) for gi, (ls, _) in enumerate(plans) for t in ls]
        units += [(gi, "plain", p, [p.grad]) for gi, (_, ps) in enumerate(plans) for p in ps]
        if not units:
            return
        grads = [g for u in units for g in u[3]]
        finite = torch.isfinite(torch.stack(torch._foreach_norm(grads))).cpu().tolist()
        bad, i = [], 0
        for u in units:
            ok = all(finite[i:i + len(u[3])])
            i += len(u[3])
            if not ok:
                bad.append(u)
        if not bad:
            return
        if self.nonfinite == "raise":
            raise FloatingPointError(f"non-finite gradients in {len(bad)} layer(s)/parameter(s); nothing was updated")
        warnings.warn(f"DLRT: non-finite gradients, skipped the step of {len(bad)} layer(s)/parameter(s)", RuntimeWarning)
        self.skipped_steps += len(bad)
        for gi, kind, obj, _ in bad:
            lst = plans[gi][0] if kind == "layer" else plans[gi][1]
            lst[:] = [o for o in lst if o is not obj]

    def _step_group(self, group, layers, plain) -> None:
        rule = make_rule(group["base"])
        lr = group["lr"]
        # A layer's bias takes the plain base update, but only together with its (finite) factors: owner[i] is
        # the index of the layer whose bias plain[i] is (None for a parameter outside any layer).
        biased = [j for j, t in enumerate(layers) if "bias" in t and t["bias"].grad is not None]
        owner = [None] * len(plain) + biased
        plain = plain + [layers[j]["bias"] for j in biased]
        # Gradient list: plain params, then (K, L, S) of each layer. Decay applies to plain params and S.
        grads = [p.grad for p in plain]
        decay = list(plain)
        states = [self.state[p] for p in plain]
        for t in layers:
            grads += [t["U"].grad, t["V"].grad, t["S"].grad]
            decay += [None, None, t["S"]]
            states += [self.state[t["U"]], self.state[t["V"]], self.state[t["S"]]]
        if not grads:
            return
        dirs, new_states = rule.directions(grads, decay, states, group)

        offset = len(plain)
        items = []
        for j, t in enumerate(layers):
            D_K, D_L, D_S = dirs[offset + 3 * j: offset + 3 * j + 3]
            item = LayerStep(t["U"], rule.decayed(t["S"], group), t["V"], t["U"].grad, t["V"].grad,
                             D_K, D_L, D_S, t["U"].lrtrain_group.max_rank)
            if self.guide is not None:
                self.guide.adjust(t["U"].lrtrain_group, item, group)
            items.append(item)
        results = update_layers(items, lr, group["tau"], group["min_rank"], backend=self.backend)
        finite = finite_flags(results)  # fused results carry it; the rest cost one sync for all layers
        for j, (t, res) in enumerate(zip(layers, results)):
            st_K, st_L, st_S = new_states[offset + 3 * j: offset + 3 * j + 3]
            if not finite[j]:
                warnings.warn("DLRT: a layer's update was non-finite (learning rate too large?); step skipped",
                              RuntimeWarning)
                self.skipped_steps += 1
                continue
            new = {"U": st_K, "V": st_L, "S": st_S}
            transport_state(new, res.R_U, res.R_V, rule.linear_keys, rule.square_keys)
            for role, value in (("U", res.U), ("S", res.S), ("V", res.V)):
                replace_factor(t[role], value.contiguous())
                self.state[t[role]].update(new[role])
        for p, d, st, j in zip(plain, dirs, new_states, owner):
            if j is None or finite[j]:
                p.copy_(rule.decayed(p, group).sub(d, alpha=lr))
                self.state[p].update(st)


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
