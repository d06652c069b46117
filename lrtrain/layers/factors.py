"""Fixed-capacity factors and the machinery shared by every factorized layer.

A factorized layer stores W = U S Vᵀ (W: out × in_flat) in three parameters allocated once at a
*capacity* c: U (out × c), S (c × c), V (in_flat × c), plus its *active rank* r ≤ c. Only the leading
r columns of U and V and the leading r × r block of S are in use; the rest is kept exactly zero, so
U S Vᵀ over the whole capacity equals the active product. Parameter objects, shapes, dtypes and storages
never change while training: :class:`lrtrain.DLRT` writes every update in place and moves r. Changing c
is the explicit :meth:`FactorizedMixin.set_capacity` (new parameters: rebuild the optimizer).

Capacity rule (default): c = ``max_rank`` when given, else min(2·rank, min(out, in_flat)); ``max_rank``
(the largest rank the optimizer may choose) defaults to c and must be ≤ c. (``lrtrain.lowrank`` also caps
its default at :func:`dense_capacity`, the largest c allocating no more than the dense weight.)

Where r lives: a plain tensor attribute ``_rank_probe`` of shape (r, 0) made by :func:`rank_probe`,
mirrored in the int64 buffer ``active_rank`` that checkpoints carry. The forward passes
``probe.shape[0]`` to the autograd functions, so torch.compile sees r as a size. The probe's length is
marked *unbacked* (``torch._dynamo.decorators.mark_unbacked``, bounds [1, c]): dynamo traces r as a
symbol without guarding on its value, so one graph serves every rank and a rank change never
recompiles. (A plain dynamic size would not do: dynamo specializes sizes 0 and 1, and the shape checks
of copy/reshape add guards r ≠ 1 and r ≠ c, so ranks 1 and c would each compile a graph of their own.)

Gradient convention (DLRT): after ``backward()``, ``U.grad[:, :r]`` holds ∂L/∂K with K = U S (= G_W V),
``V.grad[:, :r]`` holds ∂L/∂L with L = V Sᵀ (= G_Wᵀ U) and ``S.grad[:r, :r]`` holds ∂L/∂S (= Uᵀ G_W V);
the inactive parts are zero. These are not ∂L/∂U and ∂L/∂V, so any torch optimizer other than
``lrtrain.DLRT`` refuses factor parameters (:mod:`lrtrain.optim.guard`).

Each current U, S, V is linked to its layer (:mod:`.links`), which is how DLRT, the optimizer guard and
the EMA find a layer from the parameters (or detached views) they are given, after DDP or FSDP2 wrapped
the model, in deep and EMA copies and after unpickling; there is no registry of layers.
"""
from __future__ import annotations

import math
import sys

import torch
from torch import nn

from .. import validation
from .links import link

__all__ = ["FactorizedMixin", "default_capacity", "dense_capacity", "rank_probe", "ROLES",
           "orthonormality_error", "orthonormality_tolerance", "ORTHONORMALITY_TOLERANCE"]

ROLES = ("U", "S", "V")


def default_capacity(rank: int, full: int, max_rank: int | None = None) -> int:
    """c = max_rank if given, else min(2·rank, full): room for the rank to double."""
    return int(max_rank) if max_rank is not None else min(2 * int(rank), full)


def dense_capacity(out_f: int, in_f: int) -> int:
    """The largest capacity c whose factors allocate no more than the dense weight: c(out + in) + c² <= out·in
    (0 when even c = 1 would not fit). Always below min(out, in)."""
    m, n = int(out_f), int(in_f)
    c = (math.isqrt((m + n) ** 2 + 4 * m * n) - (m + n)) // 2  # the positive root of c² + (m + n) c - m n
    while (c + 1) * (m + n) + (c + 1) ** 2 <= m * n:
        c += 1
    while c > 0 and c * (m + n) + c * c > m * n:
        c -= 1
    return c


