"""DLRT optimizer: recovery of a low-rank target, the full-rank limit, base rules, state, robustness."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrtrain
import lrtrain.data
import lrtrain.train
from lrtrain import DLRT, LowRankLinear
from lrtrain.models import mlp
from lrtrain.optim.step import transport_state


def test_recovers_rank_of_a_low_rank_target():
    m, n = 60, 40
    T = (torch.randn(m, 5) @ torch.randn(5, n)) / 5
    layer = LowRankLinear(n, m, 20, bias=False)
    opt = DLRT(layer.parameters(), lr=0.5, base="sgd", tau=1e-2)
    X = torch.randn(512, n)
    Y = X @ T.T
    for _ in range(100):
        loss = 0.5 * (layer(X) - Y).square().sum(1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert layer.rank == 5
    assert torch.linalg.norm(layer.dense_weight() - T) / torch.linalg.norm(T) < 1e-3


@pytest.mark.parametrize("m,n", [(40, 40), (60, 40), (30, 50)])
def test_full_rank_limit_equals_dense_sgd(m, n):
    layer = LowRankLinear(n, m, min(m, n), bias=False, dtype=torch.float64)
    dense = layer.to_dense()
    opt = DLRT(layer.parameters(), lr=0.1, base="sgd", tau=0.0)
    dopt = torch.optim.SGD(dense.parameters(), lr=0.1)
    X, Y = torch.randn(16, n, dtype=torch.float64), torch.randn(16, m, dtype=torch.float64)
    (layer(X) - Y).square().sum().backward()
    (dense(X) - Y).square().sum().backward()
    opt.step()
    dopt.step()
    assert layer.rank == min(m, n)
    rel = torch.linalg.norm(layer.dense_weight() - dense.weight) / torch.linalg.norm(dense.weight)
    assert rel < 1e-5


def test_orthonormal_after_2000_steps_of_real_training(digits):
    model = lrtrain.lowrank(mlp(64, [128, 128], 10), rank=32, min_features=16)
    opt = DLRT(model.parameters(), lr=3e-3, weight_decay=1e-3, tau=0.05)
    gen = torch.Generator().manual_seed(0)
    steps = 0
    while steps < 2000:
        for xb, yb in lrtrain.data.batches(digits.train_x, digits.train_y, 64, gen):
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            opt.zero_grad()
            steps += 1
            if steps == 2000:
                break
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert len(layers) == 2
    for layer in layers:
        U, _, V = layer.factors()
        for B in (U, V):
            assert torch.linalg.norm(B.T @ B - torch.eye(B.shape[1])) < 1e-5
    assert lrtrain.train.evaluate(model, digits.test_x, digits.test_y) > 90


@pytest.mark.parametrize("base,torch_opt,kw", [
    ("adamw", torch.optim.AdamW, dict(weight_decay=0.1)),
    ("sgd", torch.optim.SGD, dict(momentum=0.9, weight_decay=0.1, nesterov=True)),
    ("sgd", torch.optim.SGD, dict(momentum=0.9, dampening=0.1)),
])
def test_plain_parameters_follow_the_torch_base_optimizer(base, torch_opt, kw):
    a = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    b = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    b.load_state_dict(a.state_dict())
    oa, ob = DLRT(a.parameters(), lr=0.05, base=base, **kw), torch_opt(b.parameters(), lr=0.05, **kw)
    for _ in range(5):
        x = torch.randn(8, 6)
        for model, o in ((a, oa), (b, ob)):
            model(x).square().mean().backward()
            o.step()
            o.zero_grad()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_state_transport_rotates_first_and_squares_second_moment():
    r = 3
    perm = torch.eye(r)[[2, 0, 1]]
    st = {k: {"exp_avg": torch.randn(*s), "exp_avg_sq": torch.rand(*s)} for k, s in
          (("U", (7, r)), ("V", (5, r)), ("S", (r, r)))}
    old = {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in st.items()}
    R_U, R_V = torch.linalg.qr(torch.randn(r, r))[0], perm
    transport_state(st, R_U, R_V, ("exp_avg",), ("exp_avg_sq",))
    torch.testing.assert_close(st["U"]["exp_avg"], old["U"]["exp_avg"] @ R_V)
    torch.testing.assert_close(st["U"]["exp_avg_sq"], old["U"]["exp_avg_sq"][:, [2, 0, 1]] * 0 + old["U"]["exp_avg_sq"] @ perm)
    torch.testing.assert_close(st["S"]["exp_avg"], R_U.T @ old["S"]["exp_avg"] @ R_V)
    assert (st["V"]["exp_avg_sq"] >= 0).all() and (st["S"]["exp_avg_sq"] >= 0).all()
    # the first moment, mapped back to W-space, is unchanged by a rotation that keeps the span
    U = torch.linalg.qr(torch.randn(7, r))[0]
    Vb = torch.linalg.qr(torch.randn(5, r))[0]
    M = torch.randn(r, r)
    st2 = {"U": {}, "V": {}, "S": {"exp_avg": M.clone()}}
    st2["U"]["exp_avg"], st2["V"]["exp_avg"] = torch.randn(7, r), torch.randn(5, r)
    transport_state(st2, R_U, R_U, ("exp_avg",), ())
    torch.testing.assert_close(U @ R_U @ st2["S"]["exp_avg"] @ (Vb @ R_U).T, U @ M @ Vb.T, rtol=1e-5, atol=1e-5)


def test_param_groups_lr_scheduler_and_zero_grad_without_none():
    model = nn.Sequential(LowRankLinear(30, 30, 10), nn.ReLU(), LowRankLinear(30, 30, 10))
    opt = DLRT([{"params": model[0].parameters(), "tau": 0.5}, {"params": model[2].parameters(), "tau": 0.0}],
               lr=1e-2, base="sgd")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(3):
        model(torch.randn(16, 30)).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # rank changes must not leave stale-shaped grads behind
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 8)
    assert model[0].rank < model[2].rank  # the larger tau truncates harder


def _snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def test_nonfinite_gradients_skip_the_layer_and_count():
    model = nn.Sequential(LowRankLinear(10, 10, 4), nn.ReLU(), LowRankLinear(10, 10, 4))
    opt = DLRT(model.parameters(), lr=1e-2)
    model(torch.randn(4, 10)).sum().backward()
    model[0].V.grad[0, 0] = float("nan")
    before = _snapshot(model)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    after = _snapshot(model)
    for b, a in zip(before[:4], after[:4]):  # layer 0 (U, S, V, bias) untouched
        assert torch.equal(b, a)
    assert not torch.equal(before[4], after[4]) or not torch.equal(before[5], after[5])  # layer 2 stepped
    assert opt.skipped_steps == 1
    assert opt.state_dict()["skipped_steps"] == 1


def test_nonfinite_raise_mode_updates_nothing():
    model = nn.Sequential(LowRankLinear(10, 10, 4), nn.ReLU(), nn.Linear(10, 3))
    opt = DLRT(model.parameters(), lr=1e-2, nonfinite="raise")
    model(torch.randn(4, 10)).sum().backward()
    model[2].weight.grad[0, 0] = float("inf")
    before = _snapshot(model)
    with pytest.raises(FloatingPointError):
        opt.step()
    assert all(torch.equal(b, a) for b, a in zip(before, _snapshot(model)))


def test_huge_step_overflows_the_core_and_is_skipped_not_corrupting():
    # lr = 1e38 overflows the float32 core: svd returns NaN, the eigh fallback raises LinAlgError.
    layer = LowRankLinear(16, 16, 4)
    opt = DLRT(layer.parameters(), lr=1e38, base="sgd", tau=0.0)
    layer(torch.randn(8, 16)).square().sum().backward()
    before = _snapshot(layer)
    with pytest.warns(RuntimeWarning):
        opt.step()
    after = _snapshot(layer)
    assert len(before) == 4  # U, S, V and the bias: the bias is skipped with its layer
    assert all(torch.equal(b, a) for b, a in zip(before, after))
    assert opt.skipped_steps == 1


def test_lapack_svd_failure_is_survived_with_the_same_result(monkeypatch):
    """gesdd's 'too many repeated singular values' error: the eigh fallback gives the same step."""
    def run(fail):
        torch.manual_seed(3)
        layer = LowRankLinear(24, 20, 6, dtype=torch.float64)
        opt = DLRT(layer.parameters(), lr=0.1, base="sgd", tau=0.0)
        layer(torch.randn(4, 24, dtype=torch.float64)).square().sum().backward()  # rank-deficient G (N=4 < r)
        if fail:
            def broken(*a, **k):
                raise torch.linalg.LinAlgError("linalg.svd: too many repeated singular values")
            monkeypatch.setattr(torch.linalg, "svd", broken)
        opt.step()
        monkeypatch.undo()
        return layer
    ok, fb = run(False), run(True)
    assert ok.rank == fb.rank
    torch.testing.assert_close(fb.dense_weight(), ok.dense_weight(), rtol=1e-8, atol=1e-10)
    U = fb.factors()[0]
    torch.testing.assert_close(U.T @ U, torch.eye(fb.rank, dtype=torch.float64), atol=1e-10, rtol=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(tau=-0.1), "tau must be >= 0"),
    (dict(base="adam"), "base must be one of"),
    (dict(lr=-1.0), "lr must be >= 0"),
    (dict(min_rank=0), "min_rank must be an int >= 1"),
    (dict(betas=(0.9, 1.0)), "betas must be in"),
    (dict(nonfinite="ignore"), "nonfinite must be"),
])
def test_bad_optimizer_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DLRT(LowRankLinear(8, 8, 2).parameters(), **kwargs)


def test_factors_split_or_missing_are_refused():
    layer = LowRankLinear(8, 8, 2)
    with pytest.raises(ValueError, match="split across param groups"):
        DLRT([{"params": [layer.U, layer.S]}, {"params": [layer.V]}])
    with pytest.raises(ValueError, match="partly missing"):
        DLRT([layer.U, layer.V])


def test_ranks_change_inside_a_standard_loop_holding_the_last_loss():
    """`loss` from the previous step still references its graph when the rank changes."""
    layer = LowRankLinear(20, 20, 10, bias=False)
    opt = DLRT(layer.parameters(), lr=0.5, base="sgd", tau=0.3)
    X = torch.randn(64, 20)
    ranks = set()
    for _ in range(5):
        loss = layer(X).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        ranks.add(layer.rank)
    assert len(ranks) > 1
