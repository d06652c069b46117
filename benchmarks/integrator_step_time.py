"""Training-step time of the rank-adaptive step against dense AdamW and GaLoreAdamW, side by side.

784-2048-2048-2048-10 MLP, batch 256, the hidden layers at rank 128: dense AdamW; GaLoreAdamW (projection
rank 128 on the same layers, update_proj_gap 200, its projector SVD amortized: one refresh per 200 steps);
lrtrain DLRT at rank 128 (max_rank 128, τ 0.1) with basis refresh intervals k = 1, 2, 5, 10 and each
backend ("reference", and "auto", the default, which sends groups of >= 2 same-shape layers to the fused
CPU kernels when they are built, here the two 2048×2048 layers). One timed call = 10 consecutive training
steps (forward, backward, optimizer step, zero_grad) on a fixed batch, so every refresh interval is
amortized exactly; calls are interleaved round-robin (a load change hits all methods alike); medians.

    OMP_NUM_THREADS=2 python benchmarks/integrator_step_time.py --out benchmarks/results

writes integrator_step_time.{json,md}. Time it on a quiet machine.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import lrtrain
from harness.machine import machine_info
from harness.methods import DENSE, GALORE, galore_status
from lrtrain.cli.bench import measure_interleaved
from lrtrain.cli.models import mlp

HIDDEN, BATCH, RANK, BLOCK = (2048, 2048, 2048), 256, 128, 10


def _case(kind: str, refresh: int = 1, backend: str = "auto"):
    torch.manual_seed(0)
    model = mlp(784, list(HIDDEN), 10)
    if kind == "dense":
        opt = DENSE.optimizer(model, 1e-3, 0.0, RANK, 0.1)
    elif kind == "galore":
        opt = GALORE.optimizer(model, 1e-3, 0.0, RANK, 0.1)
    else:
        model = lrtrain.lowrank(model, rank=RANK, max_rank=RANK)
        opt = lrtrain.DLRT(model.parameters(), lr=1e-3, tau=0.1, refresh=refresh, backend=backend,
                                  rank_rule="tolerance", s_direction="own")
    x = torch.randn(BATCH, 784)
    y = torch.randint(0, 10, (BATCH,))

    def block():
        for _ in range(BLOCK):
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    block.backward = lambda: F.cross_entropy(model(x), y).backward()
    return block, opt


def _galore_refresh_ms(opt, backward) -> float:
    """Extra time of GaLore's projector refresh step (an SVD of each projected gradient) over its steady
    step: median over 3 pairs of single optimizer steps on fresh gradients, in ms."""
    groups = [g for g in opt.param_groups if "rank" in g]
    extra = []
    for _ in range(3):
        times = []
        for refresh in (False, True):
            backward()
            for g in groups:
                for p in g["params"]:
                    # GaLore recomputes its projector when state["step"] % update_proj_gap == 0
                    opt.state[p]["step"] = 0 if refresh else 1
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
            opt.zero_grad(set_to_none=True)
        extra.append(1e3 * (times[1] - times[0]))
    return statistics.median(extra)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--min-time", type=float, default=6.0, help="seconds per method over all rounds")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--refresh", default="1,2,5,10")
    args = ap.parse_args(argv)
    backends = ["reference"] + (["auto"] if lrtrain.update.available()["cpu"] else [])
    calls, opts = {}, {}
    calls["dense AdamW"], _ = _case("dense")
    if galore_status()[0]:
        calls["GaLoreAdamW"], opts["galore"] = _case("galore")
        galore_backward = calls["GaLoreAdamW"].backward
    for k in (int(v) for v in args.refresh.split(",")):
        for b in backends:
            calls[f"lrtrain refresh={k} ({b})"], _ = _case("lrtrain", k, b)
    res = measure_interleaved(calls, min_time=args.min_time, rounds=args.rounds)
    per_step = {name: t.median * 1e3 / BLOCK for name, t in res.items()}
    if "galore" in opts:
        extra = _galore_refresh_ms(opts["galore"], galore_backward)
        per_step["GaLoreAdamW (projector refresh amortized, gap 200)"] = per_step["GaLoreAdamW"] + extra / 200
    dense = per_step["dense AdamW"]
    galore = per_step.get("GaLoreAdamW (projector refresh amortized, gap 200)")
    out = dict(date=datetime.date.today().isoformat(), torch=torch.__version__, threads=torch.get_num_threads(),
               machine=machine_info(), model=f"784-{'-'.join(map(str, HIDDEN))}-10",
               batch=BATCH, rank=RANK, steps_per_call=BLOCK, ms_per_step=per_step)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "integrator_step_time.json").write_text(json.dumps(out, indent=1))
    lines = [f"# Training step: 784-2048³-10, batch {BATCH}, rank {RANK} ({out['date']}, torch {out['torch']}, "
             f"{out['threads']} threads)", "",
             "Command: `OMP_NUM_THREADS=2 python benchmarks/integrator_step_time.py --out benchmarks/results`; one "
             f"call = {BLOCK} training steps, calls interleaved, medians.", "",
             "| method | ms / training step | × dense AdamW | × GaLoreAdamW |", "|---|---:|---:|---:|"]
    for name, ms in per_step.items():
        g = f"{ms / galore:.2f}" if galore else "n/a"
        lines.append(f"| {name} | {ms:.1f} | {ms / dense:.2f} | {g} |")
    (out_dir / "integrator_step_time.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
