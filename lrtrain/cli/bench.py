"""``lrtrain bench``: how much faster low-rank layers and DLRT training steps are than dense ones, here.

Two groups, on synthetic inputs (no data set), timed in this process at torch's thread count:

* ``layers`` -- forward + backward of ``nn.Linear(n, n)`` vs ``LowRankLinear(n, n, r)`` on a fixed batch,
  against the FLOP-ideal speedup mn / (r(m+n) + r²) (:func:`flop_ideal_speedup`);
* ``optimizer`` -- an MLP's training step (forward + backward + ``opt.step()``) and its optimizer step
  alone, dense ``torch.optim.AdamW`` vs ``lrtrain.DLRT`` (AdamW) with the hidden layers at the same fixed
  rank (``max_rank = r``, τ = 0, so the rank stays r).

Cases compared with each other are timed round-robin (:func:`measure_interleaved`: medians over
interleaved passes), so a load change on a shared machine hits them alike. Writes ``{out}/{name}.md`` and
``{name}.json``. The source tree's ``benchmarks/`` (GaLore, end-to-end training, memory) builds on the
cases and the timing defined here.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import __version__
from ..convert import lowrank
from ..layers import LowRankLinear
from ..optim import DLRT
from ..update import available
from .args import CLIError, command_line, file_name, name_problem, output_dir, positive_float, positive_int
from .models import mlp
from .train import ranks as layer_ranks

GROUPS = ("layers", "optimizer")


# ---------------------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Per-call wall time in seconds: median, min and interquartile range over ``runs`` calls."""

    median: float
    min: float
    iqr: float
    runs: int


def _timed_calls(fn, setup, seconds: float) -> list:
    """Wall times of calls of ``fn()`` (``setup()`` untimed before each) until ``seconds`` are spent; at least one."""
    times: list = []
    total = 0.0
    while not times or total < seconds:
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        total += times[-1]
    return times


def measure_interleaved(calls: dict, min_time: float = 0.5, rounds: int = 3, warmup: int = 1) -> dict:
    """name -> :class:`Timing` of each callable of ``calls``, timed in ``rounds`` round-robin passes.

    ``calls``: name -> ``fn`` or ``(fn, setup)``; ``setup()`` runs untimed before each call (e.g. forward +
    backward before an optimizer step). After ``warmup`` untimed calls each, every pass gives every
    callable ``min_time / rounds`` seconds (at least one call), so a load change affects all of them alike.
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
            times[k] += _timed_calls(fn, setup, min_time / rounds)
    out = {}
    for k, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        out[k] = Timing(statistics.median(ts), min(ts), q[2] - q[0], len(ts))
    return out


# ---------------------------------------------------------------------------------------------- layers
def flop_ideal_speedup(m: int, n: int, r: int) -> float:
    """FLOP-ideal speedup of a rank-r m×n layer over the dense one: mn / (r(m+n) + r²).

    Forward + backward of a dense layer on B rows costs 6·B·mn FLOPs (3 matmuls); the factorized layer
    (x V, then S, then U; and the 6 backward products of :mod:`lrtrain.layers.autograd`) 6·B·(r(m+n) + r²).
    """
    if min(m, n, r) < 1:
        raise ValueError(f"m, n, r must be >= 1, got {(m, n, r)}")
    return m * n / (r * (m + n) + r * r)


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


def linear_case(size: int, rank: int | None = None, batch: int = 512, seed: int = 0) -> LayerCase:
    """``nn.Linear(size, size)`` (rank None) or ``LowRankLinear(size, size, rank)`` on ``batch`` rows."""
    x = torch.randn(batch, size, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    if rank is None:
        return LayerCase(nn.Linear(size, size), x, f"nn.Linear {size}x{size}")
    return LayerCase(LowRankLinear(size, size, rank), x, f"LowRankLinear {size}x{size} r={rank}")


def layer_sweep(sizes=(1024, 2048, 4096), ranks=(32, 64, 128, 256, 512), batch: int = 512,
                min_time: float = 0.5, log=print) -> list[dict]:
    """Dense vs factorized fwd+bwd for each square size and each rank <= it; one row per (size, rank)."""
    rows = []
    for n in sizes:
        rs = [r for r in ranks if r <= n]
        t_all = measure_interleaved({r: linear_case(n, r, batch) for r in [None] + rs}, min_time)
        dense = t_all[None]
        for r in rs:
            t, ideal = t_all[r], flop_ideal_speedup(n, n, r)
            row = dict(size=n, rank=r, batch=batch, dense_ms=dense.median * 1e3, lowrank_ms=t.median * 1e3,
                       dense_iqr_ms=dense.iqr * 1e3, lowrank_iqr_ms=t.iqr * 1e3,
                       speedup=dense.median / t.median, ideal=ideal)
            row["fraction_of_ideal"] = row["speedup"] / ideal
            rows.append(row)
            if log:
                log(f"  linear {n}x{n} r={r}: dense {row['dense_ms']:.2f} ms, low-rank {row['lowrank_ms']:.2f} ms, "
                    f"speedup {row['speedup']:.2f}x (ideal {ideal:.2f}x, {row['fraction_of_ideal']:.0%})")
    return rows


def layer_table(rows: list) -> list[str]:
    """The markdown section of :func:`layer_sweep`'s rows."""
    out = [f"## Layer forward + backward (batch {rows[0]['batch']} rows, median per call)", "",
           "| size | rank | nn.Linear (ms) | LowRankLinear (ms) | speedup | FLOP-ideal mn/(r(m+n)+r²) | % of ideal |",
           "|---:|---:|---:|---:|---:|---:|---:|"]
    out += [f"| {r['size']} | {r['rank']} | {r['dense_ms']:.2f} | {r['lowrank_ms']:.2f} | {r['speedup']:.2f}x "
            f"| {r['ideal']:.2f}x | {r['fraction_of_ideal']:.0%} |" for r in rows]
    return out + [""]


