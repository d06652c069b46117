"""Layer kinds: for each dense layer type that lrtrain factorizes, the one place that says how.

A kind pairs a dense module type with the factorized layer that replaces it. The factorized layer holds
W = U S Vᵀ, W being the dense weight viewed as a matrix of shape (out, in_flat):

* ``linear``: ``nn.Linear``, weight (out, in), y = x Wᵀ + b  ->  ``LowRankLinear``, W = weight.
* ``conv1d``: Hugging Face transformers' ``Conv1D`` (GPT-2's linear layer), weight stored (in, out),
  y = x weight + b  ->  ``LowRankLinear``, W = weightᵀ. The LowRankLinear carries the instance attribute
  ``_lrtrain_origin = "conv1d"``, so that ``densify`` and checkpoints give a Conv1D back. transformers is
  never imported here: its Conv1D class is taken from ``sys.modules`` (a model holding one has imported it).
* ``conv2d``: ``nn.Conv2d`` with groups = 1 and numeric zero padding, weight (out, in, kh, kw)
  ->  ``LowRankConv2d``, W = weight reshaped to (out, in·kh·kw).

What a kind says (:class:`LayerKind`): which dense modules it covers (``covers``) and why it refuses one
(``refusal``); W of a dense module (``weight_matrix``); ``from_dense`` and ``to_dense``; the structure
fields of a checkpoint record (``structure`` of a factorized layer, ``dense_structure`` of the dense module
a checkpoint is loaded into: the two agree exactly when the layer replaces that module) and ``build``, a
factorized layer of a recorded structure; and the embedding behind the collapse statistics: ``embed``
gives the rows x_j that the layer multiplies by W (Linear, Conv1D: the input's rows; Conv2d: its unfolded
patches) and ``output_rows`` the output gradient as rows g_j, so that z_j = W x_j + b row by row.

``KINDS`` lists the kinds; :func:`kind_of` finds the kind of a dense or factorized module and
:func:`kind_named` the kind a checkpoint record names. ``lrtrain.lowrank`` / ``densify`` / ``summary``,
``lrtrain.save_pretrained`` / ``from_pretrained`` and the collapse monitor and analysis go through them.
"""
from __future__ import annotations

import abc
import sys

import torch
import torch.nn.functional as F
from torch import nn

from .conv import LowRankConv2d
from .factors import FactorizedMixin
from .linear import LowRankLinear

__all__ = ["LayerKind", "KINDS", "LINEAR", "CONV1D", "CONV2D", "kind_of", "kind_named", "ORIGIN_ATTR"]

# Instance attribute of a factorized layer converted from a dense type other than its own class's
# (a LowRankLinear from a Conv1D: "conv1d"); absent otherwise.
ORIGIN_ATTR = "_lrtrain_origin"


