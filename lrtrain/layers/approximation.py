"""Best rank-r factors of a dense weight: what conversion (``from_dense``, ``lowrank``) imports.

``truncated_svd_factors(W, rank, tau)`` returns U (m, r), S = diag(σ_1..σ_r), V (n, r) with W ≈ U S Vᵀ:

* **randomized** (Halko, Martinsson & Tropp 2011, Alg. 4.4) when a rank is given, min(m, n) ≥ RANDOMIZED_MIN
  (below, the exact SVD takes milliseconds) and r + oversampling is a small share of min(m, n): Y = (W Wᵀ)^q W Ω for a Gaussian Ω (n × l, l = r + p), with a QR after every
  product (subspace iteration), then the exact SVD of the small B = Qᵀ W (l × n). Cost O(mnl(2q + 2))
  instead of the O(mn·min(m, n)) of a full SVD. Ω comes from a fixed seed, so every process converts alike.
  The products with W run in its dtype (float32 at least), the small SVD in float64.
* **exact** (``torch.linalg.svd`` of all of W) otherwise, and always when only τ is given.

With τ, the rank is min(rank, τ-rank), the τ rule of :func:`lrtrain.update.tolerance_rank` on the singular
values; from a partial spectrum σ_1..σ_l the discarded tail is taken exactly, ‖W‖_F² − Σ_{i≤k} σ_i², so the
τ-rank is the same as from the full spectrum whenever it is at most l. The exact path runs in float64.
"""
from __future__ import annotations

import torch

from ..validation import integer, tolerance

__all__ = ["truncated_svd_factors", "randomized_svd", "OVERSAMPLE", "POWER_ITERATIONS", "EXACT_SHARE", "RANDOMIZED_MIN"]

OVERSAMPLE = 10  # extra columns p of the sketch
POWER_ITERATIONS = 4  # q: each halves the error's dependence on a slowly decaying spectrum
EXACT_SHARE = 0.25  # the exact SVD where l = r + p exceeds this share of min(m, n) (it is then as cheap)
RANDOMIZED_MIN = 256  # the exact SVD for layers with min(m, n) below this (milliseconds, and exactly optimal)
SEED = 0


def randomized_svd(W: torch.Tensor, k: int, oversample: int = OVERSAMPLE, iters: int = POWER_ITERATIONS):
    """The leading l = min(k + oversample, min(m, n)) singular triplets of W (m, n), approximately:
    returns P (m, l), σ (l,), Q (n, l) in float64, σ descending. The products with W run in W's dtype
    (at least float32: their rounding, ~1e-7 relative, is far below what the sketch resolves); the small SVD
    of B = Qᵀ W in float64."""
    A = W.detach()
    A = A if A.dtype in (torch.float32, torch.float64) else A.float()
    m, n = A.shape
    l = min(k + oversample, m, n)
    g = torch.Generator(device="cpu").manual_seed(SEED)
    Qm = torch.linalg.qr(A @ torch.randn(n, l, generator=g, dtype=A.dtype).to(A.device)).Q
    for _ in range(iters):
        Qn = torch.linalg.qr(A.mT @ Qm).Q
        Qm = torch.linalg.qr(A @ Qn).Q
    P, sigma, Qt = torch.linalg.svd((Qm.mT @ A).double(), full_matrices=False)
    return Qm.double() @ P, sigma, Qt.mT


def _tau_rank(sigma: torch.Tensor, total: float, tau: float) -> int:
    """Smallest k with (total − Σ_{i≤k} σ_i²)^{1/2} ≤ τ·total^{1/2} (total = ‖W‖_F²), at most len(σ), at least 1;
    the full-spectrum rule of tolerance_rank when σ is the whole spectrum."""
    from ..update.rank_rule import tolerance_rank

    if len(sigma) == 0:
        return 1
    s2 = sigma.square()
    rest = max(total - float(s2.sum()), 0.0)  # the part of the spectrum not computed
    if rest == 0.0:
        return int(tolerance_rank(sigma, tau))
    head = s2.cumsum(0)
    tails = total - head  # tail after keeping k = 1..l
    keep = int((tails > (tau * tau) * total).sum()) + 1
    return min(keep, len(sigma))


def truncated_svd_factors(W: torch.Tensor, rank: int | None, tau: float | None):
    """Best rank-r factors of W (out × in_flat); r = ``rank``, or min(rank, τ-rank), or the τ-rank.

    Returns U (out, r), S = diag(σ_1..σ_r), V (in_flat, r) in W's dtype."""
    if rank is None and tau is None:
        raise ValueError("give rank (an int >= 1) or tau (a float >= 0)")
    if rank is not None:
        integer("rank", rank, 1, min(W.shape))
    tau = tolerance(tau)
    full = min(W.shape)
    if rank is not None and full >= RANDOMIZED_MIN and rank + OVERSAMPLE <= EXACT_SHARE * full:
        P, sigma, Q = randomized_svd(W, rank)
        total = float(torch.linalg.vector_norm(W.detach(), dtype=torch.float64)) ** 2
    else:
        P, sigma, Qt = torch.linalg.svd(W.detach().double(), full_matrices=False)
        Q, total = Qt.mT, float(sigma.square().sum())
    r = full if rank is None else rank
    if tau is not None:
        r = min(r, _tau_rank(sigma, total, tau))
    r = max(min(r, len(sigma)), 1)
    return P[:, :r].to(W.dtype), torch.diag(sigma[:r]).to(W.dtype), Q[:, :r].to(W.dtype)
