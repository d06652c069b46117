"""The DLRT layer update: the specification every backend (reference here, fused in csrc/) implements.

For one layer with W = U S Vᵀ (U: m×r, V: n×r, S: r×r) and the base optimizer's directions D_K, D_L, D_S
(see :mod:`.base`) in the coordinates K = U S, L = V Sᵀ, S, the optimizer's step in weight space is

    W - lr·T,   T = U D_S Vᵀ + (I - U Uᵀ) D_K Vᵀ + U D_Lᵀ (I - V Vᵀ)        (its tangent-space part)

1. Augment with the directions the step takes:  Û = [U, Q_U], Q_U = orth((I - U Uᵀ) X_K) with at most
   a = min(r, augment) columns (X_K = D_K, or a rank guide's directions), *compacted*: numerically
   dependent columns are dropped and the independent ones come first, so a side capped by its
   dimension (m - r < a) keeps every independent direction, not the first m - r columns; V̂ = [V, Q_V]
   likewise from X_L = D_L. With X = D, span(Q_U) ⊇ span((I - U Uᵀ) D_K): the whole tangent step is
   represented (at full rank, the dense step).
2. Assemble the Galerkin core of the stepped weight, Ŝ = Ûᵀ (W - lr·T) V̂:

        Ŝ = [[ decay(S) - lr·D_S ,  -lr·D_Lᵀ Q_V ],
             [ -lr·Q_Uᵀ D_K      ,  0            ]]

3. Truncate: Ŝ = P Σ Qᵀ, r' = :func:`lrtrain.update.tolerance_rank` (σ, τ, min_rank, max_rank, spare): the
   τ-rank plus ``spare`` further singular directions (kept with their singular values, so W loses
   less than the τ rule allows). Spare directions are the rank's room to grow: at a fixed-rank
   stationary point the coupling blocks vanish and the normal block (I - UUᵀ) G (I - VVᵀ) never enters
   Ŝ, but a spare column v_s of V makes the next step's G_K = G_W V contain G_W v_s, whose normal part
   is the normal block applied to v_s (one step of subspace iteration on it); a spare direction whose
   singular value grows past the τ rule joins the τ-rank and the next best direction becomes spare.
   With ``importance`` set, the kept directions J are chosen by :mod:`.importance` instead (any subset,
   not only a prefix; J = 1..r' under the tolerance rule).
   U ← Û P[:, J], V ← V̂ Q[:, J], S ← diag(σ_J); then one CholeskyQR pass U ← U R_u⁻¹,
   V ← V R_v⁻¹, S ← R_u S R_vᵀ (W unchanged) so that rounding never accumulates in the bases.
4. Transport optimizer state to the new bases with R_U = P[:r, J] = Uᵀ U_new, R_V = Q[:r, J]:
   K-state X ← X R_V, L-state X ← X R_U, S-state X ← R_Uᵀ X R_V for momentum/first moments; Adam's
   second moment v (a per-coordinate variance) is carried by the squared rotation: v_K ← v_K (R_V∘R_V),
   v_L ← v_L (R_U∘R_U), v_S ← (R_U∘R_U)ᵀ v_S (R_V∘R_V), which keeps it non-negative and is exact when
   the rotation is a permutation. Directions new to the basis start from what this carries (no history).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .importance import Importance, importance_selection
from .rank_rule import tolerance_rank
from .linalg import orth_complement, reorthonormalize, robust_svd

__all__ = ["LayerStep", "LAYER_INPUTS", "LayerResult", "augmented_core", "core_svd", "finish_update", "reference_update",
           "reference_update_layers", "transport_state", "failed_update"]


@dataclass
class LayerStep:
    """Inputs of one layer's update. S_decayed = decay(S) from the base rule (S itself for SGD); G_K (m×r),
    G_L (n×r): the augmentation directions X_K, X_L (DLRT passes D_K, D_L; a rank guide may replace them)."""

    U: torch.Tensor
    S_decayed: torch.Tensor
    V: torch.Tensor
    G_K: torch.Tensor
    G_L: torch.Tensor
    D_K: torch.Tensor
    D_L: torch.Tensor
    D_S: torch.Tensor
    max_rank: int
    augment: int | None = None  # at most this many new columns per side (None: r); set by a rank guide
    spare: int = 0  # singular directions kept beyond the τ-rank (see the module docstring, step 3)
    importance: Importance | None = None  # None: the tolerance rule; else the importance rule's inputs


# The tensor inputs of a layer's update, in the order the compiled modules take them (their LAYER_INPUTS).
LAYER_INPUTS = tuple(f.name for f in dataclasses.fields(LayerStep))[:8]


@dataclass
class LayerResult:
    """New factors and the rotations R_U = Uᵀ U_new (r×r'), R_V = Vᵀ V_new (r×r')."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    R_U: torch.Tensor
    R_V: torch.Tensor