# Largest ‖U_rᵀU_r − I‖_max (and the same for V) a checkpoint's factors may have, by the precision their
# values carry (see orthonormality_tolerance). Measured on the digits MLP over 3,000 DLRT steps with rank
# changes: float64 1e-15, float32 5e-7, float16 4e-4, bfloat16 3e-3 (low-precision parameters are their fp32
# masters rounded); orthonormal float64 factors merely rounded to the dtype: float32 2e-8, float16 2.4e-4,
# bfloat16 1.2e-3. Each bound leaves a margin of 15x or more over the worst of these.
ORTHONORMALITY_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def orthonormality_tolerance(t: torch.Tensor) -> float:
    """The bound on ‖XᵀX − I‖_max for the factor ``t`` by the precision its values carry: that of the least
    precise of bfloat16, float16, float32 and ``t.dtype`` that represents every value of ``t`` exactly. A
    float32 checkpoint of a layer trained in bfloat16 and cast up is judged as bfloat16, a float64 one of a
    float32 layer as float32; otherwise by its own dtype (one that is not in the table: as float32)."""
    own = ORTHONORMALITY_TOLERANCE.get(t.dtype, ORTHONORMALITY_TOLERANCE[torch.float32])
    for low in (torch.bfloat16, torch.float16, torch.float32):
        tol = ORTHONORMALITY_TOLERANCE[low]
        if tol <= own:
            break
        if torch.equal(t.to(low).to(t.dtype), t):
            return tol
    return own


def orthonormality_error(X: torch.Tensor) -> float:
    """‖XᵀX − I‖_max of the columns of X (Gram matrix in float64; float32 where the device has no float64)."""
    if hasattr(X, "full_tensor"):  # a DTensor
        X = X.full_tensor()
    dt = torch.float32 if X.device.type == "mps" else torch.float64
    Y = X.detach().to(dt)
    G = Y.mT @ Y
    G.diagonal().sub_(1)
    return float(G.abs().max()) if G.numel() else 0.0


def rank_probe(r: int, capacity: int) -> torch.Tensor:
    """The empty tensor of shape (r, 0) whose length carries the active rank r ∈ [1, capacity],
    marked unbacked in that length for torch.compile (see the module doc)."""
    import torch._dynamo  # lazy: ~1 s to import (torch.optim's step imports it anyway)

    probe = torch.empty(int(r), 0)
    try:
        torch._dynamo.decorators.mark_unbacked(probe, 0, min=1, max=int(capacity))
    except TypeError:  # older torch: no bounds argument; a backed dynamic size (ranks 1, c may recompile)
        torch._dynamo.maybe_mark_dynamic(probe, 0)
    return probe


def _outer_strict() -> bool | None:
    """The ``strict`` argument of the ``nn.Module.load_state_dict`` call now running (found on the stack);
    None if there is none. torch passes ``strict=True`` to every ``_load_from_state_dict`` whatever the
    caller asked for, and only applies the caller's value to missing / unexpected keys at the very end."""
    code = nn.Module.load_state_dict.__code__
    f = sys._getframe(1)
    while f is not None:
        if f.f_code is code:
            return bool(f.f_locals.get("strict", True))
        f = f.f_back
    return None


