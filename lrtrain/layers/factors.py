"""Factor parameters and the machinery shared by every factorized layer.

A factorized layer stores W = U S Vᵀ (W: out × in_flat) as three parameters:
U (out × r) and V (in_flat × r) with orthonormal columns, S (r × r). Each is a :class:`Factor`, an
``nn.Parameter`` tagged with its role ('U', 'S', 'V', or 'bias' for the layer's bias) and a
:class:`FactorGroup` shared by the layer's parameters, which is how :class:`lrtrain.DLRT` finds them in
``model.parameters()`` (and skips the whole layer, bias included, when one of its gradients is non-finite).

Gradient convention (DLRT): after ``backward()``, ``U.grad`` holds ∂L/∂K with K = U S (= G_W V),
``V.grad`` holds ∂L/∂L with L = V Sᵀ (= G_Wᵀ U) and ``S.grad`` holds ∂L/∂S (= Uᵀ G_W V).
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

__all__ = ["Factor", "FactorGroup", "FactorizedMixin", "factor_groups", "replace_factor"]


class FactorGroup:
    """Links the U, S, V factors of one layer; carries the layer's rank cap."""

    def __init__(self, max_rank: int):
        self.max_rank = int(max_rank)

    def __repr__(self) -> str:
        return f"FactorGroup(max_rank={self.max_rank})"


class Factor(nn.Parameter):
    """A U, S or V parameter of a factorized layer (see module docstring for its gradient)."""

    def __new__(cls, data: torch.Tensor, role: str = "", group: FactorGroup | None = None, requires_grad: bool = True):
        p = super().__new__(cls, data, requires_grad)
        p.lrtrain_role = role
        p.lrtrain_group = group
        return p

    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        new = type(self)(self.data.clone(memory_format=torch.preserve_format), self.lrtrain_role,
                         copy.deepcopy(self.lrtrain_group, memo), self.requires_grad)
        memo[id(self)] = new
        return new

    def __repr__(self) -> str:
        return f"Factor[{self.lrtrain_role}] {tuple(self.shape)}"


def replace_factor(p: nn.Parameter, value: torch.Tensor) -> None:
    """Give parameter ``p`` the data ``value`` (any shape), keeping the same Parameter object.

    Autograd caches a leaf's gradient accumulator together with the shape it had; ``p.data = value``
    drops that cache only when dtype or device change, so a rank change while the previous step's graph
    is still referenced (``loss = ...`` in a loop) would make the next backward fail its shape check.
    Passing through a tensor of another dtype resets it. The stale ``.grad`` (old shape) is dropped.
    """
    if p.shape != value.shape:
        other = torch.float64 if p.dtype != torch.float64 else torch.float32
        p.data = torch.empty(0, dtype=other, device=p.device)
    p.data = value
    p.grad = None


def factor_groups(params) -> tuple[dict[int, dict[str, Factor]], list[nn.Parameter]]:
    """Split ``params`` into factor triples (keyed by id of their group) and the other parameters."""
    triples: dict[int, dict[str, Factor]] = {}
    plain: list[nn.Parameter] = []
    for p in params:
        role = getattr(p, "lrtrain_role", None)
        if role:
            triples.setdefault(id(p.lrtrain_group), {})[role] = p
        else:
            plain.append(p)
    return triples, plain


class FactorizedMixin:
    """Shared state and behaviour of LowRankLinear / LowRankConv2d (W viewed as out × in_flat)."""

    U: Factor
    S: Factor
    V: Factor

    def _init_factors(self, out_f: int, in_f: int, rank: int, max_rank: int | None,
                      device=None, dtype=None) -> None:
        full = min(out_f, in_f)
        if not isinstance(rank, int) or rank < 1 or rank > full:
            raise ValueError(f"rank must be an int in [1, min(out, in) = {full}], got {rank!r}")
        if max_rank is None:
            max_rank = full
        if not isinstance(max_rank, int) or not rank <= max_rank <= full:
            raise ValueError(f"max_rank must be an int in [rank = {rank}, min(out, in) = {full}], got {max_rank!r}")
        self._group = FactorGroup(max_rank)
        kw = dict(device=device, dtype=dtype)
        U = torch.linalg.qr(torch.randn(out_f, rank, **kw))[0]
        V = torch.linalg.qr(torch.randn(in_f, rank, **kw))[0]
        # ‖W‖_F² = r s² = out/3: the same expected energy as nn.Linear's U(-1/√in, 1/√in) init.
        S = torch.eye(rank, **kw) * math.sqrt(out_f / (3.0 * rank))
        self._set_factors(U, S, V)

    def _init_bias(self, enabled: bool, out_f: int, fan_in: int, device=None, dtype=None) -> None:
        """Bias ~ U(-1/√fan_in, 1/√fan_in) as in nn.Linear / nn.Conv2d, tagged as part of the layer."""
        if not enabled:
            self.register_parameter("bias", None)
            return
        bound = 1.0 / math.sqrt(fan_in)
        self.bias = Factor(torch.empty(out_f, device=device, dtype=dtype).uniform_(-bound, bound), "bias", self._group)

    def _set_factors(self, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> None:
        self.U = Factor(U.contiguous(), "U", self._group)
        self.S = Factor(S.contiguous(), "S", self._group)
        self.V = Factor(V.contiguous(), "V", self._group)

    @property
    def rank(self) -> int:
        """Current rank r (the side of S)."""
        return self.S.shape[0]

    @property
    def max_rank(self) -> int:
        return self._group.max_rank

    @max_rank.setter
    def max_rank(self, value: int) -> None:
        full = min(self.U.shape[0], self.V.shape[0])
        if not isinstance(value, int) or not 1 <= value <= full:
            raise ValueError(f"max_rank must be an int in [1, {full}], got {value!r}")
        self._group.max_rank = value

    def dense_weight(self) -> torch.Tensor:
        """W = U S Vᵀ, shape (out, in_flat). Materializes the dense matrix (for inspection/export)."""
        return (self.U @ self.S) @ self.V.mT

    def num_parameters_dense(self) -> int:
        """Parameters of the equivalent dense layer."""
        return self.U.shape[0] * self.V.shape[0] + (0 if self.bias is None else self.bias.numel())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A checkpoint may hold another rank: resize U, S, V (same objects, so optimizers keep them).
        for name in ("U", "S", "V"):
            key = prefix + name
            p = getattr(self, name)
            if key in state_dict and state_dict[key].shape != p.shape:
                replace_factor(p, torch.empty(state_dict[key].shape, dtype=p.dtype, device=p.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def truncated_svd_factors(W: torch.Tensor, rank: int | None, tau: float | None):
    """Best rank-r factors of W (out × in_flat) by SVD; r = ``rank`` or chosen by the τ rule.

    Returns U (out, r), S = diag(σ_1..σ_r), V (in_flat, r).
    """
    from ..rank.truncation import tolerance_rank  # local import: rank/ depends on nothing here

    if rank is None and tau is None:
        raise ValueError("give rank (an int >= 1) or tau (a float >= 0)")
    if tau is not None and not tau >= 0:
        raise ValueError(f"tau must be >= 0, got {tau!r}")
    Wd = W.detach().double()
    P, sigma, Qt = torch.linalg.svd(Wd, full_matrices=False)
    r = min(W.shape) if rank is None else rank
    if tau is not None:
        r = min(r, int(tolerance_rank(sigma, tau)))
    r = max(r, 1)
    return (P[:, :r].to(W.dtype), torch.diag(sigma[:r]).to(W.dtype), Qt[:r].mT.to(W.dtype))
