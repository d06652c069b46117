"""Byte-level language-model benchmark: dense AdamW vs GaLoreAdamW vs lrtrain (``lowrank`` + ``DLRT``).

What is trained: a Llama-style causal LM built from a ``transformers.LlamaConfig`` (no download; vocabulary
256 = bytes as tokens, ``tie_word_embeddings=False``), from scratch, on the ``*.py`` source files of the
running Python's standard library (a fixed, recorded file list: sorted relative paths, test/, tests/,
idle_test/, site-packages/, encodings/ (codec tables) and pydoc_data/ (one generated doc string) left out;
a file goes to validation when sha256(relative path) mod 20 == 0, otherwise to training).

Every method gets the same initial weights (``torch.manual_seed(seed)`` before the model is built; the
checksum of the initial weights is recorded per method), the same batches in the same order (windows of
``context + 1`` bytes at stride ``context`` over the training stream, drawn by a seeded permutation) and
the same learning-rate schedule (linear warmup, then cosine decay to ``min_lr_ratio`` of the peak).
Methods differ only in how they train the attention and MLP projections (q/k/v/o, gate/up/down):

* ``dense``   -- ``torch.optim.AdamW`` on every parameter.
* ``galore``  -- ``galore_torch.GaLoreAdamW``: the projections in a group with rank r, ``update_proj_gap``
  200, ``scale`` 0.25, ``proj_type "std"`` (the settings of galore-torch's README); everything else in a
  plain group.
* ``lrtrain`` -- ``lrtrain.lowrank(model, rank=r, include=<the projections>, exclude="lm_head")`` (the
  embeddings are nn.Embedding, never converted), then ``lrtrain.DLRT(model.parameters(), lr=..,
  weight_decay=.., tau=..)`` with every other DLRT argument at its default.

Each method runs in its own fresh Python process (``torch.set_num_threads(threads)``, ``OMP_NUM_THREADS``
set to the same), so memory is per method. Measured per method:

* **validation loss** -- mean next-byte cross entropy (nats) over a fixed set of held-out windows from the
  validation files (every predicted byte counted once); **bits per byte** = validation loss / ln 2.
  Evaluated before training and at a few evenly spaced steps (for the loss-vs-time plot).
* **training wall time** -- the sum over steps of ``time.perf_counter`` around forward + loss, backward, and
  optimizer step + scheduler step + ``zero_grad`` (each part summed separately); evaluations, logging and the
  memory probe are not counted. **tokens/s** = predicted tokens (steps x batch x context) / training wall time.
* **peak memory**, two ways: (1) peak *tensor* memory of one training step, measured after training with
  :func:`harness.memory.profile_step_memory` (live tensor storages counted by a dispatch mode:
  parameters + gradients + optimizer state + saved activations + temporaries; kernel workspaces and
  allocator overhead not counted), with its parts -- this is the number the memory targets use; and
  (2) the peak resident set size of the process during the training loop minus its RSS just before the model
  was built (Linux ``VmHWM`` reset through ``/proc/self/clear_refs`` when allowed, else ``ru_maxrss``).
* **parameters** -- trainable (allocated; lrtrain's factors at their capacity) and active
  (:func:`lrtrain.active_parameters`: factorized layers at their current rank).
* **final ranks** of every converted layer (min / median / max, and per layer).

``main()`` writes ``{out}/{name}.json``, ``{out}/{name}.md`` (tables, the issue's targets as met/missed
with the numbers, and for a missed one the measured parts that limit it) and ``{out}/{name}_loss.png``
(validation loss vs training wall time and vs tokens; needs matplotlib, skipped without it).
Several values in ``--lrs`` / ``--taus`` turn the run into a learning-rate / tau sweep (one run per value).

Usage (the full run of the report: 9.2 min on 2 otherwise idle CPU cores, 2026-11-28; longer under load)::

    nice -n 5 python benchmarks/lm_bench.py --threads 2
    OMP_NUM_THREADS=1 python benchmarks/lm_bench.py --smoke --out /tmp/lm   # seconds, tiny model
"""
from __future__ import annotations

import argparse
import bisect
import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout: import this checkout's lrtrain
    sys.path.insert(0, str(ROOT))

from harness.machine import installed_version, machine_info  # noqa: E402  (benchmarks/ is the script's directory)
from lrtrain.cli.args import file_name  # noqa: E402
from harness.memory import MIB, profile_step_memory  # noqa: E402
from lrtrain.cli.bench import loadavg  # noqa: E402
from lrtrain.cli.train import ranks as layer_ranks  # noqa: E402

METHODS = ("dense", "galore", "lrtrain")
LABELS = {"dense": "dense AdamW", "galore": "GaLoreAdamW", "lrtrain": "lrtrain DLRT"}
PROJECTIONS = ["*.self_attn.q_proj", "*.self_attn.k_proj", "*.self_attn.v_proj", "*.self_attn.o_proj",
               "*.mlp.gate_proj", "*.mlp.up_proj", "*.mlp.down_proj"]
EXCLUDED_DIRS = ("test", "tests", "idle_test", "site-packages", "__pycache__", "encodings", "pydoc_data")
VAL_MOD = 20  # a file is a validation file when sha256(relative path) % VAL_MOD == 0
LN2 = math.log(2.0)


@dataclass
class Config:
    """Every setting of a run (the defaults are the full run of benchmarks/results/lm_bench.md)."""

    # model (LlamaConfig)
    hidden: int = 384
    layers: int = 4
    intermediate: int = 1024  # ~2.67x hidden (SwiGLU)
    heads: int = 6
    context: int = 256
    # training
    batch: int = 8
    steps: int = 300
    warmup: int = 30
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak learning rate
    weight_decay: float = 0.1
    lr: dict = field(default_factory=lambda: {"dense": 1e-3, "galore": 8e-3, "lrtrain": 8e-3})  # best in lm_sweep.md
    rank: int = 64  # GaLore's projection rank = lrtrain's initial rank (capacity 2 x rank)
    rule: str = "importance"  # DLRT's rank rule; "tolerance" = the rule and S-step before issue 17
    tau: float | None = None  # DLRT's tolerance for that rule (None: the rule's default)
    galore_gap: int = 200
    galore_scale: float = 0.25
    seed: int = 0
    threads: int = 2
    # evaluation
    eval_points: int = 4  # evaluations after step 0 (evenly spaced, the last at the final step)
    val_windows: int = 64  # held-out windows of `context` predicted bytes each

    @property
    def tokens(self) -> int:
        """Predicted tokens (bytes) per run: steps x batch x context."""
        return self.steps * self.batch * self.context


