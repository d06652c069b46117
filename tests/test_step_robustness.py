"""A DLRT step either goes through or is skipped and counted, on every legal input (issue 20, items 1, 10, 13):
eps = 0 with zero gradient coordinates, gradients near float32's maximum, a refused first step leaves no state,
and torch.optim options DLRT does not implement are refused, not ignored."""
import copy
import warnings

import pytest
import torch
from torch import nn

from lrtrain import DLRT, LowRankLinear


def _snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()))


def _same(a, b):
    pa, sa = a
    pb, sb = b
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        for key, v in sa["state"][k].items():
            w = sb["state"][k][key]
            assert torch.equal(v, w) if torch.is_tensor(v) else v == w


def _dead_input_model():
    torch.manual_seed(0)
    return nn.Sequential(LowRankLinear(10, 8, 3), nn.ReLU(), nn.Linear(8, 4), nn.ReLU(), LowRankLinear(4, 3, 2))


def _dead_batch():
    x = torch.randn(16, 10)
    x[:, 3] = 0  # a dead input coordinate: rows of the gradients that are exactly zero
    return x, torch.randn(16, 3)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_eps_zero_with_zero_gradient_coordinates_skips_and_counts(backend):
    model = _dead_input_model()
    opt = DLRT(model.parameters(), eps=0.0, backend=backend)
    x, y = _dead_batch()
    nn.functional.mse_loss(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()  # AdamW's 0/0 on the zero coordinates: no LinAlgError, a skipped step
    assert opt.skipped_steps >= 1 and any("non-finite" in str(w.message) for w in caught)
    for p in model.parameters():
        assert torch.isfinite(p).all()
    first = model[0]
    assert torch.equal(first.U, before[0]) and torch.equal(first.S, before[1]) and torch.equal(first.V, before[2])


def test_eps_zero_under_raise_changes_nothing():
    model = _dead_input_model()
    opt = DLRT(model.parameters(), eps=0.0, nonfinite="raise")
    x, y = _dead_batch()
    nn.functional.mse_loss(model(x), y).backward()
    before = _snapshot(model, opt)
    with pytest.raises(FloatingPointError, match="nothing was updated"):
        opt.step()
    _same(before, _snapshot(model, opt))
    assert opt.state_dict()["state"] == {} and len(opt.state) == 0 and opt.skipped_steps == 0


@pytest.mark.parametrize("base", ["adamw", "sgd"])
def test_gradients_near_the_float32_maximum_go_through_or_are_counted(base):
    model = nn.Sequential(LowRankLinear(12, 10, 3), nn.Tanh(), LowRankLinear(10, 6, 2))
    opt = DLRT(model.parameters(), base=base, lr=1e-3)
    nn.functional.mse_loss(model(torch.randn(8, 12)), torch.randn(8, 6)).backward()
    for p in model.parameters():
        p.grad.copy_(torch.sign(p.grad) * 3e38)  # finite, near the float32 maximum (3.4e38); zeros stay zero
        assert torch.isfinite(p.grad).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()
    for layer in (model[0], model[2]):
        assert torch.isfinite(layer.U).all() and torch.isfinite(layer.S).all() and torch.isfinite(layer.V).all()
        r = layer.rank
        eye = torch.eye(r)
        assert torch.allclose(layer.U[:, :r].T @ layer.U[:, :r], eye, atol=1e-4)


@pytest.mark.parametrize("refusal", ["nan_gradient", "overflowing_update"])
def test_a_refused_first_step_leaves_no_state_entries(refusal):
    model = nn.Sequential(LowRankLinear(6, 5, 2), nn.Linear(5, 3))
    opt = DLRT(model.parameters(), nonfinite="raise", base="sgd", momentum=0.9,
               lr=1e300 if refusal == "overflowing_update" else 1e-2)
    nn.functional.mse_loss(model(torch.randn(4, 6)), torch.randn(4, 3)).backward()
    if refusal == "nan_gradient":
        model[1].weight.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        opt.step()
    assert len(opt.state) == 0 and opt.state_dict()["state"] == {}
    model[1].weight.grad[0, 0] = 0.0
    opt.param_groups[0]["lr"] = 1e-2
    opt.step()  # the next step goes through and stores state for every parameter
    assert len(opt.state) == len(list(model.parameters()))


@pytest.mark.parametrize("key,value", [("maximize", True), ("amsgrad", True), ("capturable", True),
                                       ("differentiable", True), ("fused", True)])
def test_torch_options_dlrt_does_not_implement_are_refused(key, value):
    layer = LowRankLinear(8, 8, 2)
    with pytest.raises(ValueError, match=key):
        DLRT([{"params": list(layer.parameters()), key: value}])
    opt = DLRT(LowRankLinear(4, 4, 1).parameters())
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    with pytest.raises(ValueError, match=key):
        opt.add_param_group({"params": list(layer.parameters()), key: value})
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups


def test_groups_copied_from_torch_adamw_and_scheduler_keys_are_accepted():
    layer = LowRankLinear(8, 8, 2)
    adamw = torch.optim.AdamW([{"params": list(layer.parameters()), "name": "enc"}], lr=3e-3)
    opt = DLRT(adamw.param_groups)  # maximize=False, amsgrad=False, foreach=None, fused=None, ...: what DLRT does
    assert opt.param_groups[0]["lr"] == 3e-3 and opt.param_groups[0]["name"] == "enc"
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)  # adds initial_lr
    assert "initial_lr" in opt.param_groups[0]
    opt.load_state_dict(opt.state_dict())
    adamw.param_groups[0]["maximize"] = True
    with pytest.raises(ValueError, match="maximize"):
        DLRT(adamw.param_groups)
    adam = torch.optim.Adam(layer.parameters(), weight_decay=1e-2)  # coupled L2: not DLRT's AdamW
    with pytest.raises(ValueError, match="decoupled_weight_decay"):
        DLRT(adam.param_groups)


