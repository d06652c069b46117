"""Factorized layers: forward = dense equivalent, exact DLRT gradients, SVD initialization, init scale."""
import copy

import pytest
import torch
from torch import nn

import lrtrain
from lrtrain import LowRankConv2d, LowRankLinear
from lrtrain.optim.params import find_layers

f64 = dict(dtype=torch.float64)


def _check_factor_grads(layer, G_W):
    """Full-capacity grads: G_K, G_L, G_S in the active block, exactly zero outside it."""
    U, S, V = (t.detach() for t in layer.factors())
    r = layer.rank
    torch.testing.assert_close(layer.U.grad[:, :r], G_W @ V, rtol=1e-10, atol=1e-10)  # G_K
    torch.testing.assert_close(layer.V.grad[:, :r], G_W.T @ U, rtol=1e-10, atol=1e-10)  # G_L
    torch.testing.assert_close(layer.S.grad[:r, :r], U.T @ G_W @ V, rtol=1e-10, atol=1e-10)  # G_S
    assert layer.capacity > r
    for g in (layer.U.grad[:, r:], layer.V.grad[:, r:], layer.S.grad[r:], layer.S.grad[:, r:]):
        assert g.abs().max() == 0


def _compare_with_dense(layer, x):
    """Same output as ``layer.to_dense()``; U/S/V grads are G_K, G_S, G_L of the dense weight gradient."""
    dense = layer.to_dense()
    x = x.requires_grad_()
    xd = x.detach().clone().requires_grad_()
    y, yd = layer(x), dense(xd)
    torch.testing.assert_close(y, yd, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    yd.backward(g)
    _check_factor_grads(layer, dense.weight.grad.reshape(dense.weight.shape[0], -1))
    torch.testing.assert_close(x.grad, xd.grad)
    torch.testing.assert_close(layer.bias.grad, dense.bias.grad)


def test_linear_forward_and_dlrt_gradients_match_dense():
    _compare_with_dense(LowRankLinear(20, 30, 5, **f64), torch.randn(4, 7, 20, **f64))  # extra leading dim


@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (2, 1, 1), (1, 2, 2)])
def test_conv_forward_and_dlrt_gradients_match_dense(stride, padding, dilation):
    layer = LowRankConv2d(3, 8, 3, 4, stride=stride, padding=padding, dilation=dilation, **f64)
    _compare_with_dense(layer, torch.randn(2, 3, 11, 11, **f64))


def test_from_dense_is_the_best_rank_r_approximation():
    lin = nn.Linear(40, 30, **f64)
    sigma = torch.linalg.svdvals(lin.weight.detach())
    for r in (1, 7, 30):
        lr_layer = LowRankLinear.from_dense(lin, rank=r)
        err = torch.linalg.norm(lr_layer.dense_weight() - lin.weight)
        torch.testing.assert_close(err, sigma[r:].norm(), rtol=1e-9, atol=1e-9)  # Eckart-Young
        assert lr_layer.rank == r
    # tau picks the smallest rank whose relative tail is <= tau
    tau = 0.3
    tail = torch.stack([sigma[k:].norm() for k in range(31)]) / sigma.norm()
    expected = int((tail > tau).sum())
    assert LowRankLinear.from_dense(lin, tau=tau).rank == expected
    full = LowRankLinear.from_dense(lin, rank=30)
    torch.testing.assert_close(full.dense_weight(), lin.weight.detach())


def test_orthonormal_init_and_variance_matches_nn_linear():
    layer = LowRankLinear(784, 512, 32)
    assert (layer.rank, layer.capacity, layer.max_rank) == (32, 64, 64)  # default capacity 2·rank
    eye = torch.eye(32)
    U, S, V = layer.factors()
    assert torch.linalg.norm(U.T @ U - eye) < 1e-5
    assert torch.linalg.norm(V.T @ V - eye) < 1e-5
    assert layer.U[:, 32:].abs().max() == 0 and layer.S[32:].abs().max() == 0
    dense_var = 1.0 / (3 * 784)  # nn.Linear: U(-1/sqrt(in), 1/sqrt(in))
    assert abs(layer.dense_weight().var().item() / dense_var - 1) < 0.05


