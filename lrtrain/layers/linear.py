"""LowRankLinear: y = x Wᵀ + b with W = U S Vᵀ, computed as ((x V) Sᵀ) Uᵀ + b (W never formed)."""
from __future__ import annotations

import torch
from torch import nn

from .autograd import LowRankLinearFunction
from .. import validation
from .approximation import truncated_svd_factors
from .factors import FactorizedMixin

__all__ = ["LowRankLinear"]


class LowRankLinear(FactorizedMixin, nn.Module):
    """Drop-in for ``nn.Linear(in_features, out_features)`` with a rank-r factorized weight.

    Shapes: input (*, in_features) -> output (*, out_features); parameters U (out, c), S (c, c), V (in, c)
    at capacity c, of which the active rank r is used (see :mod:`.factors`).
    Cost per sample: r (in + out + r) multiply-adds instead of in · out.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, max_rank: int | None = None,
                 bias: bool = True, device=None, dtype=None, capacity: int | None = None):
        in_features = validation.integer("in_features", in_features, 1)
        out_features = validation.integer("out_features", out_features, 1)
        validation.flag("bias", bias)
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_factors(self.out_features, self.in_features, rank, max_rank, capacity, device, dtype)
        self._init_bias(bias, self.out_features, self.in_features, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return LowRankLinearFunction.apply(x, self.U, self.S, self.V, self.bias, self.rank)

    @property
    def weight(self) -> torch.Tensor:
        """Read-only dense weight U S Vᵀ (out, in): see :meth:`dense_weight` for its cost and gradient."""
        return self.dense_weight()

    @classmethod
    def from_dense(cls, layer: nn.Linear, rank: int | None = None, tau: float | None = None,
                   max_rank: int | None = None, capacity: int | None = None) -> "LowRankLinear":
        """Truncated SVD of ``layer.weight``: rank ``rank``, or the smallest rank within relative
        Frobenius tolerance ``tau`` (both given: the smaller); capacity by the default rule.
        ``rank`` must be in [1, min(out, in)]."""
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"layer must be an nn.Linear, got {type(layer).__name__}")
        return cls.from_weight(layer.weight, layer.bias, rank=rank, tau=tau, max_rank=max_rank, capacity=capacity)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, rank: int | None = None,
                    tau: float | None = None, max_rank: int | None = None,
                    capacity: int | None = None) -> "LowRankLinear":
        """The layer y = x Wᵀ + b from the truncated SVD of ``weight`` W (out × in) and ``bias`` (out or None);
        ``rank``, ``tau``, ``max_rank``, ``capacity`` as in :meth:`from_dense`."""
        U, S, V = truncated_svd_factors(weight, rank, tau)
        new = cls(weight.shape[1], weight.shape[0], S.shape[0], max_rank=max_rank, bias=bias is not None,
                  device=weight.device, dtype=weight.dtype, capacity=capacity)
        with torch.no_grad():
            new.write_factors(U, S, V)
            if bias is not None:
                new.bias.copy_(bias)
        return new

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` computing the same function."""
        w = self.U
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            layer.weight.copy_(self.dense_weight())
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " + super().extra_repr()