def _trained():
    torch.manual_seed(0)
    model = nn.Sequential(LowRankLinear(12, 10, 3, max_rank=8), nn.Tanh(), nn.Linear(10, 4))
    opt = DLRT(model.parameters(), lr=1e-2, rank_rule="tolerance", s_direction="own")
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(model(torch.randn(16, 12)), torch.randn(16, 4)).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("role,key", [("U", "exp_avg"), ("V", "exp_avg_sq"), ("S", "exp_avg"), ("S", "bias_mass")])
def test_optimizer_state_not_zero_past_the_rank_is_refused(role, key):
    """Issue 20 item 7: a checkpoint whose moments are non-zero past the layer's rank is corrupt."""
    model, opt = _trained()
    layer = model[0]
    k = layer.rank
    assert k < layer.capacity and opt.state[layer.S]["rank"] == k
    sd = copy.deepcopy(opt.state_dict())
    idx = [p is getattr(layer, role) for p in model.parameters()].index(True)
    t = sd["state"][idx][key]
    t[..., k] = 0.5 if key == "bias_mass" else 1e-3
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match="not zero past the layer's rank"):
        opt.load_state_dict(sd)
    _same(before, _snapshot(model, opt))


def test_optimizer_state_of_another_rank_is_refused_at_the_step():
    """Model and optimizer from different checkpoints: a loud error at the step, nothing written."""
    model, opt = _trained()
    layer = model[0]
    opt.state[layer.S]["rank"] = layer.rank + 1
    nn.functional.mse_loss(model(torch.randn(16, 12)), torch.randn(16, 4)).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="same checkpoint"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_factor_replaced_after_the_optimizer_was_built_is_refused():
    """Issue 20 item 12 (the FSDP2 case itself is in test_distributed): the optimizer would train a detached copy."""
    model, opt = _trained()
    layer = model[0]
    layer.U = nn.Parameter(layer.U.detach().clone())  # what fully_shard does to every parameter
    nn.functional.mse_loss(model(torch.randn(16, 12)), torch.randn(16, 4)).backward()
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match="fully_shard"):
        opt.step()
    _same(before, _snapshot(model, opt))
    with pytest.raises(ValueError, match="fully_shard"):
        DLRT([layer.S, layer.V, opt.param_groups[0]["params"][0]])


def test_a_wholly_frozen_factorized_layer_is_skipped_like_a_frozen_parameter():
    """lowrank keeps a frozen layer frozen (issue 20 item 6); DLRT(model.parameters()) then leaves it alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 4))
    model[0].requires_grad_(False)
    from lrtrain import lowrank

    lowrank(model, rank=3, min_features=1)
    assert not any(p.requires_grad for p in model[0].parameters())
    opt = DLRT(model.parameters(), lr=1e-2)
    frozen = [p.detach().clone() for p in model[0].parameters()]
    moving = model[2].S.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(model(torch.randn(8, 12)), torch.randn(8, 4)).backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(frozen, model[0].parameters()))
    assert not torch.equal(moving, model[2].S) and model[0].U not in opt.state


def test_deepcopy_and_pickle_of_the_optimizer_keep_its_settings():
    """torch.optim.Optimizer.__getstate__ keeps only defaults, state and param_groups; DLRT's own attributes
    (backend, nonfinite, guide, skipped_steps) must survive a deepcopy (a twin run) and a pickle."""
    import pickle

    model, opt = _trained()
    opt.skipped_steps = 3
    twin_model, twin = copy.deepcopy((model, opt))
    assert (twin.backend, twin.nonfinite, twin.guide, twin.skipped_steps) == (opt.backend, opt.nonfinite, None, 3)
    x, y = torch.randn(16, 12), torch.randn(16, 4)
    for m, o in ((model, opt), (twin_model, twin)):
        o.zero_grad()
        nn.functional.mse_loss(m(x), y).backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin_model.parameters()))
    again = pickle.loads(pickle.dumps(opt))
    assert again.skipped_steps == 3 and again.backend == opt.backend
