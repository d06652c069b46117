"""``update_layers``: the DLRT layer update of a param group on the fused backends.

Same contract as :func:`lrtrain.update.spec.reference_update_layers` (that function is the spec):
items are grouped by (backend, m, n, dtype, device, raw augment setting, spare) -- plus the rank r where the
backend stacks the layers (CUDA, the CPU's batched schedule); the default CPU schedule runs each layer on
its own thread, so layers of any r fuse -- and each group is one call into the compiled module, which
runs project → orthonormalize → assemble → SVD → rank choice → rotate for all of its layers with the
ranks decided on the device, and returns padded results without synchronizing. Once every group is
launched, the ranks and per-layer statuses of all groups of a device come to the host in one copy, and
each layer's results are cut to its rank. Inputs may be strided views (column slices of larger
buffers). A layer whose status is not OK (non-finite core or result, a Jacobi SVD that did not
converge, a Cholesky that failed) is recomputed by the reference update, so those rare cases behave
exactly as the reference does. Layers a backend does not take (dtypes other than float32 /
float64) use the reference. For the backends in :data:`SELF_CHECK` (CUDA), ``"auto"`` trusts a group key
only after its first fused call agreed with the reference on the same input (:func:`agreement`); a key that
disagrees is warned about once and runs the reference from then on.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .backends import BACKENDS, NAMES, UpdateArgs, available, load_errors, module, native_args
from .constants import AUGMENT_ALL
from .budget import budget_update_layers
from .spec import LAYER_INPUTS, LayerResult, LayerStep, reference_update

__all__ = ["FusedResult", "update_layers", "run_group", "launch_group", "finish_group", "finite_flags", "check_backend",
           "agreement", "CPU_OPTIONS", "MIN_CPU_GROUP", "SELF_CHECK", "SELF_CHECK_TOL"]

_DTYPES = (torch.float32, torch.float64)


@dataclass
class FusedResult(LayerResult):
    """A :class:`LayerResult` from a compiled backend; ``finite`` (S is finite) came with the ranks."""

    finite: bool = True


def check_backend(backend: str) -> str:
    """Validate a ``backend`` name; a compiled one must be active here. Returns it."""
    if backend not in NAMES:
        raise ValueError(f"backend must be one of {list(NAMES)}, got {backend!r}")
    if backend in BACKENDS and not available()[backend]:
        why = load_errors().get(backend, "or LRTRAIN_DISABLE_EXT=1")
        raise ValueError(f"backend={backend!r} is not active here (lrtrain.update.available() = {available()}; "
                         f"{why}); use 'auto' or 'reference'")
    return backend


def _route(item: LayerStep, backend: str):
    """Backend name for one item, or None for the reference."""
    if backend == "reference":
        return None
    if item.importance is not None:  # the compiled modules keep a prefix of the singular directions only
        if backend in BACKENDS:
            raise ValueError(f"backend={backend!r} runs the 'tolerance' rank rule only; the 'importance' rule runs "
                             "on the reference (backend='auto' or 'reference'), or pass rank_rule='tolerance'")
        return None
    t = (item.U, item.S_decayed, item.V, item.G_K, item.G_L, item.D_K, item.D_L, item.D_S)
    dev = item.U.device
    name = "cuda" if dev.type == "cuda" else "cpu" if dev.type == "cpu" else None
    if backend in BACKENDS and name != backend:
        raise ValueError(f"backend={backend!r} cannot update a layer on {dev}")
    if name is None or not available()[name]:
        return None
    if item.U.dtype not in _DTYPES or any(x.dtype != item.U.dtype or x.device != dev for x in t):
        return None
    return name


def _augment(item: LayerStep) -> int:
    """The raw augment setting for the compiled modules: AUGMENT_ALL for None (r new columns per side), else
    the cap (the module takes min(r, augment) per layer, so layers of different r can share a call)."""
    return AUGMENT_ALL if item.augment is None else max(0, int(item.augment))


# CPU schedule: "svd" is "lapack" (gesdd through ATen: measured faster on CPU, see
# benchmarks/results/kernels.md) or "jacobi" (the kernel body the CUDA backend runs); "batched" runs the
# CUDA backend's all-layers-at-once schedule instead of OpenMP over layers. The tests cover all four.
CPU_OPTIONS = {"svd": "lapack", "batched": False}
# "auto" sends a CPU group of fewer layers than this to the reference: the CPU backend's speed comes from running
# layers in parallel, and a lone 1024×1024 rank-64 layer measured 16.8 ms fused vs 9.5 ms reference (2 threads),
# while 2 such layers took 8.0 ms fused vs 18.0 ms reference (python benchmarks/kernels_report.py has the 12-layer case).
MIN_CPU_GROUP = 2


# Backends that ``"auto"`` uses for a group key (shape, dtype, device, augment, spare) only after a first-use
# self-check of the fused update against the reference on that call's input has passed (CUDA: the kernels
# that CI cannot run). A key that fails is warned about once and runs the reference from then on.
SELF_CHECK = {"cuda"}
_verdicts: dict = {}  # group key -> True (fused agrees) / False (reference from now on)


def _batched(name: str, options: dict) -> bool:
    """Whether backend ``name`` stacks a group's layers (then they must share r): CUDA always, CPU on request."""
    return name == "cuda" or bool({**CPU_OPTIONS, **options}.get("batched", False))


