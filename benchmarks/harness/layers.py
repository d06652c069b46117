"""A VGG-like block of two 3×3 convolutions vs its :class:`~lrtrain.LowRankConv2d` version (forward + backward),
with the FLOP ratio counted by ``torch.utils.flop_counter``; the linear layers are :mod:`lrtrain.cli.bench`'s."""
from __future__ import annotations

import torch
from torch import nn

from lrtrain import lowrank
from lrtrain.cli.bench import LayerCase, measure_interleaved


def count_flops(fn) -> int:
    """FLOPs of the matmuls/convolutions ``fn()`` runs (forward and backward), by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


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


def conv_sweep(ranks=(32, 64, 128), channels=(128, 256, 256), hw: int = 16, batch: int = 8,
               min_time: float = 0.5, log=print) -> list[dict]:
    """Dense vs factorized VGG-like block fwd+bwd; the ideal is the counted FLOP ratio."""
    rows = []
    cases = {r: conv_block_case(r, channels, hw, batch) for r in [None] + list(ranks)}
    t_all = measure_interleaved(cases, min_time)
    dense, dense_flops = t_all[None], count_flops(cases[None])
    for r in ranks:
        t = t_all[r]
        row = dict(block="-".join(map(str, channels)), hw=hw, batch=batch, rank=r, dense_ms=dense.median * 1e3,
                   lowrank_ms=t.median * 1e3, speedup=dense.median / t.median,
                   ideal=dense_flops / count_flops(cases[r]))
        row["fraction_of_ideal"] = row["speedup"] / row["ideal"]
        rows.append(row)
        if log:
            log(f"  conv block r={r}: dense {row['dense_ms']:.2f} ms, low-rank {row['lowrank_ms']:.2f} ms, "
                f"speedup {row['speedup']:.2f}x (FLOP ratio {row['ideal']:.2f}x)")
    return rows
