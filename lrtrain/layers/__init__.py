"""Factorized layers: W = U S Vᵀ with orthonormal U, V, stored at a fixed capacity (see :mod:`.factors`);
the layer kinds that map dense layers to them (:mod:`.kinds`); the links from factor parameters to their
layer (:mod:`.links`)."""
from .conv import LowRankConv2d
from .factors import FactorizedMixin, default_capacity
from .kinds import KINDS, LayerKind, kind_of
from .linear import LowRankLinear

__all__ = ["LowRankLinear", "LowRankConv2d", "FactorizedMixin", "default_capacity", "KINDS", "LayerKind", "kind_of"]
