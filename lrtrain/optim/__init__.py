"""The DLRT optimizer and its math: base rules, the layer update spec, small linear algebra."""
from . import guard
from .dlrt import DLRT

guard.install()

__all__ = ["DLRT"]
