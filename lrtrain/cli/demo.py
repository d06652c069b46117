"""``lrtrain demo``: the same MLP trained dense (AdamW) and with lrtrain (DLRT), side by side."""
from __future__ import annotations

import argparse
import os

import torch

from ..convert import active_parameters, lowrank
from ..optim import DLRT
from .args import CLIError, data_spec, nonneg_float, nonneg_int, positive_float, positive_int
from .data import load_dataset
from .models import mlp
from .train import fit

MIN_FEATURES = 16  # lowrank's default: narrower layers stay dense


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="train an MLP dense and low-rank, print a comparison, plot ranks",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="digits", type=data_spec("digits"),
                   help="'digits' (bundled) or a directory of MNIST-format IDX files")
    p.add_argument("--hidden", type=positive_int, nargs="+", default=[256, 256],
                   help=f"hidden widths (layers with min(out, in) < {MIN_FEATURES} stay dense)")
    p.add_argument("--epochs", type=positive_int, default=15)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--lr", type=positive_float, default=2e-3)
    p.add_argument("--weight-decay", type=nonneg_float, default=5e-4)
    p.add_argument("--rank", type=positive_int, default=40, help="initial rank of the factorized layers")
    p.add_argument("--tau", type=nonneg_float, default=0.12, help="relative truncation tolerance")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--out", default="lrtrain_out/demo", help="directory for ranks.png")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.set_defaults(func=run)


def _progress(enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return lambda it: tqdm(it, desc=desc, leave=False)


def run(args) -> int:
    data = load_dataset(args.data)
    sizes = (data.in_features, args.hidden, data.num_classes)
    rows = {}

    # Both models are built before any training (the global RNG is seeded before each), so a
    # conversion that factorizes nothing is refused before minutes of dense training.
    torch.manual_seed(args.seed)
    dense = mlp(*sizes)
    torch.manual_seed(args.seed)
    model = lowrank(mlp(*sizes), rank=args.rank, min_features=MIN_FEATURES)
    report = model.lrtrain_summary
    if not report.layers:
        why = "; ".join(f"layer {name}: {reason}" for name, reason in report.skipped)
        raise CLIError(f"no layer of MLP {'-'.join(map(str, [data.in_features, *args.hidden, data.num_classes]))} "
                       f"can be factorized at rank {args.rank} ({why}); a layer needs min(out, in) >= {MIN_FEATURES} "
                       "and a rank r with r(out + in) + r² < out·in")

    opt = torch.optim.AdamW(dense.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    h_dense = fit(dense, opt, data, args.epochs, args.batch_size, args.seed, _progress(not args.no_progress, "dense"))
    rows["dense AdamW"] = (h_dense, sum(p.numel() for p in dense.parameters()), "-")

    opt = DLRT(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, tau=args.tau)
    h_lr = fit(model, opt, data, args.epochs, args.batch_size, args.seed, _progress(not args.no_progress, "lrtrain"))
    final = h_lr.ranks[-1]
    rows["lrtrain DLRT"] = (h_lr, active_parameters(model), " ".join(str(r) for r in final.values()))
    allocated = sum(p.numel() for p in model.parameters())

    print(f"\n{data.name}: {len(data.train_y)} train / {len(data.test_y)} test, MLP {data.in_features}-"
          f"{'-'.join(map(str, args.hidden))}-{data.num_classes}, {args.epochs} epochs, "
          f"{torch.get_num_threads()} threads\n")
    print("| model | test acc. (%) | parameters (active) | final rank per layer | s / epoch |")
    print("|---|---:|---:|---|---:|")
    for name, (h, n, r) in rows.items():
        print(f"| {name} | {h.test_accuracy:.2f} | {n:,} | {r} | {sum(h.epoch_seconds) / len(h.epoch_seconds):.2f} |")
    print(f"\nlrtrain: {allocated:,} parameters allocated (factors at their capacity); "
          f"{len(report.layers)} of {len(report.layers) + len(report.skipped)} Linear layers factorized")
    for name, reason in report.skipped:
        print(f"  layer {name} left dense: {reason}")
    path = _plot_ranks(h_lr.ranks, args.out)
    if path:
        print(f"\nrank per layer over steps: {path}")
    return 0


def _plot_ranks(ranks: list, out: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return None
    os.makedirs(out, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name in ranks[0]:
        ax.plot([step[name] for step in ranks], label=f"layer {name}")
    ax.set_xlabel("step")
    ax.set_ylabel("rank")
    ax.set_title("lrtrain: rank per layer during training")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out, "ranks.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