# ------------------------------------------------------------------------------------- optimizer step
@dataclass(frozen=True)
class StepModel:
    """An MLP ``in_features-hidden-classes`` trained on batches of ``batch`` rows, at each of ``ranks``."""

    hidden: tuple = (2048, 2048, 2048)
    batch: int = 128
    ranks: tuple = (64, 128)
    in_features: int = 784
    classes: int = 10

    @property
    def name(self) -> str:
        return "-".join(map(str, (self.in_features,) + tuple(self.hidden) + (self.classes,)))

    def spec(self) -> str:
        """The ``--step-models`` form: ``H1-H2-...@BATCH:R1,R2``."""
        return f"{'-'.join(map(str, self.hidden))}@{self.batch}:{','.join(map(str, self.ranks))}"

    @classmethod
    def parse(cls, spec: str) -> "StepModel":
        """``"1024-1024-1024@256:64"`` -> hidden (1024, 1024, 1024), batch 256, ranks (64,)."""
        try:
            hidden, rest = spec.split("@")
            batch, ranks = rest.split(":")
            out = cls(tuple(int(h) for h in hidden.split("-")), int(batch), tuple(int(r) for r in ranks.split(",")))
        except ValueError:
            raise ValueError(f"step model {spec!r}: expected H1-H2-...@BATCH:R1,R2, "
                             "e.g. 1024-1024-1024@256:64") from None
        if min(out.hidden + out.ranks + (out.batch,)) < 1:
            raise ValueError(f"step model {spec!r}: sizes, batch and ranks must be >= 1")
        return out


#: the README's optimizer-step MLP (784-1024-1024-1024-10, batch 256, rank 64) and the end-to-end MLP of
#: benchmarks/ (784-2048-2048-2048-10, batch 128) at ranks 64 and 128
DEFAULT_STEP_MODELS = (StepModel((1024, 1024, 1024), 256, (64,)), StepModel((2048, 2048, 2048), 128, (64, 128)))


class StepCase:
    """A model, its optimizer and a fixed seeded batch (``batch`` × ``in_features`` inputs, labels in
    ``range(classes)``), after ``warm_steps`` training steps: ``forward_backward``, ``step``, ``train_step``."""

    def __init__(self, model: nn.Module, opt, batch: int, in_features: int, classes: int, seed: int = 0,
                 warm_steps: int = 2):
        self.model, self.opt = model, opt
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(batch, in_features, generator=g)
        self.y = torch.randint(0, classes, (batch,), generator=g)
        for _ in range(warm_steps):
            self.train_step()

    def forward_backward(self) -> None:
        F.cross_entropy(self.model(self.x), self.y).backward()

    def step(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def train_step(self) -> None:
        self.forward_backward()
        self.step()


def step_case(sm: StepModel, rank: int, low_rank: bool, lr: float = 1e-3, weight_decay: float = 5e-4,
              seed: int = 0) -> StepCase:
    """``sm``'s MLP with dense AdamW, or with its layers factorized at fixed rank ``rank`` and DLRT (AdamW);
    eps 1e-8 and decoupled weight decay in both."""
    torch.manual_seed(seed)
    model = mlp(sm.in_features, list(sm.hidden), sm.classes)
    if low_rank:
        model = lowrank(model, rank=rank, max_rank=rank)
        opt = DLRT(model.parameters(), lr=lr, weight_decay=weight_decay, tau=0.0, eps=1e-8,
                   rank_rule="tolerance", s_direction="own")
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, eps=1e-8)
    return StepCase(model, opt, sm.batch, sm.in_features, sm.classes, seed)


