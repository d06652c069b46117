"""Cases for timing the fused update against the reference (benchmarks/test_bench_kernels.py and
benchmarks/kernels_report.py share them).

* :func:`layer_items` -- L realistic layer steps (orthonormal U, V; S nearly diagonal; random gradients;
  Adam-like directions bounded by 1) for ``update_layers`` alone.
* :func:`step_case` -- L stacked ``LowRankLinear(width, width, rank, max_rank=rank)`` layers with DLRT
  (AdamW, τ = 0: the rank stays at ``rank``, so every timed step does the same work) after one
  forward/backward; ``case.step()`` is one whole ``DLRT.step``.
* :func:`warm_cores` -- the augmented cores Ŝ (2r×2r) of real DLRT steps after the first one (recorded by a
  DLRT ``guide`` that changes nothing), and :func:`sweeps_to_converge` -- how many Jacobi sweeps they need
  (the issue's "warm start" claim).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lrtrain.layers import LowRankLinear
from lrtrain.optim import DLRT
from lrtrain.update.constants import NO_RANK_CAP
from lrtrain.update.spec import LayerStep, augmented_core

__all__ = ["layer_items", "StepCase", "step_case", "warm_cores", "sweeps_to_converge"]


def layer_items(L: int, m: int, n: int, r: int, dtype=torch.float32, device="cpu", seed: int = 0) -> list[LayerStep]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    items = []
    for _ in range(L):
        U, V = torch.linalg.qr(rnd(m, r))[0], torch.linalg.qr(rnd(n, r))[0]
        sig = torch.sort(torch.rand(r, generator=g, dtype=torch.float64) * 3 + 0.05, descending=True).values
        S = torch.diag(sig) + 1e-2 * rnd(r, r)
        t = (U, S, V, rnd(m, r), rnd(n, r), rnd(m, r).tanh(), rnd(n, r).tanh(), rnd(r, r).tanh())
        items.append(LayerStep(*(x.to(dtype=dtype, device=device) for x in t), max_rank=min(m, n)))
    return items


@dataclass
class StepCase:
    model: nn.Module
    opt: DLRT
    x: torch.Tensor
    y: torch.Tensor

    def forward_backward(self):
        self.opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(self.model(self.x), self.y).backward()

    def step(self):
        """One DLRT.step on the gradients of the last forward_backward (the step keeps ``.grad``, so
        repeated calls reuse them)."""
        self.opt.step()


def step_case(L: int, width: int, rank: int, backend: str, dtype=torch.float32, device="cpu", batch: int = 256,
              lr: float = 1e-3, seed: int = 0, guide=None) -> StepCase:
    """``L`` stacked ``LowRankLinear(width, width, rank, max_rank=rank)`` layers (tanh between) with DLRT (AdamW,
    τ = 0, ``backend``, ``guide``) on a regression batch, after one forward/backward."""
    torch.manual_seed(seed)
    layers = [LowRankLinear(width, width, rank, max_rank=rank, device=device, dtype=dtype) for _ in range(L)]
    model = nn.Sequential(*[m for layer in layers for m in (layer, nn.Tanh())][:-1])
    opt = DLRT(model.parameters(), lr=lr, tau=0.0, backend=backend, guide=guide, rank_rule="tolerance", s_direction="own")
    x = torch.randn(batch, width, device=device, dtype=dtype)
    case = StepCase(model, opt, x, torch.randn(batch, width, device=device, dtype=dtype))
    case.forward_backward()
    return case


def warm_cores(r: int, L: int = 12, width: int = 1024, steps: int = 3, lr: float = 1e-3, seed: int = 0):
    """Cores Ŝ ((L, 2r, 2r), float32) of DLRT step ``steps + 1`` (AdamW, fixed rank r) on a regression.

    Also returns the cores of the very first step (S diagonal from the initialization) for comparison.
    """
    recorder = _CoreRecorder()
    case = step_case(L, width, r, "reference", lr=lr, seed=seed, guide=recorder)
    for _ in range(steps + 1):
        case.forward_backward()
        case.step()
    return torch.stack(recorder.cores[-L:]), torch.stack(recorder.cores[:L])


class _CoreRecorder:
    """A DLRT guide that changes nothing: it records the augmented core Ŝ of every layer update."""

    def __init__(self):
        self.cores: list = []

    def adjust(self, layer, item, group) -> None:
        self.cores.append(augmented_core(item, group["lr"])[2])


def sweeps_to_converge(cores: torch.Tensor, limit: int = 40) -> list[int]:
    """Per core, the sweeps the Jacobi kernel needs (its last sweep rotates nothing: it only checks)."""
    from lrtrain.update import _cpu

    out = [limit + 1] * cores.shape[0]
    for s in range(1, limit + 1):
        status = _cpu.jacobi_svd(cores, 0.0, 1, NO_RANK_CAP, s)[4].tolist()
        for i, st in enumerate(status):
            if st == 0 and out[i] > limit:
                out[i] = s
        if all(o <= limit for o in out):
            break
    return out
