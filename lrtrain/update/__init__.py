"""The DLRT layer update, in one place: its spec, its linear algebra, its rank rule, its constants, and the
dispatch to the pure-PyTorch reference or the fused C++/CUDA kernels (csrc/).

* :mod:`.spec` -- the update of one layer (:func:`reference_update`, the specification every backend
  implements) and the transport of optimizer state to the new bases.
* :mod:`.linalg` -- masked CholeskyQR2 orth-complements, re-orthonormalization, a robust SVD.
* :mod:`.rank_rule` -- how many singular values of the core to keep (:func:`tolerance_rank`).
* :mod:`.importance` -- which singular directions to keep, by the loss's sensitivity to them
  (:func:`importance_selection`; the default rank rule).
* :mod:`.backends`, :mod:`.dispatch` -- which compiled backends are active; ``update_layers(items, lr, tau,
  min_rank, backend="auto")`` runs a param group's updates on them (``"auto"``: the compiled backend of each
  layer's device when active, else the reference; ``"reference"``, ``"cpu"``, ``"cuda"``).
  ``LRTRAIN_DISABLE_EXT=1`` forces the reference path. Importing this package never requires a compiled module.

This package imports nothing from the rest of lrtrain.
"""
from __future__ import annotations

from .backends import BACKENDS, NAMES, available, load_errors
from .dispatch import FusedResult, check_backend, finite_flags, update_layers
from .importance import RULES, Importance, importance_selection
from .rank_rule import tolerance_rank
from .spec import LayerResult, LayerStep, reference_update, reference_update_layers, transport_state

__all__ = ["available", "update_layers", "finite_flags", "check_backend", "load_errors", "FusedResult",
           "BACKENDS", "NAMES", "tolerance_rank", "LayerStep", "LayerResult", "reference_update",
           "reference_update_layers", "transport_state", "Importance", "importance_selection", "RULES"]
