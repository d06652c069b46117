"""Public helpers refuse bad input before changing anything: set_capacity, densify/summary/active_parameters,
fit, tolerance_rank."""
import pytest
import torch
from torch import nn

import lrtrain
import lrtrain.cli.train
from lrtrain.update import tolerance_rank


def test_refused_set_capacity_changes_nothing():
    layer = lrtrain.LowRankLinear(32, 32, 4, capacity=8)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    params = [layer.U, layer.S, layer.V]
    for kwargs in (dict(capacity=0), dict(capacity=33), dict(capacity=2, max_rank=5), dict(capacity=6, max_rank=0)):
        with pytest.raises(ValueError, match="capacity|max_rank"):
            layer.set_capacity(**kwargs)
        assert [layer.U, layer.S, layer.V] == params and (layer.capacity, layer.max_rank, layer.rank) == (8, 8, 4)
        assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
        assert not any(getattr(p, "_lrtrain_retired", False) for p in params)


@pytest.mark.parametrize("fn", [lrtrain.densify, lrtrain.summary, lrtrain.active_parameters])
def test_model_helpers_refuse_non_modules(fn):
    with pytest.raises(ValueError, match="model must be a torch.nn.Module"):
        fn("model")


def test_densify_refuses_bad_inplace_and_changes_nothing():
    model = lrtrain.lowrank(nn.Sequential(nn.Linear(32, 32)), rank=4)
    layer = model[0]
    with pytest.raises(ValueError, match="inplace"):
        lrtrain.densify(model, inplace="no")
    assert model[0] is layer


@pytest.mark.parametrize("kwargs", [dict(epochs=0), dict(epochs=1.5), dict(batch_size=0), dict(seed=-1), dict(epochs=True)])
def test_fit_refuses_bad_arguments_before_training(kwargs, digits):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    before = [p.detach().clone() for p in model.parameters()]
    args = dict(epochs=1, batch_size=32, seed=0) | kwargs
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        lrtrain.cli.train.fit(model, torch.optim.SGD(model.parameters(), lr=0.1), digits, **args)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("kwargs,match", [(dict(tau=-0.1), "tau"), (dict(tau=float("nan")), "tau"), (dict(tau="0.1"), "tau"),
                                          (dict(tau=0.1, min_rank=-1), "min_rank"), (dict(tau=0.1, max_rank=1.5), "max_rank")])
def test_tolerance_rank_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tolerance_rank(torch.tensor([3.0, 2.0, 1.0]), **kwargs)
    assert int(tolerance_rank(torch.tensor([3.0, 2.0, 1.0]), 0.0)) == 3
