"""Layer forward + backward: nn.Linear vs LowRankLinear (square, ranks 32..512) and a VGG-like conv block.

Each case is :class:`lrtrain.cli.bench.LayerCase` (gradients reset to None per call, input gradient
included). Speedups against the dense case of the same group and the FLOP-ideal mn/(r(m+n)+r²) go to
``extra_info`` and to the terminal summary.
"""
import os

import pytest

import harness as B


def env_ints(name: str, default: str) -> tuple:
    """Comma-separated ints from environment variable ``name`` (``default`` when unset)."""
    return tuple(int(v) for v in os.environ.get(name, default).split(",") if v.strip())


SIZES = env_ints("LRTRAIN_BENCH_SIZES", "1024,2048,4096")
RANKS = env_ints("LRTRAIN_BENCH_RANKS", "32,64,128,256,512")
BATCH = 512
CONV_RANKS = (32, 64, 128)

# dense first in each size, so the low-rank cases can report their speedup
LINEAR_CASES = [(n, r) for n in SIZES for r in (None,) + tuple(r for r in RANKS if r <= n)]


@pytest.mark.parametrize("size,rank", LINEAR_CASES,
                         ids=[f"{n}-{'dense' if r is None else f'r{r}'}" for n, r in LINEAR_CASES])
def test_linear_fwd_bwd(benchmark, median_of, timings, summary, size, rank):
    case = B.linear_case(size, rank, batch=BATCH)
    benchmark.group = f"layer fwd+bwd: linear {size}x{size}, batch {BATCH}"
    benchmark.extra_info.update(size=size, rank=rank, batch=BATCH)
    benchmark(case)
    t = median_of(benchmark)
    if t is None:
        return
    timings[("linear", size, rank)] = t
    dense = timings.get(("linear", size, None))
    if rank is not None and dense is not None:
        ideal = B.flop_ideal_speedup(size, size, rank)
        benchmark.extra_info.update(speedup=dense / t, flop_ideal=ideal, fraction_of_ideal=dense / t / ideal)
        summary.append(f"linear {size}x{size} r={rank}: {dense / t:.2f}x speedup, FLOP-ideal {ideal:.2f}x "
                       f"({dense / t / ideal:.0%} of ideal)")


@pytest.mark.parametrize("rank", (None,) + CONV_RANKS, ids=["dense"] + [f"r{r}" for r in CONV_RANKS])
def test_conv_block_fwd_bwd(benchmark, median_of, timings, summary, rank):
    case = B.conv_block_case(rank)
    benchmark.group = "layer fwd+bwd: VGG-like block conv3x3 128-256-256, 16x16, batch 8"
    flops = B.count_flops(case)
    benchmark.extra_info.update(rank=rank, flops=flops)
    benchmark(case)
    t = median_of(benchmark)
    if t is None:
        return
    timings[("conv", rank)] = t, flops
    if rank is not None and ("conv", None) in timings:
        dense_t, dense_flops = timings[("conv", None)]
        ideal = dense_flops / flops
        benchmark.extra_info.update(speedup=dense_t / t, flop_ratio=ideal)
        summary.append(f"VGG block r={rank}: {dense_t / t:.2f}x speedup, counted FLOP ratio {ideal:.2f}x")
