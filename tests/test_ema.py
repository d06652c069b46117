"""EMA through AveragedModel: the averaged weight of factorized layers, kept factored, through rank changes."""

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

import lrtrain
import lrtrain.cli.data
from lrtrain import LowRankLinear
from lrtrain.ema import average_factored
from lrtrain.cli.models import mlp
from lrtrain.cli.train import evaluate


def test_factored_average_equals_dense_average_within_capacity():
    torch.manual_seed(0)
    ema, cur = LowRankLinear(30, 20, 4, capacity=10, dtype=torch.float64), LowRankLinear(30, 20, 5, capacity=10, dtype=torch.float64)
    expected = 0.9 * ema.dense_weight() + 0.1 * cur.dense_weight()
    average_factored(ema, cur.U, cur.S, cur.V, 0.9)
    assert ema.rank == 9  # rank 4 + rank 5, within the capacity
    torch.testing.assert_close(ema.dense_weight(), expected, rtol=1e-12, atol=1e-12)
    U, S, V = ema.factors()
    torch.testing.assert_close(U.T @ U, torch.eye(9, dtype=torch.float64), rtol=0, atol=1e-12)
    # Beyond the capacity: the best rank-c approximation of the average (Eckart-Young).
    other = LowRankLinear(30, 20, 8, capacity=10, dtype=torch.float64)
    target = 0.5 * ema.dense_weight() + 0.5 * other.dense_weight()
    average_factored(ema, other.U, other.S, other.V, 0.5)
    assert ema.rank == 10
    sigma = torch.linalg.svdvals(target)
    torch.testing.assert_close(torch.linalg.norm(ema.dense_weight() - target), sigma[10:].norm(), rtol=1e-9, atol=1e-12)


def test_ema_model_through_rank_changes_scores_like_the_model(digits):
    torch.manual_seed(0)
    model = lrtrain.lowrank(mlp(64, [128, 128], 10), rank=32)
    opt = lrtrain.DLRT(model.parameters(), lr=3e-3, weight_decay=1e-4, tau=0.2)
    ema = AveragedModel(model, multi_avg_fn=lrtrain.get_ema_multi_avg_fn(0.95))
    naive = AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.95))
    gen = torch.Generator().manual_seed(0)
    ranks = set()
    for _ in range(10):
        for xb, yb in lrtrain.cli.data.batches(digits.train_x, digits.train_y, 64, gen):
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            opt.zero_grad()
            ema.update_parameters(model)
            naive.update_parameters(model)
            ranks.add(tuple(lrtrain.cli.train.ranks(model).values()))
    assert len(ranks) > 3  # ranks changed while averaging
    acc, acc_ema = evaluate(model, digits.test_x, digits.test_y), evaluate(ema, digits.test_x, digits.test_y)
    print(f"model {acc:.2f}%  EMA {acc_ema:.2f}%  factor-wise EMA {evaluate(naive, digits.test_x, digits.test_y):.2f}%")
    assert acc > 90
    assert acc_ema >= acc - 1.0
    # Each EMA layer's weight is the average of the model's weights: not the factor-wise average.
    for le, ln in zip(ema.module.modules(), naive.module.modules()):
        if isinstance(le, LowRankLinear):
            assert le.rank <= le.capacity
            assert not torch.allclose(le.dense_weight(), ln.dense_weight(), atol=1e-3)


def test_ema_refuses_bad_decay():
    import pytest

    for bad in (1.5, -0.1, float("nan"), "0.9", None, True, torch.tensor([0.9, 0.8])):
        with pytest.raises(ValueError, match=r"decay must be a real number in \[0, 1\]"):
            lrtrain.get_ema_multi_avg_fn(bad)
    lrtrain.get_ema_multi_avg_fn(0)  # ints and the ends of the range are fine
    lrtrain.get_ema_multi_avg_fn(1)