SMOKE = dict(hidden=64, layers=2, intermediate=160, heads=2, context=64, batch=4, steps=12, warmup=3, rank=8,
             eval_points=2, val_windows=8, threads=1)


# ----------------------------------------------------------------------------------------------- corpus
def stdlib_root() -> Path:
    import sysconfig

    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files() -> list:
    """Sorted relative paths (posix) of the selected standard-library ``*.py`` files."""
    root = stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        if any(part in EXCLUDED_DIRS for part in rel_dir.parts):
            dirnames[:] = []
            continue
        out += [(rel_dir / f).as_posix() for f in filenames if f.endswith(".py")]
    return sorted(out)


def is_validation(rel: str) -> bool:
    return int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) % VAL_MOD == 0


def load_corpus() -> dict:
    """The training and validation byte streams (each file followed by one NUL byte) and what identifies them."""
    root = stdlib_root()
    files = corpus_files()
    train, val, val_files = bytearray(), bytearray(), []
    for rel in files:
        data = (root / rel).read_bytes() + b"\0"
        if is_validation(rel):
            val += data
            val_files.append(rel)
        else:
            train += data
    if not train or not val:
        raise RuntimeError(f"no {'training' if not train else 'validation'} files under {root}")
    return {
        "train": bytes(train), "val": bytes(val),
        "info": {
            "stdlib": str(root), "python": platform.python_version(),
            "selection": f"*.py under the stdlib, sorted relative paths, directories {list(EXCLUDED_DIRS)} left out",
            "split": f"validation when int(sha256(relative path)[:8 hex], 16) % {VAL_MOD} == 0",
            "files": len(files), "train_files": len(files) - len(val_files), "val_files": len(val_files),
            "file_list_sha256": hashlib.sha256("\n".join(files).encode()).hexdigest(),
            "train_bytes": len(train), "val_bytes": len(val),
            "train_sha256": hashlib.sha256(train).hexdigest(), "val_sha256": hashlib.sha256(val).hexdigest(),
            "val_file_list": val_files,
        },
    }


def windows(stream: bytes, context: int):
    """All windows of ``context + 1`` bytes at stride ``context`` (every byte after the first predicted once)."""
    import torch

    t = torch.frombuffer(bytearray(stream), dtype=torch.uint8)
    n = (len(stream) - 1) // context
    return t[: n * context + 1].unfold(0, context + 1, context)


