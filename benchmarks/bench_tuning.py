"""The validation sweep behind lrtrain's end-to-end hyperparameters (:class:`harness.e2e.E2ESettings`).

The last ``n_val`` (2,000) training examples are held out as a validation set; each configuration
trains the 784-2048-2048-2048-10 MLP on the rest for 5 epochs (batch 128, weight decay 5e-4, seed 0,
the end-to-end group's initial weights and batch order) and records the validation accuracy after
each epoch, epoch times and final ranks. The test set is never looked at. Run it as

    python benchmarks/bench_tuning.py --out benchmarks/results/bench_tuning.jsonl \\
        dense:1e-3 lrtrain:1e-3:0.12:128 lrtrain:1e-3:0.06:128 ...

(``dense:LR`` or ``lrtrain:LR:TAU:RANK``; one line of JSON per configuration is appended to ``--out``).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from harness import MNIST_DIR
from harness.methods import DENSE, Method
from lrtrain import active_parameters
from lrtrain.cli.data import Dataset, load_idx
from lrtrain.cli.models import mlp
from lrtrain.cli.train import fit
from lrtrain.cli.train import ranks as layer_ranks


def validation_split(data: Dataset, n_val: int = 2000) -> Dataset:
    """Train on all but the last ``n_val`` training examples; their last ``n_val`` are the 'test' set."""
    n = len(data.train_y) - n_val
    if n < 1 or n_val < 1:
        raise ValueError(f"n_val must be in [1, {len(data.train_y) - 1}], got {n_val}")
    return Dataset(data.name, data.train_x[:n], data.train_y[:n], data.train_x[n:], data.train_y[n:],
                   data.num_classes)


def parse_config(spec: str) -> dict:
    """``dense:LR`` or ``lrtrain:LR:TAU:RANK``."""
    parts = spec.split(":")
    try:
        if parts[0] == "dense" and len(parts) == 2:
            return dict(kind="dense", lr=float(parts[1]), tau=0.0, r0=0)
        if parts[0] == "lrtrain" and len(parts) == 4:
            return dict(kind="lrtrain", lr=float(parts[1]), tau=float(parts[2]), r0=int(parts[3]))
    except ValueError:
        pass
    raise ValueError(f"configuration {spec!r}: expected dense:LR or lrtrain:LR:TAU:RANK")


def run_config(cfg: dict, data: Dataset, epochs: int = 5, hidden=(2048, 2048, 2048), batch_size: int = 128,
               weight_decay: float = 5e-4, seed: int = 0, backend: str = "reference") -> dict:
    """Train one configuration on ``data`` (a :func:`validation_split`); validation accuracy per epoch."""
    method = DENSE if cfg["kind"] == "dense" else Method("lrtrain", "lrtrain", {"backend": backend})
    torch.manual_seed(seed)
    model = method.prepare(mlp(data.in_features, list(hidden), data.num_classes), cfg["r0"] or 1)
    opt = method.optimizer(model, cfg["lr"], weight_decay, cfg["r0"], cfg["tau"])
    accs, secs = [], []
    for e in range(epochs):
        h = fit(model, opt, data, 1, batch_size, seed=seed + e)
        accs.append(h.test_accuracy)
        secs.append(h.epoch_seconds[0])
    return dict(cfg, epochs=epochs, val_acc=accs, epoch_s=secs, final_ranks=list(layer_ranks(model).values()),
                params=active_parameters(model))


def write_markdown(rows: list, path: str, command: str = "") -> str:
    """A table of sweep rows (validation accuracy per epoch, training seconds, final ranks) at ``path``."""
    L = ["# lrtrain end-to-end hyperparameter sweep (validation split)", "",
         "MNIST MLP 784-2048-2048-2048-10, batch 128, weight decay 5e-4, seed 0, 5 epochs; trained on the first "
         "15,435 training examples, validated on the last 2,000 (the test set is not used). lrtrain rows use the "
         "reference update. Epoch seconds: training loop, 2 CPU cores, under an exclusive CPU lock.", ""]
    if command:
        L += ["```bash", command, "```", ""]
    L += ["| method | lr | τ | initial rank | validation acc. per epoch (%) | final val. acc. | train s | final ranks |",
          "|---|---:|---:|---:|---|---:|---:|---|"]
    for r in rows:
        lrt = r["kind"] != "dense"
        L.append(f"| {'lrtrain DLRT' if lrt else 'dense AdamW'} | {r['lr']:g} | {r['tau'] if lrt else '-'} | "
                 f"{r['r0'] if lrt else '-'} | {' '.join(f'{a:.2f}' for a in r['val_acc'])} | {r['val_acc'][-1]:.2f} | "
                 f"{sum(r['epoch_s']):.1f} | {' '.join(map(str, r['final_ranks'])) or '-'} |")
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/bench_tuning.py", description=__doc__.split("\n")[0])
    p.add_argument("configs", nargs="+", help="dense:LR or lrtrain:LR:TAU:RANK")
    p.add_argument("--data", default=str(MNIST_DIR), help="directory of MNIST-format IDX files")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--n-val", type=int, default=2000)
    p.add_argument("--out", default=None, help="JSON lines file to append to")
    p.add_argument("--md", default=None, help="write a markdown table of all rows in --out here")
    args = p.parse_args(argv)
    data = validation_split(load_idx(args.data), args.n_val)
    for spec in args.configs:
        row = run_config(parse_config(spec), data, args.epochs)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    if args.md and args.out:
        with open(args.out) as f:
            write_markdown([json.loads(line) for line in f if line.strip()], args.md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