class FactorizedMixin:
    """Shared state and behaviour of LowRankLinear / LowRankConv2d (W viewed as out × in_flat)."""

    U: nn.Parameter
    S: nn.Parameter
    V: nn.Parameter

    def _init_factors(self, out_f: int, in_f: int, rank: int, max_rank: int | None, capacity: int | None,
                      device=None, dtype=None) -> None:
        full = min(out_f, in_f)
        validation.integer("rank", rank, 1, full)
        if capacity is None:
            given = None if max_rank is None else validation.integer("max_rank", max_rank, rank, full)
            capacity = default_capacity(rank, full, given)
        validation.integer("capacity", capacity, rank, full)
        max_rank = capacity if max_rank is None else validation.integer("max_rank", max_rank, rank, capacity)
        dt = torch.get_default_dtype() if dtype is None else dtype
        # drawn in float32 for a low-precision layer (no QR of bfloat16 / float16 on CPU), then rounded
        kw = dict(device=device, dtype=dt if dt in (torch.float32, torch.float64) else torch.float32)
        U = torch.linalg.qr(torch.randn(out_f, rank, **kw))[0]
        V = torch.linalg.qr(torch.randn(in_f, rank, **kw))[0]
        # ‖W‖_F² = r s² = out/3: the same expected energy as nn.Linear's U(-1/√in, 1/√in) init.
        S = torch.eye(rank, **kw) * math.sqrt(out_f / (3.0 * rank))
        self._allocate(out_f, in_f, capacity, device, dtype)
        self._max_rank = max_rank
        with torch.no_grad():
            self.write_factors(U, S, V)

    def _allocate(self, out_f: int, in_f: int, capacity: int, device, dtype) -> None:
        kw = dict(device=device, dtype=dtype)
        self.U = nn.Parameter(torch.zeros(out_f, capacity, **kw))
        self.S = nn.Parameter(torch.zeros(capacity, capacity, **kw))
        self.V = nn.Parameter(torch.zeros(in_f, capacity, **kw))
        if "active_rank" not in self._buffers:
            self.register_buffer("active_rank", torch.zeros((), dtype=torch.int64, device=device))
        self._rank_probe = rank_probe(1, capacity)

    def _init_bias(self, enabled: bool, out_f: int, fan_in: int, device=None, dtype=None) -> None:
        """Bias ~ U(-1/√fan_in, 1/√fan_in) as in nn.Linear / nn.Conv2d."""
        if not enabled:
            self.register_parameter("bias", None)
            return
        bound = 1.0 / math.sqrt(fan_in)
        self.bias = nn.Parameter(torch.empty(out_f, device=device, dtype=dtype).uniform_(-bound, bound))

    # ------------------------------------------------------------------ links to the factors (see .links)
    def _link_factors(self) -> None:
        """Link the current U, S and V to this layer."""
        for role in ROLES:
            p = self._parameters.get(role)
            if p is not None:
                link(p, self, role)

    def __setattr__(self, name, value):
        # Every assignment of a factor links it. (FSDP2's fully_shard assigns its sharded parameters through
        # setattr on a module that defines __setattr__; on one that does not, it writes _parameters directly.)
        super().__setattr__(name, value)
        if name in ROLES and isinstance(value, nn.Parameter):
            link(value, self, name)

    def _apply(self, fn, recurse=True):
        # .to(), .double(), ...: the factors may be new Parameter objects, or have their contents (and
        # attributes) swapped under torch.__future__.set_swap_module_params_on_conversion.
        out = super()._apply(fn, recurse)
        self._link_factors()
        return out

    def __setstate__(self, state):  # deepcopy / unpickling: the copy's factors are linked to the copy
        super().__setstate__(state)
        self._link_factors()

    # ------------------------------------------------------------------ rank and capacity
    @property
    def rank(self) -> int:
        """Active rank r."""
        return self._rank_probe.shape[0]

    @property
    def capacity(self) -> int:
        """c: the allocated width of U and V (the side of S)."""
        return self.S.shape[0]

    @property
    def max_rank(self) -> int:
        """The largest rank DLRT may give this layer (≤ capacity)."""
        return self._max_rank

    @max_rank.setter
    def max_rank(self, value: int) -> None:
        self._max_rank = validation.integer("max_rank", value, 1, self.capacity)

    def _set_rank(self, r: int) -> None:
        self._rank_probe = rank_probe(r, self.capacity)
        self.active_rank.fill_(int(r))

    def factors(self):
        """Active factors (views): U (out, r), S (r, r), V (in_flat, r)."""
        r = self.rank
        return self.U[:, :r], self.S[:r, :r], self.V[:, :r]

    @torch.no_grad()
    def write_factors(self, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> None:
        """Set the active factors in place (rank k = U.shape[1] ≤ capacity); the rest becomes zero."""
        k = U.shape[1]
        if not (1 <= k <= self.capacity and S.shape == (k, k) and V.shape[1] == k):
            raise ValueError(f"write_factors: need U (out, k), S (k, k), V (in, k) with 1 <= k <= capacity "
                             f"= {self.capacity}; got {tuple(U.shape)}, {tuple(S.shape)}, {tuple(V.shape)}")
        for p, new in ((self.U, U), (self.V, V)):
            p[:, :k].copy_(new)
            p[:, k:].zero_()
        self.S.zero_()
        self.S[:k, :k].copy_(S)
        self._set_rank(k)

    def set_capacity(self, capacity: int, max_rank: int | None = None) -> None:
        """Reallocate U, S, V at ``capacity`` (new Parameter objects: build the optimizer again).

        A capacity below the active rank keeps the best rank-``capacity`` approximation (SVD of S).
        The old parameters are marked retired: an optimizer still holding them refuses to step.
        """
        full = min(self.U.shape[0], self.V.shape[0])
        validation.integer("capacity", capacity, 1, full)
        max_rank = capacity if max_rank is None else validation.integer("max_rank", max_rank, 1, capacity)
        U, S, V = (t.detach().clone() for t in self.factors())
        if capacity < U.shape[1]:
            P, sig, Qt = torch.linalg.svd(S.double())
            U, V = U @ P[:, :capacity].to(U.dtype), V @ Qt[:capacity].mT.to(V.dtype)
            S = torch.diag(sig[:capacity]).to(S.dtype)
        for p in (self.U, self.S, self.V):
            p._lrtrain_retired = True
        self._allocate(self.U.shape[0], self.V.shape[0], capacity, self.U.device, self.U.dtype)
        self._max_rank = max_rank
        self.write_factors(U, S, V)

    # ------------------------------------------------------------------ dense views
    def dense_weight(self) -> torch.Tensor:
        """W = U S Vᵀ, shape (out, in_flat), materialized: O(out·in_flat·r) time, O(out·in_flat) memory.

        Differentiable with DLRT's gradient convention (G_W maps to G_K = G_W V, G_L = G_Wᵀ U,
        G_S = Uᵀ G_W V), so a module that computes with ``.weight`` trains this layer correctly.
        """
        from .autograd import DenseWeightFunction

        return DenseWeightFunction.apply(self.U, self.S, self.V, self.rank)

    def num_parameters_dense(self) -> int:
        """Parameters of the equivalent dense layer."""
        return self.U.shape[0] * self.V.shape[0] + (0 if self.bias is None else self.bias.numel())

    def num_parameters_active(self) -> int:
        """Parameters in use at the active rank: r (out + in_flat + r) + bias."""
        r = self.rank
        return r * (self.U.shape[0] + self.V.shape[0] + r) + (0 if self.bias is None else self.bias.numel())

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._reconcile_rank()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    @torch.no_grad()
    def _reconcile_rank(self) -> None:
        """Make ``active_rank`` and the probe agree before a save. Both are set together by the layer, but the
        buffer can be overwritten from outside: ``torch.optim.swa_utils.AveragedModel`` copies the source
        model's buffers into the average after every update (the average's own rank is the probe's), and its
        first update copies the model's factors (whose rank is then the buffer's). Of two different values
        the smaller is the rank when the factors are zero past it, else the larger; a buffer outside
        [1, capacity] yields to the probe."""
        buf = self.active_rank
        if buf.is_meta:
            return
        saved, r = int(buf), self.rank
        if saved == r:
            return
        if not 1 <= saved <= self.capacity:
            self._set_rank(r)
            return
        lo = min(saved, r)
        U, S, V = (t.full_tensor() if hasattr(t, "full_tensor") else t for t in (self.U, self.S, self.V))
        zero = not (U[:, lo:].any() or V[:, lo:].any() or S[lo:].any() or S[:, lo:].any())
        self._set_rank(lo if zero else max(saved, r))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """Validate every entry of this layer first; copy nothing unless all of them are acceptable.

        torch's ``Module.load_state_dict`` copies parameter by parameter and raises only at the end, so a
        bad V (or a missing bias, or an unexpected key under ``strict``) would leave U and S already
        overwritten. Here the layer's entries are checked before any copy: U (out, c), S (c, c), V (in_flat, c)
        with c this layer's capacity, a bias of shape (out,), ``active_rank`` an integer r with
        1 <= r <= capacity (r above ``max_rank`` is accepted: max_rank is configuration, not state, and DLRT
        truncates to it at its next step), finite factors, and U, S, V exactly zero outside the leading r
        columns / r × r block (the layer's invariant), and orthonormal active columns of U and V:
        ‖U_rᵀU_r − I‖_max and ‖V_rᵀV_r − I‖_max within :func:`orthonormality_tolerance` (1e-4 for float32
        values, 5e-2 for bfloat16 ones; S is unconstrained). Any problem is reported as torch reports it
        (``error_msgs`` -> RuntimeError "Error(s) in loading state_dict ..."; missing / unexpected keys under
        ``strict``) and this layer is left unchanged. (torch hands ``strict=True`` to every
        ``_load_from_state_dict``; the caller's ``strict`` is read from the running ``Module.load_state_dict``
        call. Called some other way, missing / unexpected keys are left to the caller as torch does.) Atomicity is per layer: torch loads module by module,
        so a failure in another module of the model does not undo this layer's (valid) load.
        """
        local = {name: t for name, t in self._parameters.items() if t is not None}
        local.update({name: t for name, t in self._buffers.items()
                      if t is not None and name not in self._non_persistent_buffers_set})
        extra = prefix + "_extra_state"
        missing = [prefix + name for name in local if prefix + name not in state_dict]
        unexpected = [k for k in state_dict if k.startswith(prefix) and k != extra
                      and k[len(prefix):].split(".", 1)[0] not in local]
        if (missing or unexpected) and _outer_strict():
            missing_keys.extend(missing)
            unexpected_keys.extend(unexpected)
            return  # torch raises "Missing key(s)" / "Unexpected key(s)"; nothing copied here
        errors = []
        given = {}
        for name, t in local.items():
            key = prefix + name
            if key not in state_dict:
                continue
            v = state_dict[key]
            if not torch.overrides.is_tensor_like(v):
                errors.append(f'While copying the parameter named "{key}", expected torch.Tensor or Tensor-like '
                              f"object from checkpoint but received {type(v)}")
                continue
            if t.dim() == 0 and v.dim() == 1 and v.numel() == 1:  # torch's backward-compat rule for 0-dim
                v = v[0]
            if v.shape != t.shape:
                errors.append(f"size mismatch for {key}: copying a param with shape {v.shape} from checkpoint, the "
                              f"shape in current model is {t.shape} (out = {self.U.shape[0]}, in_flat = "
                              f"{self.V.shape[0]}, capacity = {self.capacity})")
                continue
            given[name] = v
        r = self.rank
        if "active_rank" in given:
            v = given["active_rank"]
            if v.is_meta:
                pass
            elif v.dtype == torch.bool or v.is_complex() or (v.is_floating_point() and not float(v) == round(float(v))):
                errors.append(f"{prefix}active_rank: must be an integer, got {v!r}")
            else:
                r = int(v)
                if not 1 <= r <= self.capacity:
                    errors.append(f"{prefix}active_rank: rank {r} outside [1, capacity = {self.capacity}] of this layer")
        if not errors:
            for role in ROLES:
                t = given.get(role, getattr(self, role))
                if t.is_meta:
                    continue
                if role in given and not bool(torch.isfinite(t).all()):
                    errors.append(f"{prefix}{role}: the factor holds non-finite values (NaN or inf)")
                    continue
                rest = t[:, r:] if role != "S" else torch.cat([t[r:].flatten(), t[:r, r:].flatten()])
                src = "checkpoint" if role in given else "current layer"
                if rest.numel() and bool(rest.ne(0).any()):
                    errors.append(f"{prefix}{role}: nonzero entries outside the active rank r = {r} ({src}); "
                                  f"a factor must be zero beyond its leading r columns (S: its r × r block)")
                    continue
                if role != "S" and (role in given or r != self.rank):
                    err, tol = orthonormality_error(t[:, :r]), orthonormality_tolerance(t)
                    if not err <= tol:
                        errors.append(f"{prefix}{role}: the active columns are not orthonormal ({src}): "
                                      f"max |{role}_rᵀ{role}_r - I| = {err:.3g} > {tol:g} (the tolerance for the "
                                      f"precision of its values) at rank r = {r}; a corrupt checkpoint?")
        if errors:
            error_msgs.extend(errors)
            return
        n_err = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if len(error_msgs) == n_err:
            self._rank_probe = rank_probe(int(self.active_rank), self.capacity)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, capacity={self.capacity}, max_rank={self.max_rank}, bias={self.bias is not None}"
