"""Who decides the final rank: the start-rank table of issue 17, before (the tolerance rule) and after (the
importance rule, the default), with dense AdamW trained on the same seeds.

MLP 784-400-400-400-10 on real MNIST (``--data``, default ``../shared/data/mnist``), AdamW lr 1e-3 (dense's), no
weight decay, batch 128, 3 epochs, capacity 128, one thread. For each seed in ``--seeds`` and each start rank in
``--starts``:

* "before": ``DLRT(rank_rule="tolerance", s_direction="own")`` at τ 0.1 (lrtrain's defaults until issue 17);
* "after": ``DLRT()`` at its defaults (importance rule, τ 0.02, projected S-step).

    OMP_NUM_THREADS=1 python benchmarks/start_rank.py --out benchmarks/results

writes start_rank.{json,md}: per run the final ranks, test accuracy, hidden parameters (first three linear layers,
factorized ones at their active rank) as a fraction of dense, and per rule and seed the largest ratio of one
layer's final ranks across the starts (issue 17 asks <= 1.5), the accuracy spread (<= 1 point) and the largest gap
below dense (<= 0.5).
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

HIDDEN, LR, EPOCHS, CAPACITY = [400, 400, 400], 1e-3, 3, 128
RULES = {"before": dict(rank_rule="tolerance", s_direction="own", tau=0.1), "after": {}}


def _hidden(model) -> int:
    linears = [m for m in model if isinstance(m, (torch.nn.Linear, lrtrain.LowRankLinear))][:3]
    return sum(m.num_parameters_active() if isinstance(m, lrtrain.LowRankLinear) else
               sum(p.numel() for p in m.parameters()) for m in linears)


def run(data, seed: int, start: int | None, rule: str | None) -> dict:
    """One run; start None is dense AdamW."""
    torch.manual_seed(seed)
    model = mlp(784, HIDDEN, 10)
    dense_hidden = _hidden(model)
    if start is None:
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    else:
        model = lrtrain.lowrank(model, rank=start, capacity=CAPACITY)
        opt = lrtrain.DLRT(model.parameters(), lr=LR, **RULES[rule])
    t0 = time.perf_counter()
    hist = fit(model, opt, data, epochs=EPOCHS, seed=seed)
    return dict(seed=seed, start=start, rule=rule, acc=evaluate(model, data.test_x, data.test_y),
                ranks=[m.rank for m in model.modules() if isinstance(m, lrtrain.LowRankLinear)],
                hidden=_hidden(model) / dense_hidden, wall_s=round(time.perf_counter() - t0, 2),
                rank_path=[list(hist.ranks[i].values()) for i in range(0, len(hist.ranks), 40)])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(MNIST_DIR))
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--starts", default="8,48,96")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    data = load_idx(args.data)
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for start, rule in [(None, None)] + [(s, r) for r in RULES for s in map(int, args.starts.split(","))]:
            runs.append(run(data, seed, start, rule))
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "rank_path"}), flush=True)
    out = dict(date=datetime.date.today().isoformat(), torch=torch.__version__, threads=1, model="784-400-400-400-10",
               lr=LR, epochs=EPOCHS, capacity=CAPACITY, rules={k: v or "defaults" for k, v in RULES.items()}, runs=runs)
    d = Path(args.out)
    d.mkdir(parents=True, exist_ok=True)
    (d / "start_rank.json").write_text(json.dumps(out, indent=1))
    (d / "start_rank.md").write_text(report(out))
    print(report(out))


def report(out: dict) -> str:
    runs = out["runs"]
    dense = {r["seed"]: r["acc"] for r in runs if r["start"] is None}
    lines = [f"# Final ranks vs the start rank ({out['date']}, torch {out['torch']}, 1 thread)", "",
             "Command: `OMP_NUM_THREADS=1 python benchmarks/start_rank.py --out benchmarks/results`. "
             f"MLP {out['model']}, AdamW lr {out['lr']:g} (dense's), no weight decay, batch 128, {out['epochs']} "
             f"epochs, capacity {out['capacity']}. before = `DLRT(rank_rule=\"tolerance\", s_direction=\"own\", "
             "tau=0.1)` (the defaults until issue 17); after = `DLRT()` (importance rule, τ 0.02, projected S-step). "
             "Hidden = parameters of the three hidden linear layers at their active ranks / dense.", "",
             "| seed | rule | start | final ranks | accuracy (%) | Δ vs dense | hidden |", "|---:|---|---:|---|---:|---:|---:|"]
    for r in runs:
        if r["start"] is None:
            lines.append(f"| {r['seed']} | dense AdamW | - | - | {r['acc']:.2f} | | 100% |")
        else:
            lines.append(f"| {r['seed']} | {r['rule']} | {r['start']} | {' '.join(map(str, r['ranks']))} | "
                         f"{r['acc']:.2f} | {r['acc'] - dense[r['seed']]:+.2f} | {r['hidden']:.1%} |")
    lines += ["", "Per seed and rule: the largest ratio max/min of one layer's final ranks across the starts (target "
              "<= 1.5), the accuracy spread (<= 1 point), the largest gap below dense (<= 0.5).", "",
              "| seed | rule | rank ratio | accuracy spread | gap below dense |", "|---:|---|---:|---:|---:|"]
    for seed in sorted(dense):
        for rule in out["rules"]:
            rs = [r for r in runs if r["seed"] == seed and r["rule"] == rule]
            ratio = max(max(layer) / min(layer) for layer in zip(*(r["ranks"] for r in rs)))
            accs = [r["acc"] for r in rs]
            lines.append(f"| {seed} | {rule} | {ratio:.2f} | {max(accs) - min(accs):.2f} | "
                         f"{dense[seed] - min(accs):.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
