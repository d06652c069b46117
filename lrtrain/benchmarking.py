"""Measurements behind ``lrtrain bench`` and the pytest-benchmark suite in ``benchmarks/``.

Everything that builds a benchmark case or measures it lives here, so the console command (quick
sweep + markdown report + plots) and ``pytest benchmarks/ --benchmark-only`` run the same code:

* **layers** -- forward + backward of ``nn.Linear`` vs :class:`~lrtrain.LowRankLinear` (square,
  ranks 32..512) and of a VGG-like block of two 3×3 convolutions vs its :class:`~lrtrain.LowRankConv2d`
  version. The FLOP-ideal speedup of a rank-r linear layer is ``mn / (r(m+n) + r²)``
  (:func:`flop_ideal_speedup`; it is exactly the ratio of the matmul FLOPs of both forward+backward
  passes, which :func:`count_flops` checks); for the conv block it is the counted FLOP ratio.
* **optimizer step** -- one training step (forward + backward + ``opt.step``) and the optimizer step
  alone, on the same MLP at the same rank, for dense AdamW, GaLoreAdamW (``galore-torch``) and
  lrtrain's DLRT (reference update, and each fused backend when one is compiled). GaLore recomputes
  an SVD of the full gradient every ``update_proj_gap`` steps: its steady step, its refresh step and
  the amortized step ``steady + (refresh - steady) / gap`` are all reported.
* **end to end** -- the MLP trained for a fixed number of epochs with each method: training-loop wall
  time, test accuracy, parameters, ranks, and peak training memory.

Timing: :func:`measure` runs a callable in this process with ``torch.get_num_threads()`` threads
(never changed here) and returns the median (and min, IQR) of per-call wall times after warm-up calls.

Peak training memory: tracemalloc does not see torch's allocator, and this build has no CPU allocator
statistics, so :class:`TensorMemoryTracker` counts tensor storages itself: a ``TorchDispatchMode``
records the bytes of every storage an aten op creates (or resizes) during one training step, plus the
storages alive when the step starts (parameters, optimizer state, the batch), and a weak reference on
each storage subtracts its bytes when it is freed. The peak of that running sum is the peak of live
tensor memory of the step: parameters + gradients + optimizer state + saved activations + temporaries.
Not counted: workspaces allocated inside a kernel (e.g. LAPACK's), allocator overhead and Python
objects. :func:`profile_step_memory` also reports the parts (parameters, gradients, optimizer state,
activations saved for backward via ``torch.autograd.graph.saved_tensors_hooks``).
"""
from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import inspect
import json
import math
import os
import platform
import statistics
import time
import weakref
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

from .convert import lowrank
from .data import Dataset
from .models import mlp
from .optim import DLRT
from .train import evaluate, fit
from .train import ranks as layer_ranks

__all__ = [
    "machine_info", "env_ints", "flop_ideal_speedup", "count_flops", "Timing", "measure",
    "LayerCase", "linear_case", "conv_block_case", "layer_sweep", "conv_sweep",
    "galore_status", "Method", "available_methods", "StepCase", "step_case", "optimizer_sweep",
    "TensorMemoryTracker", "MemoryProfile", "profile_step_memory", "E2EResult", "EndToEndRun",
    "run_end_to_end", "run_end_to_end_interleaved",
    "BenchConfig", "BenchResults", "run_bench", "target_checks", "write_report", "make_plots",
]

MIB = 2.0 ** 20


# ====================================================================== machine and formulas
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info() -> dict:
    """What the report states about the machine: CPU model, cores, threads, torch, device, date."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count()
    try:
        from . import ext

        backends = _active_backends(ext)
    except Exception:  # pragma: no cover - the ext package is another engineer's; never fail the report
        backends = []
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": affinity,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": "cuda: " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no GPU)",
        "python": platform.python_version(),
        "lrtrain": _lrtrain_version(),
        "galore_torch": galore_status()[1] if galore_status()[0] else "not installed",
        "fused_backends": backends,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg": [round(x, 2) for x in load],
    }


def _lrtrain_version() -> str:
    from . import __version__

    return __version__


def env_ints(name: str, default: str) -> tuple:
    """Comma-separated ints from environment variable ``name`` (``default`` when unset): suite sizes."""
    return tuple(int(v) for v in os.environ.get(name, default).split(",") if v.strip())


def flop_ideal_speedup(m: int, n: int, r: int) -> float:
    """FLOP-ideal speedup of a rank-r m×n layer over the dense one: mn / (r(m+n) + r²).

    Forward + backward of a dense layer on B rows costs 6·B·mn FLOPs (3 matmuls); the factorized
    layer (x V, then S, then U; and the 6 backward products of :mod:`lrtrain.layers.autograd`) costs
    6·B·(r(m+n) + r²).
    """
    if min(m, n, r) < 1:
        raise ValueError(f"m, n, r must be >= 1, got {(m, n, r)}")
    return m * n / (r * (m + n) + r * r)


def count_flops(fn) -> int:
    """FLOPs of the matmuls/convolutions ``fn()`` runs (forward and backward), by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# ====================================================================== timing
@dataclass
class Timing:
    median: float  # seconds per call
    min: float
    iqr: float
    runs: int


def measure(fn, setup=None, min_time: float = 0.5, min_runs: int = 3, max_runs: int = 10_000,
            warmup: int = 1) -> Timing:
    """Per-call wall time of ``fn()`` (median, min, IQR) in this process, ``torch.get_num_threads()`` threads.

    ``setup()`` runs before each call, outside the timed region (e.g. forward + backward before an
    optimizer step). Runs until ``min_time`` seconds of timed calls and at least ``min_runs`` calls.
    """
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    return _timing(_timed_calls(fn, setup, min_time, min_runs, max_runs))


def _timed_calls(fn, setup, min_time: float, min_runs: int, max_runs: int = 10_000) -> list[float]:
    times: list[float] = []
    total = 0.0
    while (total < min_time or len(times) < min_runs) and len(times) < max_runs:
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt)
        total += dt
    return times


