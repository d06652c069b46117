"""MNIST runs of the rank-adaptive step: accuracy against dense AdamW at its learning rate, the basis refresh
interval, and start-rank (in)dependence.

MLP 784-400-400-400-10 on real MNIST (``--data``, default ``../shared/data/mnist``: 17,435 train / 10,000 test images), AdamW
lr 1e-3 (dense's) and no weight decay for every run, batch 128, 3 epochs, one thread:

* dense AdamW;
* lrtrain DLRT converted at rank 48 (capacity 128), τ = 0.1, for each basis refresh interval in ``--refresh``;
* lrtrain DLRT (refresh 1) started at each rank in ``--start-ranks`` (capacity 128), at each τ in ``--taus``.

Every configuration runs for each seed in ``--seeds`` (the seed sets the initialization and the batch order;
dense and lrtrain of one seed start from the same dense initialization).

    OMP_NUM_THREADS=1 python benchmarks/integrator_mnist.py --out benchmarks/results

writes integrator_mnist.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch

import lrtrain
from harness import MNIST_DIR
from lrtrain.cli.data import load_idx
from lrtrain.cli.models import mlp
from lrtrain.cli.train import evaluate, fit

HIDDEN, LR, EPOCHS, CAPACITY = [400, 400, 400], 1e-3, 3, 128


def run(data, seed: int, rank: int | None, tau: float = 0.1, refresh: int = 1) -> dict:
    """One training run; rank None is dense AdamW. Returns accuracy, final ranks, wall seconds."""
    torch.manual_seed(seed)
    model = mlp(784, HIDDEN, 10)
    if rank is None:
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    else:
        model = lrtrain.lowrank(model, rank=rank, capacity=CAPACITY)
        opt = lrtrain.DLRT(model.parameters(), lr=LR, tau=tau, refresh=refresh, rank_rule="tolerance", s_direction="own")
    t0 = time.perf_counter()
    fit(model, opt, data, epochs=EPOCHS, seed=seed)
    wall = time.perf_counter() - t0
    ranks = [m.rank for m in model.modules() if isinstance(m, lrtrain.LowRankLinear)]
    return dict(seed=seed, rank=rank, tau=tau, refresh=refresh, acc=evaluate(model, data.test_x, data.test_y),
                ranks=ranks, wall_s=round(wall, 2), params_active=lrtrain.active_parameters(model))


def _ints(s: str) -> list:
    return [int(v) for v in s.split(",") if v]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(MNIST_DIR), help="directory of MNIST-format IDX files")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--refresh", default="1,2,5")
    ap.add_argument("--start-ranks", default="8,96")
    ap.add_argument("--taus", default="0.1")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    data = load_idx(args.data)
    runs = []

    def add(kind, **kw):
        runs.append(dict(kind=kind, **run(data, **kw)))
        print(json.dumps(runs[-1]), flush=True)

    for seed in _ints(args.seeds):
        add("dense", seed=seed, rank=None)
        for k in _ints(args.refresh):
            add("refresh", seed=seed, rank=48, refresh=k)
        for tau in (float(t) for t in args.taus.split(",")):
            for r in _ints(args.start_ranks):
                add("start", seed=seed, rank=r, tau=tau)
    out = dict(date=datetime.date.today().isoformat(), torch=torch.__version__, threads=1, model="784-400-400-400-10",
               lr=LR, epochs=EPOCHS, capacity=CAPACITY, runs=runs)
    d = Path(args.out)
    d.mkdir(parents=True, exist_ok=True)
    (d / "integrator_mnist.json").write_text(json.dumps(out, indent=1))
    (d / "integrator_mnist.md").write_text(report(out))
    print(report(out))


def _mean(xs) -> float:
    return statistics.mean(xs) if xs else float("nan")


def report(out: dict) -> str:
    """Markdown tables: per configuration the accuracy per seed, its mean, Δ to dense (same seeds), final ranks."""
    runs = out["runs"]
    dense = {r["seed"]: r["acc"] for r in runs if r["kind"] == "dense"}
    seeds = sorted(dense)
    lines = [f"# Rank-adaptive step on MNIST ({out['date']}, torch {out['torch']}, 1 thread)", "",
             "Command: `OMP_NUM_THREADS=1 python benchmarks/integrator_mnist.py --out benchmarks/results`. "
             f"MLP {out['model']}, AdamW lr {out['lr']:g} (dense's), no weight decay, batch 128, {out['epochs']} epochs, "
             f"capacity {out['capacity']}; seeds {', '.join(map(str, seeds))}.", "",
             "| run | accuracy per seed (%) | mean | Δ mean vs dense | final ranks per seed | wall s (mean) |",
             "|---|---|---:|---:|---|---:|"]
    groups: dict = {}
    for r in runs:
        key = ("dense AdamW" if r["kind"] == "dense" else
               f"DLRT from rank 48, τ {r['tau']:g}, refresh {r['refresh']}" if r["kind"] == "refresh" else
               f"DLRT from rank {r['rank']}, τ {r['tau']:g}, refresh 1")
        groups.setdefault(key, []).append(r)
    dmean = _mean(list(dense.values()))
    for key, rs in groups.items():
        accs = [r["acc"] for r in rs]
        ranks = " / ".join(" ".join(map(str, r["ranks"])) for r in rs) or "-"
        lines.append(f"| {key} | {', '.join(f'{a:.2f}' for a in accs)} | {_mean(accs):.2f} | "
                     f"{_mean(accs) - dmean:+.2f} | {ranks} | {_mean([r['wall_s'] for r in rs]):.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
