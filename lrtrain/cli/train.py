"""The demo's classification training loop: :func:`fit` (cross-entropy on minibatches), :func:`evaluate`,
:func:`ranks`."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..layers.factors import FactorizedMixin
from ..validation import flag, integer
from .data import Dataset, batches

__all__ = ["History", "fit", "evaluate", "ranks"]


@dataclass
class History:
    losses: list = field(default_factory=list)  # per step
    ranks: list = field(default_factory=list)  # per step: {layer name: rank}
    epoch_seconds: list = field(default_factory=list)
    epoch_accuracies: list = field(default_factory=list)  # test accuracy after each epoch (with eval_each_epoch)
    test_accuracy: float = float("nan")  # after the last epoch


def ranks(model) -> dict:
    """{qualified name: current rank} of the factorized layers of ``model``."""
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, FactorizedMixin)}


@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048) -> float:
    """Top-1 accuracy in percent."""
    was_training = model.training
    model.eval()
    correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in batches(x, y, batch_size, shuffle=False))
    model.train(was_training)
    return 100.0 * correct / len(y)


def fit(model, opt, data: Dataset, epochs: int, batch_size: int = 128, seed: int = 0, progress=None,
        scheduler=None, on_step=None, eval_each_epoch: bool = False) -> History:
    """Train with cross-entropy for ``epochs``; ``progress`` wraps the batch iterator (e.g. tqdm).

    ``on_step(model, opt, xb, yb)`` runs after each optimizer step; ``eval_each_epoch`` records the test
    accuracy after every epoch in ``History.epoch_accuracies`` (untimed; the last one is ``test_accuracy``).
    """
    for name, value, lo in (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("seed", seed, 0)):
        integer(name, value, lo)
    flag("eval_each_epoch", eval_each_epoch)
    gen = torch.Generator().manual_seed(seed)
    hist = History()
    model.train()
    for _ in range(epochs):
        t0 = time.perf_counter()
        it = batches(data.train_x, data.train_y, batch_size, gen)
        for xb, yb in progress(it) if progress else it:
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            hist.losses.append(loss.item())
            hist.ranks.append(ranks(model))
            if on_step is not None:
                on_step(model, opt, xb, yb)
        if scheduler is not None:
            scheduler.step()
        hist.epoch_seconds.append(time.perf_counter() - t0)
        if eval_each_epoch:
            hist.epoch_accuracies.append(evaluate(model, data.test_x, data.test_y))
    hist.test_accuracy = hist.epoch_accuracies[-1] if eval_each_epoch else evaluate(model, data.test_x, data.test_y)
    return hist
