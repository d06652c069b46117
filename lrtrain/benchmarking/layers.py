"""Layer forward + backward: ``nn.Linear`` vs :class:`~lrtrain.LowRankLinear` (square, ranks 32..512) and a
VGG-like block of two 3×3 convolutions vs its :class:`~lrtrain.LowRankConv2d` version.

The FLOP-ideal speedup of a rank-r m×n linear layer is ``mn / (r(m+n) + r²)`` (:func:`flop_ideal_speedup`):
exactly the ratio of the matmul FLOPs of the dense and the factorized forward + backward, which
:func:`count_flops` checks. For the conv block the ideal is the counted FLOP ratio.
"""
from __future__ import annotations

import torch
from torch import nn

from ..convert import lowrank
from ..layers import LowRankLinear
from .timing import measure_interleaved


def flop_ideal_speedup(m: int, n: int, r: int) -> float:
    """FLOP-ideal speedup of a rank-r m×n layer over the dense one: mn / (r(m+n) + r²).

    Forward + backward of a dense layer on B rows costs 6·B·mn FLOPs (3 matmuls); the factorized
    layer (x V, then S, then U; and the 6 backward products of :mod:`lrtrain.layers.autograd`) costs
    6·B·(r(m+n) + r²).
    """
    if min(m, n, r) < 1:
        raise ValueError(f"m, n, r must be >= 1, got {(m, n, r)}")
    return m * n / (r * (m + n) + r * r)


def count_flops(fn) -> int:
    """FLOPs of the matmuls/convolutions ``fn()`` runs (forward and backward), by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


class LayerCase:
    """Forward + backward of ``module`` on a fixed input (its gradient included, as inside a network).

    Calling the case runs one forward + backward; gradients are reset to None first, as
    ``zero_grad(set_to_none=True)`` does in training, so no accumulation is timed.
    """

    def __init__(self, module: nn.Module, x: torch.Tensor, label: str):
        self.module, self.label = module, label
        self.x = x.requires_grad_(True)
        with torch.no_grad():
            self.gy = torch.randn_like(module(self.x))
        self.params = list(module.parameters())

    def __call__(self) -> None:
        for p in self.params:
            p.grad = None
        self.x.grad = None
        self.module(self.x).backward(self.gy)

    def flops(self) -> int:
        return count_flops(self)


def linear_case(size: int, rank: int | None = None, batch: int = 512, seed: int = 0) -> LayerCase:
    """``nn.Linear(size, size)`` (rank None) or ``LowRankLinear(size, size, rank)`` on ``batch`` rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, size, generator=g)
    torch.manual_seed(seed)
    if rank is None:
        return LayerCase(nn.Linear(size, size), x, f"nn.Linear {size}x{size}")
    return LayerCase(LowRankLinear(size, size, rank), x, f"LowRankLinear {size}x{size} r={rank}")


def conv_block(channels=(128, 256, 256)) -> nn.Sequential:
    """VGG-like block: conv3x3(c0→c1) → ReLU → conv3x3(c1→c2) → ReLU (stride 1, padding 1)."""
    c0, c1, c2 = channels
    return nn.Sequential(nn.Conv2d(c0, c1, 3, padding=1), nn.ReLU(), nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU())


def conv_block_case(rank: int | None = None, channels=(128, 256, 256), hw: int = 16, batch: int = 8,
                    seed: int = 0) -> LayerCase:
    """The VGG-like block, dense (rank None) or with both convolutions factorized at ``rank``."""
    torch.manual_seed(seed)
    block = conv_block(channels)
    label = f"VGG block {channels[0]}-{channels[1]}-{channels[2]} @{hw}x{hw}"
    if rank is not None:
        block = lowrank(block, rank=rank)
        n_conv = sum(1 for m in block.modules() if type(m).__name__ == "LowRankConv2d")
        if n_conv != 2:
            raise ValueError(f"rank {rank}: only {n_conv} of 2 convolutions would be factorized")
        label += f" r={rank}"
    x = torch.randn(batch, channels[0], hw, hw, generator=torch.Generator().manual_seed(seed))
    return LayerCase(block, x, label)


def layer_sweep(sizes=(1024, 2048, 4096), ranks=(32, 64, 128, 256, 512), batch: int = 512,
                min_time: float = 0.5, log=print) -> list[dict]:
    """Dense vs factorized fwd+bwd for each square size and rank; one row per (size, rank)."""
    rows = []
    for n in sizes:
        rs = [r for r in ranks if r <= n]
        t_all = measure_interleaved({r: linear_case(n, r, batch) for r in [None] + rs}, min_time)
        dense = t_all[None]
        for r in rs:
            t = t_all[r]
            ideal = flop_ideal_speedup(n, n, r)
            row = dict(size=n, rank=r, batch=batch, dense_ms=dense.median * 1e3, lowrank_ms=t.median * 1e3,
                       dense_iqr_ms=dense.iqr * 1e3, lowrank_iqr_ms=t.iqr * 1e3,
                       speedup=dense.median / t.median, ideal=ideal)
            row["fraction_of_ideal"] = row["speedup"] / ideal
            rows.append(row)
            if log:
                log(f"  linear {n}x{n} r={r}: dense {row['dense_ms']:.2f} ms, low-rank {row['lowrank_ms']:.2f} ms, "
                    f"speedup {row['speedup']:.2f}x (ideal {ideal:.2f}x, {row['fraction_of_ideal']:.0%})")
    return rows


def conv_sweep(ranks=(32, 64, 128), channels=(128, 256, 256), hw: int = 16, batch: int = 8,
               min_time: float = 0.5, log=print) -> list[dict]:
    """Dense vs factorized VGG-like block fwd+bwd; the ideal is the counted FLOP ratio."""
    rows = []
    cases = {r: conv_block_case(r, channels, hw, batch) for r in [None] + list(ranks)}
    t_all = measure_interleaved(cases, min_time)
    dense, dense_flops = t_all[None], cases[None].flops()
    for r in ranks:
        case, t = cases[r], t_all[r]
        row = dict(block="-".join(map(str, channels)), hw=hw, batch=batch, rank=r, dense_ms=dense.median * 1e3,
                   lowrank_ms=t.median * 1e3, speedup=dense.median / t.median, ideal=dense_flops / case.flops())
        row["fraction_of_ideal"] = row["speedup"] / row["ideal"]
        rows.append(row)
        if log:
            log(f"  conv block r={r}: dense {row['dense_ms']:.2f} ms, low-rank {row['lowrank_ms']:.2f} ms, "
                f"speedup {row['speedup']:.2f}x (FLOP ratio {row['ideal']:.2f}x)")
    return rows

