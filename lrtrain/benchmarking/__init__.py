"""Measurements behind ``lrtrain bench`` and the pytest-benchmark suite in ``benchmarks/``.

The console command (quick sweep + markdown report + plots) and ``pytest benchmarks/ --benchmark-only``
run the same code, one concept per module:

* :mod:`.timing` -- :func:`measure` / :func:`measure_interleaved`: median, min and IQR of per-call wall times.
* :mod:`.layers` -- forward + backward of ``nn.Linear`` vs ``LowRankLinear`` and of a VGG-like conv block,
  with the FLOP-ideal speedup ``mn / (r(m+n) + r²)``.
* :mod:`.methods` -- the contenders: dense AdamW, GaLoreAdamW (``galore-torch``), lrtrain DLRT with the
  reference update and each compiled fused backend.
* :mod:`.steps` -- the training step and the optimizer step at the same rank on the same MLP.
* :mod:`.memory` -- peak live tensor memory of a training step and its parts.
* :mod:`.e2e` -- end-to-end training runs (wall time, test accuracy, parameters, ranks, peak memory).
* :mod:`.tuning` -- the validation sweep that chose lrtrain's end-to-end hyperparameters.
* :mod:`.machine`, :mod:`.suite`, :mod:`.report` -- machine info; one ``lrtrain bench`` run and the issue's
  targets; the markdown report and PNG plots.
"""
from __future__ import annotations

from .e2e import E2EResult, E2ESettings, EndToEndRun, run_end_to_end, run_end_to_end_interleaved
from .layers import (LayerCase, conv_block, conv_block_case, conv_sweep, count_flops, flop_ideal_speedup,
                     layer_sweep, linear_case)
from .machine import cpu_model, loadavg, machine_info
from .memory import MIB, MemoryProfile, TensorMemoryTracker, profile_step_memory, storage_bytes
from .methods import (DENSE, GALORE, Method, active_backends, available_methods, dlrt_methods, galore_status,
                      galore_targets)
from .report import format_target, load_results, make_plots, write_report
from .steps import DEFAULT_STEP_MODELS, StepCase, StepModel, optimizer_sweep, step_case
from .suite import GROUPS, BenchConfig, BenchResults, run_bench, target_checks
from .timing import Timing, env_ints, measure, measure_interleaved

__all__ = [
    "Timing", "env_ints", "measure", "measure_interleaved",
    "LayerCase", "conv_block", "conv_block_case", "conv_sweep", "count_flops", "flop_ideal_speedup",
    "layer_sweep", "linear_case",
    "DENSE", "GALORE", "Method", "active_backends", "available_methods", "dlrt_methods", "galore_status",
    "galore_targets",
    "DEFAULT_STEP_MODELS", "StepCase", "StepModel", "optimizer_sweep", "step_case",
    "MIB", "MemoryProfile", "TensorMemoryTracker", "profile_step_memory", "storage_bytes",
    "E2EResult", "E2ESettings", "EndToEndRun", "run_end_to_end", "run_end_to_end_interleaved",
    "cpu_model", "loadavg", "machine_info",
    "GROUPS", "BenchConfig", "BenchResults", "run_bench", "target_checks",
    "format_target", "load_results", "make_plots", "write_report",
]
