"""Training step and optimizer step at the same rank on the same MLP.

Models (``LRTRAIN_BENCH_STEP_MODELS``, space-separated ``HIDDEN@BATCH:RANKS`` specs; default
``1024-1024-1024@256:64 2048-2048-2048@128:64,128``): the README's 784-1024-1024-1024-10 MLP at batch 256,
rank 64, and the end-to-end 784-2048-2048-2048-10 MLP at batch 128, ranks 64 and 128.
Methods: dense AdamW, GaLoreAdamW (galore-torch, the ``bench`` extra; skipped with the import error when
it does not import), lrtrain DLRT with the reference update and with each compiled fused backend
(``backend="cpu"``). DLRT's rank is fixed (max_rank = r, τ = 0); GaLore projects the same layers at rank r.
Groups per model and rank: ``train step`` (forward + backward + step), ``optimizer step`` (step alone,
forward + backward as untimed setup) with GaLore's projector ``refresh step`` (SVD of the full
gradient, once every update_proj_gap = 200 steps) and its amortized train step.
"""
import os

import pytest

import harness as B

MODELS = [B.StepModel.parse(s) for s in os.environ.get(
    "LRTRAIN_BENCH_STEP_MODELS", " ".join(m.spec() for m in B.DEFAULT_STEP_MODELS)).split()]
CASES = [(sm, r) for sm in MODELS for r in sm.ranks]
CASE_IDS = [f"{'-'.join(map(str, sm.hidden))}-b{sm.batch}-r{r}" for sm, r in CASES]
METHODS = [B.DENSE, B.GALORE] + B.dlrt_methods()
GAP = 200


def _case(method, sm, rank):
    if method.key == "galore" and not B.galore_status()[0]:
        pytest.skip(B.galore_status()[1])
    return B.step_case(method, sm.hidden, rank, sm.batch, galore_gap=GAP)


def _group(kind, sm, rank):
    return f"{kind}: MLP {sm.name}, batch {sm.batch}, r={rank}"


@pytest.mark.parametrize("sm,rank", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("method", METHODS, ids=[m.key for m in METHODS])
def test_train_step(benchmark, median_of, timings, summary, method, sm, rank):
    case = _case(method, sm, rank)
    benchmark.group = _group("train step (fwd+bwd+step)", sm, rank)
    benchmark.extra_info.update(method=method.label, model=sm.name, batch=sm.batch, rank=rank)
    benchmark(case.train_step)
    t = median_of(benchmark)
    if t is None:
        return
    timings[("train", method.key, sm, rank)] = t
    dense = timings.get(("train", "dense", sm, rank))
    vs = f" (speedup over dense AdamW {dense / t:.2f}x)" if dense and method.key != "dense" else ""
    summary.append(f"train step {sm.name} b={sm.batch} r={rank} {method.label}: {t * 1e3:.1f} ms{vs}")


@pytest.mark.parametrize("sm,rank", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("method", METHODS, ids=[m.key for m in METHODS])
def test_optimizer_step(benchmark, median_of, timings, summary, method, sm, rank):
    case = _case(method, sm, rank)
    benchmark.group = _group("optimizer step alone", sm, rank)
    benchmark.extra_info.update(method=method.label, model=sm.name, batch=sm.batch, rank=rank)
    benchmark.pedantic(case.step, setup=case.forward_backward, rounds=10, warmup_rounds=1)
    t = median_of(benchmark)
    if t is None:
        return
    timings[("step", method.key, sm, rank)] = t
    dense = timings.get(("step", "dense", sm, rank))
    vs = f" ({t / dense:.2f}x the dense AdamW step)" if dense and method.key != "dense" else ""
    summary.append(f"optimizer step {sm.name} b={sm.batch} r={rank} {method.label}: {t * 1e3:.1f} ms{vs}")


@pytest.mark.parametrize("sm,rank", CASES, ids=CASE_IDS)
def test_galore_refresh_step(benchmark, median_of, timings, summary, sm, rank):
    """GaLore's step that recomputes its projectors; with the steady step it gives the amortized cost."""
    case = _case(B.GALORE, sm, rank)
    benchmark.group = _group("optimizer step alone", sm, rank)
    benchmark.extra_info.update(method="GaLoreAdamW (projector refresh)", rank=rank, update_proj_gap=GAP)
    benchmark.pedantic(case.step, setup=case.refresh_setup, rounds=3, warmup_rounds=0)
    t = median_of(benchmark)
    steady, step = timings.get(("train", "galore", sm, rank)), timings.get(("step", "galore", sm, rank))
    if t is None or steady is None or step is None:
        return
    amortized = steady + max(t - step, 0.0) / GAP
    benchmark.extra_info["amortized_train_step_s"] = amortized
    summary.append(f"GaLoreAdamW {sm.name} r={rank}: refresh step {t * 1e3:.1f} ms, amortized train step "
                   f"{amortized * 1e3:.1f} ms")
    for m in METHODS:
        lt = timings.get(("train", m.key, sm, rank))
        if m.is_lrtrain and lt is not None:
            summary.append(f"  GaLoreAdamW (amortized) / {m.label} train step: {amortized / lt:.2f}x (target >= 2x)")
