"""Factorized layers: W = U S Vᵀ with orthonormal U, V, stored at a fixed capacity (see :mod:`.factors`)."""
from .conv import LowRankConv2d
from .factors import FactorizedMixin, default_capacity, live_layers
from .linear import LowRankLinear

__all__ = ["LowRankLinear", "LowRankConv2d", "FactorizedMixin", "default_capacity", "live_layers"]