def batch_schedule(n_windows: int, steps: int, batch: int, seed: int):
    """Window indices, ``steps x batch``: concatenated seeded permutations (same for every method)."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    need, parts = steps * batch, []
    while sum(len(p) for p in parts) < need:
        parts.append(torch.randperm(n_windows, generator=g))
    return torch.cat(parts)[:need].view(steps, batch)


def val_indices(n_windows: int, k: int) -> list:
    """``k`` evenly spaced validation windows (all of them when there are fewer)."""
    if n_windows <= k:
        return list(range(n_windows))
    return sorted({round(i * (n_windows - 1) / (k - 1)) for i in range(k)})


def eval_steps(cfg: Config) -> list:
    return sorted({0} | {round(cfg.steps * i / cfg.eval_points) for i in range(1, cfg.eval_points + 1)})


def lr_factor(step: int, cfg: Config) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based): linear warmup, then cosine to min_lr_ratio."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


# ------------------------------------------------------------------------------------------------ model
def build_model(cfg: Config):
    from transformers import LlamaConfig, LlamaForCausalLM

    mc = LlamaConfig(vocab_size=256, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                     num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                     max_position_embeddings=cfg.context, tie_word_embeddings=False, use_cache=False,
                     attn_implementation="sdpa", bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(mc)


def projection_modules(model) -> list:
    import fnmatch

    return [(n, m) for n, m in model.named_modules() if any(fnmatch.fnmatchcase(n, p) for p in PROJECTIONS)]


def build_optimizer(method: str, model, cfg: Config, lr: float, tau: float):
    import torch

    if method == "dense":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay, eps=1e-8)
    if method == "galore":
        from harness.methods import galore_adamw, galore_targets

        # the projections lrtrain factorizes at this rank (galore_targets applies lowrank's gain rule)
        proj = [w for _, m in projection_modules(model) for w in galore_targets(m, cfg.rank)]
        return galore_adamw(model.parameters(), proj, lr, cfg.weight_decay, cfg.rank, cfg.galore_gap, cfg.galore_scale)
    if method == "lrtrain":
        import lrtrain

        before = dict(rank_rule="tolerance", s_direction="own") if cfg.rule == "tolerance" else {}
        return lrtrain.DLRT(model.parameters(), lr=lr, weight_decay=cfg.weight_decay, tau=tau, **before)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def _rss_reset() -> str:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; returns the method peak RSS is read with."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM"
    except OSError:
        return "ru_maxrss"


def _proc_status(key: str) -> int:
    """``key`` (e.g. VmRSS, VmHWM) from /proc/self/status, in bytes (-1 when unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1


def _peak_rss(how: str) -> int:
    if how == "VmHWM":
        return _proc_status("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def rank_stats(ranks: dict) -> dict:
    if not ranks:
        return {}
    v = list(ranks.values())
    return {"min": min(v), "median": statistics.median(v), "max": max(v), "mean": sum(v) / len(v)}


# ----------------------------------------------------------------------------------------------- worker
def run_method(method: str, cfg: Config, lr: float, tau: float, log=print) -> dict:
    """Train one method in this process and return its measurements (see the module docstring)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    import lrtrain

    torch.set_num_threads(cfg.threads)
    t_proc = time.perf_counter()
    load_start = loadavg()
    corpus = load_corpus()
    train_w, val_all = windows(corpus["train"], cfg.context), windows(corpus["val"], cfg.context)
    val_w = val_all[val_indices(len(val_all), cfg.val_windows)].long()
    sched_idx = batch_schedule(len(train_w), cfg.steps, cfg.batch, cfg.seed)

    from transformers import LlamaForCausalLM  # noqa: F401  (imports before the RSS baseline)

    if method == "galore":
        import galore_torch  # noqa: F401
    rss_how = _rss_reset()
    rss0 = _proc_status("VmRSS")
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    with torch.no_grad():
        init_checksum = float(sum(p.double().square().sum() for p in model.parameters()))
    params_dense = sum(p.numel() for p in model.parameters())
    if method == "lrtrain":
        model = lrtrain.lowrank(model, rank=cfg.rank, include=PROJECTIONS, exclude="lm_head")
    opt = build_optimizer(method, model, cfg, lr, tau)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    setup_s = time.perf_counter() - t0
    capacities = {n: m.capacity for n, m in model.named_modules() if hasattr(m, "capacity") and hasattr(m, "rank")}

    def loss_of(w):
        logits = model(input_ids=w[:, :-1]).logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        total = 0.0
        for i in range(0, len(val_w), cfg.batch):
            w = val_w[i:i + cfg.batch]
            total += float(loss_of(w)) * w[:, 1:].numel()
        model.train()
        return total / val_w[:, 1:].numel()

    points = eval_steps(cfg)
    evals, train_loss = [], []
    fwd = bwd = stp = 0.0
    log_every = max(1, cfg.steps // 10)

    def record(step):
        t = time.perf_counter()
        v = evaluate()
        rk = layer_ranks(model)
        evals.append({"step": step, "tokens": step * cfg.batch * cfg.context, "wall_s": fwd + bwd + stp,
                      "val_loss": v, "bits_per_byte": v / LN2, "ranks": rank_stats(rk),
                      "eval_s": time.perf_counter() - t})

    model.train()
    record(0)
    for step in range(cfg.steps):
        w = train_w[sched_idx[step]].long()
        ta = time.perf_counter()
        loss = loss_of(w)
        tb = time.perf_counter()
        loss.backward()
        tc = time.perf_counter()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        td = time.perf_counter()
        fwd, bwd, stp = fwd + tb - ta, bwd + tc - tb, stp + td - tc
        train_loss.append(loss.item())
        if step + 1 in points:
            record(step + 1)
        if log and ((step + 1) % log_every == 0 or step + 1 == cfg.steps):
            log(f"[{method}] step {step + 1}/{cfg.steps} loss {train_loss[-1]:.3f} "
                f"train {fwd + bwd + stp:.1f} s" + (f" val {evals[-1]['val_loss']:.3f}" if step + 1 in points else ""))
    peak_rss = _peak_rss(rss_how)
    final_ranks = layer_ranks(model)
    params_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    params_active = lrtrain.active_parameters(model)

    class _Logits(nn.Module):  # profile_step_memory computes cross_entropy(model(x), y)
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, x):
            return self.lm(input_ids=x).logits.reshape(-1, 256)

    w = train_w[sched_idx[-1]].long()  # the last batch once more: one more (tracked) step, after all measurements
    mem = profile_step_memory(_Logits(model), opt, w[:, :-1].contiguous(), w[:, 1:].reshape(-1).contiguous())
    wall = fwd + bwd + stp
    return {
        "method": method, "label": LABELS[method], "lr": lr, "tau": tau if method == "lrtrain" else None,
        "steps": cfg.steps, "tokens": cfg.tokens,
        "train_wall_s": wall, "tokens_per_s": cfg.tokens / wall,
        "time_split_s": {"forward": fwd, "backward": bwd, "optimizer": stp},
        "val_loss": evals[-1]["val_loss"], "bits_per_byte": evals[-1]["val_loss"] / LN2,
        "evals": evals, "train_loss": train_loss,
        "params_dense_model": params_dense, "params_trainable": params_trainable, "params_active": params_active,
        "final_ranks": final_ranks, "capacities": capacities, "rank_stats": rank_stats(final_ranks),
        "memory_tensor_bytes": dataclasses.asdict(mem),
        "memory_rss_bytes": {"before_model": rss0, "peak_during_training": peak_rss, "delta": peak_rss - rss0,
                             "peak_read_from": rss_how},
        "skipped_steps": getattr(opt, "skipped_steps", 0),
        "init_checksum": init_checksum,
        "batch_schedule_sha256": hashlib.sha256(sched_idx.numpy().tobytes()).hexdigest(),
        "val_windows_sha256": hashlib.sha256(val_w.numpy().astype("uint8").tobytes()).hexdigest(),
        "corpus_sha256": [corpus["info"]["train_sha256"], corpus["info"]["val_sha256"]],
        "setup_s": setup_s, "eval_s": sum(e["eval_s"] for e in evals),
        "process_wall_s": time.perf_counter() - t_proc, "torch_threads": torch.get_num_threads(),
        "machine": machine_info(cfg.threads),
        "loadavg_start": load_start, "loadavg_end": loadavg(),
    }


def _worker(argv) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--result", required=True)
    a = p.parse_args(argv)
    spec = json.loads(Path(a.config).read_text())
    cfg = Config(**spec["config"])
    res = run_method(a.worker, cfg, spec["lr"], spec["tau"], log=lambda s: print(s, flush=True))
    res["run"] = spec["run"]
    Path(a.result).write_text(json.dumps(res))
    return 0


# ----------------------------------------------------------------------------------------------- parent
def _git_state() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = git("status", "--porcelain", "--", "lrtrain", "csrc", "benchmarks/lm_bench.py")
    return {"commit": git("rev-parse", "HEAD"), "uncommitted_changes": dirty.splitlines()}


def run_all(specs: list, cfg_dict: dict, jobs: int, log=print) -> dict:
    """Run every spec ({run, method, lr, tau}) in its own subprocess, ``jobs`` at a time; results by run name."""
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg_dict["threads"]), MKL_NUM_THREADS=str(cfg_dict["threads"]))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    results, pending, running = {}, list(specs), []
    with tempfile.TemporaryDirectory(prefix="lm_bench_") as tmp:
        while pending or running:
            while pending and len(running) < jobs:
                spec = pending.pop(0)
                cpath, rpath = Path(tmp, spec["run"] + ".cfg.json"), Path(tmp, spec["run"] + ".res.json")
                cpath.write_text(json.dumps({**spec, "config": cfg_dict}))
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", spec["method"],
                       "--config", str(cpath), "--result", str(rpath)]
                log(f"== {spec['run']}: {spec['method']} lr={spec['lr']:g}"
                    + (f" tau={spec['tau']:g}" if spec["method"] == "lrtrain" else ""))
                running.append((spec, rpath, time.perf_counter(), subprocess.Popen(cmd, env=env)))
            time.sleep(0.2)
            for item in list(running):
                spec, rpath, t0, proc = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                if proc.returncode != 0 or not rpath.exists():
                    raise RuntimeError(f"run {spec['run']} ({spec['method']}) failed with exit status {proc.returncode}")
                results[spec["run"]] = json.loads(rpath.read_text())
                results[spec["run"]]["subprocess_wall_s"] = time.perf_counter() - t0
    return {s["run"]: results[s["run"]] for s in specs}


def target_checks(runs: dict, loss_tol: float = 0.05, equal_loss_tol: float = 0.01) -> list:
    """The issue's targets for lrtrain, from one run per method: name, measured, threshold, met, why."""
    d, g, L = runs.get("dense"), runs.get("galore"), runs.get("lrtrain")
    if d is None or L is None:
        return []

    def mem(r):
        return r["memory_tensor_bytes"]["peak"]

    def split(r):
        s = r["time_split_s"]
        return (f"fwd {s['forward']:.1f} s, bwd {s['backward']:.1f} s, opt.step {s['optimizer']:.1f} s")

    def parts(r):
        m = r["memory_tensor_bytes"]
        return (f"params {m['parameters'] / MIB:.1f}, grads {m['gradients'] / MIB:.1f}, "
                f"opt. state {m['optimizer_state'] / MIB:.1f}, saved activations {m['activations'] / MIB:.1f} MiB")

    def alloc(r):
        st, m = r["rank_stats"], r["memory_tensor_bytes"]
        return (f"lrtrain's factors are allocated at capacity {max(r['capacities'].values())} while the final ranks "
                f"are {st['min']}/{st['median']:g}/{st['max']} (min/median/max): {r['params_trainable']:,} parameters "
                f"allocated in total (as many gradients, twice as many AdamW moments), {r['params_active']:,} active; "
                f"saved activations are {m['activations'] / m['peak']:.0%} of its peak")

    out = []
    rel = L["val_loss"] / d["val_loss"] - 1
    at_time = interp_loss(d, L["train_wall_s"])
    why = ""
    if rel > loss_tol:
        st = L["rank_stats"]
        why = (f"final ranks min/median/max {st['min']}/{st['median']:g}/{st['max']} of capacity "
               f"{max(L['capacities'].values())}; lrtrain's val. loss curve: "
               + ", ".join(f"{e['val_loss']:.3f}@{e['step']}" for e in L["evals"][1:])
               + "; dense's: " + ", ".join(f"{e['val_loss']:.3f}@{e['step']}" for e in d["evals"][1:]))
    if at_time is not None:
        why = (why + "; " if why else "") + (f"at lrtrain's training wall time ({L['train_wall_s']:.0f} s) dense's "
                                             f"val. loss was {at_time:.3f} (interpolated)")
    out.append({"target": "val. loss within 5% of dense", "measured":
                f"{L['val_loss']:.4f} vs {d['val_loss']:.4f} nats ({rel:+.1%})",
                "threshold": f"<= {1 + loss_tol:.2f}x", "met": rel <= loss_tol, "why": why})
    tr = L["train_wall_s"] / d["train_wall_s"]
    out.append({"target": "wall time <= 0.7x dense", "measured":
                f"{L['train_wall_s']:.1f} s vs {d['train_wall_s']:.1f} s ({tr:.2f}x)", "threshold": "<= 0.70x",
                "met": tr <= 0.7, "why": "" if tr <= 0.7 else f"lrtrain {split(L)}; dense {split(d)}"})
    mr = mem(L) / mem(d)
    out.append({"target": "peak memory <= 0.5x dense", "measured":
                f"{mem(L) / MIB:.1f} vs {mem(d) / MIB:.1f} MiB ({mr:.2f}x)", "threshold": "<= 0.50x",
                "met": mr <= 0.5, "why": "" if mr <= 0.5 else
                f"lrtrain {parts(L)}; dense {parts(d)} (peak tensor memory of one step); params + grads + state "
                f"alone: {_state_bytes(L) / _state_bytes(d):.2f}x dense; {alloc(L)}"})
    if g is not None:
        ok_loss = L["val_loss"] <= g["val_loss"] * (1 + equal_loss_tol)
        ok_time, ok_mem = L["train_wall_s"] < g["train_wall_s"], mem(L) < mem(g)
        bad = []
        if not ok_loss:
            st = L["rank_stats"]
            bad.append(f"val. loss {L['val_loss']:.4f} vs GaLore {g['val_loss']:.4f} (lrtrain's weights end at ranks "
                       f"{st['min']}/{st['median']:g}/{st['max']}; GaLore's stay full rank, only its moments are "
                       "projected)")
        if not ok_time:
            bad.append(f"lrtrain {split(L)}; GaLore {split(g)}")
        if not ok_mem:
            bad.append(f"lrtrain {parts(L)}; GaLore {parts(g)}; {alloc(L)}")
        out.append({"target": "ahead of GaLoreAdamW on time and memory at equal or better loss",
                    "measured": f"time {L['train_wall_s'] / g['train_wall_s']:.2f}x, memory {mem(L) / mem(g):.2f}x, "
                                f"val. loss {L['val_loss']:.4f} vs {g['val_loss']:.4f}",
                    "threshold": f"time < 1x, memory < 1x, loss <= GaLore's +{equal_loss_tol:.0%} (\"equal\")",
                    "met": ok_loss and ok_time and ok_mem, "why": "; ".join(bad)})
    return out


def interp_loss(r: dict, wall: float):
    """``r``'s validation loss at training wall time ``wall``, linearly interpolated between its evaluations."""
    xs, ys = [e["wall_s"] for e in r["evals"]], [e["val_loss"] for e in r["evals"]]
    if not xs or wall > xs[-1]:
        return None
    i = bisect.bisect_left(xs, wall)
    if i == 0:
        return ys[0]
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 if x1 == x0 else y0 + (y1 - y0) * (wall - x0) / (x1 - x0)


def _state_bytes(r: dict) -> int:
    """Parameters + gradients + optimizer state of a run's memory probe (bytes)."""
    m = r["memory_tensor_bytes"]
    return m["parameters"] + m["gradients"] + m["optimizer_state"]


def _mib(b):
    return f"{b / MIB:.1f}"


def write_report(res: dict, out: Path, name: str) -> Path:
    """``{out}/{name}.md`` from the results dict (the same numbers as ``{name}.json``)."""
    c, m, cor, runs = res["config"], res["machine"], res["corpus"], res["runs"]
    d = runs.get("dense")
    order = "one after the other" if res["jobs"] == 1 else f"{res['jobs']} at a time (times not comparable)"
    kind = " (smoke run)" if res["smoke"] else " (learning-rate / tau sweep)" if res["sweep"] else ""
    L = [f"# Byte-level language-model benchmark{kind}", "",
         "Produced by (from the repository root):", "", "```bash", res["command"], "```", "",
         "The same run with every setting spelled out (defaults can change; this line cannot):", "",
         "```bash", explicit_command(res), "```", "",
         f"- date: {res['date']} (run started {m['date']}); total wall time of the run {res['total_wall_s'] / 60:.1f} min",
         f"- machine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable); torch {m['torch']} "
         f"({m['device']}), {c['threads']} thread(s) per method; Python {m['python']}; lrtrain {m['lrtrain']}; "
         f"galore-torch {m['galore_torch']}; transformers {res['transformers']}; fused DLRT backends: "
         f"{', '.join(m['fused_backends']) or 'none'}",
         f"- code: commit {res['git']['commit'][:12] or '?'}"
         + (f", with uncommitted changes in {len(res['git']['uncommitted_changes'])} file(s) of lrtrain/, csrc/ and this script: "
            + ", ".join(f"`{x.split()[-1]}`" for x in res['git']['uncommitted_changes'])
            if res['git']['uncommitted_changes'] else ", no uncommitted changes in lrtrain/, csrc/ or this script")
         + " (when the run started)",
         f"- each method ran in its own fresh process, {order}; "
         "load average (1 min) at each start/end: "
         + "; ".join(f"{k} {r['loadavg_start'][0]}/{r['loadavg_end'][0]}" for k, r in runs.items()), ""]
    first = next(iter(runs.values()))
    L += ["## Setup", "",
          f"- **corpus**: Python {cor['python']} standard library `{cor['stdlib']}`: {cor['selection']}; "
          f"{cor['files']} files, split by file ({cor['split']}): {cor['train_files']} training files "
          f"({cor['train_bytes']:,} bytes), {cor['val_files']} validation files ({cor['val_bytes']:,} bytes); "
          f"sha256 of the file list `{cor['file_list_sha256'][:16]}`, of the training stream "
          f"`{cor['train_sha256'][:16]}`, of the validation stream `{cor['val_sha256'][:16]}` "
          f"(full hashes and the validation file list in `{name}.json`). Bytes are the tokens (vocabulary 256); "
          "each file is followed by one NUL byte.",
          f"- **model**: `LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size={c['hidden']}, "
          f"intermediate_size={c['intermediate']}, num_hidden_layers={c['layers']}, num_attention_heads={c['heads']}, "
          f"max_position_embeddings={c['context']}, tie_word_embeddings=False))`, SDPA attention, float32: "
          f"{first['params_dense_model']:,} parameters; the same initial weights for every method "
          f"(seed {c['seed']}; checksum Σw² = " + ", ".join(f"{r['init_checksum']:.6f}" for r in runs.values()) + ").",
          f"- **data order**: windows of {c['context']} + 1 bytes at stride {c['context']}, batch {c['batch']}, "
          f"{c['steps']} steps = **{c['steps'] * c['batch'] * c['context']:,} training tokens** (predicted bytes), "
          f"drawn by a seeded permutation (sha256 of the schedule `{first['batch_schedule_sha256'][:16]}`, "
          f"the same for every method: {len({r['batch_schedule_sha256'] for r in runs.values()}) == 1}).",
          f"- **validation**: {res['val_windows']} fixed windows evenly spaced over the validation stream "
          f"({res['val_windows'] * c['context']:,} predicted bytes), mean cross entropy in nats; bits/byte = "
          "loss / ln 2; evaluated at steps " + ", ".join(str(e['step']) for e in first['evals']) + ".",
          f"- **schedule** (all methods): linear warmup {c['warmup']} steps, cosine to {c['min_lr_ratio']:g}× the "
          f"peak; weight decay {c['weight_decay']:g} (decoupled) on every parameter; no gradient clipping.",
          f"- **methods**: dense `torch.optim.AdamW` (eps 1e-8); `galore_torch.GaLoreAdamW` rank {c['rank']} on the "
          f"attention and MLP projections (update_proj_gap {c['galore_gap']}, scale {c['galore_scale']:g}, "
          "proj_type std), other parameters in a plain group; lrtrain: `lrtrain.lowrank(model, "
          f"rank={c['rank']}, include=[q/k/v/o_proj, gate/up/down_proj], exclude='lm_head')` (capacity "
          f"{2 * c['rank']}, embeddings and lm_head dense) then `lrtrain.DLRT(model.parameters(), lr, "
          f"weight_decay={c['weight_decay']:g}, tau={'<per run>' if res['sweep'] else format(c['tau'], 'g')}"
          + (", rank_rule='tolerance', s_direction='own'" if c.get("rule", "tolerance") == "tolerance" else "")
          + ")`, other arguments at their defaults.",
          "- **peak learning rates**: " + ", ".join(f"{r['label']}" + (f" (tau {r['tau']:g})" if r['tau'] is not None else "")
                                                  + f" {r['lr']:g}" for r in runs.values())
          + (f"; chosen from the sweeps in {', '.join(f'`{x}`' for x in res['lr_note'])} (same script, smaller "
             "model and budget, commands there)" if res.get("lr_note") else "") + ".",
          "- **wall time**: training steps only (forward + loss, backward, optimizer step + scheduler + zero_grad); "
          "evaluations and the memory probe excluded. **Peak memory**: tensor memory of one training step after "
          "training (`harness.memory.profile_step_memory`: parameters + gradients + optimizer state + saved "
          "activations + temporaries; used for the targets); **RSS Δ**: the process's peak resident memory during "
          "the training loop minus its resident memory before the model was built.", ""]
    L += ["## Results", "",
          "| method | val. loss (nats) | bits/byte | train wall (s) | vs dense | tokens/s | peak tensor mem. (MiB) "
          "| vs dense | RSS Δ (MiB) | params trainable | params active | final ranks min/median/max |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for k, r in runs.items():
        st = r["rank_stats"]
        ranks = f"{st['min']}/{st['median']:g}/{st['max']}" if st else "-"
        vt = f"{r['train_wall_s'] / d['train_wall_s']:.2f}x" if d else "-"
        vm = f"{r['memory_tensor_bytes']['peak'] / d['memory_tensor_bytes']['peak']:.2f}x" if d else "-"
        L.append(f"| {r['label'] if k == r['method'] else k} | {r['val_loss']:.4f} | {r['bits_per_byte']:.4f} "
                 f"| {r['train_wall_s']:.1f} | {vt} | {r['tokens_per_s']:,.0f} | {_mib(r['memory_tensor_bytes']['peak'])} "
                 f"| {vm} | {_mib(r['memory_rss_bytes']['delta'])} | {r['params_trainable']:,} | {r['params_active']:,} "
                 f"| {ranks} |")
    L += ["", "Initial validation loss (step 0): " + ", ".join(f"{k} {r['evals'][0]['val_loss']:.4f}" for k, r in runs.items())
          + f" (ln 256 = {math.log(256):.4f}).", ""]
    if res["targets"]:
        L += ["## Targets (issue 12)", "", "| target | measured | threshold | status | what limits it (measured) |",
              "|---|---|---|---|---|"]
        for t in res["targets"]:
            L.append(f"| {t['target']} | {t['measured']} | {t['threshold']} | **{'met' if t['met'] else 'missed'}** "
                     f"| {t['why'] or '-'} |")
        L.append("")
    L += ["## Where the time goes (training wall time, s)", "",
          "| method | forward + loss | backward | optimizer step | total | ms / step |", "|---|---:|---:|---:|---:|---:|"]
    for k, r in runs.items():
        s = r["time_split_s"]
        L.append(f"| {k} | {s['forward']:.1f} | {s['backward']:.1f} | {s['optimizer']:.1f} | {r['train_wall_s']:.1f} "
                 f"| {1000 * r['train_wall_s'] / r['steps']:.0f} |")
    L += ["", "## Peak tensor memory of a training step (MiB)", "",
          "| method | parameters | gradients | optimizer state | params + grads + state | vs dense | saved activations "
          "| peak |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for k, r in runs.items():
        mm = r["memory_tensor_bytes"]
        vs = f"{_state_bytes(r) / _state_bytes(d):.2f}x" if d else "-"
        L.append(f"| {k} | {_mib(mm['parameters'])} | {_mib(mm['gradients'])} | {_mib(mm['optimizer_state'])} "
                 f"| {_mib(_state_bytes(r))} | {vs} | {_mib(mm['activations'])} | {_mib(mm['peak'])} |")
    L += ["", "Saved activations: distinct non-parameter tensors saved for backward (the batch included); the peak also "
          "counts temporaries, so it is not the sum of the parts."]
    if res["sweep"]:
        L += ["", "## Best run per method (lowest final validation loss)", "",
              "| method | val. loss (nats) | bits/byte | peak lr | tau | runs |", "|---|---:|---:|---:|---:|---:|"]
        for mth in dict.fromkeys(r["method"] for r in runs.values()):
            rs = [r for r in runs.values() if r["method"] == mth]
            b = min(rs, key=lambda r: r["val_loss"])
            L.append(f"| {LABELS[mth]} | {b['val_loss']:.4f} | {b['bits_per_byte']:.4f} | {b['lr']:g} "
                     f"| {'-' if b['tau'] is None else format(b['tau'], 'g')} | {len(rs)} |")
        L.append("")
        path = out / f"{name}.md"
        path.write_text("\n".join(L))
        return path
    L += ["", "## Validation loss during training (nats; training wall time in s)", "",
          "| step | tokens | " + " | ".join(f"{k} loss | {k} s" for k in runs) + " |",
          "|---:|---:|" + "---:|---:|" * len(runs)]
    for i, e in enumerate(first["evals"]):
        L.append(f"| {e['step']} | {e['tokens']:,} | "
                 + " | ".join(f"{r['evals'][i]['val_loss']:.4f} | {r['evals'][i]['wall_s']:.1f}" for r in runs.values())
                 + " |")
    for k, r in runs.items():
        if r["final_ranks"]:
            L += ["", f"## Final ranks of {k}'s converted layers (capacity {max(r['capacities'].values())})", "",
                  "| layer | q | k | v | o | gate | up | down |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
            for i in range(c["layers"]):
                pre = f"model.layers.{i}."
                L.append(f"| {i} | " + " | ".join(str(r["final_ranks"].get(pre + s, "-")) for s in
                                                   ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                    "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
                         + " |")
            L.append("")
            L.append("Ranks (min/median/max) at each evaluation: "
                     + ", ".join(f"step {e['step']}: {e['ranks']['min']}/{e['ranks']['median']:g}/{e['ranks']['max']}"
                                 for e in r["evals"]) + f". Skipped (non-finite) layer steps: {r['skipped_steps']}.")
    if res.get("plot"):
        L += ["", f"![validation loss vs training wall time]({Path(res['plot']).name})"]
    L.append("")
    path = out / f"{name}.md"
    path.write_text("\n".join(L))
    return path


def make_plot(res: dict, out: Path, name: str):
    """``{name}_loss.png``: validation loss vs training wall time and vs tokens (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (k, r) in enumerate(res["runs"].items()):
        lab = r["label"] if k == r["method"] else k
        ev = r["evals"]
        axes[0].plot([e["wall_s"] for e in ev], [e["val_loss"] for e in ev], "o-", color=f"C{i}", label=lab)
        axes[1].plot([e["tokens"] / 1e6 for e in ev], [e["val_loss"] for e in ev], "o-", color=f"C{i}", label=lab)
    later = [e["val_loss"] for r in res["runs"].values() for e in r["evals"][1:]]
    if later:  # step 0 (about ln 256) would squash the curves: it is drawn above the top edge
        for ax in axes:
            ax.set_ylim(min(later) - 0.05 * (max(later) - min(later) + 0.1), max(later) + 0.15 * (max(later) - min(later) + 0.1))
    axes[0].set_xlabel("training wall time (s, evaluation excluded)")
    axes[1].set_xlabel("training tokens (millions of bytes)")
    for ax in axes:
        ax.set_ylabel("validation loss (nats / byte)")
        ax.grid(alpha=0.3)
        ax.legend()
        sec = ax.secondary_yaxis("right", functions=(lambda v: v / LN2, lambda b: b * LN2))
        sec.set_ylabel("bits / byte")
    c = res["config"]
    fig.suptitle(f"byte-level Llama ({c['hidden']}x{c['layers']}, ctx {c['context']}) on the Python stdlib, "
                 f"{c['threads']} thread(s), rank {c['rank']} (step-0 loss ~ ln 256 = 5.55 above the top edge)")
    fig.tight_layout()
    path = out / f"{name}_loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _floats(s: str) -> list:
    return [float(v) for v in s.split(",") if v.strip()]


def _parse_lrs(s: str, methods: list) -> dict:
    """``--lrs``: "1e-3,2e-3" (every method) or "dense=5e-4,1e-3;lrtrain=4e-3" -> {method: [lr, ...]}."""
    if "=" not in s:
        return {m: _floats(s) for m in methods}
    out = {}
    for part in s.split(";"):
        if part.strip():
            m, _, vals = part.partition("=")
            if m.strip() not in methods:
                raise SystemExit(f"--lrs: {m.strip()!r} is not one of --methods {methods}")
            out[m.strip()] = _floats(vals)
    return out


def parse_args(argv=None):
    base = Config()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of dense,galore,lrtrain")
    p.add_argument("--steps", type=int, help=f"training steps (default {base.steps}; smoke {SMOKE['steps']})")
    p.add_argument("--tokens", type=int, help="token budget instead of --steps: steps = ceil(tokens / (batch x context))")
    p.add_argument("--rank", type=int, help=f"GaLore rank and lrtrain's initial rank (default {base.rank})")
    p.add_argument("--rule", choices=["importance", "tolerance"], help="DLRT's rank rule (default importance, "
                   "DLRT's default; tolerance: the tolerance rule with DLRT-Net's S-step, lrtrain before issue 17)")
    p.add_argument("--tau", type=float, help="DLRT tau (default: the rule's, 0.02 importance / 0.1 tolerance)")
    p.add_argument("--lr", type=float, help="peak learning rate for every method (overrides the per-method defaults)")
    for k in METHODS:
        p.add_argument(f"--lr-{k}", type=float, help=f"peak learning rate of {k} (default {base.lr[k]:g})")
    p.add_argument("--lrs", help="a sweep: comma-separated peak learning rates for every method (1e-3,2e-3), or "
                                 "per method separated by ';' (dense=5e-4,1e-3;lrtrain=4e-3)")
    p.add_argument("--taus", help="comma-separated DLRT taus: a sweep (lrtrain only)")
    p.add_argument("--threads", type=int, help=f"torch threads per method (default {base.threads})")
    p.add_argument("--jobs", type=int, help="methods run at the same time (default 1; smoke 3): >1 makes times incomparable")
    for k in ("hidden", "layers", "intermediate", "heads", "context", "batch", "warmup", "eval_points",
              "val_windows", "seed"):
        p.add_argument("--" + k.replace("_", "-"), type=int, dest=k)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--name", type=file_name, default=None,
                   help="output stem (default lm_bench; lm_bench_smoke with --smoke); a file name, not a path")
    p.add_argument("--smoke", action="store_true", help="tiny model, few steps: a seconds-long check of the pipeline")
    p.add_argument("--date", default=None, help="date written in the report (default: today, UTC)")
    p.add_argument("--report-only", metavar="JSON", help="write the .md (and plot) again from a results .json")
    return p.parse_args(argv)


def make_config(a) -> tuple:
    """(Config, run specs, whether this is a sweep) from parsed arguments."""
    cfg = Config(**(SMOKE if a.smoke else {}))
    for k in ("rank", "tau", "threads", "hidden", "layers", "intermediate", "heads", "context", "batch", "warmup",
              "eval_points", "val_windows", "seed", "steps"):
        if getattr(a, k, None) is not None:
            setattr(cfg, k, getattr(a, k))
    if a.weight_decay is not None:
        cfg.weight_decay = a.weight_decay
    if a.rule is not None:
        cfg.rule = a.rule
    if cfg.tau is None:
        from lrtrain.update import RULES

        cfg.tau = RULES[cfg.rule]
    if a.tokens is not None:
        cfg.steps = math.ceil(a.tokens / (cfg.batch * cfg.context))
    if a.steps is not None and a.tokens is not None:
        raise SystemExit("give --steps or --tokens, not both")
    if cfg.steps < 1 or cfg.warmup < 1 or cfg.warmup > cfg.steps or cfg.eval_points < 1 or cfg.rank < 1:
        raise SystemExit(f"bad settings: steps {cfg.steps}, warmup {cfg.warmup} (1..steps), eval points "
                         f"{cfg.eval_points}, rank {cfg.rank}")
    cfg.lr = dict(cfg.lr)
    for k in METHODS:
        v = getattr(a, f"lr_{k}")
        if a.lr is not None:
            cfg.lr[k] = a.lr
        if v is not None:
            cfg.lr[k] = v
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise SystemExit(f"--methods: unknown {bad}; choose from {','.join(METHODS)}")
    lrs = _parse_lrs(a.lrs, methods) if a.lrs else {}
    taus = _floats(a.taus) if a.taus else [cfg.tau]
    specs, sweep = [], bool(a.lrs or a.taus)
    for mth in methods:
        for lr in lrs.get(mth) or [cfg.lr[mth]]:
            for tau in taus if mth == "lrtrain" else [None]:
                run = mth if not sweep else f"{mth} lr={lr:g}" + (f" tau={tau:g}" if tau is not None else "")
                specs.append({"run": run, "method": mth, "lr": lr, "tau": cfg.tau if tau is None else tau})
    return cfg, specs, sweep


def explicit_command(res: dict) -> str:
    """The command that repeats ``res``'s runs with every setting given explicitly."""
    c, runs = res["config"], res["runs"].values()
    methods = list(dict.fromkeys(r["method"] for r in runs))
    args = ["--methods", ",".join(methods)]
    for k in ("hidden", "layers", "intermediate", "heads", "context", "batch", "steps", "warmup", "rank", "seed",
              "threads", "eval_points", "val_windows"):
        args += ["--" + k.replace("_", "-"), str(c[k])]
    args += ["--weight-decay", f"{c['weight_decay']:g}", "--rule", c.get("rule", "tolerance")]
    lrs = {m: list(dict.fromkeys(r["lr"] for r in runs if r["method"] == m)) for m in methods}
    taus = list(dict.fromkeys(r["tau"] for r in runs if r["method"] == "lrtrain"))
    if res["sweep"]:
        args += ["--lrs", ";".join(f"{m}=" + ",".join(f"{v:g}" for v in lrs[m]) for m in methods)]
        args += ["--taus", ",".join(f"{v:g}" for v in taus)] if taus else []
    else:
        for m in methods:
            args += [f"--lr-{m}", f"{lrs[m][0]:g}"]
        args += ["--tau", f"{taus[0] if taus else c['tau']:g}"]
    args += ["--jobs", str(res["jobs"]), "--name", res.get("name", "lm_bench")]
    return "python benchmarks/lm_bench.py " + " ".join(shlex.quote(x) for x in args)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--worker" in argv:
        return _worker(argv)
    a = parse_args(argv)
    if a.report_only:
        src = Path(a.report_only)
        res = json.loads(src.read_text())
        res.setdefault("name", src.stem)
        if not res["sweep"]:
            res["targets"] = target_checks(res["runs"])
            res["plot"] = str(make_plot(res, src.parent, src.stem) or "") or None
        src.write_text(json.dumps(res, indent=1))
        print(write_report(res, src.parent, src.stem))
        return 0
    cfg, specs, sweep = make_config(a)
    if any(s["method"] == "galore" for s in specs) and installed_version("galore-torch") is None:
        print("GaLoreAdamW skipped: galore-torch is not installed (pip install --no-build-isolation -e '.[bench]')",
              file=sys.stderr)
        specs = [s for s in specs if s["method"] != "galore"]
    if installed_version("transformers") is None:
        raise SystemExit("lm_bench needs transformers (pip install transformers)")
    name = a.name or ("lm_bench_smoke" if a.smoke else "lm_bench")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = a.jobs or (3 if a.smoke else 1)
    corpus = load_corpus()["info"]
    print(f"corpus: {corpus['train_files']} train files ({corpus['train_bytes']:,} B), {corpus['val_files']} "
          f"validation files ({corpus['val_bytes']:,} B); {cfg.steps} steps x {cfg.batch} x {cfg.context} = "
          f"{cfg.tokens:,} tokens per method", flush=True)
    t0 = time.perf_counter()
    started, load_start = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), loadavg()
    cfg_dict, git = dataclasses.asdict(cfg), _git_state()
    runs = run_all(specs, cfg_dict, jobs)
    # the machine as the first worker saw it (its torch threads), with this process's date and load
    machine = dict(next(iter(runs.values()))["machine"], date=started, loadavg=load_start, loadavg_end=loadavg())
    res = {
        "benchmark": "byte-level language model: dense AdamW vs GaLoreAdamW vs lrtrain DLRT",
        "command": (f"nice -n {os.nice(0)} " if os.nice(0) > 0 else "")  # niceness of this process
                   + "python " + " ".join(shlex.quote(x) for x in ["benchmarks/lm_bench.py", *argv]),
        "date": a.date or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
        "name": name, "smoke": a.smoke, "sweep": sweep, "jobs": jobs, "machine": machine, "git": git,
        "transformers": installed_version("transformers"), "config": cfg_dict, "corpus": corpus,
        "runs": runs, "total_wall_s": time.perf_counter() - t0,
    }
    res["val_windows"] = len(val_indices((corpus["val_bytes"] - 1) // cfg.context, cfg.val_windows))
    res["targets"] = [] if sweep else target_checks(runs)
    if not sweep and not a.smoke:
        res["lr_note"] = [f.name for f in sorted(out.glob("lm_sweep*.md"))]
    plot = None if sweep else make_plot(res, out, name)
    res["plot"] = str(plot) if plot else None
    (out / f"{name}.json").write_text(json.dumps(res, indent=1))
    md = write_report(res, out, name)
    print(md.read_text())
    print(f"wrote {md}, {out / (name + '.json')}" + (f", {plot}" if plot else "") +
          f" in {res['total_wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
