"""The DLRT optimizer and its math: base rules, the layer update spec, small linear algebra."""
from .dlrt import DLRT

__all__ = ["DLRT"]
