"""DLRT optimizer: recovery of a low-rank target, the full-rank limit, base rules, state, robustness."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrtrain
import lrtrain.cli.data
import lrtrain.cli.train
from lrtrain import DLRT, LowRankLinear
from lrtrain.cli.models import mlp
from lrtrain.update.spec import transport_state


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
    opt = DLRT(layer.parameters(), lr=0.1, base="sgd", tau=0.0, refresh=1)  # the identity holds per basis update
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
        for xb, yb in lrtrain.cli.data.batches(digits.train_x, digits.train_y, 64, gen):
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
    assert lrtrain.cli.train.evaluate(model, digits.test_x, digits.test_y) > 90


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


def _moments(m, n, r, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: {"exp_avg": torch.randn(*sh, generator=g, dtype=torch.float64),
                "exp_avg_sq": torch.rand(*sh, generator=g, dtype=torch.float64)}
            for k, sh in (("U", (m, r)), ("V", (n, r)), ("S", (r, r)))}


def _clone(st):
    return {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in st.items()}


def test_state_transport_is_exact_for_a_permutation_of_the_basis():
    """Reordering the basis columns (R_U, R_V permutations) must reorder every moment exactly: K-state columns
    follow V's order, L-state columns U's order, S-state rows U's and columns V's; squared moments alike."""
    m, n, r = 7, 5, 4
    pu, pv = [2, 0, 3, 1], [1, 3, 0, 2]  # new column j is old column p[j]
    R_U, R_V = torch.eye(r, dtype=torch.float64)[:, pu], torch.eye(r, dtype=torch.float64)[:, pv]
    st = _moments(m, n, r, 0)
    old = _clone(st)
    transport_state(st, R_U, R_V, ("exp_avg",), ("exp_avg_sq",))
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(st["U"][key], old["U"][key][:, pv])
        assert torch.equal(st["V"][key], old["V"][key][:, pu])
        assert torch.equal(st["S"][key], old["S"][key][pu][:, pv])


def test_state_transport_keeps_the_first_moment_in_weight_space():
    """A rotation that keeps span(U), span(V) (U_new = U R_U, V_new = V R_V) must leave the moments' W-space
    meaning unchanged: m_K Vᵀ (K = U S), m_L Uᵀ (L = V Sᵀ) and U m_S Vᵀ. Second moments stay non-negative and
    keep their row sums (R∘R is doubly stochastic for an orthogonal R)."""
    m, n, r = 9, 6, 4
    g = torch.Generator().manual_seed(1)
    U = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0]
    R_U = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))[0]
    R_V = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))[0]
    st = _moments(m, n, r, 2)
    old = _clone(st)
    transport_state(st, R_U, R_V, ("exp_avg",), ("exp_avg_sq",))
    Un, Vn = U @ R_U, V @ R_V
    close = dict(rtol=0, atol=1e-12)
    torch.testing.assert_close(st["U"]["exp_avg"] @ Vn.T, old["U"]["exp_avg"] @ V.T, **close)
    torch.testing.assert_close(st["V"]["exp_avg"] @ Un.T, old["V"]["exp_avg"] @ U.T, **close)
    torch.testing.assert_close(Un @ st["S"]["exp_avg"] @ Vn.T, U @ old["S"]["exp_avg"] @ V.T, **close)
    for role in "UVS":
        assert (st[role]["exp_avg_sq"] >= 0).all()
    torch.testing.assert_close(st["U"]["exp_avg_sq"].sum(1), old["U"]["exp_avg_sq"].sum(1), **close)
    torch.testing.assert_close(st["V"]["exp_avg_sq"].sum(1), old["V"]["exp_avg_sq"].sum(1), **close)
    torch.testing.assert_close(st["S"]["exp_avg_sq"].sum(), old["S"]["exp_avg_sq"].sum(), **close)
    # truncation r -> r' keeps only the leading columns of the rotation: still the restriction of the same map
    st2 = _clone(old)
    transport_state(st2, R_U[:, :2], R_V[:, :2], ("exp_avg",), ("exp_avg_sq",))
    torch.testing.assert_close(st2["S"]["exp_avg"], (R_U.T @ old["S"]["exp_avg"] @ R_V)[:2, :2], **close)


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


def _state_of(opt, params):
    """Bitwise copies of the optimizer state of ``params``."""
    return [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()} for p in params]


def _same_state(a, b):
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k] for k in x)
        for x, y in zip(a, b))


def _warm_up(model, opt, steps=3):
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        model(torch.randn(4, 10, generator=g)).sum().backward()
        opt.step()
        opt.zero_grad()
    assert all(opt.state[p] for p in model.parameters())  # every parameter has state to protect


def test_nonfinite_gradients_skip_the_layer_and_count():
    model = nn.Sequential(LowRankLinear(10, 10, 4), nn.ReLU(), LowRankLinear(10, 10, 4))
    opt = DLRT(model.parameters(), lr=1e-2)
    _warm_up(model, opt)
    model(torch.randn(4, 10)).sum().backward()
    model[0].V.grad[0, 0] = float("nan")
    params = list(model.parameters())
    before, st0, st2 = _snapshot(model), _state_of(opt, params[:4]), _state_of(opt, params[4:])
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    after = _snapshot(model)
    for b, a in zip(before[:4], after[:4]):  # layer 0 (U, S, V, bias) untouched, state included
        assert torch.equal(b, a)
    assert _same_state(_state_of(opt, params[:4]), st0)
    assert not torch.equal(before[4], after[4]) or not torch.equal(before[5], after[5])  # layer 2 stepped
    assert not _same_state(_state_of(opt, params[4:]), st2)
    assert opt.skipped_steps == 1
    assert opt.state_dict()["skipped_steps"] == 1


def test_nonfinite_raise_mode_updates_nothing():
    model = nn.Sequential(LowRankLinear(10, 10, 4), nn.ReLU(), nn.Linear(10, 3))
    opt = DLRT(model.parameters(), lr=1e-2, nonfinite="raise")
    _warm_up(model, opt)
    model(torch.randn(4, 10)).sum().backward()
    model[2].weight.grad[0, 0] = float("inf")
    params = list(model.parameters())
    before, st = _snapshot(model), _state_of(opt, params)
    with pytest.raises(FloatingPointError):
        opt.step()
    assert all(torch.equal(b, a) for b, a in zip(before, _snapshot(model)))
    assert _same_state(_state_of(opt, params), st)
    assert opt.skipped_steps == 0


def test_huge_step_overflows_the_core_and_is_skipped_not_corrupting():
    # lr = 1e38 overflows the float32 core: svd returns NaN, the eigh fallback raises LinAlgError.
    layer = LowRankLinear(16, 16, 4)
    opt = DLRT(layer.parameters(), lr=1e-2, base="sgd", momentum=0.9, tau=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        layer(torch.randn(8, 16, generator=g)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    opt.param_groups[0]["lr"] = 1e38
    layer(torch.randn(8, 16)).square().sum().backward()
    params = list(layer.parameters())
    before, st = _snapshot(layer), _state_of(opt, params)
    assert all(s for s in st)
    with pytest.warns(RuntimeWarning):
        opt.step()
    after = _snapshot(layer)
    assert len(before) == 4  # U, S, V and the bias: the bias is skipped with its layer
    assert all(torch.equal(b, a) for b, a in zip(before, after))
    assert _same_state(_state_of(opt, params), st)
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
    opt = DLRT(layer.parameters(), lr=0.5, base="sgd", tau=0.3, spare=0, rank_rule="tolerance", s_direction="own")
    X = torch.randn(64, 20)
    ranks = set()
    for _ in range(5):
        loss = layer(X).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        ranks.add(layer.rank)
    assert len(ranks) > 1
