"""Training step at the same rank on the same MLP (784-2048-2048-2048-10, batch 128).

Methods: dense AdamW, GaLoreAdamW (galore-torch, the ``bench`` extra; skipped when it does not
import), lrtrain DLRT with the reference update and with each compiled fused backend. DLRT's rank is
fixed (max_rank = r, τ = 0); GaLore projects the same layers at rank r. Groups per rank:
``train step`` (forward + backward + step), ``optimizer step`` (step alone, forward + backward as
untimed setup) and, for GaLore, the projector ``refresh step`` (SVD of the full gradient, once every
update_proj_gap = 200 steps).
"""
import pytest

from lrtrain import benchmarking as B
from lrtrain.benchmarking import env_ints

RANKS = env_ints("LRTRAIN_BENCH_STEP_RANKS", "64,128")
HIDDEN = (2048, 2048, 2048)
BATCH = 128
GAP = 200


def _methods():
    out = [m for m in B.available_methods(include_galore=False)]
    return out[:1] + [B.Method("galore", "GaLoreAdamW")] + out[1:]


METHODS = _methods()


def _case(method, rank):
    if method.key == "galore" and not B.galore_status()[0]:
        pytest.skip(f"galore-torch does not import: {B.galore_status()[1]}")
    return B.step_case(method, HIDDEN, rank, BATCH)


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("method", METHODS, ids=[m.key for m in METHODS])
def test_train_step(benchmark, median_of, timings, summary, method, rank):
    case = _case(method, rank)
    benchmark.group = f"train step (fwd+bwd+step): MLP 784-2048x3-10, batch {BATCH}, r={rank}"
    benchmark.extra_info.update(method=method.label, rank=rank)
    benchmark(case.train_step)
    t = median_of(benchmark)
    if t is not None:
        timings[("train", method.key, rank)] = t
        summary.append(f"train step r={rank} {method.label}: {t * 1e3:.1f} ms")


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("method", METHODS, ids=[m.key for m in METHODS])
def test_optimizer_step(benchmark, median_of, timings, method, rank):
    case = _case(method, rank)
    benchmark.group = f"optimizer step alone: MLP 784-2048x3-10, batch {BATCH}, r={rank}"
    benchmark.extra_info.update(method=method.label, rank=rank)
    benchmark.pedantic(case.step, setup=case.forward_backward, rounds=10, warmup_rounds=1)
    t = median_of(benchmark)
    if t is not None:
        timings[("step", method.key, rank)] = t


@pytest.mark.parametrize("rank", RANKS)
def test_galore_refresh_step(benchmark, median_of, timings, summary, rank):
    """GaLore's step that recomputes its projectors; with the steady step it gives the amortized cost."""
    case = _case(B.Method("galore", "GaLoreAdamW"), rank)
    benchmark.group = f"optimizer step alone: MLP 784-2048x3-10, batch {BATCH}, r={rank}"
    benchmark.extra_info.update(method="GaLoreAdamW (projector refresh)", rank=rank, update_proj_gap=GAP)
    benchmark.pedantic(case.step, setup=case.refresh_setup, rounds=3, warmup_rounds=0)
    t = median_of(benchmark)
    steady, step = timings.get(("train", "galore", rank)), timings.get(("step", "galore", rank))
    if t is None or steady is None or step is None:
        return
    amortized = steady + max(t - step, 0.0) / GAP
    benchmark.extra_info["amortized_train_step_s"] = amortized
    summary.append(f"GaLoreAdamW r={rank}: refresh step {t * 1e3:.1f} ms, amortized train step {amortized * 1e3:.1f} ms")
    for m in METHODS:
        lr = timings.get(("train", m.key, rank))
        if m.is_lrtrain and lr is not None:
            summary.append(f"  GaLoreAdamW (amortized) / {m.label} train step at r={rank}: {amortized / lr:.2f}x "
                           f"(target >= 2x)")
