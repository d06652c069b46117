"""DLRT: a drop-in ``torch.optim.Optimizer`` that trains factorized layers with adaptive rank.

Each step, for every factorized layer in the parameter list (found through the layers, see
:mod:`.params`), the base rule (SGD or AdamW, :mod:`.base`) gives directions D_K, D_L, D_S in the
coordinates K = U S, L = V Sᵀ and S at the layer's active rank r. Every ``refresh``-th step of a layer
is a *basis update* (:mod:`lrtrain.update.spec`): it augments the bases with the directions the optimizer
steps, projects the step onto them, keeps the singular directions the rank rule chooses (``rank_rule``: by the
loss's sensitivity to them, :mod:`lrtrain.update.importance`, or by the τ rule plus ``spare`` directions of room
to grow) at a new rank k ≤ max_rank ≤ capacity, and rotates the optimizer state. The steps in between are
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
import warnings

import torch
from torch.optim import Optimizer

from .. import validation
from ..update import RULES, check_backend
from .base import BASES
from .functional import LayerSlots, apply_step, compute_step, finite_gradients, refuse_nonfinite
from ..layers.links import replaced
from .params import LOW_PRECISION, Slot, find_layers, fsdp1_kind

__all__ = ["DLRT", "DEFAULT_REFRESH"]

# DLRT's attributes beyond torch.optim.Optimizer's (pickled and deep-copied with it).
_OWN = ("backend", "nonfinite", "guide", "skipped_steps", "_ready")

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
        rank_rule: which singular directions of the core a basis update keeps. ``"importance"`` (default,
            :mod:`lrtrain.update.importance`): those the loss is sensitive to (importance σ_j·√v_j, the
            τ-rank of the sorted scores), those it pushes to grow, and a reservoir of as many further ones;
            ``"tolerance"`` (:mod:`lrtrain.update.rank_rule`): the τ-rank of the singular values + spare.
            The fused C++/CUDA kernels implement ``"tolerance"``; ``"importance"`` runs on the reference.
        tau: relative tolerance τ >= 0 of the rank rule (on the importance scores, or on the singular
            values); None takes the rule's default (0.02 for "importance", 0.1 for "tolerance").
        s_direction: the S-block step of a basis update: ``"projected"`` (default) ½(Uᵀ D_K + D_Lᵀ V),
            the K- and L-steps' part inside the current bases, which moves singular values as fast as dense
            AdamW does; ``"own"``: the base rule's direction from S's own gradient (DLRT-Net's S-step).
        budget: None, or b in (0, 1]: the group's factorized layers keep at most b·Σ m·n active parameters
            (Σ r(m+n)+r²) from the first step on, their ranks allocated jointly so that the layers leave out
            about equal shares of their importance (:mod:`lrtrain.update.budget`; needs
            ``rank_rule="importance"``; min_rank wins over it).
        min_rank: smallest rank a layer may truncate to (>= 1).
        spare: singular directions kept beyond the τ-rank at each basis update (>= 0; default 1): the
            rank's room to grow (see :mod:`lrtrain.update.spec`); the importance rule's reservoir holds at
            least this many.
        refresh: basis update interval in steps (>= 1): 1 updates every layer's bases at every step;
            k > 1 takes k - 1 fixed-basis steps (S only, the K/L steps deferred) in between.
        nonfinite: ``"skip"`` (warn, count in ``skipped_steps``, leave that layer untouched) or
            ``"raise"`` (FloatingPointError before anything is updated).
        guide: optional rank guide (e.g. :class:`lrtrain.CollapseMonitor`): before each layer's update
            DLRT calls ``guide.adjust(layer, item, param_group)``, which may lower
            ``item.augment`` (new basis columns per side) and ``item.max_rank`` for that step, and replace
            the augmentation directions ``item.G_K`` / ``item.G_L`` (same shapes; see :mod:`lrtrain.rank.guided`).
        backend: who runs the layer updates: ``"auto"`` (the fused C++/CUDA kernels of
            :mod:`lrtrain.update` where active for the layer's device, else the reference), ``"reference"``
            (pure PyTorch), ``"cpu"`` or ``"cuda"`` (that fused backend; ValueError if it is not active).
    """

    def __init__(self, params, lr: float = 1e-3, base: str = "adamw", momentum: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, tau: float | None = None, min_rank: int = 1, spare: int = 1,
                 refresh: int = DEFAULT_REFRESH, rank_rule: str = "importance", s_direction: str = "projected",
                 budget: float | None = None, nonfinite: str = "skip", guide=None, backend: str = "auto"):
        if not isinstance(nonfinite, str) or nonfinite not in ("skip", "raise"):
            raise ValueError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
        if guide is not None and not callable(getattr(guide, "adjust", None)):
            raise TypeError(f"guide must be None or have a method adjust(layer, item, param_group), "
                            f"got {type(guide).__name__}")
        self.backend = check_backend(backend)
        self.nonfinite = nonfinite
        self.guide = guide
        self.skipped_steps = 0
        if tau is None:
            tau = RULES.get(rank_rule, 0.0)  # an unknown rule is refused by the validation below
        defaults = dict(lr=lr, base=base, momentum=momentum, dampening=dampening, nesterov=nesterov,
                        betas=betas, eps=eps, weight_decay=weight_decay, tau=tau, min_rank=min_rank, spare=spare,
                        refresh=refresh, rank_rule=rank_rule, s_direction=s_direction, budget=budget)
        validation.dlrt_group(defaults, BASES)  # every argument checked before torch sees the params
        super().__init__(params, defaults)
        self._check_factors()
        self._ready = True

    # ------------------------------------------------------------------ groups and validation
    def add_param_group(self, param_group: dict) -> None:
        """As in torch.optim, but the group is validated first: a refused group leaves nothing behind."""
        super().add_param_group(param_group)
        try:
            validation.dlrt_group(self.param_groups[-1], BASES)
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
                _refuse_replaced(p)
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

    def __getstate__(self):
        """torch.optim.Optimizer pickles (and deep-copies) only defaults, state and param_groups: DLRT's own
        settings and counters go along too."""
        return {**super().__getstate__(), **{k: self.__dict__[k] for k in _OWN if k in self.__dict__}}

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
        skipped = validation.skipped_steps(state_dict.pop("skipped_steps", 0))
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
                validation.dlrt_group(g, BASES)
            except (ValueError, TypeError) as e:
                raise ValueError(f"state_dict: param group {i}: {e}") from None
            out.append(g)
        return out

    def _validate_state(self, state_dict) -> None:
        params = {i: p for g_saved, g in zip(state_dict["param_groups"], self.param_groups)
                  for i, p in zip(g_saved["params"], g["params"])}
        layers, _ = find_layers([p for g in self.param_groups for p in g["params"]])
        index = {id(p): i for i, p in params.items()}
        validation.dlrt_state(state_dict.get("state"), params, {id(getattr(l, r)): r for l in layers for r in "USV"},
                              [tuple(index[id(getattr(l, r))] for r in "USV") for l in layers])

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """One optimization step (``closure`` re-evaluates the loss, as in torch.optim): the functional core
        (:mod:`.functional`) on each group's slots; every group is computed before any is written."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with _autocast_off():
            plans = [self._plan(g) for g in self.param_groups]
            dropped = self._drop_nonfinite(plans)
            fresh: dict = {}  # state of parameters stepped for the first time: stored once the step is applied
            pending = [compute_step(*self._slots(*plan, fresh), g, guide=self.guide, backend=self.backend)
                       for g, plan in zip(self.param_groups, plans)]
            refuse_nonfinite(pending, self.nonfinite)
            # Nothing is written (skipped_steps included) before every update has been computed.
            if dropped:
                warnings.warn(f"DLRT: non-finite gradients, skipped the step of {dropped} layer(s)/parameter(s)",
                              RuntimeWarning)
                self.skipped_steps += dropped
            for p in pending:
                self.skipped_steps += apply_step(p)
            self.state.update((p, st) for p, st in fresh.items() if st)
        return loss

    def _plan(self, group):
        """(layers, plain): factorized layers and plain params of ``group`` that have gradients."""
        for p in group["params"]:
            _refuse_replaced(p)
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
        flags = finite_gradients([g for u in units for g in u[3]])
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

    def _slots(self, layers, plain, fresh: dict):
        """The functional core's inputs: Slots of the plain params, then of each layer's bias and factors. A
        parameter without state gets a new dict in ``fresh`` (not in ``self.state`` before the step applies)."""

        def state(p):
            return self.state[p] if p in self.state else fresh.setdefault(p, {})

        dense = [Slot(p, state(p), full=False) for p in plain]
        biases = [Slot(l.bias, state(l.bias), full=False) if _grad(l.bias) is not None else None for l in layers]
        return [LayerSlots(l, *(Slot(getattr(l, r), state(getattr(l, r)), full=True) for r in "USV"), bias=b)
                for l, b in zip(layers, biases)], dense


def _refuse_replaced(p) -> None:
    """A factor parameter its layer no longer holds: the optimizer would train a detached copy, silently."""
    hit = replaced(p)
    if hit is not None:
        layer, role = hit
        raise ValueError(f"params: the {role} this optimizer holds is no longer the {_name(layer)}'s {role}: the "
                         "model's parameters were replaced after the optimizer was built (FSDP2's fully_shard "
                         "replaces every parameter; so do set_capacity() and loads with assign=True). Build "
                         "DLRT after fully_shard, from model.parameters(); nothing was updated")


def _grad(p):
    return None if p is None else p.grad


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
    """DLRT steps U, S and V together (the step rotates all three): some of them frozen is refused; all three
    frozen is a frozen layer, which (like a frozen parameter in torch.optim) gets no gradient and no step."""
    frozen = [r for r in "USV" if not getattr(layer, r).requires_grad]
    if frozen and len(frozen) < 3:
        raise ValueError(f"params: {_name(layer)} has frozen factor(s) {', '.join(frozen)} (requires_grad=False); "
                         "DLRT steps U, S and V together: unfreeze them, or freeze all three (and the bias) to "
                         "freeze the layer")


