"""Exponential moving average of a model with factorized layers, for ``torch.optim.swa_utils.AveragedModel``.

Averaging U, S and V separately is wrong: DLRT rotates the bases every step, so the average of the
factors is not a factorization of the average weight. :func:`get_ema_multi_avg_fn` is a drop-in for
torch's ``get_ema_multi_avg_fn`` that averages each factorized layer's weight,

    W_ema ← d·W_ema + (1 − d)·W        (W = U S Vᵀ, d the decay),

kept factored: with A = [U_ema, U], B = [V_ema, V] (m × 2c, n × 2c) and M = diag(d·S_ema, (1 − d)·S),
A = Q_A R_A, B = Q_B R_B, R_A M R_Bᵀ = P Σ Qᵀ, the new factors are Q_A P_k, Σ_k, Q_B Q_k with k the
numerical rank of Σ, at most the layer's capacity (the best rank-k approximation of the averaged
weight; exact while the two ranks add up to at most the capacity). Cost per layer and update:
O((m + n)·c²) time. Every other floating-point tensor is averaged as torch does (lerp); integer
buffers are copied.

Usage::

    ema = AveragedModel(model, multi_avg_fn=lrtrain.get_ema_multi_avg_fn(0.999))
    ...
    opt.step(); ema.update_parameters(model)

The first ``update_parameters`` call copies the model (torch's AveragedModel does it without calling the
averaging function); the EMA layers take their ranks at the next call.
"""
from __future__ import annotations

import numbers

import torch

from .layers.factors import ROLES
from .layers.links import factor_of_view

__all__ = ["get_ema_multi_avg_fn", "average_factored"]


@torch.no_grad()
def average_factored(layer, U, S, V, decay: float) -> None:
    """In place on ``layer`` (the average): W_layer ← decay·W_layer + (1 − decay)·U S Vᵀ (full-capacity
    factors of the model, zero outside their active block), truncated to ``layer.capacity``."""
    c = layer.capacity
    dt = torch.promote_types(U.dtype, torch.float32)
    Ue, Se, Ve = (t.to(dt) for t in layer.factors())
    A = torch.cat([Ue, U.to(dt)], 1)
    B = torch.cat([Ve, V.to(dt)], 1)
    M = torch.block_diag(decay * Se, (1.0 - decay) * S.to(dt))
    QA, RA = torch.linalg.qr(A)
    QB, RB = torch.linalg.qr(B)
    P, sigma, Qt = torch.linalg.svd(RA @ M @ RB.mT)
    tol = max(A.shape[0], B.shape[0]) * torch.finfo(dt).eps * sigma[0]
    k = max(1, min(c, int((sigma > tol).sum())))
    layer.write_factors((QA @ P[:, :k]).to(U.dtype), torch.diag(sigma[:k]).to(U.dtype),
                        (QB @ Qt[:k].mT).to(U.dtype))


def get_ema_multi_avg_fn(decay: float = 0.999):
    """``multi_avg_fn(ema_params, model_params, num_averaged)`` for ``AveragedModel`` (see module doc)."""
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be a real number in [0, 1], got {decay!r}")
    decay = float(decay)

    @torch.no_grad()
    def ema_update(ema_params, model_params, num_averaged):
        # The averaged model's tensors are detached views of its parameters: its layers are found through
        # the parameters' storages, which carry the links (lrtrain.layers.links).
        layers: dict = {}
        rest = []
        for i, t in enumerate(ema_params):
            hit = factor_of_view(t)
            if hit is not None:
                layers.setdefault(id(hit[0]), (hit[0], {}))[1][hit[1]] = i
            else:
                rest.append(i)
        for layer, idx in layers.values():
            if len(idx) == len(ROLES):
                average_factored(layer, *(model_params[idx[r]] for r in ROLES), decay)
            else:  # only part of a layer was handed over: average elementwise as torch would
                rest += list(idx.values())
        floats = [i for i in rest if ema_params[i].is_floating_point()]
        if floats:
            torch._foreach_lerp_([ema_params[i] for i in floats], [model_params[i] for i in floats], 1.0 - decay)
        for i in rest:
            if not ema_params[i].is_floating_point():
                ema_params[i].copy_(model_params[i])

    return ema_update
