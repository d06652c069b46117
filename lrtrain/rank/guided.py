"""Collapse-guided rank control: the measured collapse quantities decide how a DLRT step may grow a layer.

Used through ``lrtrain.DLRT(..., guide=monitor)`` with a :class:`lrtrain.CollapseMonitor`: before each
factorized layer's update DLRT calls ``monitor.adjust``, which hands this batch's measurements of the
layer to :meth:`CollapseGuide.apply`. Notation (see :mod:`lrtrain.collapse.monitor`): K classes, λ the
weight decay, τ the truncation tolerance, ‖W‖_F = ‖S‖_F, G the stacked output gradients (Δ = N·G),
TCV the batch's within-class variation of the layer inputs, μ_c their class means, s_c = Σ_{j∈c} g_j the
class sums of the output gradients, G_W = Σ_j g_j x_jᵀ the data gradient, R = G_W + λW. The identity

    G_W = Σ_c s_c μ_cᵀ + Σ_j g_j (x_j − μ_{c(j)})ᵀ          (rank ≤ K  +  within-class part)

gives, for every batch,

    (1)  tail_K(W)   ≤ B := (‖R‖_F + ‖G‖₂·TCV^{1/2}) / λ        (λW = R − G_W)
    (2)  E_c := ‖G_W − Σ_c s_c μ_cᵀ‖_F = ‖Σ_j g_j (x_j − μ_{c(j)})ᵀ‖_F ≤ E := ‖G‖₂·TCV^{1/2}

(the monitor measures E_c exactly on factorized layers, ``within_exact``). The class branch below
uses E by default (``within="bound"``): E_c with the same θ fired on nearly every step and cost accuracy.

The rule, per layer and step (r the layer's rank; the τ truncation rule itself is never changed):

* **certified** — if λ > 0 and B ≤ τ‖W‖_F: by (1) the τ rule applied to W keeps at most K singular values,
  so the step gets ``max_rank ← min(max_rank, max(K, min_rank))`` and the class augmentation below.
  What the cap may drop beyond the τ rule is at most the step itself (tail_K(W − step) ≤ B + ‖step‖).
* **class** — if the base is SGD, r > K and η·E ≤ θ·τ‖W‖_F, with η = lr·(1 − dampening)/(1 − momentum)
  the step gain and θ = ``theta`` (default 0.5): the step augments each basis with K directions instead
  of r — the class sums of the output gradients on the U side, (I − UUᵀ)[s_1 … s_K], and the class
  sums of the inputs on the V side, (I − VVᵀ)[n_1μ_1 … n_Kμ_K]. The rank-K term of the gradient then lies
  in Û ⊗ V̂ exactly, so by (2) the part of the data step η·G_W that the augmented bases cannot represent,
  ‖η·G_W − ÛÛᵀ(η·G_W)V̂V̂ᵀ‖_F, is ≤ η·E_c ≤ η·E ≤ θ·τ‖W‖_F: less than what the truncation may drop
  anyway. This is a per-step argument (momentum and the accumulation over steps are not covered); the
  safety of the default θ is measured, not proved.
  Saved work: the core is (r + K) × (r + K) instead of 2r × 2r (SVD O((r+K)³) instead of O(8r³)) and
  the orthogonalizations are m × K and n × K instead of m × r and n × r.
* **plain** — otherwise nothing changes (r gradient directions, the τ rule, the layer's max_rank).

Layers without a measurement for the current batch keep the plain rule; so do AdamW layers for the class
branch (the step is not linear in the gradient there; the certified branch still applies).
"""
from __future__ import annotations

import torch

__all__ = ["CollapseGuide"]

_MODES = ("certified", "class")


