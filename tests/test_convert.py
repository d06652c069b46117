"""Model conversion: which layers are factorized, the function they compute, summary, densify."""
import pytest
import torch
from torch import nn

import lrtrain
from lrtrain import LowRankConv2d, LowRankLinear
from lrtrain.models import mlp, small_cnn


def test_mlp_conversion_uses_best_rank_r_weights_and_densify_restores_function():
    model = mlp(100, [80, 80], 10)
    originals = [m.weight.detach().clone() for m in model if isinstance(m, nn.Linear)]
    lrtrain.lowrank(model, rank=8)
    converted = [m for m in model if isinstance(m, LowRankLinear)]
    assert len(converted) == 3 - 1  # 80 -> 10 has min(out, in) = 10 < min_features: left dense
    for layer, W in zip(converted, originals):
        s = torch.linalg.svdvals(W)
        err = torch.linalg.norm(layer.dense_weight() - W)
        assert abs(err - s[8:].norm()) < 1e-4 * s.norm()
    x = torch.randn(5, 100)
    y = model(x)
    dense = lrtrain.densify(model, inplace=False)
    assert not any(isinstance(m, LowRankLinear) for m in dense.modules())
    torch.testing.assert_close(dense(x), y, rtol=1e-5, atol=1e-5)


def test_summary_counts_parameters():
    model = mlp(100, [80], 10)
    lrtrain.lowrank(model, rank=8)
    s = model.lrtrain_summary
    assert s.params_before == 100 * 80 + 80 + 80 * 10 + 10
    assert s.params_active == 8 * (80 + 100) + 64 + 80 + 80 * 10 + 10  # at rank 8
    assert s.params_after == 16 * (80 + 100) + 256 + 80 + 80 * 10 + 10  # allocated at capacity 16
    assert s.params_after == sum(p.numel() for p in model.parameters())
    assert lrtrain.summary(model).params_after == s.params_after
    assert lrtrain.summary(model).params_active == s.params_active
    assert lrtrain.summary(model).params_before == s.params_before
    assert "1 layer(s) factorized" in str(s)


def test_layers_that_would_not_gain_are_left_dense():
    model = nn.Sequential(nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 40))
    lrtrain.lowrank(model, rank=30)  # 30 * 80 + 900 >= 1600
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    assert all("would not save" in why for _, why in model.lrtrain_summary.skipped)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128, batch_first=True)
        self.head = nn.Linear(64, 64)

    def forward(self, x):
        return self.head(self.encoder(x))


def test_transformer_block_include_exclude_and_training_step():
    model = Block()
    lrtrain.lowrank(model, rank=8, exclude=["head"])
    assert isinstance(model.encoder.linear1, LowRankLinear) and isinstance(model.encoder.linear2, LowRankLinear)
    assert type(model.encoder.self_attn.out_proj) is not LowRankLinear  # MultiheadAttention reads .weight
    assert isinstance(model.head, nn.Linear) and not isinstance(model.head, LowRankLinear)
    reasons = dict(model.lrtrain_summary.skipped)
    assert reasons["head"] == "excluded by include/exclude"
    assert "MultiheadAttention" in reasons["encoder.self_attn.out_proj"]
    opt = lrtrain.DLRT(model.parameters(), lr=1e-3)
    model(torch.randn(2, 5, 64)).square().mean().backward()
    opt.step()
    only = lrtrain.lowrank(Block(), rank=8, include=["encoder.linear2"])
    assert isinstance(only.encoder.linear2, LowRankLinear) and not isinstance(only.encoder.linear1, LowRankLinear)


def test_cnn_conversion_and_inplace_false():
    model = small_cnn(1, 10, width=32)
    converted = lrtrain.lowrank(model, rank=8, inplace=False)
    assert not any(isinstance(m, LowRankConv2d) for m in model.modules())  # original untouched
    convs = [m for m in converted.modules() if isinstance(m, LowRankConv2d)]
    assert len(convs) == 2  # the first conv (fan-in 9) is too small
    assert converted(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_bad_arguments():
    with pytest.raises(ValueError, match="give rank"):
        lrtrain.lowrank(mlp(10, [10], 2))
    with pytest.raises(ValueError, match="rank must be an int >= 1"):
        lrtrain.lowrank(mlp(10, [10], 2), rank=0)
    with pytest.raises(ValueError, match="tau must be >= 0"):
        lrtrain.lowrank(mlp(10, [10], 2), tau=-1.0)
