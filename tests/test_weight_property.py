"""Modules that read .weight: nn.TransformerEncoderLayer converted with lowrank trains and runs its fast path."""
import torch
from torch import nn

import lrtrain


def test_transformer_encoder_layer_converted_with_lowrank_trains():
    torch.manual_seed(0)
    enc = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=128, dropout=0.0, batch_first=True)
    lrtrain.lowrank(enc, rank=8, min_features=16)
    assert isinstance(enc.linear1, lrtrain.LowRankLinear) and isinstance(enc.linear2, lrtrain.LowRankLinear)
    x = torch.randn(16, 10, 32)
    target = torch.roll(x, 1, dims=1)  # a task that needs attention and the feed-forward block
    opt = lrtrain.DLRT(enc.parameters(), lr=3e-3, tau=0.05)
    losses = []
    for _ in range(60):
        loss = (enc(x) - target).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    enc.eval()  # inference takes torch's fused fast path, which reads linear1.weight / linear2.weight
    with torch.no_grad():
        fast = enc(x)
        dense = lrtrain.densify(enc, inplace=False)
        torch.testing.assert_close(fast, dense(x), rtol=1e-4, atol=1e-4)
