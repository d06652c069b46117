"""DLRT(budget=b) against uniform fixed ranks of the same size, and against the rank rule's own choice (issue 18).

MLP 784-400-400-400-10 on real MNIST (``--data``), AdamW lr 1e-3, no weight decay, batch 128, 3 epochs, one thread.
For each seed and each budget b in ``--budgets``:

* budget: ``lowrank(rank=48, capacity=128)`` then ``DLRT(budget=b)`` (the importance rule's allocation);
* uniform: every hidden layer at the largest rank r whose total fits the same b (``capacity=r``,
  ``DLRT(tau=0, rank_rule="tolerance")``: fixed rank, bases still updated every step);

plus ``DLRT()`` without a budget from rank 48. Active parameters: Σ r(m+n)+r² of the three hidden layers.

    OMP_NUM_THREADS=1 python benchmarks/budget.py --out benchmarks/results

writes budget.{json,md} (and budget.png with matplotlib: accuracy against active parameters).
"""
from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

import lrtrain
from harness import MNIST_DIR
from lrtrain.cli.data import load_idx
from lrtrain.cli.models import mlp
from lrtrain.cli.train import evaluate, fit
from lrtrain.update.budget import layer_parameters

HIDDEN, LR, EPOCHS = [400, 400, 400], 1e-3, 3
SIZES = [(400, 784), (400, 400), (400, 400)]
DENSE = sum(m * n for m, n in SIZES)


def _uniform_rank(b: float) -> int:
    return max(k for k in range(1, 400) if sum(layer_parameters(m, n, k) for m, n in SIZES) <= b * DENSE)


def run(data, seed: int, kind: str, b: float | None) -> dict:
    torch.manual_seed(seed)
    if kind == "uniform":
        r = _uniform_rank(b)
        model = lrtrain.lowrank(mlp(784, HIDDEN, 10), rank=r, capacity=r)
        opt = lrtrain.DLRT(model.parameters(), lr=LR, tau=0.0, rank_rule="tolerance")
    else:
        model = lrtrain.lowrank(mlp(784, HIDDEN, 10), rank=48, capacity=128)
        opt = lrtrain.DLRT(model.parameters(), lr=LR, budget=b)
    t0 = time.perf_counter()
    fit(model, opt, data, epochs=EPOCHS, seed=seed)
    layers = [m for m in model if isinstance(m, lrtrain.LowRankLinear)]
    return dict(seed=seed, kind=kind, budget=b, acc=evaluate(model, data.test_x, data.test_y),
                ranks=[m.rank for m in layers], wall_s=round(time.perf_counter() - t0, 1),
                active=sum(layer_parameters(m.out_features, m.in_features, m.rank) for m in layers))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(MNIST_DIR))
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--budgets", default="0.05,0.1,0.2")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    data = load_idx(args.data)
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for b in (float(x) for x in args.budgets.split(",")):
            for kind in ("budget", "uniform"):
                runs.append(run(data, seed, kind, b))
                print(json.dumps(runs[-1]), flush=True)
        runs.append(run(data, seed, "defaults", None))
        print(json.dumps(runs[-1]), flush=True)
    out = dict(date=datetime.date.today().isoformat(), torch=torch.__version__, dense_hidden=DENSE, runs=runs)
    d = Path(args.out)
    d.mkdir(parents=True, exist_ok=True)
    (d / "budget.json").write_text(json.dumps(out, indent=1))
    (d / "budget.md").write_text(report(out))
    _plot(out, d / "budget.png")
    print(report(out))


def report(out: dict) -> str:
    lines = [f"# Parameter budget vs uniform ranks ({out['date']}, torch {out['torch']}, 1 thread)", "",
             "Command: `OMP_NUM_THREADS=1 python benchmarks/budget.py --out benchmarks/results`. MLP 784-400³-10, MNIST, "
             "AdamW lr 1e-3, 3 epochs; budget: `DLRT(budget=b)` from rank 48 (capacity 128); uniform: fixed rank r, the "
             "largest whose total fits b; defaults: `DLRT()` from rank 48. Active = Σ r(m+n)+r² of the hidden layers "
             f"(dense {out['dense_hidden']:,}).", "",
             "| seed | b | run | final ranks | active (of dense) | accuracy (%) | budget − uniform |",
             "|---:|---:|---|---|---:|---:|---:|"]
    for r in out["runs"]:
        pair = [u for u in out["runs"] if u["seed"] == r["seed"] and u["budget"] == r["budget"] and u["kind"] == "uniform"]
        diff = f"{r['acc'] - pair[0]['acc']:+.2f}" if r["kind"] == "budget" and pair else ""
        b = "-" if r["budget"] is None else f"{r['budget']:g}"
        lines.append(f"| {r['seed']} | {b} | {r['kind']} | {' '.join(map(str, r['ranks']))} | "
                     f"{r['active']:,} ({r['active'] / out['dense_hidden']:.1%}) | {r['acc']:.2f} | {diff} |")
    return "\n".join(lines) + "\n"


def _plot(out: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, marker in (("budget", "o"), ("uniform", "s"), ("defaults", "^")):
        rs = [r for r in out["runs"] if r["kind"] == kind]
        ax.scatter([r["active"] / out["dense_hidden"] for r in rs], [r["acc"] for r in rs], marker=marker, label=kind)
    ax.set_xlabel("active hidden parameters / dense")
    ax.set_ylabel("test accuracy (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
