"""End to end: real MNIST (../shared/data/mnist), MLP 784-2048-2048-2048-10, fixed epochs
(``LRTRAIN_BENCH_EPOCHS``, default 5), batch 128, AdamW lr 1e-3 / weight decay 5e-4 for dense AdamW,
GaLoreAdamW (rank 128, gap 200, scale 0.25) and lrtrain DLRT (from rank 128, τ = 0.12).

One round per method (pytest-benchmark's time is the whole call: setup, training, memory probes,
evaluation); ``extra_info`` holds the training-loop wall time without probes, test accuracy,
parameters, final ranks and peak training memory (see :mod:`lrtrain.benchmarking`).
"""
import os

import pytest

from lrtrain import benchmarking as B

EPOCHS = int(os.environ.get("LRTRAIN_BENCH_EPOCHS", "5"))
HIDDEN = (2048, 2048, 2048)
METHODS = [B.Method("dense", "dense AdamW"), B.Method("galore", "GaLoreAdamW")] + \
    [m for m in B.available_methods(include_galore=False) if m.is_lrtrain]


@pytest.fixture(scope="module")
def results() -> dict:
    return {}


@pytest.mark.parametrize("method", METHODS, ids=[m.key for m in METHODS])
def test_mlp_mnist(benchmark, mnist, results, summary, method):
    if method.key == "galore" and not B.galore_status()[0]:
        pytest.skip(f"galore-torch does not import: {B.galore_status()[1]}")
    benchmark.group = f"end to end: MNIST MLP 784-2048x3-10, {EPOCHS} epochs"
    r = benchmark.pedantic(B.run_end_to_end, args=(method, mnist, HIDDEN, EPOCHS), rounds=1, iterations=1)
    results[method.key] = r
    benchmark.extra_info.update(train_wall_s=r.train_wall_s, test_accuracy=r.test_accuracy, parameters=r.parameters,
                                peak_memory_mib=r.memory["peak"] / B.MIB, final_ranks=r.final_ranks)
    dense = results.get("dense")
    line = (f"e2e {r.method}: wall {r.train_wall_s:.1f} s, acc {r.test_accuracy:.2f}%, {r.parameters:,} params, "
            f"peak {r.memory['peak'] / B.MIB:.1f} MiB")
    if dense is not None and method.key != "dense":
        line += (f" | vs dense: wall {r.train_wall_s / dense.train_wall_s:.2f}x, "
                 f"Δacc {r.test_accuracy - dense.test_accuracy:+.2f}, memory {r.memory['peak'] / dense.memory['peak']:.2f}x")
    summary.append(line)
    assert r.steps == EPOCHS * -(-len(mnist.train_y) // 128)