def dense_and_dlrt(sm: StepModel, rank: int) -> dict:
    """This command's contenders, {key: (label, StepCase)}: dense AdamW (first: the baseline) and DLRT."""
    return {"dense": ("dense AdamW", step_case(sm, rank, False)),
            "lrtrain": ("lrtrain DLRT", step_case(sm, rank, True))}


def optimizer_sweep(models=DEFAULT_STEP_MODELS, min_time: float = 1.0, cases=dense_and_dlrt, finish=None,
                    log=print) -> list[dict]:
    """Per model and rank, for each case of ``cases(model, rank)`` (the first is the baseline): the training
    step (fwd+bwd+step) and the optimizer step alone (fwd+bwd as untimed setup), with ratios to the baseline.

    ``finish(row, case)``, when given, completes each row before the ratios; it may charge a case for
    periodic work in ``amortized_train_step_ms`` (which the training-step ratio then uses).
    """
    rows = []
    for sm in models:
        for r in sm.ranks:
            built = cases(sm, r)
            trains = measure_interleaved({k: c.train_step for k, (_, c) in built.items()}, min_time)
            steps = measure_interleaved({k: (c.step, c.forward_backward) for k, (_, c) in built.items()}, min_time)
            group = []
            for k, (label, case) in built.items():
                train, step = trains[k], steps[k]
                row = dict(model=sm.name, hidden="-".join(map(str, sm.hidden)), batch=sm.batch, rank=r, method=label,
                           key=k, train_step_ms=train.median * 1e3, train_step_iqr_ms=train.iqr * 1e3,
                           opt_step_ms=step.median * 1e3, opt_step_iqr_ms=step.iqr * 1e3,
                           ranks=sorted(set(layer_ranks(case.model).values())))
                if finish is not None:
                    finish(row, case)
                group.append(row)
            base = group[0]
            for row in group:
                row["train_vs_dense"] = base["train_step_ms"] / row.get("amortized_train_step_ms", row["train_step_ms"])
                row["opt_step_vs_dense"] = row["opt_step_ms"] / base["opt_step_ms"]
                if log:
                    log(f"  {sm.name} b={sm.batch} r={r} {row['method']}: train step {row['train_step_ms']:.1f} ms, "
                        f"optimizer step {row['opt_step_ms']:.1f} ms")
            rows += group
    return rows


# --------------------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def loadavg() -> list:
    """1, 5 and 15 minute load averages (NaN where the OS has none)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return [round(x, 2) for x in load]


def active_backends() -> list:
    """The compiled DLRT update backends usable here (CUDA only with a GPU)."""
    return [b for b, ok in sorted(available().items()) if ok and (b != "cuda" or torch.cuda.is_available())]


def machine_info(torch_threads: int | None = None) -> dict:
    """CPU model, cores, torch threads (``torch_threads``, default this process's), torch version, device,
    Python and lrtrain versions, the compiled DLRT backends, the date (UTC) and the load average."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "cores_usable": usable,
        "torch_threads": torch.get_num_threads() if torch_threads is None else torch_threads,
        "torch": torch.__version__,
        "device": "cuda: " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no GPU)",
        "python": platform.python_version(), "lrtrain": __version__, "fused_backends": active_backends(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "loadavg": loadavg(),
    }


