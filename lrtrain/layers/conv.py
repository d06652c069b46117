"""LowRankConv2d: a Conv2d whose kernel, reshaped to W (out × in·kh·kw), is U S Vᵀ.

Forward: z = conv2d(x, V as r filters of shape in × kh × kw; stride, padding, dilation), then a 1×1
convolution with K = U S (out × r) plus bias. The DLRT gradients follow :mod:`.autograd` with the
positions (n, h, w) as rows: G_K = Σ g_y zᵀ, G_S = Σ g_t zᵀ, and G_L is the weight gradient of the
first convolution for output gradient g_t = Uᵀ g_y.

Under torch.compile the rank r is a symbolic size (see :mod:`.factors`), but inductor's convolution
lowering needs static channel counts. There the first convolution is computed as im2col + matmul
(``unfold``; its adjoints ``fold`` and a batched matmul in the backward) and the 1×1 convolution as a
matmul, so r only ever appears as a matmul dimension and one graph serves every rank. Eager mode keeps
the convolutions (no kh·kw-fold im2col buffer).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.grad import conv2d_input, conv2d_weight

from .autograd import active, compute_dtype, core_backward, pad_grads
from .. import validation
from .approximation import truncated_svd_factors
from .factors import FactorizedMixin

__all__ = ["LowRankConv2d"]


def _check_pair(name: str, value, lo: int):
    """An int or a pair (tuple / list) of ints, each >= lo, as a tuple of two ints."""
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < lo for v in pair):
        raise ValueError(f"{name} must be an int >= {lo} or a pair of such ints, got {value!r}")
    return pair


def _check_conv(groups, padding_mode, padding) -> None:
    if groups != 1:
        raise ValueError(f"groups must be 1 for LowRankConv2d (grouped/depthwise kernels are not factorized), got {groups}")
    if padding_mode != "zeros":
        raise ValueError(f"padding_mode must be 'zeros', got {padding_mode!r}")
    if isinstance(padding, str):
        raise ValueError(f"padding must be an int >= 0 or a pair of such ints (not 'same' / 'valid'), got {padding!r}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N·H·W, C): positions as rows."""
    return rearrange(t, "n c h w -> (n h w) c")


def _unrows(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N·H·W, C) -> (N, C, H, W) with N, H, W of ``like``."""
    n, _, h, w = like.shape
    return rearrange(t, "(n h w) c -> n c h w", n=n, h=h, w=w)


def _out_hw(x: torch.Tensor, kernel_size, stride, padding, dilation):
    """Spatial output size (h', w') of the first convolution."""
    return tuple((x.shape[2 + d] + 2 * padding[d] - dilation[d] * (kernel_size[d] - 1) - 1) // stride[d] + 1
                 for d in range(2))


def _patch_rows(x: torch.Tensor, kernel_size, stride, padding, dilation) -> torch.Tensor:
    """im2col with positions as rows: (N·h'·w', in·kh·kw), columns ordered as V's rows."""
    cols = F.unfold(x, kernel_size, dilation, padding, stride)  # (N, in·kh·kw, h'·w')
    return cols.mT.reshape(-1, cols.shape[1])


class _LowRankConv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, U, S, V, bias, k, kernel_size, stride, padding, dilation):
        dt = compute_dtype(x, U)
        im2col = torch.compiler.is_compiling()  # see the module doc
        with torch.autocast(x.device.type, enabled=False):
            Uk, Sk, Vk = active(U, S, V, k, dt)
            xc = x.to(dt)
            b = None if bias is None else bias.to(dt)
            if im2col:  # the Linear computation with patches as samples: r appears only in matmuls
                h, w = _out_hw(x, kernel_size, stride, padding, dilation)
                z = _patch_rows(xc, kernel_size, stride, padding, dilation) @ Vk
                y = (z @ Sk.mT) @ Uk.mT
                if b is not None:
                    y = y + b
                z = rearrange(z, "(n h w) c -> n c h w", h=h, w=w)
                y = rearrange(y, "(n h w) c -> n c h w", h=h, w=w).contiguous()
            else:
                filters = Vk.mT.reshape(k, x.shape[1], *kernel_size)
                z = F.conv2d(xc, filters, None, stride, padding, dilation)
                y = F.conv2d(z, (Uk @ Sk)[:, :, None, None], b)
        ctx.save_for_backward(xc, z, U, S, V)
        ctx.conf = (k, dt, x.dtype, kernel_size, stride, padding, dilation, bias is not None, im2col)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x, z, U, S, V = ctx.saved_tensors
        k, dt, x_dtype, kernel_size, stride, padding, dilation, has_bias, im2col = ctx.conf
        with torch.autocast(gy.device.type, enabled=False):
            Uk, Sk, Vk = active(U, S, V, k, dt)
            gy = gy.to(dt)
            gt, G_K, G_S, gz = core_backward(_rows(gy), _rows(z), Uk, Sk)
            gx = None
            if im2col:
                G_L = _patch_rows(x, kernel_size, stride, padding, dilation).mT @ gt
                if ctx.needs_input_grad[0]:
                    gcols = (gz @ Vk.mT).reshape(x.shape[0], -1, V.shape[0]).mT  # (N, in·kh·kw, h'·w')
                    gx = F.fold(gcols, x.shape[2:], kernel_size, dilation, padding, stride).to(x_dtype)
            else:
                gt, gz = _unrows(gt, gy), _unrows(gz, gy)
                fshape = (k, x.shape[1], *kernel_size)
                G_L = conv2d_weight(x, fshape, gt, stride, padding, dilation).reshape(k, -1).mT
                if ctx.needs_input_grad[0]:
                    gx = conv2d_input(x.shape, Vk.mT.reshape(fshape), gz, stride, padding, dilation).to(x_dtype)
            gb = gy.sum((0, 2, 3)) if has_bias else None
        gU, gS, gV = pad_grads(U, S, V, k, G_K, G_S, G_L)
        return gx, gU, gS, gV, gb, None, None, None, None, None


