"""The project's benchmark harness (not part of the lrtrain package): what ``benchmarks/bench_report.py``,
the other scripts in ``benchmarks/`` and the pytest-benchmark suite there (``pytest benchmarks/
--benchmark-only``) measure with. Import it as ``harness`` with ``benchmarks/`` on ``sys.path`` (scripts run
as ``python benchmarks/<script>.py`` and ``benchmarks/conftest.py`` have it there).

It builds on :mod:`lrtrain.cli.bench` (the timing, the layer and step cases and the FLOP-ideal formula of
``lrtrain bench``), one concept per module:

* :mod:`.methods` -- the contenders: dense AdamW, GaLoreAdamW (``galore-torch``, and its parameter groups),
  lrtrain DLRT with the reference update and each compiled fused backend.
* :mod:`.layers` -- the VGG-like conv block, dense vs factorized, and counted FLOPs.
* :mod:`.steps` -- the training and optimizer step of every method at the same rank, GaLore's projector refresh.
* :mod:`.memory` -- peak live tensor memory of a training step and its parts.
* :mod:`.e2e` -- end-to-end training runs (wall time, test accuracy, parameters, ranks, peak memory).
* :mod:`.machine` -- what a report states about the machine.
* :mod:`.suite`, :mod:`.report` -- one run of ``bench_report.py`` and the issue's targets; its markdown report
  and PNG plots.
* :mod:`.kernel_cases` -- cases for the fused DLRT update against the reference.
"""
from __future__ import annotations

from pathlib import Path

from lrtrain.cli.bench import (DEFAULT_STEP_MODELS, LayerCase, StepModel, Timing, flop_ideal_speedup, layer_sweep,
                               linear_case, measure_interleaved)

from .e2e import E2EResult, E2ESettings, EndToEndRun, run_end_to_end, run_end_to_end_interleaved
from .layers import conv_block, conv_block_case, conv_sweep, count_flops
from .machine import installed_version, machine_info
from .memory import MIB, MemoryProfile, TensorMemoryTracker, profile_step_memory, storage_bytes
from .methods import (DENSE, GALORE, Method, available_methods, dlrt_methods, galore_adamw, galore_status,
                      galore_targets)
from .report import format_target, load_results, make_plots, write_report
from .steps import MethodStepCase, optimizer_sweep, step_case
from .suite import GROUPS, BenchConfig, BenchResults, run_bench, target_checks

#: real MNIST (IDX files) next to the checkout, where the benchmarks look by default
MNIST_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mnist"

__all__ = [
    "MNIST_DIR", "Timing", "measure_interleaved",
    "LayerCase", "linear_case", "layer_sweep", "flop_ideal_speedup", "conv_block", "conv_block_case", "conv_sweep",
    "count_flops",
    "DENSE", "GALORE", "Method", "available_methods", "dlrt_methods", "galore_adamw", "galore_status",
    "galore_targets",
    "DEFAULT_STEP_MODELS", "StepModel", "MethodStepCase", "optimizer_sweep", "step_case",
    "MIB", "MemoryProfile", "TensorMemoryTracker", "profile_step_memory", "storage_bytes",
    "E2EResult", "E2ESettings", "EndToEndRun", "run_end_to_end", "run_end_to_end_interleaved",
    "installed_version", "machine_info",
    "GROUPS", "BenchConfig", "BenchResults", "run_bench", "target_checks",
    "format_target", "load_results", "make_plots", "write_report",
]