# ---------------------------------------------------------------------------------------------- report
def write_report(res: dict, out: str, name: str = "bench") -> str:
    """Write ``{out}/{name}.md`` (command, machine, tables) and ``{name}.json`` of ``res``; returns the .md path.

    ``name`` is a file name, not a path (ValueError, nothing written, for one with a path separator, '..' or
    empty), so the report stays inside ``out``."""
    why = name_problem(name)
    if why is not None:
        raise ValueError(f"report name {why}, got {name!r}")
    os.makedirs(out, exist_ok=True)
    m = res["machine"]
    L = ["# lrtrain bench", "", "Produced by:", "", "```bash", res["command"], "```", "",
         f"- machine: {m['cpu']}; {m['cores']} cores ({m['cores_usable']} usable), torch threads: "
         f"{m['torch_threads']}; torch {m['torch']}; {m['device']}; Python {m['python']}; lrtrain {m['lrtrain']}; "
         f"fused DLRT backends: {', '.join(m['fused_backends']) or 'none'}",
         f"- date: {m['date']}; load average at start {m['loadavg']}, at end {m['loadavg_end']}",
         "- timing: median of per-call wall times after a warm-up call, in this process; the cases compared with "
         "each other are timed round-robin in 3 passes, so a load change hits them alike.", ""]
    if res["layers"]:
        L += layer_table(res["layers"])
    if res["optimizer"]:
        L += ["## Training step and optimizer step at the same rank (median per call)", "",
              "Train step = forward + backward + optimizer step; optimizer step = `opt.step()` + `zero_grad` alone "
              "(forward + backward untimed before each call). DLRT (AdamW): the hidden layers at fixed rank r "
              "(max_rank = r, τ = 0).", "",
              "| MLP | batch | rank | method | train step (ms) | train speedup vs dense | optimizer step (ms) "
              "| optimizer step / dense |", "|---|---:|---:|---|---:|---:|---:|---:|"]
        L += [f"| {r['model']} | {r['batch']} | {r['rank']} | {r['method']} | {r['train_step_ms']:.1f} | "
              f"{r['train_vs_dense']:.2f}x | {r['opt_step_ms']:.1f} | {r['opt_step_vs_dense']:.2f}x |"
              for r in res["optimizer"]]
    path = os.path.join(out, f"{name}.md")
    with open(path, "w") as f:
        f.write("\n".join(L).rstrip() + "\n")
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(res, f, indent=1)
    return path


# ------------------------------------------------------------------------------------------------- CLI
def _step_model(spec: str) -> str:
    try:
        StepModel.parse(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return spec


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="time low-rank vs dense layers and training steps on this machine; write a report",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="lrtrain_out/bench", type=output_dir, help="output directory (created if missing)")
    p.add_argument("--name", default="bench", type=file_name,
                   help="file name stem of the report: writes OUT/NAME.md and OUT/NAME.json (a name, not a path)")
    p.add_argument("--only", nargs="+", choices=GROUPS, default=list(GROUPS), help="groups to run")
    g = p.add_argument_group("layers")
    g.add_argument("--sizes", type=positive_int, nargs="+", default=[1024, 2048, 4096], help="square layer sizes")
    g.add_argument("--ranks", type=positive_int, nargs="+", default=[32, 64, 128, 256, 512], help="layer ranks")
    g.add_argument("--layer-batch", type=positive_int, default=512, help="rows per layer forward+backward")
    g = p.add_argument_group("optimizer")
    g.add_argument("--step-models", nargs="+", type=_step_model, default=[m.spec() for m in DEFAULT_STEP_MODELS],
                   help="MLPs as HIDDEN@BATCH:RANKS (784 inputs, 10 classes)")
    p.add_argument("--min-time", type=positive_float, default=0.5,
                   help="seconds of timed calls per case and measurement (the optimizer group takes twice this)")
    p.set_defaults(func=run, _parser=p)


def run(args) -> int:
    if "layers" in args.only and not any(r <= n for n in args.sizes for r in args.ranks):
        raise CLIError(f"layers group: no --ranks value {args.ranks} is <= a --sizes value {args.sizes} "
                       "(ranks above a size are skipped), so nothing would be measured")
    res = {"command": command_line("lrtrain bench", args._parser, args), "machine": machine_info(),
           "config": {k: v for k, v in vars(args).items() if k not in ("func", "command", "_parser")},
           "layers": [], "optimizer": []}
    if "layers" in args.only:
        print("layers")
        res["layers"] = layer_sweep(args.sizes, args.ranks, args.layer_batch, args.min_time)
    if "optimizer" in args.only:
        print("optimizer")
        res["optimizer"] = optimizer_sweep([StepModel.parse(s) for s in args.step_models], 2 * args.min_time)
    res["machine"]["loadavg_end"] = loadavg()
    print(f"\nreport: {write_report(res, args.out, args.name)}")
    return 0
