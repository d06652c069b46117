"""Exact DLRT gradients without S⁻¹ and without forming G_W.

For y = z Kᵀ with z = x V (the "basis" map) and K = U S, and output gradient g_y:

    g_t = g_y U                 (N × r)       Uᵀ-projected output gradient
    G_K = g_yᵀ z   = G_W V      (out × r)
    G_S = g_tᵀ z   = Uᵀ G_W V   (r × r)
    g_z = g_t S                 (N × r)       gradient w.r.t. z
    G_L = G_Wᵀ U                (in_flat × r) = the basis map's weight-gradient with output grad g_t

Linear and Conv2d differ only in the basis map (a matmul or a convolution with r filters); this module
holds the shared part and the Linear function. The Conv2d function lives in :mod:`.conv`.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

__all__ = ["core_backward", "LowRankLinearFunction"]


def core_backward(gy: torch.Tensor, z: torch.Tensor, U: torch.Tensor, S: torch.Tensor):
    """gy: (N, out), z: (N, r) rows = samples/positions. Returns g_t, G_K, G_S, g_z (see module doc)."""
    gt = gy @ U
    G_K = gy.mT @ z
    G_S = gt.mT @ z
    gz = gt @ S
    return gt, G_K, G_S, gz


class LowRankLinearFunction(torch.autograd.Function):
    """y = ((x V) Sᵀ) Uᵀ + b; backward returns (g_x, G_K, G_S, G_L, g_b) for (x, U, S, V, b)."""

    @staticmethod
    def forward(ctx, x, U, S, V, bias):
        z = x @ V
        y = (z @ S.mT) @ U.mT
        if bias is not None:
            y = y + bias
        ctx.save_for_backward(x, z, U, S, V)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x, z, U, S, V = ctx.saved_tensors
        n_in, r, n_out = V.shape[0], V.shape[1], U.shape[0]
        gy2, z2, x2 = gy.reshape(-1, n_out), z.reshape(-1, r), x.reshape(-1, n_in)
        gt, G_K, G_S, gz = core_backward(gy2, z2, U, S)
        gx = (gz @ V.mT).reshape(x.shape) if ctx.needs_input_grad[0] else None
        G_L = x2.mT @ gt
        gb = gy2.sum(0) if ctx.has_bias else None
        return gx, G_K, G_S, G_L, gb