def _group_key(name: str, item: LayerStep, batched: bool) -> tuple:
    """Layers of one key go into one call: same (m, n), dtype, device, raw augment setting and spare; the rank r
    joins the key only where the call stacks the layers (CPU layers of any r fuse)."""
    key = (name, item.U.shape[0], item.V.shape[0], item.U.dtype, item.U.device, _augment(item), int(item.spare))
    return key + (item.U.shape[1],) if batched else key


def launch_group(name: str, group: list[LayerStep], lr: float, tau: float, min_rank: int, **options):
    """Start one fused call for ``group`` on backend ``name`` without waiting for it.

    Returns (outs, rank, status): per layer [U, S, V, R_U, R_V] padded to a width >= its rank, and the
    (L,) int32 rank and status tensors, on the group's device (CPU: already final). ``options`` override
    :data:`CPU_OPTIONS` on the CPU backend.
    """
    mod = module(name)
    if mod is None:
        raise ValueError(f"backend {name!r} is not active here ({available()})")
    inputs = [[getattr(it, f) for f in LAYER_INPUTS] for it in group]
    args = native_args(mod, UpdateArgs(max_rank=[int(it.max_rank) for it in group], augment=_augment(group[0]),
                                       lr=float(lr), tau=float(tau), min_rank=int(min_rank), spare=int(group[0].spare)))
    if name == "cuda":
        dev = group[0].U.device
        with torch.cuda.device(dev):
            return mod.update_group(inputs, args, torch.cuda.current_stream(dev).cuda_stream)
    return mod.update_group(inputs, args, **{**CPU_OPTIONS, **options})


def _cut(x: torch.Tensor, k: int, rows: bool = False) -> torch.Tensor:
    """x[:, :k] (and x[:k] when rows), or x itself when it already has that width."""
    if x.shape[-1] != k:
        x = x[..., :k]
    if rows and x.shape[0] != k:
        x = x[:k]
    return x


def finish_group(group: list[LayerStep], outs, ranks: list[int], statuses: list[int], lr: float, tau: float,
                 min_rank: int) -> list[LayerResult]:
    """Results of a launched group from its ranks and statuses on the host: each layer's outputs cut to its
    rank; a layer whose status is not OK is recomputed by :func:`reference_update`."""
    res = []
    for item, (U, S, V, R_U, R_V), k, st in zip(group, outs, ranks, statuses):
        if st != 0:
            res.append(reference_update(item, lr, tau, min_rank))
        else:
            res.append(FusedResult(_cut(U, k), _cut(S, k, rows=True), _cut(V, k), _cut(R_U, k), _cut(R_V, k),
                                   finite=True))
    return res


def run_group(name: str, group: list[LayerStep], lr: float, tau: float, min_rank: int, **options) -> list[LayerResult]:
    """One fused call for ``group`` (same (m, n), dtype, device, augment setting; same r where the backend
    stacks the layers) on backend ``name``, finished at once (one host sync on a device).

    Layers whose status is not OK are recomputed by :func:`reference_update`. ``options`` override
    :data:`CPU_OPTIONS` on the CPU backend.
    """
    outs, rank, status = launch_group(name, group, lr, tau, min_rank, **options)
    info = torch.cat([rank, status]).tolist()
    L = len(group)
    return finish_group(group, outs, info[:L], info[L:], lr, tau, min_rank)


