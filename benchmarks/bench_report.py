"""The benchmark suite in one run, written up as a markdown report with plots (benchmarks/results/bench*.md).

Layers (nn.Linear vs LowRankLinear with the FLOP-ideal curve, nn.Conv2d vs LowRankConv2d), the training
and optimizer step at the same rank (dense AdamW, GaLoreAdamW when galore-torch imports, lrtrain DLRT
reference and fused), and end-to-end MNIST MLP runs; writes ``{out}/{name}.md``, ``{name}.json`` and
``{name}_speedup.png``, ``{name}_accuracy.png``, ``{name}_ranks.png``, and prints the issue's targets. The
measuring code is :mod:`harness`. The defaults take a few minutes on 2 CPU cores (1 end-to-end epoch)::

    python benchmarks/bench_report.py --out benchmarks/results
    python benchmarks/bench_report.py --out benchmarks/results --name bench_e2e_full --only e2e --epochs 5

Bad arguments end in one line on stderr and exit status 2, as with the ``lrtrain`` console script.
"""
from __future__ import annotations

import argparse
import os
import sys

import harness as B
from lrtrain.cli.args import (ArgumentParser, command_line, file_name, data_spec, nonneg_float, nonneg_int, positive_float,
                              positive_int)
from lrtrain.cli.data import load_dataset

PROG = "python benchmarks/bench_report.py"


def _step_model(spec: str) -> str:
    try:
        B.StepModel.parse(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return spec


def parser() -> ArgumentParser:
    """The script's arguments (ranges checked while parsing)."""
    s = B.E2ESettings()
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="lrtrain_out/bench", help="output directory")
    p.add_argument("--name", type=file_name, default="bench", help="file name stem of the report and plots")
    p.add_argument("--only", nargs="+", choices=B.GROUPS, default=list(B.GROUPS), help="groups to run")
    p.add_argument("--data", default="auto", type=data_spec("auto", "digits"),
                   help=f"MNIST-format IDX directory, 'digits', or 'auto' ({B.MNIST_DIR} if it exists, else digits)")
    g = p.add_argument_group("layers and conv")
    g.add_argument("--sizes", type=positive_int, nargs="+", default=[1024, 2048, 4096], help="square layer sizes")
    g.add_argument("--ranks", type=positive_int, nargs="+", default=[32, 64, 128, 256, 512], help="layer ranks")
    g.add_argument("--layer-batch", type=positive_int, default=512, help="rows per layer forward+backward")
    g.add_argument("--conv-ranks", type=positive_int, nargs="+", default=[32, 64, 128])
    g.add_argument("--conv-hw", type=positive_int, default=16, help="conv block input height = width")
    g.add_argument("--conv-batch", type=positive_int, default=8, help="conv block batch size")
    g = p.add_argument_group("optimizer step")
    g.add_argument("--step-models", nargs="+", type=_step_model, default=[m.spec() for m in B.DEFAULT_STEP_MODELS],
                   help="MLPs of the step group as HIDDEN@BATCH:RANKS (784 inputs, 10 classes)")
    g = p.add_argument_group("end to end")
    g.add_argument("--hidden", type=positive_int, nargs="+", default=list(s.hidden), help="MLP hidden widths")
    g.add_argument("--batch-size", type=positive_int, default=s.batch_size)
    g.add_argument("--epochs", type=positive_int, default=1, help="epochs (the full comparison uses 5)")
    g.add_argument("--train-subset", type=positive_int, default=None, help="use only the first N training examples")
    g.add_argument("--lr", type=positive_float, default=s.lr, help="dense AdamW and GaLoreAdamW learning rate")
    g.add_argument("--weight-decay", type=nonneg_float, default=s.weight_decay)
    g.add_argument("--galore-rank", type=positive_int, default=s.galore_rank)
    g.add_argument("--galore-gap", type=positive_int, default=s.galore_gap, help="GaLore update_proj_gap")
    g.add_argument("--galore-scale", type=positive_float, default=s.galore_scale, help="GaLore scale")
    g.add_argument("--lrtrain-lr", type=positive_float, default=s.lrtrain_lr, help="lrtrain DLRT learning rate")
    g.add_argument("--rank", type=positive_int, default=s.lrtrain_rank, help="lrtrain DLRT initial rank")
    g.add_argument("--tau", type=nonneg_float, default=s.lrtrain_tau, help="lrtrain DLRT truncation tolerance")
    g.add_argument("--taus", type=nonneg_float, nargs="+", default=[],
                   help="extra τ values: one more lrtrain run each")
    g.add_argument("--probes", type=nonneg_int, default=2, help="memory probes during training (besides one before it)")
    g.add_argument("--seed", type=nonneg_int, default=s.seed)
    p.add_argument("--min-time", type=positive_float, default=0.5, help="seconds of timed calls per measurement")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return p


def config(args) -> B.BenchConfig:
    """The :class:`harness.BenchConfig` of parsed ``args``."""
    e2e = B.E2ESettings(hidden=tuple(args.hidden), epochs=args.epochs, batch_size=args.batch_size,
                        weight_decay=args.weight_decay, lr=args.lr, galore_rank=args.galore_rank,
                        galore_gap=args.galore_gap, galore_scale=args.galore_scale, lrtrain_lr=args.lrtrain_lr,
                        lrtrain_rank=args.rank, lrtrain_tau=args.tau, seed=args.seed, probes=args.probes)
    return B.BenchConfig(
        sizes=tuple(args.sizes), ranks=tuple(args.ranks), layer_batch=args.layer_batch,
        conv_ranks=tuple(args.conv_ranks), conv_hw=args.conv_hw, conv_batch=args.conv_batch,
        step_models=tuple(B.StepModel.parse(s) for s in args.step_models), e2e=e2e, taus=tuple(args.taus),
        train_subset=args.train_subset, min_time=args.min_time, groups=tuple(args.only))


def _data(spec: str):
    """The end-to-end data set: ``auto`` is MNIST at :data:`harness.MNIST_DIR` when it exists, else digits."""
    if spec == "auto":
        spec = str(B.MNIST_DIR) if os.path.isdir(B.MNIST_DIR) else "digits"
    return load_dataset(spec)


def main(argv=None) -> int:
    """Run the suite; the exit status (2 with one line on stderr for bad arguments)."""
    p = parser()
    try:
        args = p.parse_args(argv)
        if "layers" in args.only and not any(r <= n for n in args.sizes for r in args.ranks):
            p.error(f"layers group: no --ranks value {args.ranks} is <= a --sizes value {args.sizes} "
                    "(ranks above a size are skipped), so nothing would be measured")
    except SystemExit as e:  # --help (0) or an error already printed in one line (2)
        return e.code if isinstance(e.code, int) else 2
    data = _data(args.data) if "e2e" in args.only else None
    res = B.run_bench(config(args), data, command=command_line(PROG, p, args))
    path = B.write_report(res, args.out, args.name)
    plots = [] if args.no_plots else B.make_plots(res, args.out, args.name)
    print(f"\nreport: {path}")
    for f in plots:
        print(f"plot:   {f}")
    print()
    for t in B.target_checks(res):
        print(f"  [{t['status']}] {t['target']}: {B.format_target(t)} (target {t['threshold']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
