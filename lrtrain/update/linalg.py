"""Small dense linear algebra used by the DLRT step (reference path; the fused kernels mirror it).

* :func:`orth_complement` -- orthonormal basis of the part of ``X`` outside ``span(U)`` by a masked,
  shifted CholeskyQR2 (Gram-based, so the work is GEMMs), with numerically dependent columns zeroed.
* :func:`robust_svd` -- ``torch.linalg.svd`` with a fallback for LAPACK's ``gesdd`` failures
  ("too many repeated singular values") that rank-deficient DLRT cores provoke.
"""
from __future__ import annotations

import torch

from .constants import CHOLQR_SHIFT, DEPENDENT_TOL_FLOAT32, DEPENDENT_TOL_FLOAT64

__all__ = ["orth_complement", "reorthonormalize", "robust_svd", "dependent_tol", "column_scale"]


def dependent_tol(dtype: torch.dtype) -> float:
    """Relative squared distance below which a column counts as dependent (:mod:`.constants`: 1e-5 for
    float32 and narrower, 1e-12 for float64)."""
    return DEPENDENT_TOL_FLOAT32 if torch.finfo(dtype).bits <= 32 else DEPENDENT_TOL_FLOAT64


def column_scale(G: torch.Tensor) -> torch.Tensor:
    """The power of two ``c = 2^-⌊e/2⌋`` (shape (..., 1)) with ``max diag(G) = f·2^e``, f in [0.5, 1)
    (torch.frexp), so that ``c² max diag(G)`` is in [0.5, 2).

    The first CholeskyQR pass factorizes ``c²G`` for ``cX``: ``R⁻¹`` of a tiny X (squared column norms
    below ~1e-76, i.e. gradients near float32's smallest normal numbers) would overflow when cast to
    float32 (and a subnormal X would lose its bits). A power of two scales X, G, R and R⁻¹ exactly, so
    the result is bitwise the same wherever the unscaled pass did not under- or overflow. A zero or
    non-finite Gram gets ``c`` = 2^511 or 1 (nothing to rescue: the pass then behaves as without it).
    """
    d = G.diagonal(dim1=-2, dim2=-1).amax(-1, keepdim=True)
    d = torch.where(torch.isfinite(d), d.clamp_min(torch.finfo(torch.float64).tiny), torch.ones_like(d))
    e = torch.frexp(d).exponent
    return torch.ldexp(torch.ones_like(d), -torch.div(e, 2, rounding_mode="floor"))


def _masked_cholqr(X: torch.Tensor, keep: torch.Tensor | None = None):
    """One CholeskyQR pass ``Q = X' R'^{-1}`` on ``X' = X diag(keep)``.

    On the first pass X (and its Gram) is first scaled by the power of two :func:`column_scale`, which
    changes nothing but keeps ``R⁻¹`` representable in X's dtype for tiny X; the second pass runs on
    the first one's output, whose columns have norm ~1 or 0.

    X: (..., m, k). The Gram matrix is factorized in float64 with a shift
    ``s = (CHOLQR_SHIFT·tol + 2k·eps64)·max diag(G)`` (:mod:`.constants`);
    on the first pass (``keep`` is None) it is also formed in float64, so that its rounding stays far
    below the shift and the factorization never fails; columns whose squared
    distance to the span of the previous columns is below ``tol·max diag(G)`` are dropped (their
    column of Q is exactly zero). Returns Q (..., m, k) and the keep mask (..., k).
    """
    tol = dependent_tol(X.dtype)
    Xg = X.double() if keep is None else X
    G = (Xg.mT @ Xg).double()
    if keep is None:
        c = column_scale(G)
        X = (Xg * c[..., None]).to(X.dtype)
        G = G * (c * c)[..., None]
    k = G.shape[-1]
    eye = torch.eye(k, dtype=G.dtype, device=G.device)
    scale = G.diagonal(dim1=-2, dim2=-1).amax(-1, keepdim=True).clamp_min(torch.finfo(G.dtype).tiny)
    shift = CHOLQR_SHIFT * tol + 2.0 * k * torch.finfo(torch.float64).eps  # + the rounding of a float64 Gram of k columns
    if keep is None:
        R = torch.linalg.cholesky(G + shift * scale[..., None] * eye, upper=True)
        keep = R.diagonal(dim1=-2, dim2=-1).square() > tol * scale
    m = keep.to(G.dtype)
    # Zero the dropped rows/columns of G and put 1 on their diagonal: R' is block-diagonal there.
    Gm = G * (m[..., :, None] * m[..., None, :]) + torch.diag_embed(1.0 - m)
    R = torch.linalg.cholesky(Gm + shift * scale[..., None] * eye * m[..., None, :], upper=True)
    Rinv = torch.linalg.solve_triangular(R, eye.expand_as(R), upper=True)
    Q = X @ (Rinv * m[..., :, None]).to(X.dtype)
    return Q, keep