def augmented_core(item: LayerStep, lr: float):
    """Steps 1-2: returns Q_U (m×a), Q_V (n×b) and Ŝ ((r+a)×(r+b)) in float32 or wider."""
    U, V = item.U, item.V
    m, r = U.shape
    n = V.shape[0]
    a = r if item.augment is None else min(r, item.augment)
    Q_U = orth_complement(U, item.G_K[:, :a], min(a, m - r))
    Q_V = orth_complement(V, item.G_L[:, :a], min(a, n - r))
    top = torch.cat([item.S_decayed - lr * item.D_S, -lr * (item.D_L.mT @ Q_V)], dim=1)
    bottom = torch.cat([-lr * (Q_U.mT @ item.D_K), U.new_zeros(Q_U.shape[1], Q_V.shape[1])], dim=1)
    S_hat = torch.cat([top, bottom], dim=0)
    return Q_U, Q_V, S_hat.to(torch.promote_types(S_hat.dtype, torch.float32))


def reference_update(item: LayerStep, lr: float, tau: float, min_rank: int) -> LayerResult:
    """Steps 1-3 for one layer in plain PyTorch (one host sync: the new rank). An update that cannot be
    computed (a non-finite direction makes a Cholesky factorization fail) returns NaN factors at rank r,
    which callers treat like any non-finite update: skipped and counted."""
    try:
        return _reference_update(item, lr, tau, min_rank)
    except torch.linalg.LinAlgError:
        return failed_update(item)


def failed_update(item: LayerStep) -> LayerResult:
    """NaN factors at the layer's rank r: an update that could not be computed (skipped and counted by callers)."""
    nan = float("nan")
    U, V = item.U, item.V
    r = U.shape[1]
    return LayerResult(torch.full_like(U, nan), U.new_full((r, r), nan), torch.full_like(V, nan),
                       U.new_full((r, r), nan), U.new_full((r, r), nan))


def _reference_update(item: LayerStep, lr: float, tau: float, min_rank: int) -> LayerResult:
    core = core_svd(item, lr)
    Q_U, Q_V, P, sigma, Q = core
    if item.importance is None:
        keep = slice(0, int(tolerance_rank(sigma, tau, min_rank, item.max_rank, item.spare)))
    else:
        keep = importance_selection(sigma, P, Q, item.importance, tau, min_rank, item.max_rank, item.spare)
    return finish_update(item, core, keep)


def core_svd(item: LayerStep, lr: float) -> tuple:
    """Steps 1-3 up to the choice of directions: (Q_U, Q_V, P, σ, Q) with Ŝ = P diag(σ) Qᵀ (σ descending)."""
    Q_U, Q_V, S_hat = augmented_core(item, lr)
    return (Q_U, Q_V, *robust_svd(S_hat))


def finish_update(item: LayerStep, core: tuple, keep) -> LayerResult:
    """Step 3 from :func:`core_svd`'s output with the kept directions ``keep`` (indices or a slice of the core's
    singular triplets): the new factors and the rotations."""
    U, V = item.U, item.V
    r = U.shape[1]
    Q_U, Q_V, P, sigma, Q = core
    P, sigma, Q = P[:, keep].to(U.dtype), sigma[keep].to(U.dtype), Q[:, keep].to(U.dtype)
    R_U, R_V = P[:r], Q[:r]
    U_new, Ru = reorthonormalize(U @ R_U + Q_U @ P[r:])
    V_new, Rv = reorthonormalize(V @ R_V + Q_V @ Q[r:])
    return LayerResult(U_new, (Ru * sigma) @ Rv.mT, V_new, R_U.contiguous(), R_V.contiguous())


def reference_update_layers(items: list[LayerStep], lr: float, tau: float, min_rank: int) -> list[LayerResult]:
    """All layers of one param group, one after the other (the fused backends batch them)."""
    return [reference_update(item, lr, tau, min_rank) for item in items]


def transport_state(states: dict, R_U: torch.Tensor, R_V: torch.Tensor, linear_keys, square_keys,
                    out: dict | None = None) -> None:
    """Step 4 on ``states = {'U': {...}, 'S': {...}, 'V': {...}}`` (K-, S- and L-coordinates): each entry is
    replaced by its transported value. ``out`` (same nesting, tensors of the transported shapes, e.g. views
    of fixed buffers) receives the results instead of new tensors."""
    sq_U, sq_V = R_U.square(), R_V.square()
    for keys, A, B in ((linear_keys, R_U, R_V), (square_keys, sq_U, sq_V)):
        for key in keys:
            if key not in states["U"]:
                continue
            for role, left, right in (("U", None, B), ("V", None, A), ("S", A, B)):
                X = states[role][key] if left is None else left.mT @ states[role][key]
                dst = None if out is None else out[role][key]
                if dst is None or X.dim() == 2:
                    states[role][key] = torch.matmul(X, right, out=dst)
                else:  # a stack (the Adam bias masses): matmul's out= does not take strided batches
                    states[role][key] = dst.copy_(X @ right)
