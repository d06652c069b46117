"""One run of ``benchmarks/bench_report.py``: the configured groups in this process, in order, and the issue's
four targets checked against its results."""
from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass, field

from lrtrain.cli.bench import DEFAULT_STEP_MODELS, layer_sweep, loadavg
from lrtrain.cli.data import Dataset

from .e2e import E2ESettings, EndToEndRun, run_end_to_end_interleaved
from .layers import conv_sweep
from .machine import machine_info
from .memory import MIB
from .methods import available_methods, galore_status
from .steps import optimizer_sweep

GROUPS = ("layers", "conv", "optimizer", "e2e")


@dataclass
class BenchConfig:
    sizes: tuple = (1024, 2048, 4096)
    ranks: tuple = (32, 64, 128, 256, 512)
    layer_batch: int = 512
    conv_ranks: tuple = (32, 64, 128)
    conv_hw: int = 16
    conv_batch: int = 8
    step_models: tuple = DEFAULT_STEP_MODELS
    e2e: E2ESettings = field(default_factory=E2ESettings)
    taus: tuple = ()  # extra lrtrain τ values for the end-to-end group (one more lrtrain run each)
    train_subset: int | None = None
    min_time: float = 0.5
    groups: tuple = GROUPS


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
    unknown = set(cfg.groups) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown benchmark group(s) {sorted(unknown)}; choose from {GROUPS}")
    res = BenchResults(config=asdict(cfg), machine=machine_info(), command=command)
    ok, why = galore_status()
    if not ok:
        res.notes.append(f"GaLoreAdamW not benchmarked: {why}.")

    def timed(group, fn):
        start = _now()
        log(f"[{start}] {group}")
        out = fn()
        res.timeline.append((group, start, _now(), loadavg()))
        return out

    if "layers" in cfg.groups:
        res.layers = timed("layers", lambda: layer_sweep(cfg.sizes, cfg.ranks, cfg.layer_batch, cfg.min_time, log))
    if "conv" in cfg.groups:
        res.conv = timed("conv", lambda: conv_sweep(cfg.conv_ranks, hw=cfg.conv_hw, batch=cfg.conv_batch,
                                                    min_time=cfg.min_time, log=log))
    if "optimizer" in cfg.groups:
        res.optimizer = timed("optimizer", lambda: optimizer_sweep(cfg.step_models, 2 * cfg.min_time,
                                                                   cfg.e2e.galore_gap, log=log))
    if "e2e" in cfg.groups:
        if data is None:
            raise ValueError("the e2e group needs a dataset")
        if cfg.train_subset:
            data = data.subset(cfg.train_subset)
        res.data = f"{data.name}: {len(data.train_y)} train / {len(data.test_y)} test"
        res.e2e = timed("e2e", lambda: _e2e(cfg, data, log))
    res.machine["loadavg_end"] = loadavg()
    return res


def _e2e(cfg: BenchConfig, data: Dataset, log) -> list:
    s = cfg.e2e
    runs = []
    for m in available_methods():
        taus = (s.lrtrain_tau,) + tuple(t for t in cfg.taus if t != s.lrtrain_tau) if m.is_lrtrain else (None,)
        for tau in taus:
            label = f"{m.label} τ={tau}" if m.is_lrtrain and len(taus) > 1 else m.label
            runs.append(EndToEndRun(m, data, s, tau=tau, label=label))
    out = []
    for r in run_end_to_end_interleaved(runs, log):
        log(f"  {r.method}: {r.train_wall_s:.1f} s, {r.test_accuracy:.2f}%, {r.parameters:,} params, "
            f"peak {r.memory['peak'] / MIB:.1f} MiB" + (f", ranks {list(r.final_ranks.values())}" if r.final_ranks else ""))
        out.append(asdict(r))
    return out


def target_checks(res: BenchResults) -> list:
    """The issue's four targets against this run: measured value, threshold, met / MISSED / not measured."""
    out = []

    def add(name, value, threshold, met, detail):
        out.append(dict(target=name, value=value, threshold=threshold,
                        status="not measured" if met is None else ("met" if met else "MISSED"), detail=detail))

    row = next((r for r in res.layers if r["size"] == 4096 and r["rank"] == 256), None)
    add("layer fwd+bwd 4096², r=256, CPU: speedup / FLOP-ideal", None if row is None else row["fraction_of_ideal"],
        ">= 60%", None if row is None else row["fraction_of_ideal"] >= 0.6,
        "layers group at size 4096, rank 256 not run" if row is None else
        f"{row['speedup']:.2f}x measured vs {row['ideal']:.2f}x ideal")

    dense = next((r for r in res.e2e if r["key"] == "dense"), None)
    lrt = [x for x in res.e2e if x["key"].startswith("lrtrain")]
    if dense is None or not lrt:
        add("end-to-end wall time, lrtrain / dense AdamW, accuracy within 0.5 point", None, "<= 0.6x", None,
            "e2e group not run")
        add("peak training memory, lrtrain / dense AdamW", None, "<= 0.5x", None, "e2e group not run")
    for r in lrt if dense is not None else []:
        ratio = r["train_wall_s"] / dense["train_wall_s"]
        dacc = r["test_accuracy"] - dense["test_accuracy"]
        add(f"end-to-end wall time ({r['epochs']} epoch(s)), {r['method']} / dense AdamW, accuracy within 0.5 point", ratio,
            "<= 0.6x and Δacc >= -0.5", ratio <= 0.6 and dacc >= -0.5,
            f"{r['train_wall_s']:.1f} s vs {dense['train_wall_s']:.1f} s; accuracy {r['test_accuracy']:.2f}% vs "
            f"{dense['test_accuracy']:.2f}% (Δ {dacc:+.2f} point)")
    for r in lrt if dense is not None else []:
        mem = r["memory"]["peak"] / dense["memory"]["peak"]
        add(f"peak training memory, {r['method']} / dense AdamW", mem, "<= 0.5x", mem <= 0.5,
            f"{r['memory']['peak'] / MIB:.1f} MiB vs {dense['memory']['peak'] / MIB:.1f} MiB")

    for model, rank in sorted({(r["model"], r["rank"]) for r in res.optimizer}):
        rows = [r for r in res.optimizer if r["model"] == model and r["rank"] == rank]
        gal = next((r for r in rows if r["key"] == "galore"), None)
        for r in (x for x in rows if x["key"].startswith("lrtrain")):
            name = f"training step, GaLoreAdamW / {r['method']}, MLP {model} batch {r['batch']}, r={rank}"
            if gal is None:
                add(name, None, ">= 2x", None, "GaLoreAdamW not available")
                continue
            sp = gal["amortized_train_step_ms"] / r["train_step_ms"]
            add(name, sp, ">= 2x", sp >= 2.0,
                f"{r['train_step_ms']:.1f} ms vs {gal['amortized_train_step_ms']:.1f} ms amortized "
                f"({gal['train_step_ms']:.1f} ms steady: {gal['train_step_ms'] / r['train_step_ms']:.2f}x)")
    if not res.optimizer:
        add("training step, GaLoreAdamW / lrtrain, same rank, same model", None, ">= 2x", None, "optimizer group not run")
    return out