class LayerKind(abc.ABC):
    """One dense layer type and its factorized layer (see the module doc). Attributes:

    ``name``: the kind's name in checkpoints ("linear", "conv1d", "conv2d"); ``layer_type``: the
    factorized class; ``origin``: the value of ``_lrtrain_origin`` its factorized layers carry (None: no
    marker); ``fields``: the structure fields of its checkpoint records; ``weight_dim``: the number of
    dimensions of the dense weight; ``embedding``: how the collapse monitor reports it ("linear": the
    input's rows, "conv": unfolded patches).
    """

    name: str
    layer_type: type
    origin: str | None = None
    fields: tuple
    weight_dim: int
    embedding: str

    @abc.abstractmethod
    def dense_type(self) -> type | None:
        """The dense module class (None when its library has not been imported)."""

    def covers(self, module: nn.Module) -> bool:
        """Whether ``module`` is a dense layer of this kind (convertible or not: see :meth:`refusal`)."""
        cls = self.dense_type()
        return cls is not None and isinstance(module, cls)

    def owns(self, layer: nn.Module) -> bool:
        """Whether ``layer`` is a factorized layer of this kind."""
        return isinstance(layer, self.layer_type) and getattr(layer, ORIGIN_ATTR, None) == self.origin

    def refusal(self, module: nn.Module) -> str | None:
        """Why the dense ``module`` (covered by this kind) cannot be factorized or monitored; None if it can."""
        w = module.weight
        return None if w.dim() == self.weight_dim else f"unexpected weight shape {tuple(w.shape)}"

    @abc.abstractmethod
    def weight_matrix(self, module: nn.Module) -> torch.Tensor:
        """W (out, in_flat) of the dense ``module``: a view of its weight, not detached."""

    @abc.abstractmethod
    def from_dense(self, module: nn.Module, rank: int | None = None, tau: float | None = None,
                   max_rank: int | None = None, capacity: int | None = None) -> FactorizedMixin:
        """The factorized layer initialized from the truncated SVD of W (see ``LowRankLinear.from_dense``)."""

    @abc.abstractmethod
    def to_dense(self, layer: FactorizedMixin) -> nn.Module:
        """The dense module computing the same function as the factorized ``layer``."""

    @abc.abstractmethod
    def structure(self, layer: FactorizedMixin) -> dict:
        """The structure fields (``fields``, json values) of the factorized ``layer``'s checkpoint record."""

    @abc.abstractmethod
    def dense_structure(self, module: nn.Module) -> dict:
        """The structure fields of the dense ``module`` (covered by this kind): those of its factorized layer."""

    @abc.abstractmethod
    def build(self, structure: dict, *, bias: bool, max_rank: int, capacity: int, device=None,
              dtype=None) -> FactorizedMixin:
        """A factorized layer of ``structure`` (as :meth:`dense_structure` gives it) at rank 1, random factors:
        ``load_state_dict`` then sets the factors and the rank."""

    @abc.abstractmethod
    def embed(self, module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(X, rows per sample): X (rows, in_flat) the rows x_j of the input ``x`` (N, ...) that ``module``
        (dense or factorized) multiplies by W, sample i's rows contiguous."""

    @abc.abstractmethod
    def output_rows(self, g: torch.Tensor) -> torch.Tensor:
        """The output gradient ``g`` (the output's shape) as rows g_j (rows, out), in the order of :meth:`embed`."""


class _Linear(LayerKind):
    name = "linear"
    layer_type = LowRankLinear
    fields = ("in_features", "out_features")
    weight_dim = 2
    embedding = "linear"

    def dense_type(self):
        return nn.Linear

    def weight_matrix(self, module):
        return module.weight

    def from_dense(self, module, rank=None, tau=None, max_rank=None, capacity=None):
        return LowRankLinear.from_dense(module, rank=rank, tau=tau, max_rank=max_rank, capacity=capacity)

    def to_dense(self, layer):
        return layer.to_dense()

    def structure(self, layer):
        return {"in_features": layer.in_features, "out_features": layer.out_features}

    def dense_structure(self, module):
        return {"in_features": module.in_features, "out_features": module.out_features}

    def build(self, structure, *, bias, max_rank, capacity, device=None, dtype=None):
        return LowRankLinear(structure["in_features"], structure["out_features"], 1, max_rank=max_rank, bias=bias,
                             capacity=capacity, device=device, dtype=dtype)

    def embed(self, module, x):
        X = x.reshape(-1, x.shape[-1])  # (N, ..., in) -> (N·..., in)
        return X, X.shape[0] // max(x.shape[0], 1)

    def output_rows(self, g):
        return g.reshape(-1, g.shape[-1])


class _Conv1D(_Linear):
    """transformers' Conv1D: a Linear whose weight is stored transposed; everything else as for Linear."""

    name = "conv1d"
    origin = "conv1d"

    def dense_type(self):
        mod = sys.modules.get("transformers.pytorch_utils")
        return getattr(mod, "Conv1D", None) if mod is not None else None

    def weight_matrix(self, module):
        return module.weight.mT  # stored (in, out)

    def from_dense(self, module, rank=None, tau=None, max_rank=None, capacity=None):
        new = LowRankLinear.from_weight(self.weight_matrix(module).detach(), module.bias, rank=rank, tau=tau,
                                        max_rank=max_rank, capacity=capacity)
        setattr(new, ORIGIN_ATTR, self.origin)
        return new

    def to_dense(self, layer):
        from transformers.pytorch_utils import Conv1D  # a layer unpickled where transformers was not imported yet

        w = layer.U
        dense = Conv1D(layer.out_features, layer.in_features).to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            dense.weight.copy_(layer.dense_weight().mT)
            if layer.bias is None:
                dense.bias = None
            else:
                dense.bias.copy_(layer.bias)
        return dense

    def dense_structure(self, module):
        n_in, n_out = module.weight.shape
        return {"in_features": n_in, "out_features": n_out}

    def build(self, structure, **kwargs):
        new = super().build(structure, **kwargs)
        setattr(new, ORIGIN_ATTR, self.origin)
        return new


class _Conv2d(LayerKind):
    name = "conv2d"
    layer_type = LowRankConv2d
    fields = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation")
    weight_dim = 4
    embedding = "conv"

    def dense_type(self):
        return nn.Conv2d

    def refusal(self, module):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            return "grouped / non-zero-padded / string-padded conv"
        return super().refusal(module)

    def weight_matrix(self, module):
        return module.weight.reshape(module.weight.shape[0], -1)

    def from_dense(self, module, rank=None, tau=None, max_rank=None, capacity=None):
        return LowRankConv2d.from_dense(module, rank=rank, tau=tau, max_rank=max_rank, capacity=capacity)

    def to_dense(self, layer):
        return layer.to_dense()

    def structure(self, layer):
        return {"in_channels": layer.in_channels, "out_channels": layer.out_channels,
                **{k: list(getattr(layer, k)) for k in ("kernel_size", "stride", "padding", "dilation")}}

    dense_structure = structure  # nn.Conv2d names its geometry as LowRankConv2d does

    def build(self, structure, *, bias, max_rank, capacity, device=None, dtype=None):
        s = structure
        return LowRankConv2d(s["in_channels"], s["out_channels"], tuple(s["kernel_size"]), 1, tuple(s["stride"]),
                             tuple(s["padding"]), tuple(s["dilation"]), bias=bias, max_rank=max_rank,
                             capacity=capacity, device=device, dtype=dtype)

    def embed(self, module, x):
        cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # (N, in·kh·kw, P)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1]), cols.shape[2]

    def output_rows(self, g):
        return g.movedim(1, -1).reshape(-1, g.shape[1])  # (N, out, h', w') -> (N·h'·w', out)


LINEAR, CONV1D, CONV2D = _Linear(), _Conv1D(), _Conv2d()
KINDS: tuple[LayerKind, ...] = (LINEAR, CONV1D, CONV2D)


def kind_of(module: nn.Module) -> LayerKind | None:
    """The kind of a factorized layer (by its class and origin marker) or of a dense module of a kind's type;
    None for any other module."""
    if isinstance(module, FactorizedMixin):
        return next((k for k in KINDS if k.owns(module)), None)
    return next((k for k in KINDS if k.covers(module)), None)


def kind_named(name) -> LayerKind | None:
    """The kind called ``name`` in checkpoint records; None if there is none."""
    return next((k for k in KINDS if k.name == name), None)
