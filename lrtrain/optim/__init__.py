"""The DLRT optimizer: the base rules (:mod:`.base`), the functional step (:mod:`.functional`, ``dlrt()``),
the thin ``torch.optim.Optimizer`` over it (:mod:`.dlrt`, ``DLRT``), how parameters are read and written
(:mod:`.params`), and the guard that makes other optimizers refuse factor parameters (:mod:`.guard`).
The layer update itself is :mod:`lrtrain.update`."""
from . import functional, guard
from .dlrt import DLRT

guard.install()

__all__ = ["DLRT", "functional"]
