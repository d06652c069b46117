"""Measure the fused DLRT update against the reference and write benchmarks/results/kernels.md.

    flock /tmp/lrtrain-cpu.lock python benchmarks/kernels_report.py [--out PATH] [--min-time SECONDS]

Everything runs side by side in one process with torch.utils.benchmark.Timer at torch's thread count;
the variants of one table are measured in alternating rounds (3 by default) and each row reports the median
and interquartile range over all of its runs, so slow drift of a shared machine hits every row alike.
Cases (benchmarks/harness/kernel_cases.py): the issue's CPU target, 12 layers of 1024×1024 at rank 64, float32, as the
layer update alone (update_layers) and as a whole DLRT.step (AdamW, fixed rank); then the Jacobi SVD kernel
on warm cores (real DLRT steps after the first) against LAPACK at 2r = 64, 128, 256, with sweep counts.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

import lrtrain.update as ext
from lrtrain.update.constants import MAX_SWEEPS, NO_RANK_CAP
from harness.kernel_cases import layer_items, step_case, sweeps_to_converge, warm_cores
from lrtrain.cli.bench import cpu_model
from lrtrain.update import dispatch
from lrtrain.update.spec import reference_update_layers

OUT = Path(__file__).resolve().parent / "results" / "kernels.md"
L, WIDTH, RANK = 12, 1024, 64
LR, TAU = 1e-3, 0.1


def measure(fns: dict, min_time: float, rounds: int) -> dict:
    """name -> (median s, IQR s, runs): alternating rounds of Timer.blocked_autorange."""
    times: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            m = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(min_run_time=min_time)
            times[name] += m.times
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        out[name] = (statistics.median(ts), q[2] - q[0], len(ts))
    return out


def table(res: dict, base: str, note: dict | None = None) -> list[str]:
    lines = ["| variant | median (ms) | IQR (ms) | runs | speed-up vs reference |", "|---|---:|---:|---:|---:|"]
    for name, (med, iqr, n) in res.items():
        extra = f" {note[name]}" if note and name in note else ""
        lines.append(f"| {name}{extra} | {med * 1e3:.1f} | {iqr * 1e3:.1f} | {n} | {res[base][0] / med:.2f}x |")
    return lines


def update_section(min_time, rounds) -> tuple[list[str], float]:
    items = layer_items(L, WIDTH, WIDTH, RANK)
    fns = {"reference (lrtrain.update.spec)": lambda: reference_update_layers(items, LR, TAU, 1)}
    for label, opts in (("fused, OpenMP over layers + LAPACK SVD (default)", dict(batched=False, svd="lapack")),
                        ("fused, OpenMP over layers + Jacobi SVD", dict(batched=False, svd="jacobi")),
                        ("fused, CUDA schedule (batched) + LAPACK SVD", dict(batched=True, svd="lapack")),
                        ("fused, CUDA schedule (batched) + Jacobi SVD", dict(batched=True, svd="jacobi"))):
        fns[label] = (lambda o: lambda: dispatch.run_group("cpu", items, LR, TAU, 1, **o))(opts)
    res = measure(fns, min_time, rounds)
    base = next(iter(res))
    ratio = res[base][0] / res["fused, OpenMP over layers + LAPACK SVD (default)"][0]
    return table(res, base), ratio


def step_section(min_time, rounds) -> tuple[list[str], float]:
    cases = {"reference": step_case(L, WIDTH, RANK, "reference"), "fused (backend='cpu')": step_case(L, WIDTH, RANK, "cpu")}
    res = measure({name: c.step for name, c in cases.items()}, min_time, rounds)
    return table(res, "reference"), res["reference"][0] / res["fused (backend='cpu')"][0]


def jacobi_section(min_time, rounds) -> list[str]:
    from lrtrain.update import _cpu

    lines = ["| 2r | sweeps, warm (min / median / max) | sweeps, first step | sweeps, random core | "
             "Jacobi (ms) | LAPACK gesdd (ms) | Jacobi / LAPACK |", "|---:|---|---|---|---:|---:|---:|"]
    for two_r in (64, 128, 256):
        warm, first = warm_cores(two_r // 2)
        cold = torch.randn(warm.shape, generator=torch.Generator().manual_seed(0))
        counts = {k: sorted(sweeps_to_converge(c)) for k, c in (("warm", warm), ("first", first), ("cold", cold))}
        res = measure({"jacobi": lambda: _cpu.jacobi_svd(warm, 0.0, 1, NO_RANK_CAP, MAX_SWEEPS),
                       "lapack": lambda: torch.linalg.svd(warm, full_matrices=False)}, min_time, rounds)
        fmt = lambda c: f"{c[0]} / {statistics.median(c):g} / {c[-1]}"  # noqa: E731
        lines.append(f"| {two_r} | {fmt(counts['warm'])} | {fmt(counts['first'])} | {fmt(counts['cold'])} | "
                     f"{res['jacobi'][0] * 1e3:.2f} | {res['lapack'][0] * 1e3:.2f} | "
                     f"{res['jacobi'][0] / res['lapack'][0]:.2f} |")
    return lines


NOTES = [
    "## Reading these numbers",
    "",
    "- The CPU default is OpenMP over layers with LAPACK's gesdd for the core; the Jacobi kernel body is what the CUDA",
    "  kernels run (here on one thread per layer), kept on CPU for the parity tests.",
    "- The issue expected a Jacobi SVD warm-started from the nearly diagonal Ŝ to converge in one or two sweeps. It does",
    "  not: warm cores take about as many sweeps as random ones. Only Ŝ's top-left block is nearly diagonal; the",
    "  coupling blocks (−lr·D_Lᵀ Q_V, −lr·Q_Uᵀ D_K) are small but unstructured, and the singular values they create",
    "  (O(lr), below the top-left block's) are a generic r-column problem that the one-sided Jacobi resolves to full",
    "  relative accuracy. On CPU the Jacobi kernel is only on par with LAPACK at 2r = 64 and slower above.",
    "- The whole DLRT.step also runs the AdamW rule and the optimizer-state rotation (per layer, in PyTorch, shared by",
    "  both backends), about 15 ms of the step here, which caps the step's speed-up below the update's.",
    "- The machine's 2 cores are shared with other jobs: medians move by ±20% from run to run (see the IQRs);",
    "  the ratios, measured in alternating rounds in one process, move less.",
    "",
]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds per Timer.blocked_autorange")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    if not ext.available()["cpu"]:
        raise SystemExit(f"CPU extension not active: {ext.load_errors()}")
    upd, upd_ratio = update_section(args.min_time, args.rounds)
    stp, step_ratio = step_section(args.min_time, args.rounds)
    jac = jacobi_section(args.min_time, args.rounds)
    verdict = lambda r: "met" if r >= 1.5 else "MISSED"  # noqa: E731
    text = [
        "# Fused DLRT update: CPU kernel benchmark",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}",
        f"- backends active: {ext.available()}",
        "- command: `flock /tmp/lrtrain-cpu.lock python benchmarks/kernels_report.py` "
        f"(Timer.blocked_autorange, {args.rounds} alternating rounds of ≥ {args.min_time:g} s per variant)",
        "- GPU: not measured — no GPU was available in this session; CUDA kernels are compile-checked only "
        "(`nvcc -arch=sm_90 -c csrc/cuda/*.cu`, in .ci/run).",
        "",
        f"## Layer update alone: {L} layers of {WIDTH}×{WIDTH}, rank {RANK}, float32 (target ≥ 1.5x: "
        f"{verdict(upd_ratio)}, {upd_ratio:.2f}x)",
        "",
        f"`update_layers` on random realistic layer steps (lr = {LR}, τ = {TAU}; cores {2 * RANK}×{2 * RANK}).",
        "",
        *upd,
        "",
        f"## Whole DLRT.step: same {L} layers, AdamW, fixed rank (target ≥ 1.5x: {verdict(step_ratio)}, "
        f"{step_ratio:.2f}x)",
        "",
        "The step also runs the AdamW rule and the optimizer-state rotation, which the backends share.",
        "",
        *stp,
        "",
        "## Jacobi SVD of warm cores vs LAPACK (CPU, 12 cores at once, same threads)",
        "",
        "Warm cores: Ŝ of the 4th DLRT step (AdamW, lr 1e-3, fixed rank r) of 12 stacked 1024×1024 layers on a "
        "regression; first step: the 1st step's Ŝ (S diagonal); random: Gaussian entries. A sweep count includes "
        "the final sweep that only checks (no rotation).",
        "",
        *jac,
        "",
        *NOTES,
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(text))
    print("\n".join(text))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
