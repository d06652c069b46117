"""The rank-adaptive step (issue 10): the optimizer's whole tangent step, calibrated Adam moments for new
directions, rank growth through spare directions, the dimension-capped augmentation, and the basis refresh interval.
Trajectory checks run in float64."""
from __future__ import annotations

import copy

import pytest
import torch

import lrtrain
import lrtrain.update as ext
import lrtrain.optim.functional as dlrt_module
from lrtrain import DLRT
from lrtrain.layers import LowRankLinear
from lrtrain.optim.base import make_rule
from lrtrain.update.spec import LayerStep, augmented_core, reference_update
from lrtrain.update import tolerance_rank

BACKENDS = ["reference"] + (["cpu"] if ext.available()["cpu"] else [])
BASES = {"sgd": dict(base="sgd"), "momentum": dict(base="sgd", momentum=0.9),
         "adamw": dict(base="adamw", weight_decay=0.01)}


def _capture_items(monkeypatch):
    """Record the LayerSteps DLRT hands to the layer update (one list per step)."""
    seen = []
    real = dlrt_module.update_layers

    def spy(items, *args, **kwargs):
        seen.append([copy.deepcopy(it) for it in items])
        return real(items, *args, **kwargs)

    monkeypatch.setattr(dlrt_module, "update_layers", spy)
    return seen


def _tangent_step(U, S_decayed, V, D_K, D_L, D_S, lr):
    """W - lr·T with T = U D_S Vᵀ + (I - UUᵀ) D_K Vᵀ + U D_Lᵀ (I - VVᵀ): the base rule's step, dense."""
    PU = torch.eye(U.shape[0], dtype=U.dtype) - U @ U.mT
    PV = torch.eye(V.shape[0], dtype=V.dtype) - V @ V.mT
    return U @ S_decayed @ V.mT - lr * (U @ D_S @ V.mT + PU @ D_K @ V.mT + U @ D_L.mT @ PV)


@pytest.mark.parametrize("base", list(BASES))
def test_the_whole_tangent_step_is_represented(base, monkeypatch):
    """Augmenting with the optimizer's own directions: the share of ‖(I - UUᵀ)D_K‖² in span(Q_U) is 1, and
    with τ = 0 the new weight is exactly the base rule's tangent step (step 4, ranks moved before)."""
    torch.manual_seed(0)
    layer = LowRankLinear(50, 60, rank=3, capacity=50).double()  # τ = 0: 3 → 6 → 12 → 24, room to augment
    opt = DLRT(layer.parameters(), lr=0.05, tau=0.0, spare=0, backend="reference", **BASES[base])
    seen = _capture_items(monkeypatch)
    X = torch.randn(64, 50, dtype=torch.float64)
    Y = torch.randn(64, 60, dtype=torch.float64)
    for step in range(4):
        W_before = layer.dense_weight().detach().clone()
        layer.zero_grad()
        (layer(X) - Y).square().mean().backward()
        opt.step()
    item = seen[-1][0]
    lr = opt.param_groups[0]["lr"]
    # the augmentation directions are the step's directions
    assert torch.equal(item.G_K, item.D_K) and torch.equal(item.G_L, item.D_L)
    if base == "adamw":  # D ≠ G: Adam's direction is not the gradient's
        G_K = layer.U.grad[:, :item.U.shape[1]]
        cos = (item.D_K * G_K).sum() / (item.D_K.norm() * G_K.norm())
        assert cos < 0.99
    Q_U, Q_V, _ = augmented_core(item, lr)
    for B, Q, D in ((item.U, Q_U, item.D_K), (item.V, Q_V, item.D_L)):
        N = D - B @ (B.mT @ D)
        share = (Q @ (Q.mT @ N)).square().sum() / N.square().sum()
        assert N.norm() > 1e-3 * D.norm() and abs(float(share) - 1.0) < 1e-10
    expect = _tangent_step(item.U, item.S_decayed, item.V, item.D_K, item.D_L, item.D_S, lr)
    assert (layer.dense_weight().detach() - expect).abs().max() < 1e-10
    assert not torch.allclose(W_before, expect)