class CollapseGuide:
    """The decision rule above.

    Args:
        num_classes: K.
        mode: "class" (default: certified, then class augmentation) or "certified" (rule (1) only).
        theta: safety factor θ in (0, 1] of the class branch: η·E ≤ θ·τ‖W‖_F.
        within: "bound" (default: E = ‖G‖₂TCV^{1/2}) or "exact" (E_c ≤ E where measured: fires more often).
            Measured (benchmarks/results/collapse_guided.md, 3 epochs MNIST): "exact" with θ = 0.25 lost 0.7
            points of accuracy, "exact" with θ = 0.1 and "bound" with θ = 0.25 or 0.5 stayed within 0.2.
    """

    def __init__(self, num_classes: int, mode: str = "class", theta: float = 0.5, within: str = "bound"):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if not (isinstance(theta, (int, float)) and 0 < theta <= 1):
            raise ValueError(f"theta must be a float in (0, 1], got {theta!r}")
        if within not in ("exact", "bound"):
            raise ValueError(f"within must be 'exact' or 'bound', got {within!r}")
        self.num_classes, self.mode, self.theta, self.within = num_classes, mode, float(theta), within

    @staticmethod
    def step_gain(param_group: dict) -> float | None:
        """η such that the steady-state step is η·(gradient): SGD heavy ball lr(1−dampening)/(1−momentum);
        None for bases whose step is not linear in the gradient (AdamW)."""
        if param_group.get("base", "sgd") != "sgd":
            return None
        mom = float(param_group.get("momentum", 0.0))
        damp = float(param_group.get("dampening", 0.0)) if mom > 0 else 0.0
        return float(param_group["lr"]) * (1.0 - damp) / (1.0 - mom)

    def decide(self, *, rank: int, max_rank: int, min_rank: int, tau: float, weight_decay: float,
               step_gain: float | None, weight_norm: float, bound: float, within: float) -> str:
        """The branch ("certified", "class" or "plain") for one layer step; see the module docstring."""
        tol = tau * weight_norm
        if weight_decay > 0 and bound <= tol:
            return "certified"
        if (self.mode == "class" and step_gain is not None and rank > self.num_classes
                and step_gain * within <= self.theta * tol):
            return "class"
        return "plain"

    def apply(self, item, values: dict, param_group: dict) -> str:
        """Apply :meth:`decide` to a :class:`lrtrain.update.spec.LayerStep` in place; returns the branch.

        ``values``: this batch's measurements of the layer as produced by the monitor (``bound``,
        ``within`` (E) or ``within_exact`` (E_c, preferred), ``weight_norm``; ``class_dirs`` = (class sums of the output gradients (K, m), class
        sums of the inputs (K, n)) for the class augmentation).
        """
        K = self.num_classes
        r = item.U.shape[1]
        lam = float(param_group.get("weight_decay", 0.0))
        branch = self.decide(
            rank=r, max_rank=item.max_rank, min_rank=int(param_group.get("min_rank", 1)),
            tau=float(param_group["tau"]), weight_decay=lam, step_gain=self.step_gain(param_group),
            weight_norm=float(values["weight_norm"]), bound=float(values.get("bound", float("inf"))),
            within=float(values["within"] if self.within == "bound" else values.get("within_exact", values["within"])))
        dirs = values.get("class_dirs")
        if branch == "class" and dirs is None:
            return "plain"
        if branch == "certified":
            item.max_rank = min(item.max_rank, max(K, int(param_group.get("min_rank", 1))))
        if dirs is not None and branch != "plain" and r > K:
            gsums, xsums = dirs
            item.G_K = _padded(gsums.mT, r, item.G_K)
            item.G_L = _padded(xsums.mT, r, item.G_L)
            item.augment = K if item.augment is None else min(item.augment, K)
        return branch


def _padded(cols: torch.Tensor, r: int, like: torch.Tensor) -> torch.Tensor:
    """(dim, K) class directions as a (dim, r) matrix in ``like``'s dtype/device, zero columns after K
    (the step reads only the first ``augment`` = K columns; the shape stays what every backend expects)."""
    out = torch.zeros(like.shape[0], r, dtype=like.dtype, device=like.device)
    out[:, :cols.shape[1]] = cols.to(like.dtype)
    return out