class LowRankConv2d(FactorizedMixin, nn.Module):
    """Drop-in for ``nn.Conv2d`` (groups = 1, zero padding) with a rank-r factorized kernel.

    Shapes: input (N, in, H, W) -> (N, out, H', W'), or unbatched (in, H, W) -> (out, H', W') as for
    nn.Conv2d; parameters U (out, c), S (c, c), V (in·kh·kw, c) at
    capacity c, of which the active rank r is used (see :mod:`.factors`).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, rank: int, stride=1, padding=0,
                 dilation=1, bias: bool = True, max_rank: int | None = None, groups: int = 1,
                 padding_mode: str = "zeros", device=None, dtype=None, capacity: int | None = None):
        in_channels = validation.integer("in_channels", in_channels, 1)
        out_channels = validation.integer("out_channels", out_channels, 1)
        _check_conv(groups, padding_mode, padding)
        kernel_size, stride = _check_pair("kernel_size", kernel_size, 1), _check_pair("stride", stride, 1)
        padding, dilation = _check_pair("padding", padding, 0), _check_pair("dilation", dilation, 1)
        validation.flag("bias", bias)
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation
        fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        self._init_factors(self.out_channels, fan_in, rank, max_rank, capacity, device, dtype)
        self._init_bias(bias, self.out_channels, fan_in, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (3, 4):
            raise RuntimeError(f"Expected 3D (unbatched) or 4D (batched) input to LowRankConv2d, but got input of "
                               f"size: {list(x.shape)}")
        unbatched = x.dim() == 3  # (C, H, W), as nn.Conv2d accepts it: computed as a batch of one
        y = _LowRankConv2dFunction.apply(x.unsqueeze(0) if unbatched else x, self.U, self.S, self.V, self.bias,
                                         self.rank, self.kernel_size, self.stride, self.padding, self.dilation)
        return y.squeeze(0) if unbatched else y

    @property
    def weight(self) -> torch.Tensor:
        """Read-only dense kernel (out, in, kh, kw) = U S Vᵀ reshaped: see :meth:`dense_weight`."""
        return self.dense_weight().reshape(self.out_channels, self.in_channels, *self.kernel_size)

    @classmethod
    def from_dense(cls, layer: nn.Conv2d, rank: int | None = None, tau: float | None = None,
                   max_rank: int | None = None, capacity: int | None = None) -> "LowRankConv2d":
        """Truncated SVD of ``layer.weight`` reshaped to out × (in·kh·kw) (see LowRankLinear.from_dense)."""
        if not isinstance(layer, nn.Conv2d):
            raise ValueError(f"layer must be an nn.Conv2d, got {type(layer).__name__}")
        _check_conv(layer.groups, layer.padding_mode, layer.padding)
        w = layer.weight
        U, S, V = truncated_svd_factors(w.reshape(w.shape[0], -1), rank, tau)
        new = cls(layer.in_channels, layer.out_channels, layer.kernel_size, S.shape[0], layer.stride,
                  layer.padding, layer.dilation, layer.bias is not None, max_rank,
                  padding_mode=layer.padding_mode, device=w.device, dtype=w.dtype, capacity=capacity)
        with torch.no_grad():
            new.write_factors(U, S, V)
            if layer.bias is not None:
                new.bias.copy_(layer.bias)
        return new

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` computing the same function."""
        w = self.U
        layer = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                          self.dilation, bias=self.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            layer.weight.copy_(self.dense_weight().reshape(layer.weight.shape))
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, " + super().extra_repr())
