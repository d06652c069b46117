"""The training step at the same rank on the same MLP, for every method (:mod:`.methods`).

A :class:`StepCase` holds one method's MLP, optimizer and a fixed batch. DLRT's rank is fixed
(``max_rank = r``, τ = 0, so the augment-truncate step keeps exactly r); GaLore projects the same layers
at rank r. GaLore recomputes its projectors (an SVD of each full gradient) every ``update_proj_gap``
steps: its steady step, its refresh step and the amortized step
``steady train step + (refresh step − steady optimizer step) / gap`` are all reported.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models import mlp
from ..train import ranks as layer_ranks
from .methods import Method, available_methods
from .timing import measure, measure_interleaved


@dataclass(frozen=True)
class StepModel:
    """An MLP ``in_features-hidden-classes`` trained on batches of ``batch`` rows, at each of ``ranks``."""

    hidden: tuple = (2048, 2048, 2048)
    batch: int = 128
    ranks: tuple = (64, 128)
    in_features: int = 784
    classes: int = 10

    @property
    def name(self) -> str:
        return "-".join(map(str, (self.in_features,) + tuple(self.hidden) + (self.classes,)))

    def spec(self) -> str:
        """The ``--step-models`` form: ``H1-H2-...@BATCH:R1,R2``."""
        return f"{'-'.join(map(str, self.hidden))}@{self.batch}:{','.join(map(str, self.ranks))}"

    @classmethod
    def parse(cls, spec: str) -> "StepModel":
        """``"1024-1024-1024@256:64"`` -> hidden (1024, 1024, 1024), batch 256, ranks (64,)."""
        try:
            hidden, rest = spec.split("@")
            batch, ranks = rest.split(":")
            out = cls(tuple(int(h) for h in hidden.split("-")), int(batch), tuple(int(r) for r in ranks.split(",")))
        except ValueError:
            raise ValueError(f"step model {spec!r}: expected H1-H2-...@BATCH:R1,R2, e.g. 1024-1024-1024@256:64") from None
        if min(out.hidden + out.ranks + (out.batch,)) < 1:
            raise ValueError(f"step model {spec!r}: sizes, batch and ranks must be >= 1")
        return out


#: the README's optimizer-step number (784-1024-1024-1024-10, batch 256, hidden layers at rank 64) and the
#: end-to-end MLP (784-2048-2048-2048-10, batch 128) at ranks 64 and 128
DEFAULT_STEP_MODELS = (StepModel((1024, 1024, 1024), 256, (64,)), StepModel((2048, 2048, 2048), 128, (64, 128)))


class StepCase:
    """One method's MLP, optimizer and a fixed batch: ``forward_backward``, ``step``, ``train_step``."""

    def __init__(self, method: Method, model: nn.Module, opt, x: torch.Tensor, y: torch.Tensor):
        self.method, self.model, self.opt, self.x, self.y = method, model, opt, x, y

    def forward_backward(self) -> None:
        F.cross_entropy(self.model(self.x), self.y).backward()

    def step(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def train_step(self) -> None:
        self.forward_backward()
        self.step()

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
              seed: int = 0, warm_steps: int = 2, galore_gap: int = 200) -> StepCase:
    """The MLP ``in-hidden-classes`` for ``method`` at fixed rank ``rank`` (DLRT: max_rank = rank, τ = 0,
    so its rank stays ``rank``; GaLore: projection rank ``rank``), after ``warm_steps`` steps."""
    torch.manual_seed(seed)
    model = method.prepare(mlp(in_features, list(hidden), classes), rank, fixed_rank=True)
    opt = method.optimizer(model, lr, weight_decay, rank, tau=0.0, galore_gap=galore_gap)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_features, generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)
    case = StepCase(method, model, opt, x, y)
    for _ in range(warm_steps):
        case.train_step()
    return case


def optimizer_sweep(models=DEFAULT_STEP_MODELS, min_time: float = 1.0, galore_gap: int = 200,
                    methods: list | None = None, log=print) -> list:
    """Per model, rank and method: train step (fwd+bwd+step), optimizer step alone (fwd+bwd as untimed
    setup), GaLore's refresh step and amortized train step; ratios against dense AdamW."""
    methods = available_methods() if methods is None else methods
    rows = []
    for sm in models:
        for r in sm.ranks:
            cases = {m.key: step_case(m, sm.hidden, r, sm.batch, sm.in_features, sm.classes, galore_gap=galore_gap)
                     for m in methods}
            trains = measure_interleaved({k: c.train_step for k, c in cases.items()}, min_time)
            steps = measure_interleaved({k: (c.step, c.forward_backward) for k, c in cases.items()}, min_time)
            group = []
            for m in methods:
                case, train, step = cases[m.key], trains[m.key], steps[m.key]
                row = dict(model=sm.name, hidden="-".join(map(str, sm.hidden)), batch=sm.batch, rank=r,
                           method=m.label, key=m.key, train_step_ms=train.median * 1e3,
                           train_step_iqr_ms=train.iqr * 1e3, opt_step_ms=step.median * 1e3,
                           opt_step_iqr_ms=step.iqr * 1e3, refresh_step_ms=None,
                           amortized_train_step_ms=train.median * 1e3)
                if m.is_lrtrain:
                    row["ranks"] = sorted(set(layer_ranks(case.model).values()))
                if m.key == "galore":
                    refresh = measure(case.step, setup=case.refresh_setup, min_time=0.0, min_runs=3)
                    row["refresh_step_ms"] = refresh.median * 1e3
                    extra = max(refresh.median - step.median, 0.0)
                    row["amortized_train_step_ms"] = (train.median + extra / galore_gap) * 1e3
                    row["gap"] = galore_gap
                group.append(row)
            dense = next((x for x in group if x["key"] == "dense"), None)
            for row in group:
                row["train_vs_dense"] = dense["train_step_ms"] / row["amortized_train_step_ms"] if dense else None
                row["opt_step_vs_dense"] = row["opt_step_ms"] / dense["opt_step_ms"] if dense else None
                if log:
                    ref = f", refresh step {row['refresh_step_ms']:.1f} ms" if row["refresh_step_ms"] else ""
                    log(f"  {sm.name} b={sm.batch} r={r} {row['method']}: train step {row['train_step_ms']:.1f} ms "
                        f"(amortized {row['amortized_train_step_ms']:.1f}), optimizer step {row['opt_step_ms']:.1f} ms{ref}")
            rows += group
    return rows