def _capped_case(dtype=torch.float64):
    """m = 10, n = 30, r = 8 (m - r = 2 < r): the first two columns of D_K lie in span(U), so the first m - r
    columns carry no new direction; the others span the whole 2-dimensional complement."""
    g = torch.Generator().manual_seed(3)
    m, n, r = 10, 30, 8
    U = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0]
    S = torch.diag(torch.linspace(3, 0.5, r, dtype=torch.float64)) + 0.01 * torch.randn(r, r, generator=g, dtype=torch.float64)
    D_K = torch.randn(m, r, generator=g, dtype=torch.float64)
    D_K[:, :2] = U @ torch.randn(r, 2, generator=g, dtype=torch.float64)
    D_L = torch.randn(n, r, generator=g, dtype=torch.float64)
    D_S = torch.randn(r, r, generator=g, dtype=torch.float64)
    t = [x.to(dtype) for x in (U, S, V, D_K, D_L, D_K, D_L, D_S)]
    return LayerStep(*t, max_rank=min(m, n))


@pytest.mark.parametrize("backend", BACKENDS)
def test_width_cap_takes_the_best_columns(backend):
    """The closed-form truncated tangent step (dense SVD of W - lr·T, same τ rule) to 1e-6 in float64."""
    item = _capped_case()
    lr, tau = 0.3, 0.05
    dense = _tangent_step(item.U, item.S_decayed, item.V, item.D_K, item.D_L, item.D_S, lr)
    P, s, Qt = torch.linalg.svd(dense, full_matrices=False)
    k = int(tolerance_rank(s, tau, 1, item.max_rank))
    expect = (P[:, :k] * s[:k]) @ Qt[:k]
    if backend == "reference":
        res = reference_update(item, lr, tau, 1)
    else:
        res = ext.dispatch.run_group("cpu", [item, copy.deepcopy(item)], lr, tau, 1)[0]
    got = res.U @ res.S @ res.V.mT
    assert res.S.shape[0] == k
    assert (got - expect).abs().max() < 1e-6
    # the first m - r columns alone (the old cap) would have lost a visible part of the step
    first = LayerStep(item.U, item.S_decayed, item.V, item.D_K[:, :2], item.D_L, item.D_K, item.D_L, item.D_S,
                      item.max_rank, augment=2)
    old = reference_update(first, lr, 0.0, 1)
    assert ((old.U @ old.S @ old.V.mT) - dense).norm() > 1e-2 * lr * dense.norm()


def _planted(start: int, base: str, tau: float, spare: int = 1, steps: int = 300):
    """A 64×48 layer fitting a planted rank-12 target (σ from 2 to 1) by minibatch regression."""
    g = torch.Generator().manual_seed(0)
    m, n, k = 64, 48, 12
    A = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]
    B = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]
    T = (A * torch.linspace(2.0, 1.0, k, dtype=torch.float64)) @ B.mT
    X = torch.randn(512, n, generator=g, dtype=torch.float64)
    Y = X @ T.mT
    dense = torch.nn.Linear(n, m, bias=False).double()
    dense.weight.data.copy_(torch.randn(m, n, generator=g, dtype=torch.float64) * 0.3 / n ** 0.5)
    layer = LowRankLinear.from_dense(dense, rank=start, capacity=48)
    hp = dict(base="adamw", lr=1e-2) if base == "adamw" else dict(base="sgd", lr=1e-2, momentum=0.9)
    opt = DLRT(layer.parameters(), tau=tau, spare=spare, backend="reference", rank_rule="tolerance", s_direction="own", **hp)
    for _ in range(steps):
        idx = torch.randint(0, 512, (64,), generator=g)
        loss = (layer(X[idx]) - Y[idx]).square().sum(1).mean() / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        err = float((layer.dense_weight() - T).norm() / T.norm())
    return layer.rank, err


