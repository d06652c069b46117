"""How the training step's cost grows with the width (issue 19 item 2): a 2-layer square MLP (w → w → w, both
layers w × w), batch 512, at rank w/16 and at a fixed rank; dense AdamW, GaLoreAdamW (when galore-torch imports)
and lrtrain at its defaults (``lowrank(model, rank=r)``, ``DLRT(model.parameters())``) side by side, training steps
(forward + backward + optimizer step) interleaved in one process, medians; against the FLOP-ideal ratio
(r(m+n) + r²)/(mn) of a factorized layer's work to the dense one's.

    OMP_NUM_THREADS=2 python benchmarks/step_scaling.py --out benchmarks/results   # step_scaling.md/json/png

Target: lrtrain / dense ≤ 2 × the FLOP-ideal ratio at every width.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
from lrtrain import DLRT, lowrank  # noqa: E402
from lrtrain.cli.bench import StepCase, measure_interleaved  # noqa: E402
from lrtrain.cli.models import mlp  # noqa: E402

BATCH = 512


def _case(width: int, rank: int, method: str) -> StepCase:
    torch.manual_seed(0)
    model = mlp(width, [width], width)
    if method == "lrtrain":
        model = lowrank(model, rank=rank)
        opt = DLRT(model.parameters())
    elif method == "galore":
        matrices = [p for p in model.parameters() if p.dim() == 2]
        opt = harness.galore_adamw(list(model.parameters()), matrices, lr=1e-3, weight_decay=0.0, rank=rank)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    return StepCase(model, opt, BATCH, width, width)


def ideal(width: int, rank: int) -> float:
    return (rank * 2 * width + rank * rank) / (width * width)


def run(widths, fixed_rank: int, min_time: float) -> list:
    methods = ["dense", "lrtrain"] + (["galore"] if harness.galore_status()[0] else [])
    rows = []
    for w in widths:
        for r in sorted({w // 16, fixed_rank}):
            cases = {m: _case(w, r, m) for m in methods}
            t = measure_interleaved({m: c.train_step for m, c in cases.items()}, min_time=min_time)
            row = dict(width=w, rank=r, ideal=round(ideal(w, r), 4),
                       ms={m: round(t[m].median * 1e3, 2) for m in methods},
                       ranks=[l.rank for l in cases["lrtrain"].model.modules() if hasattr(l, "rank") and hasattr(l, "U")])
            row["lrtrain_vs_dense"] = round(row["ms"]["lrtrain"] / row["ms"]["dense"], 3)
            row["vs_ideal"] = round(row["lrtrain_vs_dense"] / row["ideal"], 2)
            if "galore" in row["ms"]:
                row["galore_vs_dense"] = round(row["ms"]["galore"] / row["ms"]["dense"], 3)
            print(row, flush=True)
            rows.append(row)
    return rows


def plot(rows: list, fixed_rank: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pick in (("rank = width/16", lambda r: r["rank"] == r["width"] // 16),
                        (f"rank {fixed_rank}", lambda r: r["rank"] == fixed_rank)):
        sel = [r for r in rows if pick(r)]
        if not sel:
            continue
        xs = [r["width"] for r in sel]
        line, = ax.plot(xs, [r["lrtrain_vs_dense"] for r in sel], "o-", label=f"lrtrain / dense, {label}")
        ax.plot(xs, [r["ideal"] for r in sel], ":", color=line.get_color(), label=f"FLOP-ideal, {label}")
        ax.plot(xs, [2 * r["ideal"] for r in sel], "--", color=line.get_color(), alpha=0.4, label=f"target 2× ideal, {label}")
        if "galore_vs_dense" in sel[0]:
            ax.plot(xs, [r["galore_vs_dense"] for r in sel], "s-", label=f"GaLore / dense, {label}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("width w (2 layers w × w, batch 512)")
    ax.set_ylabel("training step time / dense AdamW's")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--widths", default="1024,2048,4096")
    ap.add_argument("--fixed-rank", type=int, default=64)
    ap.add_argument("--min-time", type=float, default=3.0, help="seconds per method and case (default 3)")
    args = ap.parse_args(argv)
    widths = [int(w) for w in args.widths.split(",")]
    res = dict(command="python benchmarks/step_scaling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               machine=harness.machine_info(), date=time.strftime("%Y-%m-%d"),
               galore=harness.galore_status()[1], rows=run(widths, args.fixed_rank, args.min_time))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "step_scaling.json"), "w") as f:
        json.dump(res, f, indent=1)
    res["fixed_rank"] = args.fixed_rank
    plot(res["rows"], args.fixed_rank, os.path.join(args.out, "step_scaling.png"))
    lines = [f"# Training-step scaling ({res['date']})", "", f"`{res['command']}`", "", f"Machine: {res['machine']}",
             "", f"GaLore: {res['galore']}", "",
             "| width | rank | dense AdamW (ms) | lrtrain (ms) | lrtrain / dense | FLOP-ideal | / ideal (target ≤ 2) | final ranks |",
             "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['width']} | {r['rank']} | {r['ms']['dense']} | {r['ms']['lrtrain']} | {r['lrtrain_vs_dense']} | "
                     f"{r['ideal']} | {r['vs_ideal']} | {' '.join(map(str, r['ranks']))} |")
    with open(os.path.join(args.out, "step_scaling.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