def _timing(times: list[float]) -> Timing:
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return Timing(statistics.median(times), min(times), q[2] - q[0], len(times))


def measure_interleaved(calls: dict, min_time: float = 0.5, rounds: int = 3, warmup: int = 1) -> dict:
    """:func:`measure` for several callables at once, in ``rounds`` round-robin passes.

    ``calls``: name -> ``fn`` or ``(fn, setup)``. Each pass gives every callable ``min_time / rounds``
    seconds (at least one call), so a load change on a shared machine affects all of them alike and
    the ratios stay meaningful. Returns name -> :class:`Timing` over all passes.
    """
    norm = {k: v if isinstance(v, tuple) else (v, None) for k, v in calls.items()}
    for fn, setup in norm.values():
        for _ in range(warmup):
            if setup is not None:
                setup()
            fn()
    times: dict = {k: [] for k in norm}
    for _ in range(rounds):
        for k, (fn, setup) in norm.items():
            times[k] += _timed_calls(fn, setup, min_time / rounds, 1)
    return {k: _timing(v) for k, v in times.items()}


# ====================================================================== layer cases
class LayerCase:
    """Forward + backward of ``module`` on a fixed input (its gradient included, as inside a network).

    Calling the case runs one forward + backward; gradients are reset to None first, as
    ``zero_grad(set_to_none=True)`` does in training, so no accumulation is timed.
    """

    def __init__(self, module: nn.Module, x: torch.Tensor, label: str):
        self.module, self.label = module, label
        self.x = x.requires_grad_(True)
        with torch.no_grad():
            self.gy = torch.randn_like(module(self.x))
        self.params = list(module.parameters())

    def __call__(self) -> None:
        for p in self.params:
            p.grad = None
        self.x.grad = None
        self.module(self.x).backward(self.gy)

    def flops(self) -> int:
        return count_flops(self)


def linear_case(size: int, rank: int | None = None, batch: int = 512, seed: int = 0) -> LayerCase:
    """``nn.Linear(size, size)`` (rank None) or ``LowRankLinear(size, size, rank)`` on ``batch`` rows."""
    from .layers import LowRankLinear

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, size, generator=g)
    torch.manual_seed(seed)
    if rank is None:
        return LayerCase(nn.Linear(size, size), x, f"nn.Linear {size}x{size}")
    return LayerCase(LowRankLinear(size, size, rank), x, f"LowRankLinear {size}x{size} r={rank}")


def conv_block(channels=(128, 256, 256)) -> nn.Sequential:
    """VGG-like block: conv3x3(c0→c1) → ReLU → conv3x3(c1→c2) → ReLU (stride 1, padding 1)."""
    c0, c1, c2 = channels
    return nn.Sequential(nn.Conv2d(c0, c1, 3, padding=1), nn.ReLU(), nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU())


def conv_block_case(rank: int | None = None, channels=(128, 256, 256), hw: int = 16, batch: int = 8,
                    seed: int = 0) -> LayerCase:
    """The VGG-like block, dense (rank None) or with both convolutions factorized at ``rank``."""
    torch.manual_seed(seed)
    block = conv_block(channels)
    label = f"VGG block {channels[0]}-{channels[1]}-{channels[2]} @{hw}x{hw}"
    if rank is not None:
        block = lowrank(block, rank=rank)
        n_conv = sum(1 for m in block.modules() if type(m).__name__ == "LowRankConv2d")
        if n_conv != 2:
            raise ValueError(f"rank {rank}: only {n_conv} of 2 convolutions would be factorized")
        label += f" r={rank}"
    x = torch.randn(batch, channels[0], hw, hw, generator=torch.Generator().manual_seed(seed))
    return LayerCase(block, x, label)


def layer_sweep(sizes=(1024, 2048, 4096), ranks=(32, 64, 128, 256, 512), batch: int = 512,
                min_time: float = 0.5, log=print) -> list[dict]:
    """Dense vs factorized fwd+bwd for each square size and rank; one row per (size, rank)."""
    rows = []
    for n in sizes:
        rs = [r for r in ranks if r <= n]
        t_all = measure_interleaved({r: linear_case(n, r, batch) for r in [None] + rs}, min_time)
        dense = t_all[None]
        for r in rs:
            t = t_all[r]
            ideal = flop_ideal_speedup(n, n, r)
            row = dict(size=n, rank=r, batch=batch, dense_ms=dense.median * 1e3, lowrank_ms=t.median * 1e3,
                       dense_iqr_ms=dense.iqr * 1e3, lowrank_iqr_ms=t.iqr * 1e3,
                       speedup=dense.median / t.median, ideal=ideal)
            row["fraction_of_ideal"] = row["speedup"] / ideal
            rows.append(row)
            if log:
                log(f"  linear {n}x{n} r={r}: dense {row['dense_ms']:.2f} ms, low-rank {row['lowrank_ms']:.2f} ms, "
                    f"speedup {row['speedup']:.2f}x (ideal {ideal:.2f}x, {row['fraction_of_ideal']:.0%})")
    return rows


def conv_sweep(ranks=(32, 64, 128), channels=(128, 256, 256), hw: int = 16, batch: int = 8,
               min_time: float = 0.5, log=print) -> list[dict]:
    """Dense vs factorized VGG-like block fwd+bwd; the ideal is the counted FLOP ratio."""
    rows = []
    cases = {r: conv_block_case(r, channels, hw, batch) for r in [None] + list(ranks)}
    t_all = measure_interleaved(cases, min_time)
    dense, dense_flops = t_all[None], cases[None].flops()
    for r in ranks:
        case, t = cases[r], t_all[r]
        row = dict(block="-".join(map(str, channels)), hw=hw, batch=batch, rank=r, dense_ms=dense.median * 1e3,
                   lowrank_ms=t.median * 1e3, speedup=dense.median / t.median, ideal=dense_flops / case.flops())
        row["fraction_of_ideal"] = row["speedup"] / row["ideal"]
        rows.append(row)
        if log:
            log(f"  conv block r={r}: dense {row['dense_ms']:.2f} ms, low-rank {row['lowrank_ms']:.2f} ms, "
                f"speedup {row['speedup']:.2f}x (FLOP ratio {row['ideal']:.2f}x)")
    return rows


