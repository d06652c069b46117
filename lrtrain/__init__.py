"""lrtrain: low-rank training for PyTorch.

Factorized layers (W = U S Vᵀ), model conversion, and DLRT, a rank-adaptive drop-in optimizer.
``save_pretrained`` / ``from_pretrained``: the Hugging Face transformers round trip (transformers is optional,
imported only when they are called).
"""
from .compact import compact
from .convert import Summary, active_parameters, densify, lowrank, summary
from .collapse import CollapseMonitor
from .layers import LowRankConv2d, LowRankLinear
from .ema import get_ema_multi_avg_fn
from .hf import from_pretrained, save_pretrained
from .optim import DLRT

__version__ = "0.1.0"

__all__ = ["LowRankLinear", "LowRankConv2d", "lowrank", "densify", "summary", "Summary", "active_parameters", "compact", "DLRT",
           "CollapseMonitor", "get_ema_multi_avg_fn", "save_pretrained", "from_pretrained", "__version__"]
