"""The truncation rule, including its off-by-one edges."""
import pytest
import torch

from lrtrain.update import tolerance_rank


def rank(sig, tau, **kw):
    return int(tolerance_rank(torch.tensor(sig, dtype=torch.float64), tau, **kw))


def test_tau_zero_keeps_every_nonzero_value():
    assert rank([3.0, 2.0, 1.0], 0.0) == 3
    assert rank([3.0, 2.0, 1.0, 0.0, 0.0], 0.0) == 3


def test_boundaries_of_the_relative_tail():
    sig = [2.0, 1.0, 1.0]  # ||sigma||^2 = 6; tails after k=1: sqrt(2/6)=0.577, after k=2: sqrt(1/6)=0.408
    assert rank(sig, 0.58) == 1
    assert rank(sig, 0.57) == 2
    assert rank(sig, 0.41) == 2
    assert rank(sig, 0.40) == 3
    assert rank(sig, (1 / 6) ** 0.5 + 1e-12) == 2  # tail exactly at tau*||sigma|| is discarded (<=)


def test_clamps_and_numerical_rank():
    assert rank([1.0, 0.5, 0.25], 1.5) == 1  # rule says 0, min_rank 1
    assert rank([1.0, 0.5, 0.25], 1.5, min_rank=2) == 2
    assert rank([1.0, 0.5, 0.25], 0.0, max_rank=2) == 2
    assert rank([1.0, 1e-20, 1e-21], 0.0) == 1  # numerically zero values are never kept


def test_batched_on_device_without_sync():
    sig = torch.tensor([[4.0, 2.0, 1.0, 0.1], [1.0, 1.0, 1.0, 1.0]])
    out = tolerance_rank(sig, 0.25)  # thresholds: 0.0625*21.01=1.31 and 0.25
    assert out.dtype == torch.int64 and out.tolist() == [2, 4]


def test_tau_validation_in_layers():
    from torch import nn

    from lrtrain import LowRankLinear

    with pytest.raises(ValueError, match="tau must be >= 0"):
        LowRankLinear.from_dense(nn.Linear(8, 8), tau=-0.1)