# ====================================================================== methods (optimizers)
_GALORE: tuple | None = None


def galore_status() -> tuple[bool, str]:
    """(True, version) when ``galore_torch.GaLoreAdamW`` imports, else (False, why)."""
    global _GALORE
    if _GALORE is None:
        try:
            from importlib.metadata import version

            from galore_torch import GaLoreAdamW  # noqa: F401  (imports transformers and bitsandbytes)

            _GALORE = (True, version("galore-torch"))
        except Exception as e:  # ImportError, or a broken transformers/bitsandbytes install
            _GALORE = (False, f"{type(e).__name__}: {e}")
    return _GALORE


def _active_backends(ext) -> list[str]:
    """Names of the compiled DLRT update backends that are active (``ext.available()`` maps name -> bool)."""
    avail = ext.available()
    return sorted(k for k, v in avail.items() if v) if isinstance(avail, dict) else sorted(avail)


def _dlrt_variants() -> list[tuple[str, str, dict, dict]]:
    """(key, label, extra DLRT kwargs, environment): the reference update, plus each active fused backend.

    With a ``backend`` keyword on DLRT the variants pass it. Without one (DLRT dispatches by itself),
    the reference variant sets ``LRTRAIN_DISABLE_EXT=1`` (read by :mod:`lrtrain.ext` at every call)
    while it runs, and the fused variant is DLRT's default dispatch.
    """
    from . import ext

    fused = [b for b in _active_backends(ext) if b == "cpu" or (b == "cuda" and torch.cuda.is_available())]
    if "backend" in inspect.signature(DLRT).parameters:
        out = [("lrtrain", "lrtrain DLRT (reference)", {"backend": "reference"}, {})]
        return out + [(f"lrtrain-{b}", f"lrtrain DLRT (fused {b})", {"backend": b}, {}) for b in fused]
    if not fused:
        return [("lrtrain", "lrtrain DLRT (reference)", {}, {})]
    return [("lrtrain", "lrtrain DLRT (reference)", {}, {"LRTRAIN_DISABLE_EXT": "1"})] + \
        [(f"lrtrain-{b}", f"lrtrain DLRT (fused {b})", {}, {}) for b in fused[:1]]


@contextlib.contextmanager
def _environ(overrides: dict):
    """Set environment variables for the duration of the block, then restore them."""
    if not overrides:
        yield
        return
    old = {k: os.environ.get(k) for k in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class Method:
    """How one contender builds its model and optimizer from a dense model."""

    key: str  # "dense", "galore", "lrtrain", "lrtrain-cpu", ...
    label: str
    dlrt_kwargs: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)  # environment while this method trains (see _dlrt_variants)

    def active(self):
        """Context in which this method's steps run."""
        return _environ(self.env)

    @property
    def is_lrtrain(self) -> bool:
        return self.key.startswith("lrtrain")

    def prepare(self, model: nn.Module, rank: int, fixed_rank: bool = False) -> nn.Module:
        """The model this method trains (factorized for lrtrain; ``fixed_rank`` caps ranks at ``rank``)."""
        if self.is_lrtrain:
            return lowrank(model, rank=rank, max_rank=rank if fixed_rank else None)
        return model

    def optimizer(self, model: nn.Module, lr: float, weight_decay: float, rank: int, tau: float,
                  galore_gap: int = 200, galore_scale: float = 0.25):
        if self.key == "dense":
            return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        if self.key == "galore":
            from galore_torch import GaLoreAdamW

            proj = galore_targets(model, rank)
            ids = {id(p) for p in proj}
            groups = [{"params": [p for p in model.parameters() if id(p) not in ids]},
                      {"params": proj, "rank": rank, "update_proj_gap": galore_gap, "scale": galore_scale,
                       "proj_type": "std"}]
            return GaLoreAdamW(groups, lr=lr, weight_decay=weight_decay, no_deprecation_warning=True)
        return DLRT(model.parameters(), lr=lr, base="adamw", weight_decay=weight_decay, tau=tau,
                    **self.dlrt_kwargs)


def galore_targets(model: nn.Module, rank: int, min_features: int = 16) -> list[nn.Parameter]:
    """The weights GaLore projects: those of the nn.Linear layers :func:`lrtrain.lowrank` factorizes
    at ``rank`` (min(out, in) >= ``min_features`` and r(out + in) + r² < out·in), so both methods
    compress the same layers."""
    out = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            o, i = m.weight.shape
            r = min(rank, o, i)
            if min(o, i) >= min_features and r * (o + i) + r * r < o * i:
                out.append(m.weight)
    return out


def available_methods(include_galore: bool = True) -> list[Method]:
    """dense AdamW, GaLoreAdamW (when galore-torch imports) and the DLRT variants available here."""
    out = [Method("dense", "dense AdamW")]
    if include_galore and galore_status()[0]:
        out.append(Method("galore", "GaLoreAdamW"))
    out += [Method(k, label, kw, env) for k, label, kw, env in _dlrt_variants()]
    return out


# ====================================================================== optimizer step cases
class StepCase:
    """One method's MLP, optimizer and a fixed batch: ``forward_backward``, ``step``, ``train_step``."""

    def __init__(self, method: Method, model: nn.Module, opt, x: torch.Tensor, y: torch.Tensor):
        self.method, self.model, self.opt, self.x, self.y = method, model, opt, x, y

    def forward_backward(self) -> None:
        F.cross_entropy(self.model(self.x), self.y).backward()

    def step(self) -> None:
        with self.method.active():
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def train_step(self) -> None:
        self.forward_backward()
        self.step()

    def force_refresh(self) -> None:
        """GaLore only: make the next step recompute every projector (an SVD of the full gradient), as
        it does every ``update_proj_gap`` steps (a projector with no matrix recomputes it)."""
        for st in self.opt.state.values():
            if "projector" in st:
                st["projector"].ortho_matrix = None

    def refresh_setup(self) -> None:
        self.forward_backward()
        self.force_refresh()


