"""DLRT-Net's LeNet5/MNIST table (Schotthöfer et al., NeurIPS 2022, Table 1) re-run with lrtrain.

LeNet5 as DLRT-Net builds it: conv 1→20 5×5, ReLU, max-pool 2; conv 20→50 5×5, ReLU, max-pool 2; linear 800→500,
ReLU; linear 500→10. Real MNIST (``--data``: 17,435 train / 10,000 test), batch 128, ``--epochs`` (4), one thread.
``lowrank(model, rank=--rank)`` factorizes conv2 and fc1 (conv1 and the head would not save parameters); compression
= 1 − (all parameters at the active ranks) / (the dense network's 431,080). One run per configuration and base:

* dense: the same network and base optimizer (SGD lr 0.01 momentum 0.9, or AdamW lr 1e-3);
* the tolerance rule at DLRT-Net's relative tolerances τ ∈ {0.09, 0.11, 0.2, 0.3} (``rank_rule="tolerance"``, with
  DLRT-Net's S-step ``s_direction="own"``);
* the importance rule (lrtrain's default) at τ ∈ ``--importance-taus``.

    OMP_NUM_THREADS=1 python benchmarks/lenet_dlrt_net.py run --base sgd --out benchmarks/results
    OMP_NUM_THREADS=1 python benchmarks/lenet_dlrt_net.py run --base adamw --out benchmarks/results
    python benchmarks/lenet_dlrt_net.py report --out benchmarks/results

write lenet_{sgd,adamw}.json, then lenet.md next to the paper's numbers.
"""
from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch
from torch import nn

import lrtrain
from harness import MNIST_DIR
from lrtrain.cli.data import load_idx
from lrtrain.cli.train import evaluate, fit

# DLRT-Net, Table 1 (LeNet5 on MNIST): relative tolerance -> (test accuracy %, compression %); dense 98.82%.
PAPER = {0.09: (98.16, 91.3), 0.11: (98.21, 93.0), 0.2: (98.12, 97.0), 0.3: (97.45, 97.8)}
PAPER_DENSE = 98.82
TOLERANCES = (0.09, 0.11, 0.2, 0.3)
BASES = {"sgd": dict(base="sgd", lr=0.01, momentum=0.9), "adamw": dict(base="adamw", lr=1e-3)}


def lenet5() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10))


def _params(model) -> int:
    return sum(m.num_parameters_active() + (0 if m.bias is None else m.bias.numel())
               if isinstance(m, (lrtrain.LowRankLinear, lrtrain.LowRankConv2d)) else
               sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


def run(data, base: str, rule: str | None, tau: float | None, rank: int, epochs: int, seed: int) -> dict:
    torch.manual_seed(seed)
    model = lenet5()
    dense = _params(model)
    hp = BASES[base]
    if rule is None:
        opt = (torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=hp["momentum"]) if base == "sgd" else
               torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=0.0))
    else:
        model = lrtrain.lowrank(model, rank=rank)
        kw = dict(rank_rule="tolerance", s_direction="own") if rule == "tolerance" else {}
        opt = lrtrain.DLRT(model.parameters(), tau=tau, **kw, **hp)
    t0 = time.perf_counter()
    fit(model, opt, data, epochs=epochs, seed=seed)
    return dict(base=base, rule=rule, tau=tau, acc=evaluate(model, data.test_x, data.test_y),
                compression=1.0 - _params(model) / dense, params=_params(model), dense_params=dense,
                ranks=[m.rank for m in model.modules() if isinstance(m, (lrtrain.LowRankLinear, lrtrain.LowRankConv2d))],
                wall_s=round(time.perf_counter() - t0, 1))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["run", "report"])
    ap.add_argument("--base", choices=list(BASES), default="sgd")
    ap.add_argument("--data", default=str(MNIST_DIR))
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--rank", type=int, default=40, help="start rank of the factorized layers (capacity 2x)")
    ap.add_argument("--importance-taus", default="0.02,0.1,0.2,0.3")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    d = Path(args.out)
    if args.what == "report":
        outs = [json.loads((d / f"lenet_{b}.json").read_text()) for b in BASES if (d / f"lenet_{b}.json").exists()]
        (d / "lenet.md").write_text(report(outs))
        print(report(outs))
        return
    torch.set_num_threads(1)
    data = load_idx(args.data)
    configs = [(None, None)] + [("tolerance", t) for t in TOLERANCES] + \
              [("importance", float(t)) for t in args.importance_taus.split(",") if t]
    runs = []
    for rule, tau in configs:
        runs.append(run(data, args.base, rule, tau, args.rank, args.epochs, args.seed))
        print(json.dumps(runs[-1]), flush=True)
    out = dict(date=datetime.date.today().isoformat(), torch=torch.__version__, base=args.base, hp=BASES[args.base],
               epochs=args.epochs, rank=args.rank, seed=args.seed, runs=runs)
    d.mkdir(parents=True, exist_ok=True)
    (d / f"lenet_{args.base}.json").write_text(json.dumps(out, indent=1))


def report(outs: list) -> str:
    lines = ["# DLRT-Net's LeNet5/MNIST table, re-run with lrtrain", ""]
    for out in outs:
        dense = next(r for r in out["runs"] if r["rule"] is None)
        hp = ", ".join(f"{k} {v}" for k, v in out["hp"].items())
        lines += [f"## {out['base']} ({hp}; {out['date']}, torch {out['torch']}, 1 thread)", "",
                  f"Command: `OMP_NUM_THREADS=1 python benchmarks/lenet_dlrt_net.py run --base {out['base']} --out "
                  f"benchmarks/results`; {out['epochs']} epochs, batch 128, start rank {out['rank']} (capacity "
                  f"{2 * out['rank']}), seed {out['seed']}. Dense here: {dense['acc']:.2f}% ({dense['dense_params']:,} "
                  f"parameters); DLRT-Net's dense: {PAPER_DENSE}%.", "",
                  "| rule | τ | accuracy (%) | Δ vs dense | compression | final ranks (conv2, fc1) | DLRT-Net: accuracy / "
                  "compression | wall s |", "|---|---:|---:|---:|---:|---|---|---:|"]
        for r in out["runs"]:
            if r["rule"] is None:
                continue
            paper = PAPER.get(r["tau"]) if r["rule"] == "tolerance" else None
            ref = f"{paper[0]} / {paper[1]}%" if paper else "-"
            lines.append(f"| {r['rule']} | {r['tau']:g} | {r['acc']:.2f} | {r['acc'] - dense['acc']:+.2f} | "
                         f"{100 * r['compression']:.1f}% | {' '.join(map(str, r['ranks']))} | {ref} | {r['wall_s']} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