def test_conv_refuses_groups_with_clear_error():
    with pytest.raises(ValueError, match="groups"):
        LowRankConv2d(4, 8, 3, 2, groups=2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=0), r"rank must be .*\[1, 20\]"),
    (dict(rank=21), r"rank must be"),
    (dict(rank=5, max_rank=4), r"max_rank must be .*\[5, 20\]"),
    (dict(rank=5, max_rank=21), r"max_rank must be"),
    (dict(rank=5, capacity=4), r"capacity must be .*\[5, 20\]"),
    (dict(rank=5, capacity=8, max_rank=9), r"max_rank must be .*\[5, 8\]"),
])
def test_bad_rank_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LowRankLinear(20, 30, **kwargs)


def test_deepcopy_is_a_live_layer_that_trains_alone():
    model = nn.Sequential(LowRankLinear(10, 10, 3), nn.ReLU(), LowRankLinear(10, 4, 2))
    before = [p.detach().clone() for p in model.parameters()]
    clone = copy.deepcopy(model)
    assert find_layers(clone.parameters())[0] == [clone[0], clone[2]] and clone[0].rank == 3
    opt = lrtrain.DLRT(clone.parameters(), lr=1e-2)
    clone(torch.randn(8, 10)).square().sum().backward()
    opt.step()
    assert not torch.equal(clone[0].S, before[1])  # the copy was stepped ...
    for p, b in zip(model.parameters(), before):  # ... and the original is untouched
        assert torch.equal(p, b)


def test_parameters_keep_object_shape_and_storage_through_rank_changes():
    torch.manual_seed(0)
    layer = LowRankLinear(30, 40, 12, capacity=16)
    opt = lrtrain.DLRT(layer.parameters(), lr=0.05, tau=0.3, rank_rule="tolerance", s_direction="own")
    ident = [(p, p.shape, p.data_ptr()) for p in layer.parameters()]
    X = torch.randn(64, 30)
    ranks = set()
    for _ in range(15):
        (layer(X) - X[:, :1]).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ranks.add(layer.rank)
        assert [(p, p.shape, p.data_ptr()) for p in layer.parameters()] == ident
        r = layer.rank
        assert layer.U[:, r:].abs().max() == 0 and layer.V[:, r:].abs().max() == 0 and layer.S[r:].abs().max() == 0
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt.state[layer.U][key].shape == layer.U.shape and opt.state[layer.U][key][:, r:].abs().max() == 0
    assert len(ranks) >= 3  # the rank really moved


def test_weight_property_is_differentiable_with_dlrt_gradients():
    layer = LowRankLinear(12, 9, 4, **f64)
    x = torch.randn(5, 12, **f64)
    g = torch.randn(5, 9, **f64)
    torch.nn.functional.linear(x, layer.weight, layer.bias).backward(g)  # a module that reads .weight
    via_weight = [p.grad.clone() for p in (layer.U, layer.S, layer.V)]
    layer.zero_grad()
    layer(x).backward(g)
    for a, b in zip(via_weight, (layer.U.grad, layer.S.grad, layer.V.grad)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    conv = LowRankConv2d(3, 5, 3, 2, **f64)
    torch.testing.assert_close(conv.weight, conv.to_dense().weight)


def test_set_capacity_keeps_the_function_and_retires_old_parameters():
    layer = LowRankLinear(20, 30, 6, **f64)
    x = torch.randn(4, 20, **f64)
    y = layer(x)
    opt = lrtrain.DLRT(layer.parameters(), lr=1e-2)
    old_U = layer.U
    layer.set_capacity(12)
    assert layer.capacity == 12 and layer.max_rank == 12 and layer.U is not old_U
    torch.testing.assert_close(layer(x), y)
    layer(x).sum().backward()
    with pytest.raises(ValueError, match="set_capacity"):
        lrtrain.DLRT([old_U, layer.S, layer.V])
    layer.set_capacity(3)  # below the rank: the best rank-3 approximation
    assert layer.rank == 3
    del opt
