"""``lrtrain bench``: a quick run of the benchmark suite's measurements, written up as a markdown report.

Layers (nn.Linear vs LowRankLinear, nn.Conv2d vs LowRankConv2d), the training step at the same rank
(dense AdamW, GaLoreAdamW when galore-torch is installed, lrtrain DLRT), and an end-to-end MLP run;
writes ``{out}/{name}.md``, ``{name}.json`` and ``{name}_speedup.png``, ``{name}_accuracy.png``,
``{name}_ranks.png``. The measuring code is :mod:`lrtrain.benchmarking`.
"""
from __future__ import annotations

import argparse
import os
import shlex

GROUPS = ("layers", "conv", "optimizer", "e2e")
DEFAULT_MNIST = os.path.join("..", "shared", "data", "mnist")


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark lrtrain vs dense training and GaLore; write a report with plots",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="lrtrain_out/bench", help="output directory")
    p.add_argument("--name", default="bench", help="file name stem of the report and plots")
    p.add_argument("--only", nargs="+", choices=GROUPS, default=list(GROUPS), help="groups to run")
    p.add_argument("--data", default="auto",
                   help=f"MNIST-format IDX directory, 'digits', or 'auto' ({DEFAULT_MNIST} if it exists, else digits)")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096], help="square layer sizes")
    p.add_argument("--ranks", type=int, nargs="+", default=[32, 64, 128, 256, 512], help="layer ranks")
    p.add_argument("--layer-batch", type=int, default=512, help="rows per layer forward+backward")
    p.add_argument("--conv-ranks", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--conv-hw", type=int, default=16, help="conv block input height = width")
    p.add_argument("--conv-batch", type=int, default=8, help="conv block batch size")
    p.add_argument("--step-ranks", type=int, nargs="+", default=[64, 128], help="ranks of the training-step group")
    p.add_argument("--hidden", type=int, nargs="+", default=[2048, 2048, 2048], help="MLP hidden widths")
    p.add_argument("--batch-size", type=int, default=128, help="MLP batch size (step and end-to-end groups)")
    p.add_argument("--epochs", type=int, default=1, help="end-to-end epochs")
    p.add_argument("--train-subset", type=int, default=None, help="use only the first N training examples")
    p.add_argument("--rank", type=int, default=128, help="end-to-end: GaLore rank and DLRT initial rank")
    p.add_argument("--taus", type=float, nargs="+", default=[0.12],
                   help="end-to-end: DLRT truncation tolerance(s), one lrtrain run each")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--galore-gap", type=int, default=200, help="GaLore update_proj_gap")
    p.add_argument("--galore-scale", type=float, default=0.25, help="GaLore scale")
    p.add_argument("--min-time", type=float, default=0.5, help="seconds of timed calls per measurement")
    p.add_argument("--probes", type=int, default=4, help="end-to-end memory probes (besides the one before training)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.set_defaults(func=run)
    global _PARSER
    _PARSER = p


_PARSER = None


def _command(args) -> str:
    """The ``lrtrain bench`` command line that reproduces ``args`` (options that differ from the defaults)."""
    defaults = vars(_PARSER.parse_args([])) if _PARSER is not None else {}
    parts = ["lrtrain", "bench"]
    for key, value in vars(args).items():
        if key in ("func", "command") or defaults.get(key, object()) == value:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif isinstance(value, (list, tuple)):
            parts += [flag] + [str(v) for v in value]
        elif value is not None and value is not False:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def _load(spec: str):
    from ..data import load_dataset

    if spec == "auto":
        spec = DEFAULT_MNIST if os.path.isdir(DEFAULT_MNIST) else "digits"
    return load_dataset(spec)


def run(args) -> int:
    from .. import benchmarking as B

    cfg = B.BenchConfig(
        sizes=tuple(args.sizes), ranks=tuple(args.ranks), layer_batch=args.layer_batch,
        conv_ranks=tuple(args.conv_ranks), conv_hw=args.conv_hw, conv_batch=args.conv_batch, step_ranks=tuple(args.step_ranks), hidden=tuple(args.hidden),
        batch_size=args.batch_size, epochs=args.epochs, train_subset=args.train_subset, rank=args.rank,
        taus=tuple(args.taus), lr=args.lr, weight_decay=args.weight_decay, galore_gap=args.galore_gap,
        galore_scale=args.galore_scale, min_time=args.min_time, probes=args.probes, groups=tuple(args.only),
        seed=args.seed)
    data = _load(args.data) if "e2e" in args.only else None
    res = B.run_bench(cfg, data, command=_command(args))
    path = B.write_report(res, args.out, args.name)
    plots = [] if args.no_plots else B.make_plots(res, args.out, args.name)
    print(f"\nreport: {path}")
    for p in plots:
        print(f"plot:   {p}")
    print()
    for t in B.target_checks(res):
        v = t["value"]
        val = "-" if v is None else (f"{v:.0%}" if "%" in t["threshold"] else f"{v:.2f}x")
        print(f"  [{t['status']}] {t['target']}: {val} (target {t['threshold']})")
    return 0
