"""Honest gradients: a torch optimizer other than DLRT refuses factor parameters, before changing anything."""
import pytest
import torch


import lrtrain
from lrtrain.cli.models import mlp


@pytest.mark.parametrize("make", [lambda ps: torch.optim.AdamW(ps, lr=1e-2), lambda ps: torch.optim.SGD(ps, lr=0.1)])
def test_other_optimizers_refuse_factor_parameters_and_change_nothing(make):
    model = lrtrain.lowrank(mlp(20, [32], 4), rank=4, min_features=4)
    opt = make(model.parameters())
    model(torch.randn(8, 20)).square().sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"lrtrain\.DLRT"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert not opt.state  # no state was created


def test_other_optimizers_may_step_the_plain_parameters():
    model = lrtrain.lowrank(mlp(20, [32], 4), rank=4, min_features=4)
    layer = model[1]
    plain = [p for n, p in model.named_parameters() if not n.endswith((".U", ".S", ".V"))]
    factors = [layer.U, layer.S, layer.V]
    adam, dlrt = torch.optim.AdamW(plain, lr=1e-2), lrtrain.DLRT(factors, lr=1e-2)
    model(torch.randn(8, 20)).square().sum().backward()
    head = model[3].weight.detach().clone()
    adam.step()
    dlrt.step()
    assert not torch.equal(model[3].weight, head)
    adam.add_param_group({"params": [layer.U]})  # a factor added later is caught at the next step
    with pytest.raises(RuntimeError, match=r"lrtrain\.DLRT"):
        adam.step()
