"""End to end: the MLP trained for a fixed number of epochs with each method (:mod:`.methods`):
training-loop wall time, test accuracy, parameters, ranks and peak training memory (:mod:`.memory`).

:class:`E2ESettings` holds every hyperparameter. Dense AdamW and GaLoreAdamW share ``lr``; lrtrain has
its own ``lrtrain_lr``, initial rank and τ, chosen by the validation sweep recorded in
``benchmarks/results/bench_tuning.md`` (``python benchmarks/bench_tuning.py``).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from lrtrain import active_parameters
from lrtrain.cli.data import Dataset, batches
from lrtrain.cli.models import mlp
from lrtrain.cli.train import evaluate, fit
from lrtrain.cli.train import ranks as layer_ranks

from .memory import MemoryProfile, profile_step_memory
from .methods import Method


@dataclass
class E2ESettings:
    """Hyperparameters of the end-to-end runs (the same data, batches and initial weights for every method)."""

    hidden: tuple = (2048, 2048, 2048)
    epochs: int = 5
    batch_size: int = 128
    weight_decay: float = 5e-4
    lr: float = 1e-3  # dense AdamW and GaLoreAdamW
    galore_rank: int = 64  # the same rank as lrtrain's initial rank
    galore_gap: int = 200
    galore_scale: float = 0.25
    # lrtrain: the configuration with the best final validation accuracy in benchmarks/results/bench_tuning.md
    lrtrain_lr: float = 1e-3
    lrtrain_rank: int = 64  # initial rank (truncated SVD of the dense initial weights); τ then adapts it
    lrtrain_tau: float = 0.08
    seed: int = 0
    probes: int = 6  # memory probes during training (besides the one before it)

    def optimizer_args(self, method: Method, tau: float | None = None) -> dict:
        """The keyword arguments of ``method.optimizer`` for this method."""
        if method.is_lrtrain:
            return dict(lr=self.lrtrain_lr, weight_decay=self.weight_decay, rank=self.lrtrain_rank,
                        tau=self.lrtrain_tau if tau is None else tau)
        return dict(lr=self.lr, weight_decay=self.weight_decay, rank=self.galore_rank, tau=0.0,
                    galore_gap=self.galore_gap, galore_scale=self.galore_scale)


@dataclass
class E2EResult:
    method: str
    key: str
    data: str
    hidden: list
    epochs: int
    steps: int
    train_wall_s: float  # training loop only: setup, memory probes and the final evaluation excluded
    epoch_s: list
    setup_s: float  # building/converting the model and the optimizer
    test_accuracy: float
    parameters: int  # parameters at the end of training
    parameters_initial: int
    final_ranks: dict
    rank_trajectory: list  # per step {layer: rank}; empty for dense methods
    memory: dict  # MemoryProfile (bytes) of the probe with the highest peak
    memory_probes: int
    config: dict = field(default_factory=dict)


class EndToEndRun:
    """One method's end-to-end training, advanced one epoch at a time (so runs can be interleaved).

    Epoch ``e`` is ``lrtrain.cli.train.fit`` for one epoch with seed ``seed + e``: every method sees the same
    initial dense weights and the same batches. ``fit``'s own evaluation is skipped (it gets a one-example
    test set); :meth:`result` evaluates on the whole test set once. Memory: before training and at
    ``probes`` evenly spaced steps, an independent copy of the model and optimizer takes one step under
    :func:`profile_step_memory`; the highest peak is reported and probe time is not counted as training.
    """

    def __init__(self, method: Method, data: Dataset, settings: E2ESettings | None = None,
                 tau: float | None = None, label: str | None = None):
        s = self.settings = settings or E2ESettings()
        self.method, self.data, self.label = method, data, label or method.label
        self.opt_args = s.optimizer_args(method, tau)
        t0 = time.perf_counter()
        torch.manual_seed(s.seed)
        self.model = method.prepare(mlp(data.in_features, list(s.hidden), data.num_classes), self.opt_args["rank"])
        self.opt = method.optimizer(self.model, **self.opt_args)
        self.setup_s = time.perf_counter() - t0
        self.params0 = active_parameters(self.model)
        steps_per_epoch = math.ceil(len(data.train_y) / s.batch_size)
        self.every = max(1, steps_per_epoch * s.epochs // max(s.probes, 1))
        self.profiles: list = []
        self.epoch_s: list = []
        self.ranks: list = []
        self.steps = 0
        self._train_only = Dataset(data.name, data.train_x, data.train_y, data.test_x[:1], data.test_y[:1],
                                   data.num_classes)
        xb, yb = next(iter(batches(data.train_x, data.train_y, s.batch_size, torch.Generator().manual_seed(s.seed))))
        self._probe(xb, yb)

    @property
    def done(self) -> bool:
        return len(self.epoch_s) >= self.settings.epochs

    def _probe(self, xb, yb) -> None:
        m2 = copy.deepcopy(self.model)
        o2 = self.method.optimizer(m2, **self.opt_args)
        o2.load_state_dict(copy.deepcopy(self.opt.state_dict()))
        self.profiles.append(profile_step_memory(m2, o2, xb, yb))

    def epoch(self) -> float:
        """Train one more epoch; returns its training seconds (probes excluded)."""
        probe_s = [0.0]
        s = self.settings

        def on_step(m, o, xb, yb):
            self.steps += 1
            if s.probes and self.steps % self.every == 0:
                t = time.perf_counter()
                self._probe(xb, yb)
                probe_s[0] += time.perf_counter() - t

        hist = fit(self.model, self.opt, self._train_only, 1, s.batch_size, s.seed + len(self.epoch_s),
                   on_step=on_step)
        self.ranks += hist.ranks
        self.epoch_s.append(hist.epoch_seconds[0] - probe_s[0])
        return self.epoch_s[-1]

    def result(self) -> E2EResult:
        final = layer_ranks(self.model)
        worst: MemoryProfile = max(self.profiles, key=lambda p: p.peak)
        d, s = self.data, self.settings
        return E2EResult(
            method=self.label, key=self.method.key, data=d.name, hidden=list(s.hidden), epochs=len(self.epoch_s),
            steps=self.steps, train_wall_s=sum(self.epoch_s), epoch_s=list(self.epoch_s), setup_s=self.setup_s,
            test_accuracy=evaluate(self.model, d.test_x, d.test_y),
            parameters=active_parameters(self.model), parameters_initial=self.params0,
            final_ranks=final, rank_trajectory=self.ranks if final else [], memory=asdict(worst),
            memory_probes=len(self.profiles),
            config=dict(batch_size=s.batch_size, seed=s.seed, train=len(d.train_y), test=len(d.test_y),
                        in_features=d.in_features, classes=d.num_classes, **self.opt_args))


def run_end_to_end(method: Method, data: Dataset, settings: E2ESettings | None = None, **overrides) -> E2EResult:
    """Train the MLP with ``method`` for ``settings.epochs`` (see :class:`EndToEndRun`); keyword
    ``overrides`` replace fields of ``settings``."""
    run = EndToEndRun(method, data, replace(settings or E2ESettings(), **overrides))
    while not run.done:
        run.epoch()
    return run.result()


def run_end_to_end_interleaved(runs: list, log=print) -> list:
    """Advance the runs epoch by epoch in turn (dense, GaLore, lrtrain, dense, ...), so that a load change
    on a shared machine hits every method alike rather than whichever ran at the time."""
    e = 0
    while not all(r.done for r in runs):
        e += 1
        for r in runs:
            if not r.done:
                sec = r.epoch()
                if log:
                    rk = f", ranks {list(layer_ranks(r.model).values())}" if r.method.is_lrtrain else ""
                    log(f"  epoch {e} {r.label}: {sec:.1f} s{rk}")
    return [r.result() for r in runs]
