"""GPU training step: a stack of 48 ``LowRankLinear(4096, 4096, rank=128, max_rank=128)`` trained by lrtrain DLRT,
against the same stack of ``nn.Linear(4096, 4096)`` with dense (fused) AdamW and with GaLoreAdamW, in fp32 and bf16.

Model: ``h <- h + gelu(layer_i(h))`` for i = 1..L (residual, so 48 layers neither vanish nor explode), loss
``mean((h.float() - y)^2)`` on a fixed batch of ``--batch`` rows. DLRT: rank fixed (max_rank = r, τ = 0, AdamW
base), bf16 models stepped through the fp32 masters DLRT keeps; its update backend is ``"reference"`` (pure
PyTorch), the device's fused backend forced (``"cuda"`` / ``"cpu"``) when it is active, and ``"auto"`` (the
default: fused where active, the CUDA one after its first-use self-check against the reference). Dense: one
``torch.optim.AdamW`` (``fused=True`` on CUDA) over the bf16 or fp32 parameters. GaLoreAdamW (galore-torch, when it
imports): projection rank r on every layer's weight, its own ``update_proj_gap`` (200); the report's Method section
says how its projector refresh (an SVD of each full gradient) is measured and amortized.

Timing: after ``--warmup`` steps, ``--steps`` training steps (fewer when a method would exceed
``--max-seconds``, at least 3), each started on an idle device (synchronize) and timed with CUDA events (on CPU:
``time.perf_counter``) at three points: forward + backward, then ``opt.step()`` + ``zero_grad(set_to_none=True)``
(the optimizer step), their sum the training step; medians. Peak memory: ``torch.cuda.max_memory_allocated`` over
the method's model, optimizer and steps (reset before each method). Methods run one after the other on one device.

    python benchmarks/gpu_step.py --device cuda --out benchmarks/results          # the GPU check's run
    python benchmarks/gpu_step.py --device cpu --layers 2 --width 64 --rank 8 --steps 2 --out /tmp/x   # smoke

writes ``{out}/{name}.md`` and ``{name}.json`` (name ``gpu_step``), rewritten after every method, so a run cut
short still leaves the rows it finished. ``benchmarks/gpu_check.sh`` runs it on the GPU machine.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib
import importlib.util
import json
import math
import shlex
import statistics
import subprocess
import sys
import time
import types
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

if str(Path(__file__).resolve().parent) not in sys.path:  # the harness (benchmarks/harness), imported from elsewhere
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from lrtrain import LowRankLinear, update  # noqa: E402
from lrtrain.cli.train import ranks as layer_ranks  # noqa: E402
from lrtrain.update import dispatch  # noqa: E402

from harness import methods as hm  # noqa: E402
from harness.machine import machine_info  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GIB = 2.0 ** 30


# ------------------------------------------------------------------------------------------------ model
class ResidualStack(nn.Module):
    """``h <- h + gelu(layer(h))`` through ``layers``."""

    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + F.gelu(layer(x))
        return x


def build_stack(low_rank: bool, layers: int, width: int, rank: int, device: torch.device, dtype: torch.dtype,
                seed: int = 0) -> ResidualStack:
    """``layers`` × ``nn.Linear(width, width)`` or ``LowRankLinear(width, width, rank, max_rank=rank)``, made in
    fp32 on ``device`` (QR, which builds the factors, has no bf16 kernels) and cast to ``dtype`` layer by layer."""
    torch.manual_seed(seed)
    out = []
    for _ in range(layers):
        if low_rank:
            layer = LowRankLinear(width, width, rank=rank, max_rank=rank, device=device)
        else:
            layer = nn.Linear(width, width, device=device)
        out.append(layer.to(dtype))
    return ResidualStack(out)


# ------------------------------------------------------------------------------------------------ GaLore
def galore_import() -> tuple:
    """(True, version note) when ``galore_torch.GaLoreAdamW`` can be used, else (False, why).

    :func:`harness.methods.galore_status` first. When only bitsandbytes is missing (galore_torch's package
    ``__init__`` imports it for GaLoreAdamW8bit; GaLoreAdamW does not use it), the package is registered without
    running its ``__init__`` and ``galore_torch.adamw`` -- the real GaLoreAdamW -- is imported from it."""
    ok, why = hm.galore_status()
    if ok:
        return True, f"galore-torch {why}"
    if importlib.util.find_spec("bitsandbytes") is not None:
        return False, why
    try:
        spec = importlib.util.find_spec("galore_torch")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return False, why
    saved = sys.modules.pop("galore_torch", None)
    pkg = types.ModuleType("galore_torch")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__file__ = spec.origin
    sys.modules["galore_torch"] = pkg
    try:
        adamw = importlib.import_module("galore_torch.adamw")
    except Exception as e:  # transformers missing or broken
        sys.modules.pop("galore_torch", None)
        if saved is not None:
            sys.modules["galore_torch"] = saved
        return False, f"{why}; galore_torch.adamw alone: {type(e).__name__}: {e}"
    pkg.GaLoreAdamW = adamw.AdamW
    try:
        ver = version("galore-torch")
    except PackageNotFoundError:
        ver = "unknown version"
    return True, (f"galore-torch {ver} (bitsandbytes is not installed: galore_torch.adamw imported without the "
                  "package __init__, which imports bitsandbytes for GaLoreAdamW8bit only)")


def seed_galore_projectors(opt, projected: list, rank: int, gap: int) -> list:
    """Give every projected weight of a fresh GaLoreAdamW a projector with a random orthonormal (r, n) matrix and
    ``state["step"] = 1``, so no step before step ``gap`` recomputes it: the steady steps are timed without GaLore's
    first-step SVD of every full gradient (measured separately, :func:`galore_refresh_ms`). Returns the matrices."""
    from galore_torch.galore_projector import GaLoreProjector

    group = next(g for g in opt.param_groups if "rank" in g)
    mats = []
    for p in projected:
        m, n = p.shape
        if m < n:
            raise ValueError("seed_galore_projectors: only weights with out >= in (GaLore's right projection)")
        proj = GaLoreProjector(rank, update_proj_gap=gap, scale=group["scale"], proj_type=group["proj_type"])
        q = torch.linalg.qr(torch.randn(n, rank, device=p.device, dtype=torch.float32))[0]
        proj.ortho_matrix = q.T.contiguous().to(p.dtype)
        opt.state[p]["step"] = 1
        opt.state[p]["projector"] = proj
        mats.append(proj.ortho_matrix)
    return mats


def galore_refresh_ms(opt, projected: list, rank: int, forward_backward, sync, layers: int = 2) -> float:
    """Median time (ms) of GaLore's projector refresh of one weight -- its own ``get_orthogonal_matrix`` (an SVD of
    the full gradient, in fp32) -- on fresh gradients of the first ``layers`` weights, after one untimed call."""
    forward_backward()
    times = []
    for i, p in enumerate(projected[:layers + 1]):
        proj = opt.state[p]["projector"]
        sync()
        t0 = time.perf_counter()
        proj.get_orthogonal_matrix(p.grad, rank, type="right")
        sync()
        if i > 0 or len(projected) == 1:
            times.append((time.perf_counter() - t0) * 1e3)
    opt.zero_grad(set_to_none=True)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------ timing
def _sync(device: torch.device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def time_steps(model, opt, x, y, device, warmup: int, steps: int, max_seconds: float, min_steps: int = 3) -> dict:
    """Per-step forward+backward, optimizer step (step + zero_grad) and training step times in ms (medians), and
    the wall time of a synchronized step; ``steps`` steps or as many as fit in ``max_seconds`` (>= min_steps)."""
    cuda = device.type == "cuda"
    sync = _sync(device)

    def fb():
        ((model(x).float() - y) ** 2).mean().backward()

    def st():
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        fb()
        st()
    samples = []
    sync()
    t_start = time.perf_counter()
    while len(samples) < steps and (len(samples) < min(min_steps, steps) or time.perf_counter() - t_start < max_seconds):
        sync()
        w0 = time.perf_counter()
        if cuda:
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            ev[0].record()
        fb()
        if cuda:
            ev[1].record()
        else:
            w1 = time.perf_counter()
        st()
        if cuda:
            ev[2].record()
        sync()
        w2 = time.perf_counter()
        if cuda:
            f_ms, o_ms = ev[0].elapsed_time(ev[1]), ev[1].elapsed_time(ev[2])
        else:
            f_ms, o_ms = (w1 - w0) * 1e3, (w2 - w1) * 1e3
        samples.append((f_ms, o_ms, f_ms + o_ms, (w2 - w0) * 1e3, o_ms / max(f_ms + o_ms, 1e-9)))
    med = [statistics.median(s[i] for s in samples) for i in range(5)]
    return dict(fwd_bwd_ms=med[0], opt_ms=med[1], step_ms=med[2], wall_ms=med[3], opt_share=med[4],
                timed_steps=len(samples), step_min_ms=min(s[2] for s in samples),
                step_max_ms=max(s[2] for s in samples), fb=fb)


def fused_layers_per_step(model, opt, fb) -> dict:
    """Run one more training step counting the layers each compiled backend is launched on ({} = reference)."""
    counts: dict = {}
    real = dispatch.launch_group

    def counting(name, group, *a, **k):
        counts[name] = counts.get(name, 0) + len(group)
        return real(name, group, *a, **k)

    dispatch.launch_group = counting
    try:
        fb()
        opt.step()
        opt.zero_grad(set_to_none=True)
    finally:
        dispatch.launch_group = real
    return counts


# ------------------------------------------------------------------------------------------------ one method
def run_method(method: hm.Method, dtype_name: str, args, device: torch.device) -> dict:
    dtype = DTYPES[dtype_name]
    cuda = device.type == "cuda"
    sync = _sync(device)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base_alloc = torch.cuda.memory_allocated(device)
    t_setup = time.perf_counter()
    model = build_stack(method.is_lrtrain, args.layers, args.width, args.rank, device, dtype, args.seed)
    g = torch.Generator(device=device).manual_seed(args.seed)
    x = torch.randn(args.batch, args.width, device=device, generator=g).to(dtype)
    y = torch.randn(args.batch, args.width, device=device, generator=g)
    row = dict(dtype=dtype_name, key=method.key, method=method.label, layers=args.layers, width=args.width,
               rank=args.rank, batch=args.batch)
    seeded = None
    if method.key == "dense":
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, eps=1e-8, fused=cuda)
        row["optimizer"] = f"torch.optim.AdamW(fused={cuda})"
    elif method.key == "galore":
        projected = hm.galore_targets(model, args.rank)
        opt = hm.galore_adamw(list(model.parameters()), projected, args.lr, args.weight_decay, args.rank,
                              args.galore_gap)
        seeded = seed_galore_projectors(opt, projected, args.rank, args.galore_gap)
        row["optimizer"] = f"GaLoreAdamW(rank={args.rank}, update_proj_gap={args.galore_gap}, proj_type='std')"
    else:
        opt = method.optimizer(model, args.lr, args.weight_decay, args.rank, tau=0.0)
        row["optimizer"] = f"lrtrain.DLRT(base='adamw', tau=0, backend={method.dlrt_kwargs['backend']!r})"
    sync()
    row["setup_s"] = time.perf_counter() - t_setup
    t = time_steps(model, opt, x, y, device, args.warmup, args.steps, args.max_seconds)
    fb = t.pop("fb")
    row.update(t)
    if cuda:
        row["peak_gib"] = (torch.cuda.max_memory_allocated(device) - base_alloc) / GIB
        row["resident_gib"] = (torch.cuda.memory_allocated(device) - base_alloc) / GIB  # params + optimizer state
    else:
        row["peak_gib"] = row["resident_gib"] = None
    row["amortized_step_ms"] = row["step_ms"]
    if method.is_lrtrain:
        row["ranks"] = sorted(set(layer_ranks(model).values()))
        row["skipped_steps"] = opt.skipped_steps
        row["fused_layers"] = fused_layers_per_step(model, opt, fb)
        total = sum(row["fused_layers"].values())
        row["backend_used"] = (", ".join(f"{k} ({v}/{args.layers} layers)" for k, v in row["fused_layers"].items())
                               if total else "reference")
    elif method.key == "galore":
        changed = sum(opt.state[p]["projector"].ortho_matrix is not m for p, m in zip(projected, seeded))
        row["projector_refreshes_timed"] = changed
        svd = galore_refresh_ms(opt, projected, args.rank, fb, sync, layers=args.galore_svd_layers)
        row["refresh_per_layer_ms"] = svd
        row["refresh_ms"] = svd * len(projected)
        row["refresh_step_ms"] = row["opt_ms"] + row["refresh_ms"]
        row["amortized_step_ms"] = row["step_ms"] + row["refresh_ms"] / args.galore_gap
        row["gap"] = args.galore_gap
        row["backend_used"] = "-"
    else:
        row["backend_used"] = "-"
    with torch.no_grad():
        row["loss_finite"] = bool(math.isfinite(((model(x).float() - y) ** 2).mean().item()))
    del model, opt, x, y, seeded
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


# ------------------------------------------------------------------------------------------------ report
def nvidia_smi() -> str:
    """``nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv`` (its data line), or why not."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi not available ({type(e).__name__})"
    lines = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
    if out.returncode != 0 or len(lines) < 2:
        return f"nvidia-smi failed (exit {out.returncode}): {(out.stderr or out.stdout).strip()[:200]}"
    return "; ".join(lines[1:]) + f" ({lines[0]})"


