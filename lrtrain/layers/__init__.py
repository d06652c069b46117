"""Factorized layers: W = U S Vᵀ with orthonormal U, V."""
from .conv import LowRankConv2d
from .factors import Factor, FactorGroup, FactorizedMixin, factor_groups
from .linear import LowRankLinear

__all__ = ["LowRankLinear", "LowRankConv2d", "Factor", "FactorGroup", "FactorizedMixin", "factor_groups"]