@pytest.mark.parametrize("tau", [0.02, 0.1])
@pytest.mark.parametrize("base", ["adamw", "sgd"])
@pytest.mark.parametrize("start", [2, 24])
def test_rank_reaches_a_planted_rank_from_below_and_above(start, base, tau):
    rank, err = _planted(start, base, tau)
    assert 11 <= rank <= 13, rank
    assert err < 0.05, err


def test_without_spare_the_rank_cannot_grow():
    """The control: spare=0 is the old behaviour, stuck at the start rank 2 (the normal block never enters)."""
    rank, err = _planted(2, "sgd", 0.02, spare=0)
    assert rank == 2 and err > 0.5


def _entry_run(mode: str) -> list[float]:
    """A rank-2 layer at a noisy fit for 1000 AdamW steps; then the target gains a direction e3 e3ᵀ outside
    both bases. Returns (ΔW[2, 2] / lr) for the 11 steps after that. mode: "continue" (the optimizer of the
    1000 steps), "fresh" (a new optimizer at step 1000), "step-count" (bias correction by the layer's step
    count, the old calibration: every bias mass reset to 1 - βᵗ after each step)."""
    torch.manual_seed(0)
    layer = LowRankLinear(16, 20, rank=2, capacity=6, bias=False).double()
    U = torch.zeros(20, 2, dtype=torch.float64)
    V = torch.zeros(16, 2, dtype=torch.float64)
    U[0, 0] = U[1, 1] = V[0, 0] = V[1, 1] = 1
    layer.write_factors(U, torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64)), V)
    T0 = torch.zeros(20, 16, dtype=torch.float64)
    T0[0, 0], T0[1, 1] = 2.0, 1.0
    T0 += 1e-3 * torch.randn(20, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    T1 = T0.clone()
    T1[2, 2] += 0.5
    make = lambda l: DLRT(l.parameters(), lr=1e-2, tau=0.01, backend="reference")  # noqa: E731

    def step(l, o, T):
        o.zero_grad()
        (0.5 * (l.dense_weight() - T).square().sum()).backward()
        o.step()

    opt = make(layer)
    for _ in range(1000):
        step(layer, opt, T0)
    if mode == "fresh":
        opt = make(layer)
    out = []
    for _ in range(11):
        W0 = layer.dense_weight().detach().clone()
        step(layer, opt, T1)
        if mode == "step-count":
            for p, two in ((layer.U, False), (layer.V, False), (layer.S, True)):
                st, r = opt.state[p], layer.rank
                w = st["bias_mass"]
                w.zero_()
                blk = w[:, :r, :r] if two else w[:, :r]
                blk[0], blk[1] = 1 - 0.9 ** st["step"], 1 - 0.999 ** st["step"]
        out.append(float((layer.dense_weight().detach() - W0)[2, 2]) / 1e-2)
    return out


def test_a_direction_entering_at_step_1000_gets_a_fresh_adam_step():
    """1, 2, 5 and 10 steps after the new direction appears, its step is within 1.5× of a fresh AdamW run's;
    the step-count calibration overshoots by > 3× on the same run (the check can fail)."""
    cont, fresh, old = _entry_run("continue"), _entry_run("fresh"), _entry_run("step-count")
    for i in (1, 2, 5, 10):
        assert abs(cont[i]) <= 1.5 * abs(fresh[i]), (i, cont[i], fresh[i])
    assert max(abs(o) / abs(f) for o, f in zip(old[1:], fresh[1:])) > 3


def test_refresh_defers_the_k_and_l_steps_to_the_next_basis_update(monkeypatch):
    """refresh=3, SGD: steps 1 and 2 keep U and V bitwise and step S by -lr·G_S; step 3 is a basis update
    whose K/L directions are the sums of the three steps' G_K, G_L; refresh=1 is a basis update each step."""
    torch.manual_seed(0)
    layer = LowRankLinear(24, 20, rank=4, capacity=12).double()
    opt = DLRT(layer.parameters(), lr=0.1, base="sgd", tau=0.05, refresh=3, backend="reference", rank_rule="tolerance", s_direction="own")
    seen = _capture_items(monkeypatch)
    X = torch.randn(32, 24, dtype=torch.float64)
    Y = torch.randn(32, 20, dtype=torch.float64)
    sums = [0, 0]
    for step in range(3):
        U0, S0, V0 = (t.detach().clone() for t in (layer.U, layer.S, layer.V))
        opt.zero_grad()
        (layer(X) - Y).square().mean().backward()
        r = layer.rank
        sums = [sums[0] + layer.U.grad[:, :r], sums[1] + layer.V.grad[:, :r]]
        GS = layer.S.grad[:r, :r].clone()
        opt.step()
        if step < 2:
            assert not seen
            assert torch.equal(layer.U, U0) and torch.equal(layer.V, V0)
            assert torch.equal(layer.S[:r, :r], S0[:r, :r] - 0.1 * GS)
        else:
            (item,) = seen[0]
            assert torch.allclose(item.D_K, sums[0], atol=1e-14) and torch.allclose(item.D_L, sums[1], atol=1e-14)
            assert not torch.equal(layer.U, U0)
    assert opt.state[layer.S]["basis_age"] == 0 and not opt.state[layer.U]["deferred"].any()


def test_refresh_state_survives_a_checkpoint():
    """Deferred sums and the basis age are optimizer state: a resumed run equals the uninterrupted one."""
    torch.manual_seed(0)
    X = torch.randn(32, 24, dtype=torch.float64)
    Y = torch.randn(32, 20, dtype=torch.float64)
    a = LowRankLinear(24, 20, rank=4, capacity=12).double()
    b = copy.deepcopy(a)
    oa = DLRT(a.parameters(), lr=0.01, tau=0.05, refresh=4)
    ob = DLRT(b.parameters(), lr=0.01, tau=0.05, refresh=4)

    def step(l, o):
        o.zero_grad()
        (l(X) - Y).square().mean().backward()
        o.step()

    for _ in range(6):
        step(a, oa)
        step(b, ob)
    ob2 = DLRT(b.parameters(), lr=0.01, tau=0.05, refresh=4)
    ob2.load_state_dict(ob.state_dict())
    for _ in range(6):
        step(a, oa)
        step(b, ob2)
    assert torch.equal(a.dense_weight(), b.dense_weight()) and a.rank == b.rank


def test_new_hyperparameters_are_validated():
    layer = LowRankLinear(24, 20, rank=4)
    for kw in (dict(spare=-1), dict(refresh=0), dict(spare=1.5), dict(refresh=True)):
        with pytest.raises((ValueError, TypeError), match=next(iter(kw))):
            DLRT(layer.parameters(), **kw)
    assert make_rule("adamw").square_keys == ("exp_avg_sq", "bias_mass")


@pytest.mark.parametrize("refresh", [1, 3])
def test_a_refused_first_step_leaves_no_state(refresh):
    """Bias masses and deferred sums are stored with the step, not before it: a refused step adds nothing."""
    torch.manual_seed(0)
    layer = LowRankLinear(24, 20, rank=4, capacity=12)
    opt = DLRT(layer.parameters(), lr=1e-2, refresh=refresh, nonfinite="raise")
    layer(torch.randn(8, 24)).square().sum().backward()
    layer.S.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        opt.step()
    assert len(opt.state) == 0
    layer.S.grad[0, 0] = 0.0
    opt.step()
    assert opt.state[layer.S]["bias_mass"].shape == (2, 12, 12) and opt.state[layer.U]["bias_mass"].shape == (2, 12)
    assert ("deferred" in opt.state[layer.U]) == (refresh > 1)
