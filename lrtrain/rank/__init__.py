"""Rank control: how many singular values of the DLRT core to keep."""
from .guided import CollapseGuide

__all__ = ["CollapseGuide"]
