"""lrtrain: low-rank training for PyTorch.

Factorized layers (W = U S Vᵀ), model conversion, and DLRT, a rank-adaptive drop-in optimizer.
"""
from .convert import Summary, active_parameters, densify, lowrank, summary
from .collapse import CollapseMonitor
from .layers import LowRankConv2d, LowRankLinear
from .ema import get_ema_multi_avg_fn
from .optim import DLRT

__version__ = "0.1.0"

__all__ = ["LowRankLinear", "LowRankConv2d", "lowrank", "densify", "summary", "Summary", "active_parameters", "DLRT",
           "CollapseMonitor", "get_ema_multi_avg_fn", "__version__"]
