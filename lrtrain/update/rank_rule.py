"""The truncation rule of the DLRT step.

Given the singular values σ_1 ≥ … ≥ σ_p of the augmented core Ŝ, the new rank is

    r = min{ k ∈ {0..p} : (Σ_{j>k} σ_j²)^{1/2} ≤ τ · ‖σ‖_2 }          (1-based σ)

i.e. the smallest rank whose discarded tail has relative Frobenius norm at most τ; it is then
raised by ``spare`` (directions kept beyond the τ-rank, see :mod:`lrtrain.update.spec`), then
limited to the numerical rank (σ_j > p·eps·σ_1: singular vectors of numerically zero singular values
are arbitrary and never kept) and clamped to [min_rank, max_rank]. Counting, for k = 0..p-1, the tails
``tail_k = Σ_{j>k} σ_j²`` that still exceed τ²‖σ‖² gives exactly that k (tails are non-increasing), so
the rule is branch-free and evaluates on the device without a host sync. With τ = 0 every non-zero
singular value is kept (no off-by-one: a rank-p core with τ = 0 keeps p, not p - 1).
"""
from __future__ import annotations

import torch

__all__ = ["tolerance_rank"]


def tolerance_rank(sigma: torch.Tensor, tau: float, min_rank: int = 1, max_rank: int | None = None,
                   spare: int = 0) -> torch.Tensor:
    """Rank chosen for singular values ``sigma`` (..., p), sorted descending. Returns an int64 tensor (...)."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau >= 0 or tau == float("inf"):
        raise ValueError(f"tau must be a finite real number >= 0, got {tau!r}")
    if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 0:
        raise ValueError(f"min_rank must be an int >= 0, got {min_rank!r}")
    if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 0):
        raise ValueError(f"max_rank must be None or an int >= 0, got {max_rank!r}")
    if isinstance(spare, bool) or not isinstance(spare, int) or spare < 0:
        raise ValueError(f"spare must be an int >= 0, got {spare!r}")
    p = sigma.shape[-1]
    s2 = sigma.double().square()
    tail = s2.flip(-1).cumsum(-1).flip(-1)  # tail[k] = Σ_{j>=k} σ_j² (0-based) = Σ_{j>k} (1-based)
    total = tail[..., :1]
    by_tol = (tail > (tau * tau) * total).sum(-1) + spare
    eps = torch.finfo(sigma.dtype).eps
    numerical = (sigma > p * eps * sigma[..., :1]).sum(-1)
    hi = p if max_rank is None else min(max_rank, p)
    return torch.minimum(by_tol, numerical).clamp(min=min(min_rank, hi), max=hi)
