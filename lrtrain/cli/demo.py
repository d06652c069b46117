"""``lrtrain demo``: the same MLP trained dense (AdamW) and with lrtrain (DLRT), side by side.

Prints a comparison table and writes ``{out}/ranks.png`` (:func:`plot_demo`): test accuracy per epoch of
both models, active parameters (lrtrain against dense) and the rank of each factorized layer against its
capacity.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

from ..convert import active_parameters, lowrank
from ..optim import DLRT
from .args import (CLIError, data_spec, nonneg_float, nonneg_int, output_dir, positive_float, positive_int,
                   relative_tolerance)
from .data import load_dataset
from .models import mlp
from .train import fit

MIN_FEATURES = 16  # lowrank's default: narrower layers stay dense
FIGURE = "ranks.png"


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="train an MLP dense and low-rank, print a comparison, plot both runs",
                       description="Train the same MLP dense (AdamW) and with lrtrain (DLRT), print a comparison "
                                   f"table and write OUT/{FIGURE}: test accuracy per epoch, active parameters and "
                                   "the rank of each factorized layer against its capacity.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="digits", type=data_spec("digits"),
                   help="'digits' (scikit-learn's bundled 8x8 digits) or a directory of MNIST-format IDX files "
                        "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-...; optionally .gz)")
    p.add_argument("--hidden", type=positive_int, nargs="+", default=[256, 256],
                   help=f"hidden widths (layers with min(out, in) < {MIN_FEATURES} stay dense)")
    p.add_argument("--epochs", type=positive_int, default=15, help="training epochs of each model")
    p.add_argument("--batch-size", type=positive_int, default=64, help="training examples per step")
    p.add_argument("--lr", type=positive_float, default=2e-3, help="learning rate of AdamW and of DLRT (AdamW)")
    p.add_argument("--weight-decay", type=nonneg_float, default=5e-4,
                   help="decoupled weight decay λ of both optimizers")
    p.add_argument("--rank", type=positive_int, default=40,
                   help="initial rank of the factorized layers (DLRT adapts it). A layer takes min(RANK, "
                        "min(out, in)); a layer where that rank saves no parameters stays dense, and the report "
                        "says so with the rank asked for; a RANK no layer can take is refused")
    p.add_argument("--rank-rule", choices=["importance", "tolerance"], default="importance",
                   help="DLRT's rank rule: importance (DLRT's default: keeps the directions the loss is sensitive "
                        "to) or tolerance (the smallest rank whose discarded singular values have norm <= τ·||S||)")
    p.add_argument("--s-direction", choices=["projected", "own"], default="projected",
                   help="DLRT's S-step: projected (the default: the K- and L-steps' part in the current bases) or own "
                        "(from S's own gradient, DLRT-Net's)")
    p.add_argument("--tau", type=relative_tolerance, default=None,
                   help="the rank rule's relative tolerance τ, in [0, 1); default: the rule's (0.02 importance, "
                        "0.1 tolerance); 0 truncates nothing")
    p.add_argument("--seed", type=nonneg_int, default=0,
                   help="seed of the initial weights and of the batch order (the run is deterministic)")
    p.add_argument("--out", default="lrtrain_out/demo", type=output_dir,
                   help=f"directory for the figure {FIGURE} (created if missing)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (shown only when stderr is a terminal and tqdm is installed)")
    p.set_defaults(func=run)


def _progress(enabled: bool, desc: str):
    """A tqdm wrapper for the batch iterator, or None: only when ``enabled``, stderr is a terminal (a log
    file or pipe would get bar fragments) and tqdm is installed."""
    isatty = getattr(sys.stderr, "isatty", None)
    if not enabled or isatty is None or not isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return lambda it: tqdm(it, desc=desc, leave=False, file=sys.stderr)


def _rank_note(layer, rank: int) -> str:
    """For a Linear layer that cannot start at ``rank``: how the rank was capped (else '')."""
    if isinstance(layer, nn.Linear) and MIN_FEATURES <= min(layer.weight.shape) < rank:
        return f" (--rank {rank} capped at min(out, in) = {min(layer.weight.shape)})"
    return ""


def run(args) -> int:
    data = load_dataset(args.data)
    sizes = (data.in_features, args.hidden, data.num_classes)

    # Both models are built before any training (the global RNG is seeded before each), so a
    # conversion that factorizes nothing is refused before minutes of dense training.
    torch.manual_seed(args.seed)
    dense = mlp(*sizes)
    layers = dict(dense.named_modules())
    torch.manual_seed(args.seed)
    model = lowrank(mlp(*sizes), rank=args.rank, min_features=MIN_FEATURES)
    report = model.lrtrain_summary
    skipped = [(name, reason + _rank_note(layers.get(name), args.rank)) for name, reason in report.skipped]
    if not report.layers:
        why = "; ".join(f"layer {name}: {reason}" for name, reason in skipped)
        raise CLIError(f"no layer of MLP {'-'.join(map(str, [data.in_features, *args.hidden, data.num_classes]))} "
                       f"can be factorized at rank {args.rank} ({why}); a layer needs min(out, in) >= {MIN_FEATURES} "
                       "and a rank r with r(out + in) + r² < out·in")

    dense_params = sum(p.numel() for p in dense.parameters())
    opt = torch.optim.AdamW(dense.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    h_dense = fit(dense, opt, data, args.epochs, args.batch_size, args.seed, _progress(not args.no_progress, "dense"),
                  eval_each_epoch=True)

    active = [report.params_active]  # before the first step, then after each
    opt = DLRT(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, tau=args.tau, rank_rule=args.rank_rule,
               s_direction=args.s_direction)
    h_lr = fit(model, opt, data, args.epochs, args.batch_size, args.seed, _progress(not args.no_progress, "lrtrain"),
               on_step=lambda m, *_: active.append(active_parameters(m)), eval_each_epoch=True)
    final = h_lr.ranks[-1]
    allocated = sum(p.numel() for p in model.parameters())
    rows = {"dense AdamW": (h_dense, dense_params, "-"),
            "lrtrain DLRT": (h_lr, active[-1], " ".join(str(r) for r in final.values()))}

    print(f"\n{data.name}: {len(data.train_y)} train / {len(data.test_y)} test, MLP {data.in_features}-"
          f"{'-'.join(map(str, args.hidden))}-{data.num_classes}, {args.epochs} epochs, "
          f"{torch.get_num_threads()} threads\n")
    print("| model | test acc. (%) | parameters (active) | final rank per layer | s / epoch |")
    print("|---|---:|---:|---|---:|")
    for name, (h, n, r) in rows.items():
        print(f"| {name} | {h.test_accuracy:.2f} | {n:,} | {r} | {sum(h.epoch_seconds) / len(h.epoch_seconds):.2f} |")
    print(f"\nlrtrain: {allocated:,} parameters allocated (factors at their capacity); "
          f"{len(report.layers)} of {len(report.layers) + len(report.skipped)} Linear layers factorized")
    for name, shape, r0, cap in report.layers:
        print(f"  layer {name} ({shape}): rank {r0} at the start (--rank), {final[name]} at the end; capacity {cap}")
    for name, reason in skipped:
        print(f"  layer {name} left dense: {reason}")
    path = save_figure(h_dense, h_lr, dense_params, active, allocated, {n: (r0, c) for n, _, r0, c in report.layers},
                       args.out)
    if path:
        print(f"\nfigure (test accuracy per epoch, active parameters, rank per layer): {path}")
    return 0


def plot_demo(dense, lowrank_hist, dense_params: int, active: list, allocated: int, layers: dict):
    """The demo's figure (a ``matplotlib.figure.Figure``, no pyplot state): three panels sharing the epoch axis.

    1. test accuracy after each epoch, lines ``dense`` and ``lrtrain`` (:class:`History.epoch_accuracies`);
    2. parameters: ``dense``, ``lrtrain (active)`` over steps (``active``: before the first step, then after
       each) and ``lrtrain (allocated)``;
    3. the rank of each factorized layer over steps (``layers``: name -> (initial rank, capacity), then
       ``lowrank_hist.ranks``) with its capacity (dashed), on integer ticks.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    epochs = len(lowrank_hist.epoch_accuracies)
    steps = len(lowrank_hist.ranks)
    x = [i * epochs / steps for i in range(steps + 1)]  # step i at epoch i / steps-per-epoch
    fig = Figure(figsize=(13, 3.8))
    acc, par, rk = fig.subplots(1, 3)

    ep = list(range(1, epochs + 1))
    for name, h in (("dense", dense), ("lrtrain", lowrank_hist)):  # clip_on: the last epoch sits on the edge
        acc.plot(ep, h.epoch_accuracies, marker="o", ms=3, clip_on=False, label=name)
    acc.set_title("test accuracy after each epoch")
    acc.set_ylabel("test accuracy (%)")

    par.plot([0, epochs], [dense_params] * 2, label="dense")
    par.plot(x, active, label="lrtrain (active)")
    par.plot([0, epochs], [allocated] * 2, ls=":", color="gray", label="lrtrain (allocated)")
    par.set_ylim(0, 1.08 * max(dense_params, allocated, *active))
    par.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k" if v else "0"))
    par.set_title("parameters")

    for i, (name, (initial, cap)) in enumerate(layers.items()):
        color = f"C{i + 2}"  # C0 / C1 are dense / lrtrain in the other panels
        rk.plot(x, [initial] + [step[name] for step in lowrank_hist.ranks], color=color, label=f"layer {name}")
        rk.axhline(cap, color=color, ls="--", lw=1, label=f"layer {name} capacity {cap}")
    rk.set_ylim(0, 1.08 * max(cap for _, cap in layers.values()))
    rk.yaxis.set_major_locator(MaxNLocator(integer=True))
    rk.set_title("rank per layer (dashed: capacity)")
    rk.set_ylabel("rank")

    for ax in (acc, par, rk):
        ax.set_xlabel("epoch")
        ax.set_xlim(0, epochs)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def save_figure(dense, lowrank_hist, dense_params, active, allocated, layers, out: str) -> str | None:
    """:func:`plot_demo` written to ``{out}/ranks.png``; None (and a note) without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("(matplotlib not installed: no figure)")
        return None
    fig = plot_demo(dense, lowrank_hist, dense_params, active, allocated, layers)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, FIGURE)
    fig.savefig(path, dpi=120)
    return path
