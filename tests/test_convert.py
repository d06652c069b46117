"""Model conversion: which layers are factorized, the function they compute, summary, densify."""
import pytest
import torch
from torch import nn

import lrtrain
from lrtrain import LowRankConv2d, LowRankLinear
from lrtrain.cli.models import mlp


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


def test_cnn_conversion_and_inplace_false(small_cnn):
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


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=8, max_rank=4), r"max_rank must be an int >= 8, got 4"),
    (dict(rank=8, max_rank=0), r"max_rank must be an int >= 8, got 0"),
    (dict(rank=8, max_rank=-5), r"max_rank must be an int >= 8, got -5"),
    (dict(rank=8, max_rank=2.5), r"max_rank must be an int >= 8, got 2.5"),
    (dict(tau=0.1, max_rank=0), r"max_rank must be an int >= 1, got 0"),
    (dict(rank=8, capacity=4), r"capacity must be an int >= 8, got 4"),
    (dict(rank=8, capacity=16.0), r"capacity must be an int >= 8"),
    (dict(rank=4, capacity=8, max_rank=9), r"max_rank must be an int in \[4, capacity = 8\], got 9"),
    (dict(rank=True), r"rank must be an int >= 1, got True"),
    (dict(rank=2.0), r"rank must be an int >= 1"),
    (dict(tau="0.1"), r"tau must be >= 0"),
    (dict(tau=float("nan")), r"tau must be >= 0"),
    (dict(rank=8, include=3), r"include must be a glob pattern \(str\) or a list of them, got 3"),
    (dict(rank=8, exclude=["fc", 1]), r"exclude must be a glob pattern"),
    (dict(rank=8, min_features=0), r"min_features must be an int >= 1"),
    (dict(rank=8, inplace="no"), r"inplace must be True or False"),
])
def test_bad_arguments_refused_before_anything_changes(kwargs, match):
    model = mlp(40, [40], 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        lrtrain.lowrank(model, **kwargs)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules()) and not hasattr(model, "lrtrain_summary")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_model_must_be_a_module():
    with pytest.raises(ValueError, match="model must be a torch.nn.Module"):
        lrtrain.lowrank([nn.Linear(40, 40)], rank=4)


def test_max_rank_and_capacity_are_honoured_not_clipped():
    model = lrtrain.lowrank(mlp(40, [40], 10), rank=4, max_rank=6, capacity=10, min_features=8)
    assert (model[1].rank, model[1].max_rank, model[1].capacity) == (4, 6, 10)
    # capacity above a small layer's min(out, in) is capped there (10 -> 10 here: min(out, in) = 10)
    model = lrtrain.lowrank(mlp(40, [40], 10), rank=4, capacity=30, min_features=8)
    assert model[1].capacity == 30 and model[3].capacity == 10
    # with tau alone the rank is chosen by tau, but never above max_rank / capacity
    model = lrtrain.lowrank(mlp(40, [40], 10), tau=0.0, max_rank=6, capacity=12, min_features=8)
    assert (model[1].rank, model[1].max_rank, model[1].capacity) == (6, 6, 12)


def test_a_string_include_is_one_pattern():
    model = lrtrain.lowrank(mlp(40, [40, 40], 10), rank=4, include="3")
    assert isinstance(model[3], LowRankLinear) and not isinstance(model[1], LowRankLinear)
    model = lrtrain.lowrank(mlp(40, [40, 40], 10), rank=4, include="13")  # not '1' or '3'
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    model = lrtrain.lowrank(mlp(40, [40, 40], 10), rank=4, exclude="*")
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())


def test_second_call_converts_nothing_and_says_so():
    model = lrtrain.lowrank(mlp(40, [40], 10), rank=4)
    layer = model[1]
    again = lrtrain.lowrank(model, rank=2)
    assert again is model and model[1] is layer and layer.rank == 4
    s = model.lrtrain_summary
    assert s.layers == [] and ("1", "already factorized") in s.skipped
    assert s.params_before == 40 * 40 + 40 + 40 * 10 + 10  # still the all-dense count
    assert "0 layer(s) factorized" in str(s) and "already factorized" in str(s)


def test_a_bare_layer_is_converted_and_returned():
    lin = nn.Linear(40, 30)
    w = lin.weight.detach().clone()
    new = lrtrain.lowrank(lin, rank=4)
    assert isinstance(new, LowRankLinear) and new.rank == 4 and new.lrtrain_summary.layers[0][0] == ""
    assert type(lin) is nn.Linear and torch.equal(lin.weight, w)  # the argument itself is not modified
    conv = lrtrain.lowrank(nn.Conv2d(16, 32, 3), rank=4)
    assert isinstance(conv, LowRankConv2d)
    small = nn.Linear(8, 8)
    assert lrtrain.lowrank(small, rank=2) is small and "min_features" in small.lrtrain_summary.skipped[0][1]
    assert lrtrain.lowrank(new, rank=2) is new and new.lrtrain_summary.skipped == [("", "already factorized")]
    assert "(the model itself)" in str(new.lrtrain_summary)
