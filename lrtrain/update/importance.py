"""The importance rank rule: which singular directions of the core Ŝ a basis update keeps.

The tolerance rule (:mod:`.rank_rule`) keeps the largest singular values. Judged by magnitude alone, a
random start is never forgotten in a short run: its flat spectrum sits far above τ‖σ‖ and AdamW moves a
singular value by about lr per step (../shared/design/rank-decisions.md). This rule judges a direction by
how much the loss *uses* it, as AdaLoRA's sensitivity |w·∂L/∂w| does for its singular triplets.

Let Ŝ = P Σ Qᵀ ((r+a)×(r+b), p singular triplets), and m̂, v̂ (r×r) the bias-corrected first and second
moments of the S-gradient G_S = Uᵀ G_W V (this step's, from the base rule's state). In the new basis the
direction j has the moments carried by its rotation P_r = P[:r], Q_r = Q[:r] (as :func:`transport_state`
carries them; an augmented direction, P_r[:, j] = 0, has none yet):

    m_j = (P_rᵀ m̂ Q_r)_jj,    v_j = ((P_r∘P_r)ᵀ v̂ (Q_r∘Q_r))_jj       (v_j ≈ E[(∂L/∂σ_j)²])

1. importance  s_j = σ_j·√v_j  (|σ_j| times the RMS sensitivity of the loss to σ_j); the *important* set
   is the τ-rank of the sorted scores (:func:`tolerance_rank` on s): the fewest directions whose left-out
   scores have relative 2-norm ≤ τ;
2. pushed directions, −m_j / (√v_j + eps) > ``push``: the loss consistently asks σ_j to grow (a
   direction on its way in, not yet important);
3. a reservoir of ⌈``reservoir``·n⌉ (default n) further directions (n = the count of 1 and 2, at least ``spare``),
   the largest remaining σ: the newly augmented directions, which have no moments yet, and the room to
   grow (see :mod:`.spec`, step 3) of the tolerance rule's spare directions;

in that priority, limited to the numerical rank (σ_j > p·eps·σ_1) and to max_rank, then filled to
min_rank by σ. Unsupported directions of a random start lose importance (their sensitivity is small)
and leave within a few steps, whatever their σ; the kept ones are returned in order of σ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .rank_rule import tolerance_rank

__all__ = ["Importance", "importance_selection", "ranked_directions", "limited", "RULES"]

# Rank rules a DLRT param group may name (``rank_rule``), with the default tolerance τ of each.
RULES = {"importance": 0.02, "tolerance": 0.1}


@dataclass
class Importance:
    """The S-gradient moments m̂, v̂ (r×r, bias-corrected, in the layer's current basis) and the rule's
    settings (see the module docstring)."""

    m: torch.Tensor
    v: torch.Tensor
    push: float = 0.5
    reservoir: float = 1.0


def ranked_directions(sigma: torch.Tensor, P: torch.Tensor, Q: torch.Tensor, imp: Importance, tau: float,
                      spare: int = 0, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """The directions the rule keeps before the rank limits, in priority order (important by score, pushed by σ,
    reservoir by σ: int64 indices), and every direction's importance score s (p,).

    sigma: (p,) descending; P: ((r+a)×p), Q: ((r+b)×p) the core's singular vectors; imp.m, imp.v: r×r."""
    r = imp.m.shape[0]
    dt = sigma.dtype
    Pr, Qr = P[:r].to(dt), Q[:r].to(dt)
    m = torch.einsum("aj,ab,bj->j", Pr, imp.m.to(dt), Qr)
    v = torch.einsum("aj,ab,bj->j", Pr.square(), imp.v.to(dt).clamp_min(0), Qr.square())
    p = sigma.shape[0]
    usable = sigma > p * torch.finfo(dt).eps * sigma[:1]
    score = torch.where(usable, sigma * v.sqrt(), torch.zeros_like(sigma))
    order = torch.argsort(score, descending=True, stable=True)
    k_imp = int(tolerance_rank(score[order], tau, 0))
    chosen = torch.zeros(p, dtype=torch.bool, device=sigma.device)
    chosen[order[:k_imp]] = True
    pushed = usable & ~chosen & (-m / (v.sqrt() + eps) > imp.push)
    n = k_imp + int(pushed.sum())
    rest = torch.nonzero(usable & ~chosen & ~pushed).flatten()
    n_res = max(int(spare), math.ceil(imp.reservoir * n))
    return torch.cat([order[:k_imp], torch.nonzero(pushed).flatten(), rest[:n_res]]), score


def limited(ranked: torch.Tensor, p: int, min_rank: int, max_rank: int) -> torch.Tensor:
    """The first max_rank of ``ranked`` (indices into p directions), filled to min_rank with the remaining
    directions by σ (ascending index); returned sorted (largest σ first)."""
    hi = min(int(max_rank), p)
    keep = ranked[:hi]
    if keep.numel() < min(min_rank, hi):
        free = torch.ones(p, dtype=torch.bool, device=ranked.device)
        free[keep] = False
        keep = torch.cat([keep, torch.nonzero(free).flatten()[:min(min_rank, hi) - keep.numel()]])
    return torch.sort(keep).values


def importance_selection(sigma: torch.Tensor, P: torch.Tensor, Q: torch.Tensor, imp: Importance, tau: float,
                         min_rank: int, max_rank: int, spare: int = 0, eps: float = 1e-8) -> torch.Tensor:
    """Indices of the directions kept (int64, ascending: largest σ first): :func:`ranked_directions` within
    [min_rank, max_rank]."""
    ranked, _ = ranked_directions(sigma, P, Q, imp, tau, spare, eps)
    return limited(ranked, sigma.shape[0], min_rank, max_rank)
