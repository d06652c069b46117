"""Collapse-guided rank control: the measured collapse bound decides how far a DLRT step may grow a layer.

Used through ``lrtrain.DLRT(..., guide=monitor)`` with a :class:`lrtrain.CollapseMonitor`: before each
factorized layer's update DLRT calls ``monitor.adjust``, which hands this batch's measurements of the
layer to :meth:`CollapseGuide.apply`. With K classes, λ the weight decay, τ the truncation tolerance,
‖W‖_F = ‖S‖_F, ‖G‖₂ the spectral norm of the stacked output gradients (Δ = N·G), TCV the batch's
within-class variation of the layer inputs and ‖R‖_F the norm of the regularized gradient
(see :mod:`lrtrain.collapse.monitor`), the decomposition λW = R − Σ_c (Σ_{j∈c} g_j) μ_cᵀ − Σ_j g_j (x_j − μ_c)ᵀ
gives, for this batch,

    (1)  tail_K(W)   ≤ B := (‖R‖_F + ‖G‖₂·TCV^{1/2}) / λ
    (2)  tail_K(G_W) ≤ E := ‖G‖₂·TCV^{1/2}                      (G_W: the data part of the gradient)

The rule, per layer and step (a = the step's augmentation, r by default; the τ rule itself is unchanged):

* **certified** — if λ > 0 and B ≤ τ‖W‖_F: by (1) the plain τ rule applied to W keeps at most K
  singular values, so the step gets ``max_rank ← min(max_rank, max(K, min_rank))`` and
  ``augment ← min(a, K)``. What this truncation may drop beyond the τ rule is at most the step itself.
* **within** (``mode="within"``, SGD base only) — if η·E ≤ τ‖W‖_F with η = lr·(1 − dampening)/(1 − momentum)
  (the heavy-ball step gain): by (2) the step's data part is within η·E of a rank-K matrix, i.e. what a
  K-column augmentation cannot represent is below the truncation tolerance; the step gets
  ``augment ← min(a, K)`` (the rank cap and the τ rule are untouched). This is a per-step argument: the
  within-class part of the gradient is systematic, so over many steps the cap can slow training; it is
  opt-in, and ``benchmarks/collapse_sweep.py`` measures what it costs.
* **plain** — otherwise nothing changes.

Layers without a measurement for the current batch keep the plain rule.
"""
from __future__ import annotations

__all__ = ["CollapseGuide"]

_MODES = ("certified", "within")


class CollapseGuide:
    """The decision rule above. ``mode``: "certified" (rule (1) only, the default) or "within" ((1), then (2))."""

    def __init__(self, num_classes: int, mode: str = "certified"):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        self.num_classes, self.mode = num_classes, mode

    @staticmethod
    def step_gain(param_group: dict) -> float | None:
        """η such that the steady-state step is η·(gradient): SGD heavy ball lr(1−dampening)/(1−momentum);
        None for bases whose step is not linear in the gradient (AdamW)."""
        if param_group.get("base", "sgd") != "sgd":
            return None
        mom = float(param_group.get("momentum", 0.0))
        damp = float(param_group.get("dampening", 0.0)) if mom > 0 else 0.0
        return float(param_group["lr"]) * (1.0 - damp) / (1.0 - mom)

    def decide(self, *, rank: int, augment: int | None, max_rank: int, min_rank: int, tau: float,
               weight_decay: float, step_gain: float | None, weight_norm: float, bound: float,
               within: float) -> tuple[int, int, str]:
        """(augment, max_rank, branch) for one layer step; see the module docstring."""
        K = self.num_classes
        a = rank if augment is None else min(rank, augment)
        tol = tau * weight_norm
        if weight_decay > 0 and bound <= tol:
            return min(a, K), min(max_rank, max(K, min_rank)), "certified"
        if self.mode == "within" and step_gain is not None and step_gain * within <= tol:
            return min(a, K), max_rank, "within"
        return a, max_rank, "plain"

    def apply(self, item, values: dict, param_group: dict) -> str:
        """Apply :meth:`decide` to a :class:`lrtrain.optim.step.LayerStep` in place; returns the branch.

        ``values``: this batch's measurements of the layer (``bound``, ``within``, ``weight_norm``) as
        produced by the monitor for the group's weight decay.
        """
        lam = float(param_group.get("weight_decay", 0.0))
        a, mr, branch = self.decide(
            rank=item.U.shape[1], augment=item.augment, max_rank=item.max_rank,
            min_rank=int(param_group.get("min_rank", 1)), tau=float(param_group["tau"]), weight_decay=lam,
            step_gain=self.step_gain(param_group), weight_norm=float(values["weight_norm"]),
            bound=float(values.get("bound", float("inf"))), within=float(values["within"]))
        if branch != "plain":
            item.augment, item.max_rank = a, mr
        return branch
