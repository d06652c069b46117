"""Training-step time of fixed-capacity factors against an earlier lrtrain checkout, side by side.

The 784-2048-2048-2048-10 MLP, hidden layers factorized at rank 64 (τ = 0 and max_rank = 64, so the rank
stays at 64 and every timed step does the same work), batch 256, DLRT (AdamW, backend "auto"). One whole
training step = zero_grad + forward + backward + ``opt.step()``. This checkout runs at its default capacity
(2·rank = 128: forward/backward must follow the active rank, not the capacity) and at capacity 64; the
baseline (a checkout given by ``--baseline``, e.g. ``git worktree add /tmp/base 6ab3882`` built with
``python setup.py build_ext --inplace``) runs its own code. Each variant runs in its own process,
interleaved round-robin for ``--rounds`` rounds; the report gives each variant's median and its ratio to
the baseline.

    OMP_NUM_THREADS=2 python benchmarks/capacity_step_time.py --baseline /tmp/base --out benchmarks/results
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

WORKER = r"""
import json, statistics, sys, time, torch
import torch.nn.functional as F
import lrtrain
from lrtrain.models import mlp
cap = json.loads(sys.argv[1])
torch.manual_seed(0)
kw = dict(rank=64, max_rank=64) if cap is None else dict(rank=64, max_rank=64, capacity=cap)
model = lrtrain.lowrank(mlp(784, [2048, 2048, 2048], 10), **kw)
opt = lrtrain.DLRT(model.parameters(), lr=1e-4, tau=0.0)
x, y = torch.randn(256, 784), torch.randint(0, 10, (256,))
times = []
for i in range(int(sys.argv[2])):
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    times.append(time.perf_counter() - t0)
ranks = sorted({m.rank for m in model.modules() if hasattr(m, "rank") and not callable(m.rank)})
print(json.dumps(dict(median_ms=1e3 * statistics.median(times[3:]), ranks=ranks, where=lrtrain.__file__)))
"""


def run(path: str, capacity, steps: int) -> dict:
    env = dict(os.environ, PYTHONPATH=path)
    out = subprocess.run([sys.executable, "-c", WORKER, json.dumps(capacity), str(steps)], env=env, cwd="/",
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="path of the earlier checkout (built in place)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--out", default=None, help="folder for capacity_step_time.{md,json}")
    args = ap.parse_args(argv)
    variants = {"baseline (fixed shapes absent)": (args.baseline, None),
                "fixed capacity, c = 2·rank (default)": (ROOT, 128),
                "fixed capacity, c = rank": (ROOT, 64)}
    samples = {k: [] for k in variants}
    ranks = {}
    for _ in range(args.rounds):
        for name, (path, cap) in variants.items():
            res = run(path, cap, args.steps)
            samples[name].append(res["median_ms"])
            ranks[name] = res["ranks"]
    base = statistics.median(samples[next(iter(variants))])
    rows = [dict(variant=k, median_ms=statistics.median(v), ratio=statistics.median(v) / base, rounds=v, ranks=ranks[k])
            for k, v in samples.items()]
    lines = [f"# Training step: fixed capacity vs baseline ({datetime.date.today()}, "
             f"{os.environ.get('OMP_NUM_THREADS', 'default')} threads, {os.cpu_count()} cores)", "",
             "784-2048³-10 MLP, hidden layers at rank 64 (τ = 0, max_rank 64), batch 256, DLRT AdamW, backend auto; "
             "median over rounds of each process's median step; variants interleaved round-robin.", "",
             f"Baseline: {args.baseline}", "", "| variant | step (ms) | vs baseline | ranks |", "|---|---:|---:|---|"]
    lines += [f"| {r['variant']} | {r['median_ms']:.1f} | {r['ratio']:.2f}x | {r['ranks']} |" for r in rows]
    lines += ["", f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python benchmarks/capacity_step_time.py "
              f"--baseline {args.baseline} --rounds {args.rounds} --steps {args.steps}`"]
    print("\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "capacity_step_time.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(os.path.join(args.out, "capacity_step_time.json"), "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