def _f(v, spec=".1f", suffix=""):
    return "-" if v is None else format(v, spec) + suffix


def write_report(res: dict, out: Path, name: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    c, m = res["config"], res["machine"]
    L = [f"# lrtrain GPU training step: {c['layers']} × {c['width']}×{c['width']} layers at rank {c['rank']}, "
         f"batch {c['batch']}", "",
         f"- date: {res['date']}",
         f"- device: {res['device']}",
         f"- nvidia-smi: {res['nvidia_smi']}",
         f"- torch {m['torch']} (CUDA {res['torch_cuda']}), TF32 matmul: {res['tf32']}; lrtrain {m['lrtrain']}; "
         f"Python {m['python']}; CPU: {m['cpu']} ({m['cores']} cores)",
         f"- lrtrain update backends: `update.available()` = {res['available']}"
         + (f"; load errors: {res['load_errors']}" if res["load_errors"] else ""),
         f"- GaLoreAdamW: {res['galore']}",
         f"- command: `{res['command']}`", ""]
    dense_by = {r["dtype"]: r for r in res["rows"] if r["key"] == "dense"}
    for dt in c["dtypes"]:
        rows = [r for r in res["rows"] if r["dtype"] == dt]
        if not rows:
            continue
        d = dense_by.get(dt)
        L += [f"## {dt}" + (" (model and activations in bf16; DLRT steps fp32 masters)" if dt == "bf16" else ""), "",
              "| method | update backend used | fwd+bwd (ms) | optimizer step (ms) | train step (ms) | optimizer share "
              "| train step vs dense | optimizer vs dense | amortized step (ms) | peak memory (GiB) | vs dense | "
              "ranks | steps timed |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
        for r in rows:
            sv = f"{r['amortized_step_ms'] / d['step_ms']:.2f}x" if d else "-"
            ov = f"{r['opt_ms'] / d['opt_ms']:.2f}x" if d else "-"
            mv = f"{r['peak_gib'] / d['peak_gib']:.2f}x" if d and r["peak_gib"] and d["peak_gib"] else "-"
            rk = " ".join(map(str, r.get("ranks", []))) or "-"
            L.append(f"| {r['method']} | {r['backend_used']} | {r['fwd_bwd_ms']:.2f} | {r['opt_ms']:.2f} | "
                     f"{r['step_ms']:.2f} | {r['opt_share']:.0%} | {sv} | {ov} | {r['amortized_step_ms']:.2f} | "
                     f"{_f(r['peak_gib'], '.2f')} | {mv} | {rk} | {r['timed_steps']} |")
        L.append("")
    gal = [r for r in res["rows"] if r["key"] == "galore"]
    if gal:
        L += ["## GaLoreAdamW projector refresh", "",
              "| dtype | SVD refresh per layer (ms) | refresh of all layers (ms) | refresh step (ms) | steady train step "
              "(ms) | amortized train step (ms) | gap | refreshes during the timed steps |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in gal:
            L.append(f"| {r['dtype']} | {r['refresh_per_layer_ms']:.1f} | {r['refresh_ms']:.1f} | "
                     f"{r['refresh_step_ms']:.1f} | {r['step_ms']:.2f} | {r['amortized_step_ms']:.2f} | {r['gap']} | "
                     f"{r['projector_refreshes_timed']} |")
        L.append("")
    L += ["## Method", "",
          f"- Model: h ← h + gelu(layer(h)) through {c['layers']} layers, loss mean((h − y)²) in fp32, one fixed batch "
          f"of {c['batch']} rows; every method starts from its own seeded model. Dense and GaLoreAdamW train "
          f"`nn.Linear({c['width']}, {c['width']})`; lrtrain trains `LowRankLinear({c['width']}, {c['width']}, "
          f"rank={c['rank']}, max_rank={c['rank']})` with DLRT (AdamW base, τ = 0: the rank stays {c['rank']}). "
          f"lr {c['lr']}, weight decay {c['weight_decay']}, eps 1e-8 everywhere.",
          f"- Timing: {c['warmup']} warm-up steps, then {c['steps']} timed steps (fewer, but at least "
          f"{min(3, c['steps'])}, when a method would exceed {c['max_seconds']} s), each started on an idle device; "
          + ("CUDA events" if res["device"].startswith("cuda") else "time.perf_counter")
          + " around forward+backward and around `opt.step()` + `zero_grad(set_to_none=True)` (the optimizer "
          "step); train step = their sum. Each column is the median over the timed steps (so the train step need "
          "not equal the sum of the two medians); optimizer share = median of optimizer step / train step. The "
          "ratios to dense use the dense row of the same dtype (GaLoreAdamW: its amortized step).",
          "- Update backend used: the compiled backend each DLRT step was launched on, counted on one extra step "
          "(`reference` = none: the pure-PyTorch update). `auto` checks its first CUDA call against the reference "
          f"(self-check verdicts: {res['self_check'] or 'none'}).",
          "- Peak memory: `torch.cuda.max_memory_allocated` over the method's model, optimizer and steps, above what "
          "was allocated before it (reset per method; `auto`'s includes its first step, which also runs the reference "
          "update for the self-check); not measured on CPU."]
    if gal:
        L += [f"- GaLoreAdamW: the real `galore_torch` GaLoreAdamW, projection rank {c['rank']} on every weight, "
          f"update_proj_gap {c['galore_gap']}. Its first step would compute an SVD of every full {c['width']}×"
          f"{c['width']} gradient; instead each projector starts from a random orthonormal matrix (state step 1), so "
          "the timed steps are its steady steps (none refreshes: last column above). The refresh is timed on its own: "
          f"GaLore's `get_orthogonal_matrix` on {c['galore_svd_layers']} layers' gradients (median), times "
          f"{c['layers']} layers = the refresh; amortized step = steady step + refresh / gap."]
    L += [""] + [f"- {n}" for n in res["notes"]]
    path = out / f"{name}.md"
    path.write_text("\n".join(L).rstrip() + "\n")
    (out / f"{name}.json").write_text(json.dumps(res, indent=1, default=str))
    return path


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--batch", type=int, default=512, help="rows (tokens) per step")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per method (median)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--max-seconds", type=float, default=20.0, help="cap on one method's timed steps (>= 3 run)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="whole-run budget: methods not started by then are skipped (listed in the notes)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--methods", default=None,
                    help="comma-separated method keys (dense, galore, lrtrain-reference, lrtrain-cuda, lrtrain-cpu, "
                         "lrtrain-auto); default: all usable here")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--galore-gap", type=int, default=200, help="GaLore's update_proj_gap")
    ap.add_argument("--galore-svd-layers", type=int, default=2, help="layers whose projector refresh is timed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="gpu_step")
    args = ap.parse_args(argv)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in args.dtypes if d not in DTYPES]
    if bad or not args.dtypes:
        ap.error(f"--dtypes: choose from {list(DTYPES)}, got {bad or args.dtypes}")
    if min(args.layers, args.width, args.rank, args.batch, args.steps) < 1 or args.rank > args.width:
        ap.error("--layers, --width, --rank, --batch, --steps must be >= 1 and --rank <= --width")
    if args.warmup < 0:
        ap.error("--warmup must be >= 0")
    if args.steps + args.warmup + 2 >= args.galore_gap:
        ap.error("--galore-gap must exceed --steps + --warmup + 2 (no projector refresh inside the timed steps)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t_run = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("gpu_step: --device cuda but torch.cuda.is_available() is False "
                  f"(torch {torch.__version__}, CUDA {torch.version.cuda})", file=sys.stderr)
            return 2
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    galore_ok, galore_why = galore_import()
    methods = [hm.DENSE] + ([hm.GALORE] if galore_ok else [])
    methods += [mt for mt in hm.dlrt_methods() if mt.dlrt_kwargs["backend"] in ("reference", "auto", device.type)]
    if args.methods:
        want = [k.strip() for k in args.methods.split(",") if k.strip()]
        unknown = [k for k in want if k not in {"dense", "galore", "lrtrain-reference", "lrtrain-auto",
                                                "lrtrain-cpu", "lrtrain-cuda"}]
        if unknown:
            print(f"gpu_step: unknown --methods {unknown}", file=sys.stderr)
            return 2
        methods = [mt for mt in methods if mt.key in want]
    notes = []
    if not galore_ok:
        notes.append(f"GaLoreAdamW not run: {galore_why}")
    res = dict(date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
               device=(f"cuda: {torch.cuda.get_device_name(device)} (capability "
                       f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}, "
                       f"{torch.cuda.get_device_properties(device).total_memory / GIB:.1f} GiB)")
               if device.type == "cuda" else "cpu (no GPU used)",
               nvidia_smi=nvidia_smi(), torch_cuda=torch.version.cuda,
               tf32=torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else "n/a",
               machine=machine_info(), available=update.available(),
               load_errors={k: v for k, v in update.load_errors().items() if v},
               galore=galore_why if galore_ok else f"not run ({galore_why})",
               command="python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + (sys.argv[1:] if argv is None
                                                                                    else list(argv))),
               config=dict(layers=args.layers, width=args.width, rank=args.rank, batch=args.batch, steps=args.steps,
                           warmup=args.warmup, max_seconds=args.max_seconds, dtypes=args.dtypes, lr=args.lr,
                           weight_decay=args.weight_decay, galore_gap=args.galore_gap,
                           galore_svd_layers=args.galore_svd_layers, seed=args.seed,
                           methods=[mt.key for mt in methods]),
               rows=[], notes=notes, self_check={})
    out = Path(args.out)
    write_report(res, out, args.name)
    print(f"gpu_step: {res['device']}; methods {[mt.key for mt in methods]}; dtypes {args.dtypes}", flush=True)
    failed = 0
    for dt in args.dtypes:
        for mt in methods:
            if args.budget_s is not None and time.perf_counter() - t_run > args.budget_s:
                notes.append(f"{dt} {mt.label}: not run, the --budget-s {args.budget_s:g} s was spent")
                continue
            row = None
            try:
                row = run_method(mt, dt, args, device)
            except Exception as e:  # one failing method (e.g. out of memory) must not lose the others
                failed += 1
                notes.append(f"{dt} {mt.label}: FAILED: {type(e).__name__}: {str(e)[:300]}")
                print(f"  {dt} {mt.label}: FAILED {type(e).__name__}: {e}", flush=True)
            if row is None:  # the failed method's tensors are free once its traceback is gone
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            else:
                res["rows"].append(row)
                print(f"  {dt} {mt.label}: train step {row['step_ms']:.2f} ms (fwd+bwd {row['fwd_bwd_ms']:.2f}, "
                      f"optimizer {row['opt_ms']:.2f} = {row['opt_share']:.0%}), peak {_f(row['peak_gib'], '.2f')} "
                      f"GiB, backend {row['backend_used']}", flush=True)
                if not row["loss_finite"]:
                    notes.append(f"{dt} {mt.label}: the loss after the run is not finite")
                if row.get("skipped_steps"):
                    notes.append(f"{dt} {mt.label}: DLRT skipped {row['skipped_steps']} layer steps (non-finite)")
            res["self_check"] = {f"{k[0]} {k[1]}x{k[2]} {str(k[3]).replace('torch.', '')}": v
                                 for k, v in dispatch._verdicts.items()}
            write_report(res, out, args.name)
    path = write_report(res, out, args.name)
    print(f"gpu_step: wrote {path} and {path.with_suffix('.json')}")
    print(f"gpu_step: done {len(res['rows'])}/{len(args.dtypes) * len(methods)} runs, {failed} failed, in "
          f"{time.perf_counter() - t_run:.0f} s" + ("" if galore_ok else "; GaLoreAdamW not run"))
    return 1 if failed or not res["rows"] else 0


if __name__ == "__main__":
    sys.exit(main())
