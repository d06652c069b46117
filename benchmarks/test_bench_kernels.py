"""Fused DLRT update (lrtrain.update, csrc/) against the reference (lrtrain.update.spec), group "kernels".

The issue's CPU case: 12 layers of 1024×1024 at rank 64, float32 -- the layer update alone
(``update_layers``) and a whole ``DLRT.step`` (AdamW, fixed rank). The GPU case (48 layers of 4096×4096 at
rank 128) runs only where the CUDA backend is active. Jacobi SVD (warm cores of real DLRT steps) against
LAPACK at 2r = 64, 128, 256. ``python benchmarks/kernels_report.py`` measures the same cases side by side
and writes benchmarks/results/kernels.md.
"""
import functools

import pytest
import torch

import lrtrain.update as ext
from harness.kernel_cases import layer_items, step_case, warm_cores
from lrtrain.update.spec import reference_update_layers

CASES = {"cpu": (12, 1024, 64), "cuda": (48, 4096, 128)}
BACKENDS = [("reference", "cpu"), ("cpu", "cpu"), ("reference", "cuda"), ("cuda", "cuda")]
IDS = [f"{b}-on-{d}" for b, d in BACKENDS]


def _skip_unless(device):
    if device == "cuda" and not ext.available()["cuda"]:
        pytest.skip("no CUDA backend (needs a GPU and a CUDA build)")
    if device == "cpu" and not ext.available()["cpu"]:
        pytest.skip(f"CPU extension not active: {ext.load_errors()}")


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
def test_update_layers(benchmark, median_of, timings, summary, backend, device):
    _skip_unless(device)
    items = layer_items(*_shape(device), device=device)
    if backend == "reference":
        fn = lambda: reference_update_layers(items, 1e-3, 0.1, 1)  # noqa: E731
    else:
        fn = lambda: ext.update_layers(items, 1e-3, 0.1, 1, backend=backend)  # noqa: E731
    _bench(benchmark, median_of, timings, summary, "update_layers", backend, device, fn, 1.5 if device == "cpu" else 5.0)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
def test_dlrt_step(benchmark, median_of, timings, summary, backend, device):
    _skip_unless(device)
    L, width, _, rank = _shape(device)
    case = step_case(L, width, rank, backend, device=device)
    _bench(benchmark, median_of, timings, summary, "DLRT.step", backend, device, case.step, 1.5 if device == "cpu" else None)


def _shape(device):
    L, width, rank = CASES[device]
    return L, width, width, rank


def _bench(benchmark, median_of, timings, summary, what, backend, device, fn, target):
    """Time fn (synchronized on CUDA); once both sides of a pair are in, add their ratio to the summary."""
    L, width, _, rank = _shape(device)
    benchmark.group = f"kernels: {what}, {L} layers {width}x{width} r={rank} float32 ({device})"
    benchmark.extra_info.update(backend=backend, device=device, layers=L, width=width, rank=rank)

    def run():
        fn()
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark(run)
    t = median_of(benchmark)
    if t is None:
        return
    timings[(what, device, backend)] = t
    ref = timings.get((what, device, "reference"))
    if backend != "reference" and ref is not None:
        goal = f" (target >= {target}x)" if target else ""
        summary.append(f"{what} ({device}): reference {ref * 1e3:.1f} ms, fused {t * 1e3:.1f} ms, {ref / t:.2f}x{goal}")


@functools.lru_cache(maxsize=None)
def _warm(two_r):
    return warm_cores(two_r // 2)[0]


@pytest.mark.parametrize("method", ["jacobi", "lapack"])
@pytest.mark.parametrize("two_r", [64, 128, 256])
def test_core_svd(benchmark, summary, method, two_r):
    """12 warm cores Ŝ (2r×2r) from real DLRT steps: the Jacobi kernel vs torch.linalg.svd, same threads."""
    _skip_unless("cpu")
    from lrtrain.update import _cpu

    cores = _warm(two_r)
    benchmark.group = f"kernels: SVD of 12 warm cores {two_r}x{two_r} float32 (cpu)"
    benchmark.extra_info.update(method=method, two_r=two_r)
    if method == "jacobi":
        benchmark(_cpu.jacobi_svd, cores, 0.0, 1, -1, 40)
    else:
        benchmark(torch.linalg.svd, cores, full_matrices=False)