def step_case(method: Method, hidden=(2048, 2048, 2048), rank: int = 128, batch: int = 128,
              in_features: int = 784, classes: int = 10, lr: float = 1e-3, weight_decay: float = 5e-4,
              seed: int = 0, warm_steps: int = 2) -> StepCase:
    """The MLP ``in-hidden-classes`` for ``method`` at fixed rank ``rank`` (DLRT: max_rank = rank, τ = 0,
    so its rank stays ``rank``; GaLore: projection rank ``rank``), after ``warm_steps`` steps."""
    torch.manual_seed(seed)
    model = method.prepare(mlp(in_features, list(hidden), classes), rank, fixed_rank=True)
    opt = method.optimizer(model, lr, weight_decay, rank, tau=0.0)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_features, generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)
    case = StepCase(method, model, opt, x, y)
    for _ in range(warm_steps):
        case.train_step()
    return case


def optimizer_sweep(ranks=(64, 128), hidden=(2048, 2048, 2048), batch: int = 128, min_time: float = 1.0,
                    galore_gap: int = 200, methods: list[Method] | None = None, log=print) -> list[dict]:
    """Per rank and method: train step (fwd+bwd+step), optimizer step alone, GaLore refresh/amortized."""
    methods = available_methods() if methods is None else methods
    rows = []
    for r in ranks:
        cases = {m.key: step_case(m, hidden, r, batch) for m in methods}
        trains = measure_interleaved({k: c.train_step for k, c in cases.items()}, min_time)
        steps = measure_interleaved({k: (c.step, c.forward_backward) for k, c in cases.items()}, min_time / 2)
        for m in methods:
            case, train, step = cases[m.key], trains[m.key], steps[m.key]
            row = dict(rank=r, method=m.label, key=m.key, hidden="-".join(map(str, hidden)), batch=batch,
                       train_step_ms=train.median * 1e3, opt_step_ms=step.median * 1e3,
                       refresh_step_ms=None, amortized_train_step_ms=train.median * 1e3)
            if m.is_lrtrain:
                row["ranks"] = sorted(set(layer_ranks(case.model).values()))
            if m.key == "galore":
                refresh = measure(case.step, setup=case.refresh_setup, min_time=0.0, min_runs=3)
                row["refresh_step_ms"] = refresh.median * 1e3
                extra = max(refresh.median - step.median, 0.0)
                row["amortized_train_step_ms"] = (train.median + extra / galore_gap) * 1e3
                row["gap"] = galore_gap
            rows.append(row)
            if log:
                ref = f", refresh step {row['refresh_step_ms']:.1f} ms" if row["refresh_step_ms"] else ""
                log(f"  r={r} {m.label}: train step {row['train_step_ms']:.1f} ms "
                    f"(amortized {row['amortized_train_step_ms']:.1f}), optimizer step {row['opt_step_ms']:.1f} ms{ref}")
    return rows


# ====================================================================== memory
class TensorMemoryTracker(TorchDispatchMode):
    """Running sum and peak of the bytes of live tensor storages (see the module docstring).

    ``existing``: tensors alive before the tracked region (their storages count from the start and
    stop counting when freed). Storages are counted once however many tensors view them.
    """

    def __init__(self, existing=()):
        super().__init__()
        self._bytes: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}
        self.current = 0
        self.peak = 0
        for t in existing:
            self.track(t)

    def track(self, t) -> None:
        if not isinstance(t, torch.Tensor):
            return
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage
            return
        key, nb = id(st), st.nbytes()
        old = self._bytes.get(key)
        if old is None:
            self._refs[key] = weakref.ref(st, partial(self._freed, key))
            self._bytes[key] = nb
            self.current += nb
        elif old != nb:  # resized in place
            self._bytes[key] = nb
            self.current += nb - old
        if self.current > self.peak:
            self.peak = self.current

    def _freed(self, key: int, _ref) -> None:
        self.current -= self._bytes.pop(key, 0)
        self._refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self.track, out)
        if func._schema.is_mutable:  # in-place / out= ops may resize their arguments' storages
            tree_map_only(torch.Tensor, self.track, (args, kwargs))
        return out


