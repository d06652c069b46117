"""The training step at the same rank on the same MLP, for every method (:mod:`.methods`).

A :class:`MethodStepCase` is :class:`lrtrain.cli.bench.StepCase` for one method: its MLP, optimizer and a fixed
batch. DLRT's rank is fixed (``max_rank = r``, τ = 0, so the augment-truncate step keeps exactly r); GaLore
projects the same layers at rank r. GaLore recomputes its projectors (an SVD of each full gradient) every
``update_proj_gap`` steps: its steady step, its refresh step and the amortized step
``steady train step + (refresh step − steady optimizer step) / gap`` are all reported.
"""
from __future__ import annotations

import torch

from lrtrain.cli.bench import DEFAULT_STEP_MODELS, StepCase, measure_interleaved
from lrtrain.cli.bench import optimizer_sweep as _sweep
from lrtrain.cli.models import mlp

from .methods import Method, available_methods


class MethodStepCase(StepCase):
    """:class:`~lrtrain.cli.bench.StepCase` of a :class:`~harness.methods.Method`, with GaLore's projector refresh."""

    def __init__(self, method: Method, *args, **kwargs):
        self.method = method
        super().__init__(*args, **kwargs)

    def force_refresh(self) -> None:
        """GaLore only: make the next step recompute every projector (an SVD of the full gradient), as
        it does every ``update_proj_gap`` steps (a projector with no matrix recomputes it)."""
        for st in self.opt.state.values():
            if "projector" in st:
                st["projector"].ortho_matrix = None

    def refresh_setup(self) -> None:
        self.forward_backward()
        self.force_refresh()


def step_case(method: Method, hidden=(2048, 2048, 2048), rank: int = 128, batch: int = 128,
              in_features: int = 784, classes: int = 10, lr: float = 1e-3, weight_decay: float = 5e-4,
              seed: int = 0, warm_steps: int = 2, galore_gap: int = 200) -> MethodStepCase:
    """The MLP ``in-hidden-classes`` for ``method`` at fixed rank ``rank`` (DLRT: max_rank = rank, τ = 0,
    so its rank stays ``rank``; GaLore: projection rank ``rank``), after ``warm_steps`` steps."""
    torch.manual_seed(seed)
    model = method.prepare(mlp(in_features, list(hidden), classes), rank, fixed_rank=True)
    opt = method.optimizer(model, lr, weight_decay, rank, tau=0.0, galore_gap=galore_gap)
    return MethodStepCase(method, model, opt, batch, in_features, classes, seed, warm_steps)


def optimizer_sweep(models=DEFAULT_STEP_MODELS, min_time: float = 1.0, galore_gap: int = 200,
                    methods: list | None = None, log=print) -> list:
    """:func:`lrtrain.cli.bench.optimizer_sweep` over ``methods`` (default: every one usable here, dense first),
    plus GaLore's refresh step and amortized train step (``refresh_step_ms`` None for the other methods)."""
    methods = available_methods() if methods is None else methods

    def cases(sm, r):
        return {m.key: (m.label, step_case(m, sm.hidden, r, sm.batch, sm.in_features, sm.classes,
                                           galore_gap=galore_gap)) for m in methods}

    def finish(row, case):
        row.update(refresh_step_ms=None, amortized_train_step_ms=row["train_step_ms"])
        if row["key"] == "galore":
            refresh = measure_interleaved({"refresh": (case.step, case.refresh_setup)}, min_time=0.0)["refresh"]
            row["refresh_step_ms"] = refresh.median * 1e3
            extra = max(row["refresh_step_ms"] - row["opt_step_ms"], 0.0)
            row["amortized_train_step_ms"] = row["train_step_ms"] + extra / galore_gap
            row["gap"] = galore_gap
            if log:
                log(f"  GaLoreAdamW r={row['rank']}: refresh step {row['refresh_step_ms']:.1f} ms, amortized train "
                    f"step {row['amortized_train_step_ms']:.1f} ms")

    return _sweep(models, min_time, cases, finish, log)
