"""Rank control: how many singular values of the DLRT core to keep."""
from .guided import CollapseGuide
from .truncation import tolerance_rank

__all__ = ["tolerance_rank", "CollapseGuide"]
