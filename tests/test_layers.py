"""Factorized layers: forward = dense equivalent, exact DLRT gradients, SVD initialization, init scale."""
import copy

import pytest
import torch
from torch import nn

import lrtrain
from lrtrain import LowRankConv2d, LowRankLinear

f64 = dict(dtype=torch.float64)


def _check_factor_grads(layer, G_W):
    U, S, V = layer.U.detach(), layer.S.detach(), layer.V.detach()
    torch.testing.assert_close(layer.U.grad, G_W @ V, rtol=1e-10, atol=1e-10)  # G_K
    torch.testing.assert_close(layer.V.grad, G_W.T @ U, rtol=1e-10, atol=1e-10)  # G_L
    torch.testing.assert_close(layer.S.grad, U.T @ G_W @ V, rtol=1e-10, atol=1e-10)  # G_S


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
    eye = torch.eye(32)
    assert torch.linalg.norm(layer.U.T @ layer.U - eye) < 1e-5
    assert torch.linalg.norm(layer.V.T @ layer.V - eye) < 1e-5
    dense_var = 1.0 / (3 * 784)  # nn.Linear: U(-1/sqrt(in), 1/sqrt(in))
    assert abs(layer.dense_weight().var().item() / dense_var - 1) < 0.05


def test_conv_refuses_groups_with_clear_error():
    with pytest.raises(ValueError, match="groups"):
        LowRankConv2d(4, 8, 3, 2, groups=2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=0), r"rank must be .*\[1, min\(out, in\) = 20\]"),
    (dict(rank=21), r"rank must be"),
    (dict(rank=5, max_rank=4), r"max_rank must be .*\[rank = 5"),
    (dict(rank=5, max_rank=21), r"max_rank must be"),
])
def test_bad_rank_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LowRankLinear(20, 30, **kwargs)


def test_deepcopy_keeps_factor_links_and_trains():
    model = nn.Sequential(LowRankLinear(10, 10, 3), nn.ReLU(), LowRankLinear(10, 4, 2))
    clone = copy.deepcopy(model)
    assert clone[0].U.lrtrain_group is clone[0].S.lrtrain_group is clone[0]._group
    assert clone[0]._group is not model[0]._group
    opt = lrtrain.DLRT(clone.parameters(), lr=1e-2)
    clone(torch.randn(8, 10)).square().sum().backward()
    opt.step()
    torch.testing.assert_close(model[0].U, copy.deepcopy(model)[0].U)  # original untouched
