"""Shared fixtures of the pytest-benchmark suite (``pytest benchmarks/ --benchmark-only``).

Sizes can be narrowed for a quick pass with environment variables (defaults are the issue's):
``LRTRAIN_BENCH_SIZES`` ("1024,2048,4096"), ``LRTRAIN_BENCH_RANKS`` ("32,64,128,256,512"),
``LRTRAIN_BENCH_STEP_MODELS`` ("1024-1024-1024@256:64 2048-2048-2048@128:64,128"),
``LRTRAIN_BENCH_EPOCHS`` (1; the full end-to-end comparison is 5).
A summary (speedup vs FLOP-ideal, end-to-end wall/accuracy/memory) is printed after the run.
The shared benchmark code is ``harness`` (benchmarks/harness/), importable because this directory is on ``sys.path``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import MNIST_DIR  # noqa: E402

_SUMMARY = pytest.StashKey[list]()


def pytest_configure(config):
    config.stash[_SUMMARY] = []


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def summary(request) -> list:
    """Lines appended here are printed in the terminal summary."""
    return request.config.stash[_SUMMARY]


@pytest.fixture(scope="session")
def timings() -> dict:
    """Medians of finished benchmarks, keyed by the test's own key (ratios need the dense baseline)."""
    return {}


@pytest.fixture(scope="session")
def mnist():
    """Real MNIST from ../shared/data/mnist (skipped when absent)."""
    from lrtrain.cli.data import load_idx

    if not MNIST_DIR.is_dir():
        pytest.skip(f"MNIST not found at {MNIST_DIR}")
    return load_idx(str(MNIST_DIR))


@pytest.fixture
def median_of():
    """median_of(benchmark): median seconds of a finished benchmark, or None when benchmarking is disabled."""

    def get(benchmark):
        stats = getattr(benchmark, "stats", None)
        return None if stats is None else stats.stats.median

    return get


def pytest_terminal_summary(terminalreporter, config):
    lines = config.stash.get(_SUMMARY, [])
    if lines:
        terminalreporter.section("lrtrain benchmark summary")
        for line in lines:
            terminalreporter.write_line(line)
