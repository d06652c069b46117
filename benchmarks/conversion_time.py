"""Time to convert dense layers to factorized ones (issue 19 item 3): ``LowRankLinear.from_weight``'s truncated SVD
(randomized range finder for small ranks, exact otherwise: lrtrain/layers/approximation.py) on single wide layers
and on the linear-layer stacks of GPT-2 small and a Llama-1B-sized model built from their configs' shapes
(random weights: the time of an SVD does not depend on what was learned), against the exact float64 SVD.

    OMP_NUM_THREADS=2 python benchmarks/conversion_time.py --out benchmarks/results   # writes conversion_time.md/json

Targets: 4096×4096 at rank 8 ≤ 3 s, 3072×8192 at rank 192 ≤ 15 s on 2 cores; the error of each conversion
relative to the exact truncated SVD's (Eckart-Young: the tail of the exact spectrum) is reported where the exact
SVD was run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import machine_info  # noqa: E402
from lrtrain.layers.approximation import truncated_svd_factors  # noqa: E402

# (name, layer shapes (out, in) × count) of the linear layers of each stack.
STACKS = {
    # GPT-2 small: 12 blocks of c_attn 768→2304, c_proj 768→768, c_fc 768→3072, mlp c_proj 3072→768.
    "GPT-2 small (124M)": [((2304, 768), 12), ((768, 768), 12), ((3072, 768), 12), ((768, 3072), 12)],
    # Llama 3.2 1B-sized: hidden 2048, intermediate 8192, 16 layers, 32 heads, 8 KV heads (k/v 2048→512).
    "Llama-1B-sized": [((2048, 2048), 32), ((512, 2048), 32), ((8192, 2048), 32), ((2048, 8192), 16)],
}
SINGLE = [((4096, 4096), 8), ((3072, 8192), 192)]


def _time(W: torch.Tensor, rank: int) -> tuple[float, torch.Tensor]:
    t = time.perf_counter()
    U, S, V = truncated_svd_factors(W, rank, None)
    dt = time.perf_counter() - t
    return dt, (W.double() - U.double() @ S.double() @ V.double().mT).norm()


def single_layers(exact: bool) -> list:
    rows = []
    for (m, n), r in SINGLE:
        torch.manual_seed(0)
        W = torch.randn(m, n) / n ** 0.5
        dt, err = _time(W, r)
        row = dict(shape=f"{m}x{n}", rank=r, seconds=round(dt, 2))
        if exact:
            t = time.perf_counter()
            sigma = torch.linalg.svdvals(W.double())
            row["exact_svd_seconds"] = round(time.perf_counter() - t, 2)
            row["error_vs_exact"] = round(float(err / sigma[r:].norm()), 5)
        rows.append(row)
    return rows


def stacks(ranks) -> list:
    rows = []
    for name, layers in STACKS.items():
        for r in ranks:
            total, n = 0.0, 0
            for (m, k), count in layers:
                torch.manual_seed(0)
                W = torch.randn(m, k) / k ** 0.5
                dt, _ = _time(W, r)
                total += dt * count  # same shape, same work: time one, count all
                n += count
            rows.append(dict(stack=name, layers=n, rank=r, seconds=round(total, 1)))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--ranks", default="8,64,128", help="stack ranks, comma-separated (default 8,64,128)")
    ap.add_argument("--no-exact", action="store_true", help="skip the exact float64 SVDs (minutes for 4096²)")
    args = ap.parse_args(argv)
    ranks = [int(x) for x in args.ranks.split(",")]
    res = dict(machine=machine_info(), command="python benchmarks/conversion_time.py " + " ".join(argv or sys.argv[1:]),
               date=time.strftime("%Y-%m-%d"), single=single_layers(not args.no_exact), stacks=stacks(ranks))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "conversion_time.json"), "w") as f:
        json.dump(res, f, indent=1)
    lines = [f"# Conversion time ({res['date']})", "", f"`{res['command']}`", "",
             f"Machine: {res['machine']}", "", "| layer | rank | time (s) | exact float64 SVD (s) | error / exact truncation's |",
             "|---|---:|---:|---:|---:|"]
    for row in res["single"]:
        lines.append(f"| {row['shape']} | {row['rank']} | {row['seconds']} | {row.get('exact_svd_seconds', '-')} | "
                     f"{row.get('error_vs_exact', '-')} |")
    lines += ["", "Linear-layer stacks (each shape timed once, times its count):", "",
              "| stack | layers | rank | conversion (s) |", "|---|---:|---:|---:|"]
    lines += [f"| {r['stack']} | {r['layers']} | {r['rank']} | {r['seconds']} |" for r in res["stacks"]]
    with open(os.path.join(args.out, "conversion_time.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