def update_layers(items: list[LayerStep], lr: float, tau: float, min_rank: int, backend: str = "auto",
                  budget: int | None = None) -> list[LayerResult]:
    """One param group's layer updates; ``backend`` is 'auto', 'reference', 'cpu' or 'cuda'.

    Every fused group is launched first; then the ranks and statuses of all groups of a device come to the
    host in one copy (the step's only synchronization there), and each layer's results are cut to its rank.
    ``budget`` (active parameters, with the importance rule): the layers' ranks are allocated jointly
    (:mod:`.budget`, on the reference).
    """
    check_backend(backend)
    if budget is not None:
        for item in items:
            if item.importance is None:
                raise ValueError("a parameter budget needs the importance rule's scores (rank_rule='importance')")
            _route(item, backend)  # an explicitly fused backend refuses
        return budget_update_layers(items, lr, tau, min_rank, budget)
    results: list = [None] * len(items)
    groups: dict = {}
    for i, item in enumerate(items):
        name = _route(item, backend)
        if name is None:
            results[i] = reference_update(item, lr, tau, min_rank)
            continue
        groups.setdefault(_group_key(name, item, _batched(name, {})), []).append(i)
    launched = []  # (key, indices, outs, rank, status)
    for key, idx in groups.items():
        if backend == "auto" and ((key[0] == "cpu" and len(idx) < MIN_CPU_GROUP) or _verdicts.get(key) is False):
            for i in idx:
                results[i] = reference_update(items[i], lr, tau, min_rank)
            continue
        launched.append((key, idx, *launch_group(key[0], [items[i] for i in idx], lr, tau, min_rank)))
    by_device: dict = {}
    for g in launched:
        by_device.setdefault(g[3].device, []).append(g)
    for gs in by_device.values():
        info = torch.cat([t for g in gs for t in (g[3], g[4])]).tolist()  # one device→host copy
        pos = 0
        for key, idx, outs, rank, status in gs:
            L = len(idx)
            ranks, statuses = info[pos:pos + L], info[pos + L:pos + 2 * L]
            pos += 2 * L
            group = [items[i] for i in idx]
            res = finish_group(group, outs, ranks, statuses, lr, tau, min_rank)
            if backend == "auto" and key[0] in SELF_CHECK and key not in _verdicts:
                res = _self_check(key, group, res, lr, tau, min_rank)
            for i, r in zip(idx, res):
                results[i] = r
    return results


def agreement(fused: LayerResult, ref: LayerResult) -> float:
    """Relative distance ‖W_f − W_r‖_F / ‖W_r‖_F of two updates' weights W = U S Vᵀ (inf for different ranks),
    in O((m + n) k²) from the factors: ‖W_f − W_r‖² = ‖S_f‖² + ‖S_r‖² − 2 tr(S_fᵀ (U_fᵀU_r) S_r (V_rᵀV_f))
    (U, V orthonormal)."""
    if fused.S.shape != ref.S.shape:
        return float("inf")
    Sf, Sr = fused.S.double(), ref.S.double()
    cross = torch.trace(Sf.mT @ (fused.U.double().mT @ ref.U.double()) @ Sr @ (ref.V.double().mT @ fused.V.double()))
    d2 = Sf.square().sum() + Sr.square().sum() - 2 * cross
    return float(d2.clamp_min(0).sqrt() / Sr.square().sum().sqrt().clamp_min(torch.finfo(torch.float64).tiny))


# Largest agreement() a first-use self-check accepts, by dtype (rounding of the two paths plus their SVDs).
SELF_CHECK_TOL = {torch.float32: 1e-3, torch.float64: 1e-9}


def _self_check(key: tuple, group: list, fused: list, lr: float, tau: float, min_rank: int) -> list:
    """The first fused call of ``key``: compare with the reference on the same input; keep the verdict. Returns
    the results to use (the reference's where the check fails)."""
    ref = [reference_update(item, lr, tau, min_rank) for item in group]
    pairs = [(f, r) for f, r in zip(fused, ref) if bool(torch.isfinite(r.S).all())]
    if not pairs:  # a step that overflows is skipped either way: no verdict from it
        return ref
    worst = max(agreement(f, r) for f, r in pairs)
    _verdicts[key] = ok = worst <= SELF_CHECK_TOL[group[0].U.dtype]
    if ok:
        return fused
    name, m, n, dtype = key[0], key[1], key[2], key[3]
    warnings.warn(f"lrtrain: the fused {name} update of {m}x{n} {dtype} layers disagreed with the reference on its "
                  f"first use (relative difference {worst:.3g}); using the reference update for them", RuntimeWarning)
    return ref


def finite_flags(results: list[LayerResult]) -> list[bool]:
    """Whether each result's S is finite: fused results already know; the others cost one sync per device."""
    flags = [r.finite if isinstance(r, FusedResult) else None for r in results]
    by_device: dict = {}
    for i, f in enumerate(flags):
        if f is None:
            by_device.setdefault(results[i].S.device, []).append(i)
    for idx in by_device.values():
        ok = torch.stack([torch.isfinite(results[i].S).all() for i in idx]).tolist()
        for i, v in zip(idx, ok):
            flags[i] = bool(v)
    return flags
