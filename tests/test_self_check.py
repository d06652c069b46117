"""backend="auto" trusts a fused backend in SELF_CHECK for a (shape, dtype) only after its first call agreed with
the reference on that input (issue 19 item 4); forced here on the CPU backend, which CI has."""
import warnings

import pytest
import torch

import lrtrain.update as update
from lrtrain.update import dispatch

pytestmark = pytest.mark.skipif(not update.available()["cpu"], reason="CPU extension not built")


def _items(dtype=torch.float64, L=2, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    out = []
    for _ in range(L):
        U, V = torch.linalg.qr(rnd(30, 5))[0], torch.linalg.qr(rnd(24, 5))[0]
        t = [U, torch.diag(torch.linspace(3, 0.3, 5, dtype=torch.float64)), V, rnd(30, 5), rnd(24, 5), rnd(30, 5).tanh(),
             rnd(24, 5).tanh(), rnd(5, 5).tanh()]
        out.append(update.LayerStep(*(x.to(dtype) for x in t), max_rank=10, spare=1))
    return out


@pytest.fixture
def checked_cpu(monkeypatch):
    monkeypatch.setattr(dispatch, "SELF_CHECK", {"cpu"})
    monkeypatch.setattr(dispatch, "_verdicts", {})


def test_agreement_measures_the_weight_difference():
    items = _items()
    a = update.reference_update(items[0], 1e-2, 0.1, 1)
    W = a.U @ a.S @ a.V.mT
    b = update.LayerResult(a.U, a.S * 1.01, a.V, a.R_U, a.R_V)
    assert dispatch.agreement(a, a) < 1e-12
    assert dispatch.agreement(b, a) == pytest.approx(float((b.U @ b.S @ b.V.mT - W).norm() / W.norm()), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_passing_first_use_keeps_the_fused_results(checked_cpu, dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = update.update_layers(_items(dtype), 1e-2, 0.1, 1, backend="auto")
    assert all(isinstance(r, update.FusedResult) for r in got)
    assert list(dispatch._verdicts.values()) == [True]


def test_a_failing_first_use_warns_once_and_runs_the_reference_from_then_on(checked_cpu, monkeypatch):
    real_finish = dispatch.finish_group

    def corrupt(group, outs, *a, **k):  # a fused backend that is wrong by 1% in S
        return [update.FusedResult(r.U, r.S * 1.01, r.V, r.R_U, r.R_V) for r in real_finish(group, outs, *a, **k)]

    monkeypatch.setattr(dispatch, "finish_group", corrupt)
    items = _items()
    with pytest.warns(RuntimeWarning, match="disagreed with the reference"):
        got = update.update_layers(items, 1e-2, 0.1, 1, backend="auto")
    ref = update.reference_update_layers(items, 1e-2, 0.1, 1)
    assert all(torch.equal(a.S, b.S) and torch.equal(a.U, b.U) and torch.equal(a.V, b.V) for a, b in zip(got, ref))
    launched = []
    monkeypatch.setattr(dispatch, "launch_group", lambda *a, **k: launched.append(a) or pytest.fail("fused launched"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        again = update.update_layers(_items(seed=1), 1e-2, 0.1, 1, backend="auto")
    assert not launched and not any(isinstance(r, update.FusedResult) for r in again)
