"""Training-step time of fixed-capacity factors against an earlier lrtrain checkout, in one process.

The 784-2048-2048-2048-10 MLP, hidden layers factorized at rank 64 (τ = 0 and max_rank = 64, so the rank
stays at 64 and every timed step does the same work), batch 256, DLRT (AdamW, backend "auto"). One training
step = zero_grad + forward + backward (timed as "fwd+bwd") + ``opt.step()`` (timed as "step").

Variants: the baseline checkout (``--baseline``, e.g. ``git worktree add /tmp/base 6ab3882`` built with
``python setup.py build_ext --inplace``; it is imported under the name ``lrtrain_base``), and this checkout
with the same call ``lowrank(rank=64, max_rank=64)`` (capacity = max_rank = 64 by the capacity rule) and
with capacity 128 (2·rank: room for the rank to double). All variants live in one process and their steps
are interleaved round-robin, so machine noise hits them alike; the report gives medians per phase and the
ratio of the whole step to the baseline's.

    OMP_NUM_THREADS=2 python benchmarks/capacity_step_time.py --baseline /tmp/base --out benchmarks/results
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import lrtrain  # noqa: E402
from lrtrain.cli.models import mlp  # noqa: E402


def import_baseline(path: str):
    """The package ``lrtrain`` of checkout ``path`` (built in place), importable as ``lrtrain_base``."""
    tmp = tempfile.mkdtemp(prefix="lrtrain_base_")
    shutil.copytree(os.path.join(path, "lrtrain"), os.path.join(tmp, "lrtrain_base"))
    backends = os.path.join(tmp, "lrtrain_base", "ext", "backends.py")
    with open(backends) as f:
        src = f.read()
    with open(backends, "w") as f:  # its compiled module by its new package name
        f.write(src.replace('f"lrtrain.ext._{name}"', 'f"lrtrain_base.ext._{name}"'))
    sys.path.insert(0, tmp)
    import lrtrain_base

    return lrtrain_base


def case(pkg, **kw):
    torch.manual_seed(0)
    model = pkg.lowrank(mlp(784, [2048, 2048, 2048], 10), rank=64, max_rank=64, **kw)
    return model, pkg.DLRT(model.parameters(), lr=1e-4, tau=0.0, rank_rule="tolerance", s_direction="own")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="path of the earlier checkout (built in place)")
    ap.add_argument("--steps", type=int, default=80, help="timed steps per variant (after 5 warm-up steps)")
    ap.add_argument("--out", default=None, help="folder for capacity_step_time.{md,json}")
    args = ap.parse_args(argv)
    base = import_baseline(args.baseline)
    variants = {"baseline": case(base), "fixed capacity, c = 64 (same call)": case(lrtrain),
                "fixed capacity, c = 128 (2·rank)": case(lrtrain, capacity=128)}
    x, y = torch.randn(256, 784), torch.randint(0, 10, (256,))
    times = {k: {"fwd+bwd": [], "step": [], "total": []} for k in variants}
    for i in range(args.steps + 5):
        for name, (model, opt) in variants.items():
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            if i >= 5:
                times[name]["fwd+bwd"].append(t1 - t0)
                times[name]["step"].append(t2 - t1)
                times[name]["total"].append(t2 - t0)
    med = {k: {p: 1e3 * statistics.median(v) for p, v in ph.items()} for k, ph in times.items()}
    ref = med["baseline"]["total"]
    rows = [dict(variant=k, **{p + "_ms": v for p, v in m.items()}, ratio=m["total"] / ref,
                 ranks=sorted({l.rank for l in variants[k][0].modules() if hasattr(l, "max_rank")}))
            for k, m in med.items()]
    threads = torch.get_num_threads()
    lines = [f"# Training step: fixed capacity vs baseline ({datetime.date.today()}, {threads} threads, "
             f"{os.cpu_count()} cores, torch {torch.__version__})", "",
             "784-2048³-10 MLP, hidden layers at rank 64 (τ = 0, max_rank 64), batch 256, DLRT AdamW, backend auto; "
             f"medians over {args.steps} steps, all variants in one process, interleaved step by step.", "",
             f"Baseline: `{args.baseline}`", "",
             "| variant | fwd+bwd (ms) | opt.step (ms) | train step (ms) | vs baseline | ranks |", "|---|---:|---:|---:|---:|---|"]
    lines += [f"| {r['variant']} | {r['fwd+bwd_ms']:.2f} | {r['step_ms']:.2f} | {r['total_ms']:.2f} | {r['ratio']:.3f}x | "
              f"{r['ranks']} |" for r in rows]
    lines += ["", f"Command: `OMP_NUM_THREADS={threads} python benchmarks/capacity_step_time.py --baseline "
              f"{args.baseline} --steps {args.steps}`"]
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