def orth_complement(U: torch.Tensor, X: torch.Tensor, width: int) -> torch.Tensor:
    """Orthonormal columns spanning ``(I - U Uᵀ) X``, compacted to ``width`` columns.

    U: (m, r) with orthonormal columns; X: (m, k), width <= k. Every column of X is projected and
    orthonormalized (columns whose squared residual is below :func:`dependent_tol` of the largest are
    dropped, i.e. zero); the kept columns are then moved to the front, in their order, and the first
    ``width`` returned, zero-padded (kept columns past ``width`` -- in the capped case, rounding
    residue of an exhausted complement -- are dropped before the second pass). Returns Q (m, width) with QᵀU = 0 and the non-zero columns
    orthonormal; ``span(Q) = span((I - U Uᵀ) X)`` whenever that span has dimension <= width (always when
    width = m - r, the dimension cap).
    """
    if width == 0:
        return X[:, :0]
    X = X - U @ (U.mT @ X)
    Q, keep = _masked_cholqr(X)
    if width < Q.shape[-1]:  # more kept than fit are rounding (past the dimension m - r): keep the first
        keep = keep & (keep.cumsum(-1) <= width)
    Q = Q - U @ (U.mT @ Q)  # remove the rounding leak into span(U) before the second pass
    Q, _ = _masked_cholqr(Q, keep)
    if width < Q.shape[-1]:
        order = torch.argsort(keep.to(torch.uint8), descending=True, stable=True)[:width]
        Q = Q[:, order]
    return Q


def reorthonormalize(U: torch.Tensor):
    """One CholeskyQR pass on a nearly orthonormal U (m, k): returns (U R⁻¹, R), UᵀU = RᵀR.

    Rounding in each step's rotations would otherwise accumulate in the bases over thousands of steps;
    callers fold R into the coefficients (S ← R_U S R_Vᵀ) so W is unchanged.
    """
    k = U.shape[-1]
    eye = torch.eye(k, dtype=torch.float64, device=U.device)
    R, info = torch.linalg.cholesky_ex((U.mT @ U).double(), upper=True)
    if int(info) != 0:  # a (numerically) dependent or non-finite column: Householder always succeeds
        Q, R = torch.linalg.qr(U.double())
        return Q.to(U.dtype), R.to(U.dtype)
    Rinv = torch.linalg.solve_triangular(R, eye, upper=True)
    return U @ Rinv.to(U.dtype), R.to(U.dtype)


def robust_svd(A: torch.Tensor):
    """Reduced SVD ``A = P diag(sigma) Qᵀ`` (sigma descending) that survives LAPACK failures.

    A: (p, q). Tries ``torch.linalg.svd``; on ``LinAlgError`` or non-finite output (gesdd fails on
    some rank-deficient cores), recomputes in float64 via ``eigh(AᵀA)`` for Q and a Householder QR
    ``A Q = P R`` for P and sigma = |diag R| (exact for the non-zero singular values; the zero ones get an
    arbitrary orthonormal completion). If that fails too (a core that overflowed after a huge step),
    the result is NaN, which callers treat as a failed, skipped update.
    Returns (P (p, k), sigma (k,), Q (q, k)), k = min(p, q).
    """
    try:
        P, sigma, Qt = torch.linalg.svd(A, full_matrices=False)
        if bool(torch.isfinite(sigma).all()):
            return P, sigma, Qt.mT
    except torch.linalg.LinAlgError:
        pass
    try:
        return _svd_by_eigh(A)
    except torch.linalg.LinAlgError:
        k = min(A.shape)
        nan = float("nan")
        return A.new_full((A.shape[0], k), nan), A.new_full((k,), nan), A.new_full((A.shape[1], k), nan)


def _svd_by_eigh(A: torch.Tensor):
    k = min(A.shape)
    Ad = A.double()
    w, E = torch.linalg.eigh(Ad.mT @ Ad)
    order = torch.argsort(w, descending=True)[:k]
    Q = E[:, order]
    # A Q = P R with R ≈ diag(σ): |R_ii| (a column norm) is accurate to eps·‖A‖, unlike √λ_i whose
    # rounding floor is √eps·‖A‖, so numerically zero singular values stay recognisable as zero.
    P, R = torch.linalg.qr(Ad @ Q)
    d = R.diagonal()
    sign = torch.where(d < 0, -1.0, 1.0).to(P.dtype)
    return (P * sign).to(A.dtype), d.abs().to(A.dtype), Q.to(A.dtype)
