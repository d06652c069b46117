"""Neural rank collapse on real MNIST (Zangrando et al., arXiv:2402.03991), and collapse-guided DLRT.

Part ``sweep``: a dense ReLU MLP 784-4×256-10 trained with SGD (momentum 0.9, cosine learning rate to 0,
batch 128) at each weight decay λ; then, per hidden layer on the whole training set
(:func:`lrtrain.collapse.analysis.full_data_collapse`): the numerical rank #{j : σ_j > 1e-3·σ_1}, the
τ-rank (smallest k with tail_k ≤ τ‖W‖_F, the DLRT rule), tail_K(W), the normalized within-class
variation TCV/(TCV+BCV) of the layer's inputs, and the bound B = (‖R‖_F + ‖Δ‖₂TCV^{1/2}/N)/λ.
The same sweep is repeated with lrtrain (factorized layers from rank 64, DLRT SGD, the same λ, τ),
reporting the ranks DLRT settles at. Part ``guided``: DLRT with and without ``guide=CollapseMonitor``
on MNIST, same τ: accuracy, final ranks, optimizer time, guide decisions and the core-SVD work.

    python benchmarks/collapse_sweep.py sweep     # ≈ 10 min on 2 cores: collapse_sweep.{json,md}, PNGs
    python benchmarks/collapse_sweep.py guided    # ≈ 5 min: collapse_guided.{json,md}
    python benchmarks/collapse_sweep.py overhead  # ≈ 1 min: collapse_overhead.{json,md}
    python benchmarks/collapse_sweep.py sweep --quick   # a small smoke version
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (tests/test_collapse.py): find harness
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import lrtrain  # noqa: E402
import lrtrain.rank  # noqa: E402
from harness import MNIST_DIR  # noqa: E402
from harness.machine import machine_info  # noqa: E402
from lrtrain.collapse.analysis import full_data_collapse  # noqa: E402
from lrtrain.cli.data import batches, load_idx  # noqa: E402
from lrtrain.cli.models import mlp  # noqa: E402
from lrtrain.cli.train import evaluate, ranks  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
K = 10


def train(model, opt, data, epochs: int, batch_size: int = 128, seed: int = 0, monitor=None, lr: float | None = None):
    """SGD-style loop with a cosine learning rate to 0; returns (seconds in opt.step, total seconds)."""
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(data.train_y) / batch_size)
    base = [g["lr"] for g in opt.param_groups]
    t_opt, t0, k = 0.0, time.perf_counter(), 0
    model.train()
    for _ in range(epochs):
        for xb, yb in batches(data.train_x, data.train_y, batch_size, gen):
            for g, b in zip(opt.param_groups, base):
                g["lr"] = b * 0.5 * (1 + math.cos(math.pi * k / steps))
            if monitor is not None:
                monitor.set_labels(yb)
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            if monitor is not None:
                monitor.clear_labels()
            ts = time.perf_counter()
            opt.step()
            t_opt += time.perf_counter() - ts
            opt.zero_grad(set_to_none=True)
            k += 1
    return t_opt, time.perf_counter() - t0


def sweep_point(data, lam: float, epochs: int, lowrank: bool, lr: float = 0.05, tau: float = 0.05,
                width: int = 256, depth: int = 4, rank: int = 64, rel: float = 1e-3, seed: int = 0,
                rule: str = "tolerance") -> dict:
    """Train one model at weight decay ``lam`` and measure every layer on the training set. ``rule``: DLRT's rank
    rule for a factorized run ("tolerance": at ``tau``, with DLRT-Net's S-step; "importance": DLRT's defaults);
    ``tau`` is also the τ of the measured τ-ranks."""
    torch.manual_seed(seed)
    model = mlp(data.in_features, [width] * depth, K)
    if lowrank:
        model = lrtrain.lowrank(model, rank=rank)
        kw = dict(tau=tau, rank_rule="tolerance", s_direction="own") if rule == "tolerance" else {}
        opt = lrtrain.DLRT(model.parameters(), lr=lr, base="sgd", momentum=0.9, weight_decay=lam, **kw)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=lam)
    t_opt, t_all = train(model, opt, data, epochs, seed=seed)
    x, y = data.train_x, data.train_y
    with torch.no_grad():
        train_acc = evaluate(model, x, y)
    meas = full_data_collapse(model, x, y, K, lam, batch_size=2048, rel=rel, tau=tau)
    layers = {}
    for name, v in meas.items():
        layers[name] = {k: (float(t) if not isinstance(t, (int, float)) else t) for k, t in v.items() if k != "sigma"}
        layers[name]["sigma_head"] = [float(s) for s in v["sigma"][:40]]
        layers[name]["stationary_bound"] = v["within"] / lam  # ‖Δ‖₂TCV^{1/2}/(Nλ): the bound at R = 0
    return {"lambda": lam, "lowrank": lowrank, "epochs": epochs, "lr": lr, "tau": tau, "rule": rule if lowrank else None,
            "train_acc": train_acc, "test_acc": evaluate(model, data.test_x, data.test_y),
            "ranks": ranks(model) if lowrank else {}, "seconds": t_all, "opt_seconds": t_opt, "layers": layers}


def machine() -> str:
    """The machine in one line: CPU model, cores, torch version and threads."""
    m = machine_info()
    return f"{m['cpu']}, {m['cores']} CPU cores, torch {m['torch']}, {m['torch_threads']} threads"


def run_sweep(args) -> None:
    data = load_idx(str(args.data))
    if args.n_train:
        data = data.subset(args.n_train, None)
    lams = [float(s) for s in args.lambdas.split(",")]
    res = {"command": " ".join(["python"] + sys.argv), "date": datetime.datetime.utcnow().isoformat(timespec="seconds") + "Z",
           "machine": machine(), "rank_rule": f"numerical rank #{{j: sigma_j > {args.rel:g} sigma_1}}",
           "tau": args.tau, "rule": args.rule, "dense": [], "lowrank": []}
    t0 = time.perf_counter()
    for lam in lams:
        r = sweep_point(data, lam, args.epochs, False, lr=args.lr, tau=args.tau, rel=args.rel)
        res["dense"].append(r)
        print(f"dense λ={lam:g}: train {r['train_acc']:.2f} test {r['test_acc']:.2f} ranks",
              [v["rank_rel"] for v in r["layers"].values()], f"{time.perf_counter() - t0:.0f}s", flush=True)
    if not args.no_lowrank:
        for lam in lams:
            r = sweep_point(data, lam, args.lowrank_epochs, True, lr=args.lr, tau=args.tau, rel=args.rel, rule=args.rule)
            res["lowrank"].append(r)
            print(f"lowrank λ={lam:g}: train {r['train_acc']:.2f} test {r['test_acc']:.2f} ranks {r['ranks']}",
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
    res["seconds"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "collapse_sweep" + ("_quick" if args.quick else "")
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    (args.out / f"{stem}.md").write_text(sweep_markdown(res))
    plot_sweep(res, args.out, stem)
    print(sweep_markdown(res))


def sweep_markdown(res: dict) -> str:
    lines = [f"# Neural rank collapse on MNIST ({res['date']})", "",
             f"Machine: {res['machine']}. Command: `{res['command']}` ({res['seconds']:.0f} s).",
             f"Rank rule: {res['rank_rule']}; τ-rank: smallest k with tail_k(W) ≤ τ‖W‖_F, τ = {res['tau']}.",
             "lrtrain: DLRT SGD from rank 64 with " + ("the importance rule at its default τ (`DLRT()` defaults)"
                                                      if res.get("rule") == "importance" else
                                                      "the tolerance rule at the same τ (rank_rule='tolerance')") + ".",
             "Per hidden layer (inputs of layer l are the outputs of layer l−1; layer 1 reads pixels). "
             "ν = TCV/(TCV+BCV) of the layer's inputs over the training set; B = (‖R‖_F + ‖Δ‖₂TCV^{1/2}/N)/λ "
             "with R the full-training-set gradient; B₀ = ‖Δ‖₂TCV^{1/2}/(Nλ) (the bound at a stationary point).", "",
             "| λ | train / test acc. | layer | num. rank (dense) | τ-rank (dense) | lrtrain rank | tail_K | ν | B₀ | B |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    low = {r["lambda"]: r for r in res.get("lowrank", [])}
    for r in res["dense"]:
        lr_ = low.get(r["lambda"])
        for i, (name, v) in enumerate(r["layers"].items()):
            lrk = lr_["ranks"].get(name, "-") if lr_ else "-"
            acc = f"{r['train_acc']:.2f} / {r['test_acc']:.2f}" if i == 0 else ""
            lines.append(f"| {r['lambda']:g} | {acc} | {name} | {v['rank_rel']} | {v['rank_tau']} | {lrk} | "
                         f"{v['tail_K']:.3g} | {v['ntcv']:.3f} | {v['stationary_bound']:.3g} | {v['bound']:.3g} |")
    if low:
        same = "same λ" + (" and τ" if res.get("rule", "tolerance") == "tolerance" else ", the rule's default τ")
        lines += ["", f"lrtrain runs (factorized from rank 64, DLRT SGD, {same}): accuracy train / test",
                  ", ".join(f"λ={r['lambda']:g}: {r['train_acc']:.2f} / {r['test_acc']:.2f}" for r in res["lowrank"])]
    return "\n".join(lines) + "\n"


def plot_sweep(res: dict, out: Path, stem: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        print("matplotlib missing: no figures")
        return
    lams = [r["lambda"] for r in res["dense"]]
    names = list(res["dense"][0]["layers"])
    fig, ax = plt.subplots(1, 1, figsize=(6.4, 4.2))
    for i, name in enumerate(names):
        c = f"C{i}"
        ax.plot(lams, [r["layers"][name]["rank_rel"] for r in res["dense"]], "o-", color=c, label=f"layer {name} dense σ>1e-3σ₁")
        ax.plot(lams, [r["layers"][name]["rank_tau"] for r in res["dense"]], "s:", color=c, alpha=0.7)
        if res.get("lowrank"):
            ax.plot([r["lambda"] for r in res["lowrank"]], [r["ranks"].get(name, float("nan")) for r in res["lowrank"]],
                    "x--", color=c, ms=9)
    ax.axhline(K, color="k", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("weight decay λ")
    ax.set_ylabel("rank")
    ax.set_title("rank vs λ (o dense numerical, s dense τ-rank, x lrtrain)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{stem}_rank.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(1, 1, figsize=(5.6, 4.2))
    allx = []
    for i, name in enumerate(names):
        xs = [r["layers"][name]["stationary_bound"] for r in res["dense"]]
        ys = [r["layers"][name]["tail_K"] for r in res["dense"]]
        ax.scatter(xs, ys, color=f"C{i}", label=f"layer {name}")
        ax.scatter([r["layers"][name]["bound"] for r in res["dense"]], ys, color=f"C{i}", marker="x", alpha=0.6)
        allx += xs
    lo, hi = min(allx + [1e-3]), max(allx)
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = x")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("‖Δ‖₂·TCV^{1/2}/(N λ)   (x: full bound B)")
    ax.set_ylabel("tail_K(W)")
    ax.set_title("tail beyond K vs the collapse bound (one point per λ)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{stem}_tail.png", dpi=120)
    plt.close(fig)


def guided_run(data, guided: bool, epochs: int, lr: float, lam: float, tau: float, rank: int, hidden, seed: int = 0,
               theta: float = 0.5, within: str = "bound") -> dict:
    torch.manual_seed(seed)
    model = lrtrain.lowrank(mlp(data.in_features, hidden, K), rank=rank)
    mon = lrtrain.CollapseMonitor(model, K, guide=lrtrain.rank.CollapseGuide(K, theta=theta, within=within)) if guided else None
    # refresh=1: a basis update (where the guide decides) at every step, as when this table was first measured
    opt = lrtrain.DLRT(model.parameters(), lr=lr, base="sgd", momentum=0.9, weight_decay=lam, tau=tau, rank_rule="tolerance", s_direction="own", guide=mon,
                       refresh=1)
    work = {"core_flops": 0.0}
    if guided:  # count the augmented core's SVD work, 4·p·q·min(p, q) with p = r + a
        adjust = mon.adjust

        def counting(fg, item, group):
            adjust(fg, item, group)
            r = item.U.shape[1]
            a = r if item.augment is None else min(r, item.augment)
            work["core_flops"] += 4.0 * (r + a) ** 3
        opt.guide = type("G", (), {"adjust": staticmethod(counting)})()
    else:
        class _Count:
            @staticmethod
            def adjust(fg, item, group):
                r = item.U.shape[1]
                work["core_flops"] += 4.0 * (2 * r) ** 3
        opt.guide = _Count()
    t_opt, t_all = train(model, opt, data, epochs, seed=seed, monitor=mon)
    out = {"guided": guided, "test_acc": evaluate(model, data.test_x, data.test_y), "ranks": ranks(model),
           "opt_seconds": t_opt, "seconds": t_all, "core_gflops": work["core_flops"] / 1e9,
           "params": sum(p.numel() for p in model.parameters())}
    if guided:
        out["decisions"] = {n: s.guide for n, s in mon.summary().items() if s.factorized}
        mon.remove()
    return out


def run_guided(args) -> None:
    data = load_idx(str(args.data))
    hidden = [int(h) for h in args.hidden.split(",")]
    res = {"command": " ".join(["python"] + sys.argv), "date": datetime.datetime.utcnow().isoformat(timespec="seconds") + "Z",
           "machine": machine(), "config": {"hidden": hidden, "epochs": args.epochs, "lr": args.lr, "lambda": args.lam,
                                            "tau": args.tau, "rank": args.rank, "theta": args.theta, "within": args.within, "base": "sgd",
                                            "momentum": 0.9, "batch": 128, "n_train": len(data.train_y)}, "runs": []}
    for seed in range(args.seeds):
        for guided in (False, True):
            r = guided_run(data, guided, args.epochs, args.lr, args.lam, args.tau, args.rank, hidden, seed, args.theta,
                           args.within)
            r["seed"] = seed
            res["runs"].append(r)
            print(json.dumps(r), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "collapse_guided.json").write_text(json.dumps(res, indent=1))
    md = guided_markdown(res)
    (args.out / "collapse_guided.md").write_text(md)
    print(md)


def guided_markdown(res: dict) -> str:
    c = res["config"]
    lines = [f"# Collapse-guided vs plain DLRT on MNIST ({res['date']})", "",
             f"Machine: {res['machine']}. Command: `{res['command']}`.",
             f"MLP 784-{'-'.join(map(str, c['hidden']))}-10, factorized from rank {c['rank']}, DLRT SGD momentum 0.9, "
             f"lr {c['lr']} (cosine), λ = {c['lambda']}, τ = {c['tau']}, θ = {c['theta']} (within = {c['within']}), batch 128, {c['epochs']} epochs, "
             f"{c['n_train']} training images, 10,000 test images.", "",
             "| seed | run | test acc. (%) | final ranks | opt.step time (s) | core SVD GFLOP | total time (s) | guide decisions (class / certified / plain per layer) |",
             "|---|---|---:|---|---:|---:|---:|---|"]
    for r in res["runs"]:
        dec = ", ".join(f"{d.get('class', 0)}/{d.get('certified', 0)}/{d.get('plain', 0)}"
                        for d in r.get("decisions", {}).values()) or "-"
        lines.append(f"| {r['seed']} | {'guided' if r['guided'] else 'plain'} | {r['test_acc']:.2f} | "
                     f"{' '.join(str(v) for v in r['ranks'].values())} | {r['opt_seconds']:.1f} | {r['core_gflops']:.1f} | "
                     f"{r['seconds']:.1f} | {dec} |")
    return "\n".join(lines) + "\n"


def _step_time(model, opt, xs, ys, monitor=None, reps: int = 3) -> float:
    """Median over ``reps`` of the mean seconds per training step (forward, backward, opt.step) on the
    given batches (after 10 warm-up steps)."""
    import statistics

    def one(x, y):
        if monitor is not None:
            monitor.set_labels(y)
        F.cross_entropy(model(x), y).backward()
        if monitor is not None:
            monitor.clear_labels()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(10):
        one(xs[i % len(xs)], ys[i % len(ys)])
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for x, y in zip(xs, ys):
            one(x, y)
        out.append((time.perf_counter() - t0) / len(xs))
    return statistics.median(out)


def run_overhead(args) -> None:
    """Training-step time with and without a CollapseMonitor (default settings), dense SGD and DLRT."""
    data = load_idx(str(args.data))
    xs = list(data.train_x[:128 * 40].split(128))
    ys = list(data.train_y[:128 * 40].split(128))
    rows = []
    configs = [("dense SGD 784-4x256-10", False, [256] * 4, {}), ("DLRT 784-4x256-10 (rank 64)", True, [256] * 4, {}),
               ("DLRT 784-3x512-10 (rank 64)", True, [512] * 3, {}),
               ("dense SGD 784-4x256-10, every=4", False, [256] * 4, {"every": 4})]
    for label, low, hidden, kw in configs:
        times = {}
        for with_mon in (False, True, False, True):  # interleaved, twice
            torch.manual_seed(0)
            model = mlp(784, hidden, K)
            if low:
                model = lrtrain.lowrank(model, rank=64)
                opt = lrtrain.DLRT(model.parameters(), lr=0.01, base="sgd", momentum=0.9, weight_decay=5e-4, tau=0.1, rank_rule="tolerance", s_direction="own")
            else:
                opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
            mon = lrtrain.CollapseMonitor(model, K, **kw) if with_mon else None
            t = _step_time(model, opt, xs, ys, mon)
            times.setdefault(with_mon, []).append(t)
            if mon is not None:
                mon.remove()
        off, on = min(times[False]), min(times[True])
        rows.append({"config": label, "step_ms": off * 1e3, "step_ms_monitor": on * 1e3, "overhead_pct": 100 * (on / off - 1)})
        print(rows[-1], flush=True)
    res = {"command": " ".join(["python"] + sys.argv), "date": datetime.datetime.utcnow().isoformat(timespec="seconds") + "Z",
           "machine": machine(), "batch": 128, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "collapse_overhead.json").write_text(json.dumps(res, indent=1))
    md = [f"# CollapseMonitor overhead ({res['date']})", "", f"Machine: {res['machine']}. Command: `{res['command']}`.",
          "Mean time per training step (forward, backward, optimizer step; batch 128, MNIST), best of two interleaved "
          "runs of 3 × 40 steps; monitor with default settings (power iteration for ‖G‖₂, NC1 on, exact ‖R‖).", "",
          "| configuration | step (ms) | step with monitor (ms) | overhead |", "|---|---:|---:|---:|"]
    md += [f"| {r['config']} | {r['step_ms']:.2f} | {r['step_ms_monitor']:.2f} | {r['overhead_pct']:+.1f}% |" for r in rows]
    (args.out / "collapse_overhead.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["sweep", "guided", "overhead"])
    p.add_argument("--data", type=Path, default=MNIST_DIR)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--quick", action="store_true", help="small smoke version")
    p.add_argument("--lambdas", default="1e-4,5e-4,1e-3,2e-3,5e-3")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lowrank-epochs", type=int, default=None)
    p.add_argument("--no-lowrank", action="store_true")
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--tau", type=float, default=None)
    p.add_argument("--rel", type=float, default=1e-3)
    p.add_argument("--lam", type=float, default=5e-4)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--hidden", default="512,512,512")
    p.add_argument("--theta", type=float, default=0.5)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--within", choices=["bound", "exact"], default="bound")
    p.add_argument("--rule", choices=["importance", "tolerance"], default="importance",
                   help="sweep: DLRT's rank rule for the factorized runs")
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.part == "sweep":
        args.epochs = args.epochs or (3 if args.quick else 60)
        args.lowrank_epochs = args.lowrank_epochs or (2 if args.quick else 15)
        args.tau = 0.05 if args.tau is None else args.tau
        if args.quick:
            args.n_train = args.n_train or 4000
        run_sweep(args)
    elif args.part == "overhead":
        run_overhead(args)
    else:
        args.epochs = args.epochs or 3
        args.tau = 0.1 if args.tau is None else args.tau
        run_guided(args)


if __name__ == "__main__":
    main()
