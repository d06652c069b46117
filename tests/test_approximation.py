"""Conversion's truncated SVD (issue 19 item 3): the randomized range finder is within 1% of the exact truncated
SVD's error on a decaying spectrum, deterministic, orthonormal, and gives the τ-rank of the full spectrum."""
import pytest
import torch

from lrtrain.layers import approximation
from lrtrain.layers.approximation import randomized_svd, truncated_svd_factors
from lrtrain.update import tolerance_rank


def _decaying(m=600, n=500, power=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    Uo = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))[0]
    Vo = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    s = torch.arange(1, n + 1, dtype=torch.float64) ** -power
    return (Uo * s) @ Vo.T, s


@pytest.mark.parametrize("power", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("rank", [4, 20, 100])
def test_randomized_error_is_within_one_percent_of_the_exact_truncation(power, rank):
    W, s = _decaying(power=power)
    assert rank + approximation.OVERSAMPLE <= approximation.EXACT_SHARE * 500 or rank == 100
    U, S, V = truncated_svd_factors(W.float(), rank, None)
    err = (W - U.double() @ S.double() @ V.double().T).norm()
    best = s[rank:].norm()  # Eckart-Young: the exact truncated SVD's error
    assert err <= 1.01 * best
    I = torch.eye(rank, dtype=torch.float64)
    assert torch.allclose(U.double().T @ U.double(), I, atol=1e-5) and torch.allclose(V.double().T @ V.double(), I, atol=1e-5)


def test_randomized_is_deterministic_and_used_for_small_ranks(monkeypatch):
    W, _ = _decaying()
    calls = []
    real = approximation.randomized_svd
    monkeypatch.setattr(approximation, "randomized_svd", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    a = truncated_svd_factors(W.float(), 8, None)
    b = truncated_svd_factors(W.float(), 8, None)
    assert calls == [8, 8] and all(torch.equal(x, y) for x, y in zip(a, b))
    truncated_svd_factors(W.float(), 200, None)  # a large share of min(m, n): the exact SVD
    truncated_svd_factors(W.float(), None, 0.3)  # only τ: the exact SVD
    assert calls == [8, 8]


@pytest.mark.parametrize("tau", [0.05, 0.2, 0.5, 0.9])
def test_tau_rank_from_the_partial_spectrum_is_the_full_spectrum_rule(tau):
    W, s = _decaying(power=0.7)
    cap = 30
    full = min(cap, int(tolerance_rank(s, tau)))
    U, S, V = truncated_svd_factors(W, cap, tau)
    assert S.shape[0] == max(full, 1)


def test_randomized_svd_recovers_an_exactly_low_rank_matrix():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(300, 7, generator=g, dtype=torch.float64) @ torch.randn(7, 200, generator=g, dtype=torch.float64)
    P, sigma, Q = randomized_svd(W, 7)
    ref = torch.linalg.svdvals(W)[:7]
    assert torch.allclose(sigma[:7], ref, rtol=1e-10)
    assert float(sigma[7:].max()) <= 1e-10 * float(ref[0])
