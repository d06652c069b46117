"""Neural-collapse measurements and the rank-collapse bound (Zangrando et al., arXiv:2402.03991).

:class:`CollapseMonitor` streams, per Linear/Conv2d layer (dense or factorized), the within- and
between-class variation of the layer inputs, NC1, ‖Δ‖₂ of the output gradients and the bound
tail_K(W) ≤ (‖R‖_F + ‖Δ‖₂·TCV^{1/2}/N)/λ; passed to ``lrtrain.DLRT(..., guide=monitor)`` it steers the
ranks (:mod:`lrtrain.rank.guided`). :mod:`.analysis` has the exact offline versions (whole data set).
"""
from .monitor import CollapseMonitor, LayerCollapse
from .spectral import SpectralNorm, spectral_norm_exact
from .stats import ClassStats, scatter_reference

__all__ = ["CollapseMonitor", "LayerCollapse", "ClassStats", "SpectralNorm", "spectral_norm_exact",
           "scatter_reference"]