def _tensors_in(obj, out: list, depth: int = 0) -> list:
    """Tensors inside ``obj`` (dicts, sequences, and attributes of objects like GaLore's projector)."""
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors_in(v, out, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensors_in(v, out, depth + 1)
    elif depth < 4 and hasattr(obj, "__dict__") and not isinstance(obj, (type, nn.Module)):
        _tensors_in(vars(obj), out, depth + 1)
    return out


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        if st.nbytes():
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


@dataclass
class MemoryProfile:
    """Tensor memory of one training step, in bytes (see the module docstring)."""

    peak: int  # peak of live tensor bytes during forward + backward + optimizer step
    parameters: int
    gradients: int
    optimizer_state: int  # after the step
    activations: int  # distinct non-parameter storages saved for backward (the input batch included)

    def mib(self) -> dict:
        return {k: v / MIB for k, v in asdict(self).items()}


def profile_step_memory(model: nn.Module, opt, x: torch.Tensor, y: torch.Tensor) -> MemoryProfile:
    """Run one training step on ``model``/``opt`` under :class:`TensorMemoryTracker` (it really steps)."""
    opt.zero_grad(set_to_none=True)
    params = list(model.parameters())
    existing = params + list(model.buffers()) + _tensors_in(dict(opt.state), []) + [x, y]
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in param_ptrs and st.nbytes():
            saved[st.data_ptr()] = st.nbytes()
        return t

    param_bytes = storage_bytes(params)
    with TensorMemoryTracker(existing) as tracker:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        del loss
        grad_bytes = storage_bytes([p.grad for p in model.parameters() if p.grad is not None])
        opt.step()
        opt.zero_grad(set_to_none=True)
        peak = tracker.peak
    state_bytes = storage_bytes(_tensors_in(dict(opt.state), []))
    return MemoryProfile(peak, param_bytes, grad_bytes, state_bytes, sum(saved.values()))


# ====================================================================== end to end
@dataclass
class E2EResult:
    method: str
    key: str
    data: str
    hidden: list
    epochs: int
    steps: int
    train_wall_s: float  # training loop only (memory probes excluded); excludes setup and evaluation
    epoch_s: list
    setup_s: float  # building/converting the model and the optimizer
    test_accuracy: float
    parameters: int  # parameters at the end of training
    parameters_initial: int
    final_ranks: dict
    rank_trajectory: list  # per step {layer: rank}; empty for dense methods
    memory: dict  # MemoryProfile (bytes) of the probe with the highest peak
    memory_probes: int
    config: dict


class EndToEndRun:
    """One method's end-to-end training, advanced one epoch at a time (so runs can be interleaved).

    Epoch ``e`` is ``lrtrain.train.fit`` for one epoch with seed ``seed + e``: every method sees the same
    initial dense weights and the same batches. ``fit``'s own evaluation is skipped (it gets a one-example
    test set); :meth:`result` evaluates on the whole test set once. Memory: before training and at
    ``probes`` evenly spaced steps, an independent copy of the model and optimizer takes one step under
    :func:`profile_step_memory`; the highest peak is reported and probe time is not counted as training.
    """

    def __init__(self, method: Method, data: Dataset, hidden=(2048, 2048, 2048), epochs: int = 5,
                 batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 5e-4, rank: int = 128,
                 tau: float = 0.12, galore_gap: int = 200, galore_scale: float = 0.25, seed: int = 0,
                 probes: int = 6, label: str | None = None):
        self.method, self.data, self.hidden, self.epochs = method, data, tuple(hidden), epochs
        self.label = label or method.label
        self.batch_size, self.seed, self.probes = batch_size, seed, probes
        self.opt_args = dict(lr=lr, weight_decay=weight_decay, rank=rank, tau=tau, galore_gap=galore_gap,
                             galore_scale=galore_scale)
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        self.model = method.prepare(mlp(data.in_features, list(hidden), data.num_classes), rank)
        self.opt = method.optimizer(self.model, **self.opt_args)
        self.setup_s = time.perf_counter() - t0
        self.params0 = sum(p.numel() for p in self.model.parameters())
        self.steps_per_epoch = math.ceil(len(data.train_y) / batch_size)
        self.every = max(1, self.steps_per_epoch * epochs // max(probes, 1))
        self.profiles: list[MemoryProfile] = []
        self.epoch_s: list[float] = []
        self.ranks: list[dict] = []
        self.steps = 0
        self._train_only = Dataset(data.name, data.train_x, data.train_y, data.test_x[:1], data.test_y[:1],
                                   data.num_classes)
        from .data import batches

        xb, yb = next(iter(batches(data.train_x, data.train_y, batch_size, torch.Generator().manual_seed(seed))))
        self._probe(xb, yb)

    def _probe(self, xb, yb) -> None:
        m2 = copy.deepcopy(self.model)
        o2 = self.method.optimizer(m2, **self.opt_args)
        o2.load_state_dict(copy.deepcopy(self.opt.state_dict()))
        with self.method.active():
            self.profiles.append(profile_step_memory(m2, o2, xb, yb))

    def epoch(self) -> float:
        """Train one more epoch; returns its training seconds (probes excluded)."""
        probe_s = [0.0]

        def on_step(m, o, xb, yb):
            self.steps += 1
            if self.probes and self.steps % self.every == 0:
                t = time.perf_counter()
                self._probe(xb, yb)
                probe_s[0] += time.perf_counter() - t

        with self.method.active():
            hist = fit(self.model, self.opt, self._train_only, 1, self.batch_size, self.seed + len(self.epoch_s),
                       on_step=on_step)
        self.ranks += hist.ranks
        self.epoch_s.append(hist.epoch_seconds[0] - probe_s[0])
        return self.epoch_s[-1]

    def result(self) -> "E2EResult":
        final = layer_ranks(self.model)
        worst = max(self.profiles, key=lambda p: p.peak)
        d = self.data
        return E2EResult(
            method=self.label, key=self.method.key, data=d.name, hidden=list(self.hidden), epochs=len(self.epoch_s),
            steps=self.steps, train_wall_s=sum(self.epoch_s), epoch_s=list(self.epoch_s), setup_s=self.setup_s,
            test_accuracy=evaluate(self.model, d.test_x, d.test_y),
            parameters=sum(p.numel() for p in self.model.parameters()), parameters_initial=self.params0,
            final_ranks=final, rank_trajectory=self.ranks if final else [], memory=asdict(worst),
            memory_probes=len(self.profiles),
            config=dict(batch_size=self.batch_size, seed=self.seed, train=len(d.train_y), test=len(d.test_y),
                        in_features=d.in_features, classes=d.num_classes, **self.opt_args))


def run_end_to_end(method: Method, data: Dataset, hidden=(2048, 2048, 2048), epochs: int = 5,
                   batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 5e-4, rank: int = 128,
                   tau: float = 0.12, galore_gap: int = 200, galore_scale: float = 0.25, seed: int = 0,
                   probes: int = 6) -> E2EResult:
    """Train the MLP with ``method`` for ``epochs`` (see :class:`EndToEndRun`)."""
    run = EndToEndRun(method, data, hidden, epochs, batch_size, lr, weight_decay, rank, tau, galore_gap,
                      galore_scale, seed, probes)
    for _ in range(epochs):
        run.epoch()
    return run.result()


def run_end_to_end_interleaved(runs: list[EndToEndRun], log=print) -> list[E2EResult]:
    """Advance the runs epoch by epoch in turn (dense, GaLore, lrtrain, dense, ...), so that a load change
    on a shared machine hits every method alike rather than whichever ran at the time."""
    for e in range(max(r.epochs for r in runs)):
        for r in runs:
            if len(r.epoch_s) < r.epochs:
                s = r.epoch()
                if log:
                    rk = f", ranks {list(layer_ranks(r.model).values())}" if r.method.is_lrtrain else ""
                    log(f"  epoch {e + 1} {r.label}: {s:.1f} s{rk}")
    return [r.result() for r in runs]


# ====================================================================== the whole run and its report
@dataclass
class BenchConfig:
    sizes: tuple = (1024, 2048, 4096)
    ranks: tuple = (32, 64, 128, 256, 512)
    layer_batch: int = 512
    conv_ranks: tuple = (32, 64, 128)
    conv_hw: int = 16
    conv_batch: int = 8
    step_ranks: tuple = (64, 128)
    hidden: tuple = (2048, 2048, 2048)
    batch_size: int = 128
    epochs: int = 1
    train_subset: int | None = None
    rank: int = 128
    taus: tuple = (0.12,)
    lr: float = 1e-3
    weight_decay: float = 5e-4
    galore_gap: int = 200
    galore_scale: float = 0.25
    min_time: float = 0.5
    probes: int = 4
    groups: tuple = ("layers", "conv", "optimizer", "e2e")
    seed: int = 0


@dataclass
class BenchResults:
    config: dict
    machine: dict
    command: str
    data: str = ""
    layers: list = field(default_factory=list)
    conv: list = field(default_factory=list)
    optimizer: list = field(default_factory=list)
    e2e: list = field(default_factory=list)
    timeline: list = field(default_factory=list)  # (group, start, end, loadavg at end)
    notes: list = field(default_factory=list)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%H:%M:%S")


def run_bench(cfg: BenchConfig, data: Dataset | None, command: str = "", log=print) -> BenchResults:
    """Run the configured groups in this process, in order, and collect the results."""
    res = BenchResults(config=asdict(cfg), machine=machine_info(), command=command)
    ok, why = galore_status()
    if not ok:
        res.notes.append(f"GaLoreAdamW not benchmarked: galore-torch does not import ({why}).")

    def timed(group, fn):
        start = _now()
        log(f"[{start}] {group}")
        out = fn()
        load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
        res.timeline.append((group, start, _now(), [round(v, 2) for v in load]))
        return out

    if "layers" in cfg.groups:
        res.layers = timed("layers", lambda: layer_sweep(cfg.sizes, cfg.ranks, cfg.layer_batch, cfg.min_time, log))
    if "conv" in cfg.groups:
        res.conv = timed("conv", lambda: conv_sweep(cfg.conv_ranks, hw=cfg.conv_hw, batch=cfg.conv_batch,
                                                    min_time=cfg.min_time, log=log))
    if "optimizer" in cfg.groups:
        res.optimizer = timed("optimizer", lambda: optimizer_sweep(cfg.step_ranks, cfg.hidden, cfg.batch_size,
                                                                   cfg.min_time, cfg.galore_gap, log=log))
    if "e2e" in cfg.groups:
        if data is None:
            raise ValueError("the e2e group needs a dataset")
        if cfg.train_subset:
            data = data.subset(cfg.train_subset)
        res.data = f"{data.name}: {len(data.train_y)} train / {len(data.test_y)} test"

        def e2e():
            runs = []
            for m in available_methods():
                for tau in (cfg.taus if m.is_lrtrain else (cfg.taus[0],)):
                    label = f"{m.label} τ={tau}" if m.is_lrtrain else m.label
                    runs.append(EndToEndRun(m, data, cfg.hidden, cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay,
                                            cfg.rank, tau, cfg.galore_gap, cfg.galore_scale, cfg.seed, cfg.probes,
                                            label=label))
            out = []
            for r in run_end_to_end_interleaved(runs, log):
                log(f"  {r.method}: {r.train_wall_s:.1f} s, {r.test_accuracy:.2f}%, {r.parameters:,} params, "
                    f"peak {r.memory['peak'] / MIB:.1f} MiB" + (f", ranks {list(r.final_ranks.values())}" if r.final_ranks else ""))
                out.append(asdict(r))
            return out

        res.e2e = timed("e2e", e2e)
    res.machine["loadavg_end"] = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else []
    return res


def target_checks(res: BenchResults) -> list[dict]:
    """The issue's four targets against this run: measured value, threshold, met / missed / not measured."""
    out = []

    def add(name, value, threshold, met, detail):
        out.append(dict(target=name, value=value, threshold=threshold,
                        status="not measured" if met is None else ("met" if met else "MISSED"), detail=detail))

    row = next((r for r in res.layers if r["size"] == 4096 and r["rank"] == 256), None)
    add("layer fwd+bwd 4096², r=256, CPU: speedup / FLOP-ideal", None if row is None else row["fraction_of_ideal"],
        ">= 60%", None if row is None else row["fraction_of_ideal"] >= 0.6,
        "" if row is None else f"{row['speedup']:.2f}x measured vs {row['ideal']:.2f}x ideal")

    dense = next((r for r in res.e2e if r["key"] == "dense"), None)
    for r in (x for x in res.e2e if x["key"].startswith("lrtrain")):
        if dense is None:
            break
        ratio = r["train_wall_s"] / dense["train_wall_s"]
        dacc = r["test_accuracy"] - dense["test_accuracy"]
        add(f"end-to-end wall time, {r['method']} / dense AdamW (accuracy within 0.5 point)", ratio,
            "<= 0.6x and Δacc >= -0.5", ratio <= 0.6 and dacc >= -0.5,
            f"{r['train_wall_s']:.1f} s vs {dense['train_wall_s']:.1f} s; accuracy {r['test_accuracy']:.2f}% vs "
            f"{dense['test_accuracy']:.2f}% (Δ {dacc:+.2f})")
        mem = r["memory"]["peak"] / dense["memory"]["peak"]
        add(f"peak training memory, {r['method']} / dense AdamW", mem, "<= 0.5x", mem <= 0.5,
            f"{r['memory']['peak'] / MIB:.1f} MiB vs {dense['memory']['peak'] / MIB:.1f} MiB")
    if dense is None:
        add("end-to-end wall time / dense AdamW", None, "<= 0.6x", None, "e2e group not run")
        add("peak training memory / dense AdamW", None, "<= 0.5x", None, "e2e group not run")

    for rank in sorted({r["rank"] for r in res.optimizer}):
        rows = [r for r in res.optimizer if r["rank"] == rank]
        gal = next((r for r in rows if r["key"] == "galore"), None)
        for r in (x for x in rows if x["key"].startswith("lrtrain")):
            if gal is None:
                add(f"training step, GaLoreAdamW / {r['method']}, r={rank}", None, ">= 2x", None,
                    "GaLoreAdamW not available")
                continue
            sp = gal["amortized_train_step_ms"] / r["train_step_ms"]
            add(f"training step, GaLoreAdamW / {r['method']}, r={rank}", sp, ">= 2x", sp >= 2.0,
                f"{r['train_step_ms']:.1f} ms vs {gal['amortized_train_step_ms']:.1f} ms amortized "
                f"({gal['train_step_ms']:.1f} ms steady; {gal['train_step_ms'] / r['train_step_ms']:.2f}x steady)")
    if not res.optimizer:
        add("training step, GaLoreAdamW / lrtrain", None, ">= 2x", None, "optimizer group not run")
    return out


def _fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def write_report(res: BenchResults, out: str, name: str = "bench") -> str:
    """Write ``{out}/{name}.md`` (tables, targets, machine, method) and ``{name}.json``; returns the .md path."""
    os.makedirs(out, exist_ok=True)
    m, c = res.machine, res.config
    L = ["# lrtrain benchmark report", ""]
    if res.command:
        L += ["Produced by:", "", "```bash", res.command, "```", ""]
    L += ["## Machine", "",
          f"- CPU: {m['cpu']}; {m['cores']} cores ({m['cores_usable']} usable), torch threads: {m['torch_threads']}",
          f"- device: {m['device']}; torch {m['torch']}; Python {m['python']}; lrtrain {m['lrtrain']}; "
          f"galore-torch {m['galore_torch']}; fused DLRT backends compiled: {', '.join(m['fused_backends']) or 'none'}",
          f"- date: {m['date']}; load average at start {m['loadavg']}, at end {m.get('loadavg_end', '-')}",
          "- all ratios below come from this one run, in one process, on this machine.", ""]
    if res.timeline:
        L += ["Timeline (UTC): " + "; ".join(f"{g} {s}–{e} (load {ld[0]})" for g, s, e, ld in res.timeline), ""]
    L += ["## Targets", "", "| target | measured | threshold | status | detail |", "|---|---:|---|---|---|"]
    for t in target_checks(res):
        v = t["value"]
        val = "-" if v is None else (f"{v:.0%}" if "%" in t["threshold"] else f"{v:.2f}x")
        L.append(f"| {t['target']} | {val} | {t['threshold']} | {t['status']} | {t['detail']} |")
    L.append("")
    if res.layers:
        L += [f"## Layer forward + backward (batch {res.layers[0]['batch']} rows, median per call)", "",
              "| size | rank | nn.Linear (ms) | LowRankLinear (ms) | speedup | FLOP-ideal mn/(r(m+n)+r²) | % of ideal |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in res.layers:
            L.append(f"| {r['size']} | {r['rank']} | {r['dense_ms']:.2f} | {r['lowrank_ms']:.2f} | {r['speedup']:.2f}x "
                     f"| {r['ideal']:.2f}x | {r['fraction_of_ideal']:.0%} |")
        L.append("")
        L += [f"![speedup vs rank]({name}_speedup.png)", ""]
    if res.conv:
        r0 = res.conv[0]
        L += [f"## VGG-like block fwd+bwd (conv3x3 {r0['block']}, {r0['hw']}×{r0['hw']}, batch {r0['batch']})", "",
              "| rank | nn.Conv2d (ms) | LowRankConv2d (ms) | speedup | FLOP ratio (counted) | % of ideal |",
              "|---:|---:|---:|---:|---:|---:|"]
        for r in res.conv:
            L.append(f"| {r['rank']} | {r['dense_ms']:.2f} | {r['lowrank_ms']:.2f} | {r['speedup']:.2f}x | {r['ideal']:.2f}x "
                     f"| {r['fraction_of_ideal']:.0%} |")
        L.append("")
    if res.optimizer:
        r0 = res.optimizer[0]
        L += [f"## Training step at the same rank (MLP 784-{r0['hidden']}-10, batch {r0['batch']}, median)", "",
              "Train step = forward + backward + optimizer step. DLRT: rank fixed (max_rank = r, τ = 0); GaLoreAdamW: "
              f"projection rank r on the same layers, update_proj_gap {c['galore_gap']}, refresh step = the step that "
              "recomputes the projectors (SVD of the full gradient); amortized = steady + (refresh − steady optimizer "
              "step) / gap.", "",
              "| rank | method | train step (ms) | amortized (ms) | optimizer step (ms) | refresh step (ms) | vs dense |",
              "|---:|---|---:|---:|---:|---:|---:|"]
        for r in res.optimizer:
            dense = next((d for d in res.optimizer if d["rank"] == r["rank"] and d["key"] == "dense"), None)
            vs = f"{dense['train_step_ms'] / r['amortized_train_step_ms']:.2f}x" if dense else "-"
            L.append(f"| {r['rank']} | {r['method']} | {r['train_step_ms']:.1f} | {r['amortized_train_step_ms']:.1f} | "
                     f"{r['opt_step_ms']:.1f} | {_fmt(r['refresh_step_ms'], '.1f')} | {vs} |")
        L.append("")
    if res.e2e:
        e0 = res.e2e[0]
        ec = e0["config"]
        L += [f"## End to end ({res.data}; MLP {'-'.join(map(str, [ec['in_features']] + e0['hidden'] + [ec['classes']]))}, "
              f"{e0['epochs']} epoch(s), batch {ec['batch_size']})", "",
              f"AdamW lr {ec['lr']}, weight decay {ec['weight_decay']} for every method; GaLoreAdamW rank {ec['rank']}, "
              f"gap {ec['galore_gap']}, scale {ec['galore_scale']}, on the layers lrtrain factorizes; lrtrain DLRT from "
              f"rank {ec['rank']} (truncated SVD of the same initial weights), τ per row. Same initial weights and "
              "batches for every method; the runs are interleaved epoch by epoch. Wall = training loop (setup, "
              "memory probes and the final evaluation excluded; setup per row in the JSON).", "",
              "| method | wall (s) | vs dense | test acc. (%) | parameters | peak memory (MiB) | vs dense | "
              "params / grads / opt. state / activations (MiB) | final ranks |",
              "|---|---:|---:|---:|---:|---:|---:|---|---|"]
        dense = next((d for d in res.e2e if d["key"] == "dense"), None)
        for r in res.e2e:
            mm = {k: v / MIB for k, v in r["memory"].items()}
            wall_vs = f"{r['train_wall_s'] / dense['train_wall_s']:.2f}x" if dense else "-"
            mem_vs = f"{r['memory']['peak'] / dense['memory']['peak']:.2f}x" if dense else "-"
            rk = " ".join(str(v) for v in r["final_ranks"].values()) or "-"
            L.append(f"| {r['method']} | {r['train_wall_s']:.1f} | {wall_vs} | {r['test_accuracy']:.2f} | {r['parameters']:,} | "
                     f"{mm['peak']:.1f} | {mem_vs} | {mm['parameters']:.1f} / {mm['gradients']:.1f} / "
                     f"{mm['optimizer_state']:.1f} / {mm['activations']:.1f} | {rk} |")
        L += ["", f"![accuracy vs parameters]({name}_accuracy.png) ![rank trajectories]({name}_ranks.png)", ""]
    L += ["## Method", "",
          "- Timing: median of per-call wall times (`time.perf_counter`) after a warm-up call, in one process with "
          f"torch's default {m['torch_threads']} threads; the cases compared with each other (dense and every rank of "
          "one size; every method at one rank) are timed round-robin in 3 passes, and the end-to-end runs are "
          "interleaved epoch by epoch, so a load change on a shared machine hits them alike. Layer "
          "forward+backward resets gradients to None before each call and includes the input gradient.",
          "- FLOP-ideal: linear layers mn/(r(m+n)+r²), which equals the ratio of the matmul FLOPs of the dense and "
          "factorized forward+backward (checked with `torch.utils.flop_counter`); conv block: the counted FLOP ratio.",
          "- Peak memory: live tensor bytes tracked by a `TorchDispatchMode` (every storage an aten op creates, plus "
          "parameters, optimizer state and batch alive at the start, minus storages freed) over one full training "
          "step (forward, backward, optimizer step) on an independent copy of the model and optimizer, before "
          "training and at evenly spaced steps; the highest peak is reported. Parts: parameters, gradients, "
          "optimizer state (GaLore's projection matrices included), and activations saved for backward "
          "(`saved_tensors_hooks`). Kernel-internal workspaces (LAPACK) and allocator overhead are not counted.",
          "- GPU: none on this machine, so there are no GPU numbers.", ""]
    L += [f"- {n}" for n in res.notes]
    path = os.path.join(out, f"{name}.md")
    with open(path, "w") as f:
        f.write("\n".join(L).rstrip() + "\n")
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(asdict(res), f, indent=1, default=str)
    return path


def make_plots(res: BenchResults, out: str, name: str = "bench") -> list[str]:
    """PNG plots: speedup vs rank with the FLOP-ideal curve; accuracy vs parameters; rank trajectories."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    os.makedirs(out, exist_ok=True)
    paths = []
    if res.layers:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for i, n in enumerate(sorted({r["size"] for r in res.layers})):
            rows = [r for r in res.layers if r["size"] == n]
            rs = [r["rank"] for r in rows]
            color = f"C{i}"
            ax.plot(rs, [r["speedup"] for r in rows], "o-", color=color, label=f"{n}×{n} measured")
            dense_r = [2 ** (k / 8) for k in range(int(8 * math.log2(min(rs))), int(8 * math.log2(max(rs))) + 1)]
            ax.plot(dense_r, [flop_ideal_speedup(n, n, r) for r in dense_r], "--", color=color, alpha=0.7,
                    label=f"{n}×{n} FLOP-ideal mn/(r(m+n)+r²)")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        all_r = sorted({r["rank"] for r in res.layers})
        ax.set_xticks(all_r)
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x" if str(v)[0] in "25" else ""))
        ax.set_xlabel("rank r")
        ax.set_ylabel("speedup over nn.Linear (fwd+bwd)")
        ax.set_title(f"LowRankLinear vs nn.Linear, {res.machine['cpu']}, {res.machine['torch_threads']} threads",
                     fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(os.path.join(out, f"{name}_speedup.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    if res.e2e:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, r in enumerate(res.e2e):
            ax.scatter([r["parameters"]], [r["test_accuracy"]], color=f"C{i}", s=50, label=r["method"])
            if r["parameters_initial"] != r["parameters"]:
                ax.annotate("", (r["parameters"], r["test_accuracy"]), (r["parameters_initial"], r["test_accuracy"]),
                            arrowprops=dict(arrowstyle="->", color=f"C{i}", alpha=0.5))
        ax.set_xscale("log")
        ax.set_xlabel("parameters at the end of training (arrow: from initial)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"accuracy vs parameters ({res.e2e[0]['data']}, {res.e2e[0]['epochs']} epoch(s))", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(os.path.join(out, f"{name}_accuracy.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
        traj = [r for r in res.e2e if r["rank_trajectory"]]
        if traj:
            fig, ax = plt.subplots(figsize=(6.5, 4))
            styles = ["-", "--", ":", "-."]
            for j, r in enumerate(traj):
                for i, layer in enumerate(r["rank_trajectory"][0]):
                    ax.plot([s[layer] for s in r["rank_trajectory"]], styles[j % 4], color=f"C{i}",
                            label=f"{r['method']}: layer {layer}")
            ax.set_xlabel("step")
            ax.set_ylabel("rank")
            ax.set_title("lrtrain DLRT: rank per layer during training", fontsize=9)
            ax.legend(fontsize=7)
            fig.tight_layout()
            paths.append(os.path.join(out, f"{name}_ranks.png"))
            fig.savefig(paths[-1], dpi=120)
            plt.close(fig)
    return paths
