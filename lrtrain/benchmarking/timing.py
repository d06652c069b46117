"""Wall-clock timing in this process: :func:`measure` and the round-robin :func:`measure_interleaved`.

Nothing here changes ``torch.get_num_threads()``; times are ``time.perf_counter`` differences around
one call, summarized by median, min and interquartile range.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass


def env_ints(name: str, default: str) -> tuple:
    """Comma-separated ints from environment variable ``name`` (``default`` when unset): suite sizes."""
    return tuple(int(v) for v in os.environ.get(name, default).split(",") if v.strip())


@dataclass
class Timing:
    median: float  # seconds per call
    min: float
    iqr: float
    runs: int


def measure(fn, setup=None, min_time: float = 0.5, min_runs: int = 3, max_runs: int = 10_000,
            warmup: int = 1) -> Timing:
    """Per-call wall time of ``fn()`` (median, min, IQR) after ``warmup`` untimed calls.

    ``setup()`` runs before each call, outside the timed region (e.g. forward + backward before an
    optimizer step). Runs until ``min_time`` seconds of timed calls and at least ``min_runs`` calls.
    """
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    return _timing(_timed_calls(fn, setup, min_time, min_runs, max_runs))


def _timed_calls(fn, setup, min_time: float, min_runs: int, max_runs: int = 10_000) -> list:
    times: list = []
    total = 0.0
    while (total < min_time or len(times) < min_runs) and len(times) < max_runs:
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt)
        total += dt
    return times


def _timing(times: list) -> Timing:
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return Timing(statistics.median(times), min(times), q[2] - q[0], len(times))


def measure_interleaved(calls: dict, min_time: float = 0.5, rounds: int = 3, warmup: int = 1) -> dict:
    """:func:`measure` for several callables at once, in ``rounds`` round-robin passes.

    ``calls``: name -> ``fn`` or ``(fn, setup)``. Each pass gives every callable ``min_time / rounds``
    seconds (at least one call), so a load change on a shared machine affects all of them alike and
    the ratios stay meaningful. Returns name -> :class:`Timing` over all passes.
    """
    norm = {k: v if isinstance(v, tuple) else (v, None) for k, v in calls.items()}
    for fn, setup in norm.values():
        for _ in range(warmup):
            if setup is not None:
                setup()
            fn()
    times: dict = {k: [] for k in norm}
    for _ in range(rounds):
        for k, (fn, setup) in norm.items():
            times[k] += _timed_calls(fn, setup, min_time / rounds, 1)
    return {k: _timing(v) for k, v in times.items()}
