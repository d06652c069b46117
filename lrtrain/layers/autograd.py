"""Exact DLRT gradients at the active rank, without S⁻¹ and without forming G_W.

Parameters have capacity c; the functions here read only the active block (r columns of U and V, the
r × r block of S) and return gradients of full capacity, zero outside that block. With K = U S, L = V Sᵀ,
the "basis" map z = x V (N × r), y = z Kᵀ, and output gradient g_y:

    g_t = g_y U                 (N × r)       Uᵀ-projected output gradient
    G_K = g_yᵀ z   = G_W V      (out × r)
    G_S = g_tᵀ z   = Uᵀ G_W V   (r × r)
    g_z = g_t S                 (N × r)       gradient w.r.t. z
    G_L = G_Wᵀ U                (in_flat × r) = the basis map's weight-gradient with output grad g_t

Mixed precision: under ``torch.autocast`` the functions compute in the autocast dtype (inputs and
factors cast once, inner ops with autocast off) and return gradients in each parameter's own dtype,
which is what ``torch.amp.custom_fwd`` / ``custom_bwd`` do, for any device type.

Linear and Conv2d differ only in the basis map; this module holds the shared part, the Linear function
and the dense-weight view. The Conv2d function lives in :mod:`.conv`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["core_backward", "compute_dtype", "active", "pad_grads", "LowRankLinearFunction", "DenseWeightFunction"]


def compute_dtype(x: torch.Tensor, like: torch.Tensor) -> torch.dtype:
    """The autocast dtype of ``x``'s device when autocast is on there, else ``like``'s dtype."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else like.dtype


def active(U, S, V, k: int, dtype: torch.dtype):
    """The active factors U[:, :k], S[:k, :k], V[:, :k] in ``dtype`` (views when no cast is needed)."""
    return U[:, :k].to(dtype), S[:k, :k].to(dtype), V[:, :k].to(dtype)


def pad_grads(U, S, V, k: int, G_K, G_S, G_L):
    """Full-capacity gradients of U, S, V (parameter dtypes), zero outside the active block.

    Zero-padding (not a slice of a zeros tensor written in place): under torch.compile, where k is an
    unbacked size (see :mod:`.factors`), inductor's constant folding cannot tell whether a slice of a
    constant zeros tensor is contiguous and fails; ``pad`` has no such view.
    """
    c = S.shape[0]
    return (F.pad(G_K.to(U.dtype), (0, c - k)), F.pad(G_S.to(S.dtype), (0, c - k, 0, c - k)),
            F.pad(G_L.to(V.dtype), (0, c - k)))


def grad_buffers(U, S, V, k: int, dtype: torch.dtype):
    """Eager mode, gradients in the parameters' dtype: full-capacity gradient tensors of U, S, V with the
    inactive part zeroed, and their active blocks, for the backward to write its products into (``out=``)
    instead of padding them afterwards. None under torch.compile (see :func:`pad_grads`) or autocast."""
    if torch.compiler.is_compiling() or dtype != U.dtype:
        return None
    gU, gS, gV = torch.empty_like(U), torch.empty_like(S), torch.empty_like(V)
    if k < S.shape[0]:
        gU[:, k:].zero_()
        gV[:, k:].zero_()
        gS[k:].zero_()
        gS[:k, k:].zero_()
    return (gU, gS, gV), (gU[:, :k], gS[:k, :k], gV[:, :k])


def core_backward(gy: torch.Tensor, z: torch.Tensor, U: torch.Tensor, S: torch.Tensor, out=None):
    """gy: (N, out), z: (N, r) rows = samples/positions. Returns g_t, G_K, G_S, g_z (see module doc);
    ``out``: optional (G_K, G_S) tensors to write into."""
    gt = gy @ U
    G_K = torch.mm(gy.mT, z, out=None if out is None else out[0])
    G_S = torch.mm(gt.mT, z, out=None if out is None else out[1])
    gz = gt @ S
    return gt, G_K, G_S, gz


class LowRankLinearFunction(torch.autograd.Function):
    """y = ((x V_k) S_kᵀ) U_kᵀ + b; backward returns (g_x, G_K, G_S, G_L, g_b) padded to capacity."""

    @staticmethod
    def forward(ctx, x, U, S, V, bias, k):
        dt = compute_dtype(x, U)
        with torch.autocast(x.device.type, enabled=False):
            Uk, Sk, Vk = active(U, S, V, k, dt)
            xc = x.to(dt)
            z = xc @ Vk
            y = (z @ Sk.mT) @ Uk.mT
            if bias is not None:
                y = y + bias.to(dt)
        ctx.save_for_backward(xc, z, U, S, V)
        ctx.k, ctx.dt, ctx.x_dtype = k, dt, x.dtype
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x, z, U, S, V = ctx.saved_tensors
        k, dt = ctx.k, ctx.dt
        with torch.autocast(gy.device.type, enabled=False):
            Uk, Sk, Vk = active(U, S, V, k, dt)
            n_in, n_out = V.shape[0], U.shape[0]
            gy2, z2, x2 = gy.to(dt).reshape(-1, n_out), z.reshape(-1, k), x.reshape(-1, n_in)
            bufs = grad_buffers(U, S, V, k, dt)
            gt, G_K, G_S, gz = core_backward(gy2, z2, Uk, Sk, None if bufs is None else bufs[1][:2])
            gx = (gz @ Vk.mT).reshape(x.shape).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
            G_L = torch.mm(x2.mT, gt, out=None if bufs is None else bufs[1][2])
            gb = gy2.sum(0) if ctx.has_bias else None
        gU, gS, gV = pad_grads(U, S, V, k, G_K, G_S, G_L) if bufs is None else bufs[0]
        return gx, gU, gS, gV, gb, None


class DenseWeightFunction(torch.autograd.Function):
    """W = U_k S_k V_kᵀ (out × in_flat); backward maps G_W to (G_W V, Uᵀ G_W V, G_Wᵀ U) padded to capacity."""

    @staticmethod
    def forward(ctx, U, S, V, k):
        Uk, Sk, Vk = active(U, S, V, k, U.dtype)
        ctx.save_for_backward(U, S, V)
        ctx.k = k
        return (Uk @ Sk) @ Vk.mT

    @staticmethod
    @once_differentiable
    def backward(ctx, gW):
        U, S, V = ctx.saved_tensors
        k = ctx.k
        Uk, _, Vk = active(U, S, V, k, gW.dtype)
        G_K = gW @ Vk
        gU, gS, gV = pad_grads(U, S, V, k, G_K, Uk.mT @ G_K, gW.mT @ Uk)
        return gU, gS, gV, None
