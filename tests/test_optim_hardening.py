"""DLRT hardening: every bad input refused (naming the argument) before anything changes; legal extremes
(tiny or huge finite gradients) stepped without a crash."""
import copy
import math
import warnings

import pytest
import torch
from torch import nn

import lrtrain.update as ext
from lrtrain import DLRT, LowRankLinear

BACKENDS = ["reference"] + (["cpu"] if ext.available()["cpu"] else [])


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(LowRankLinear(12, 10, 4), nn.Tanh(), nn.Linear(10, 3))


def _train(model, opt, steps=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        model(torch.randn(8, 12, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _backward(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    model(torch.randn(8, 12, generator=g)).square().mean().backward()


def _snap_params(model):
    return [p.detach().clone() for p in model.parameters()]


def _snap_opt(opt):
    """Everything the optimizer holds: groups (without params), state (bitwise), skipped_steps, ranks."""
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    params = [[id(p) for p in g["params"]] for g in opt.param_groups]
    state = {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()} for p, st in opt.state.items()}
    return groups, params, state, opt.skipped_steps


def _same(a, b):
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and \
            torch.equal(a.view(torch.uint8) if a.numel() else a, b.view(torch.uint8) if b.numel() else b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def assert_unchanged(model, opt, params_before, opt_before):
    assert _same(_snap_params(model), params_before)
    assert _same(_snap_opt(opt), opt_before)


# ---------------------------------------------------------------------------------------- 1. add_param_group
@pytest.mark.parametrize("bad", ["lr", "partial_layer"])
def test_refused_param_group_leaves_nothing_and_the_next_step_trains_nothing_extra(bad):
    model = _model()
    extra = LowRankLinear(12, 10, 4)
    opt = DLRT(model.parameters(), lr=1e-2)
    _train(model, opt)
    group = {"params": list(extra.parameters()), "lr": -1.0} if bad == "lr" else {"params": [extra.U, extra.S]}
    before_p, before_o = _snap_params(model), _snap_opt(opt)
    with pytest.raises(ValueError, match="lr must be >= 0" if bad == "lr" else "partly missing"):
        opt.add_param_group(group)
    assert_unchanged(model, opt, before_p, before_o)
    extra_before = _snap_params(extra)
    _backward(model)
    extra(torch.randn(4, 12)).sum().backward()  # the refused params have gradients: still not stepped
    opt.step()
    assert _same(_snap_params(extra), extra_before)
    assert not _same(_snap_params(model), before_p)


# ---------------------------------------------------------------------------------------- 2. load_state_dict
def _corrupt_group(key, value):
    def f(sd):
        sd["param_groups"][0][key] = value
    return f


def _corrupt_state(key, how):
    def f(sd):
        st = sd["state"][0]  # U of the factorized layer
        if how == "shape":
            st[key] = st[key][:, :-1].clone()
        elif how == "nan":
            st[key] = st[key].clone()
            st[key][0, 0] = float("nan")
        elif how == "negative":
            st[key] = -st[key] - 1
    return f


def _drop_group(sd):
    sd["param_groups"].append(copy.deepcopy(sd["param_groups"][0]))


def _drop_param(sd):
    sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]


def _bad_skipped(sd):
    sd["skipped_steps"] = -3


@pytest.mark.parametrize("corrupt,match", [
    (_corrupt_group("lr", -1.0), "lr must be >= 0"),
    (_corrupt_group("tau", -1.0), "tau must be >= 0"),
    (_corrupt_group("lr", float("nan")), "lr must be >= 0"),
    (_corrupt_group("betas", (2.0, 2.0)), "betas must be in"),
    (_corrupt_group("base", "foo"), "base must be one of"),
    (_corrupt_group("min_rank", 0), "min_rank must be"),
    (_corrupt_state("exp_avg", "shape"), "its parameter's shape"),
    (_corrupt_state("exp_avg", "nan"), "not finite"),
    (_corrupt_state("exp_avg_sq", "nan"), "not finite"),
    (_corrupt_state("exp_avg_sq", "negative"), "must be >= 0"),
    (_drop_group, "param group"),
    (_drop_param, "parameter"),
    (_bad_skipped, "skipped_steps"),
], ids=["lr-1", "tau-1", "lr-nan", "betas22", "base-foo", "min_rank0", "state-shape", "state-nan",
        "state-sq-nan", "state-sq-neg", "groups", "params", "skipped"])
def test_load_state_dict_refuses_bad_input_and_changes_nothing(corrupt, match):
    model = _model()
    opt = DLRT(model.parameters(), lr=1e-2)
    _train(model, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.skipped_steps = 2
    sd = copy.deepcopy(opt.state_dict())
    sd["skipped_steps"] = 7
    corrupt(sd)
    before_p, before_o = _snap_params(model), _snap_opt(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert_unchanged(model, opt, before_p, before_o)
    assert opt.skipped_steps == 2
    _backward(model)
    opt.step()  # still usable


def test_load_state_dict_round_trip_still_works():
    model = _model()
    opt = DLRT(model.parameters(), lr=1e-2)
    _train(model, opt)
    opt.skipped_steps = 5
    sd = copy.deepcopy(opt.state_dict())
    model2 = copy.deepcopy(model)
    opt2 = DLRT(model2.parameters(), lr=1e-2)
    opt2.load_state_dict(sd)
    assert opt2.skipped_steps == 5
    _backward(model)
    _backward(model2)
    opt.step()
    opt2.step()
    assert _same(_snap_params(model), _snap_params(model2))


# ---------------------------------------------------------------------------------------- 3. raise on overflow
@pytest.mark.parametrize("backend", BACKENDS)
def test_raise_mode_core_overflow_with_a_dense_head_updates_nothing(backend):
    model = _model()
    opt = DLRT(model.parameters(), lr=1e-2, base="sgd", momentum=0.9, nonfinite="raise", backend=backend,
               rank_rule="tolerance", s_direction="own")
    _train(model, opt)
    assert opt.state  # there is state to protect
    _backward(model)
    for p in model.parameters():
        p.grad.mul_(1e4)
    for g in opt.param_groups:
        g["lr"] = 1e38  # the factorized layer's core overflows; the dense head's update would be inf
    before_p, before_o, rank = _snap_params(model), _snap_opt(opt), model[0].rank
    with pytest.raises(FloatingPointError, match="nothing was updated"):
        opt.step()
    assert_unchanged(model, opt, before_p, before_o)
    assert model[0].rank == rank


# ---------------------------------------------------------------------------------------- 4. tiny gradients
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("scale", [1e-36, 1e-38, 1e-41])
def test_tiny_finite_gradients_step_without_linalg_error(backend, base, scale):
    torch.manual_seed(0)
    layer = LowRankLinear(32, 24, 6)
    opt = DLRT(layer.parameters(), lr=1e-2, base=base, backend=backend, rank_rule="tolerance", s_direction="own")
    layer(torch.randn(8, 32)).square().sum().backward()
    for p in layer.parameters():
        p.grad.mul_(scale / p.grad.abs().max())
    opt.step()
    U, S, V = layer.factors()
    assert all(torch.isfinite(t).all() for t in (U, S, V))
    r = layer.rank
    for B in (U, V):
        assert torch.linalg.norm(B.T @ B - torch.eye(r)) < 1e-5
    assert opt.skipped_steps == 0


# ---------------------------------------------------------------------------------------- 5. frozen factors
@pytest.mark.parametrize("role", ["U", "S", "V"])
def test_frozen_factor_is_refused_at_construction(role):
    layer = LowRankLinear(12, 10, 4)
    getattr(layer, role).requires_grad_(False)
    with pytest.raises(ValueError, match=f"LowRankLinear.*frozen factor\\(s\\) {role}"):
        DLRT(layer.parameters())


def test_factor_frozen_after_construction_is_refused_at_step_before_anything_changes():
    model = _model()
    opt = DLRT(model.parameters(), lr=1e-2)
    _train(model, opt)
    model[0].S.requires_grad_(False)
    _backward(model)  # S gets no gradient now, U and V do
    before_p, before_o = _snap_params(model), _snap_opt(opt)
    with pytest.raises(ValueError, match="frozen factor\\(s\\) S"):
        opt.step()
    assert_unchanged(model, opt, before_p, before_o)


def test_factor_missing_its_gradient_is_refused_at_step():
    model = _model()
    opt = DLRT(model.parameters(), lr=1e-2)
    _backward(model)
    model[0].V.grad = None
    before_p, before_o = _snap_params(model), _snap_opt(opt)
    with pytest.raises(ValueError, match="not for V"):
        opt.step()
    assert_unchanged(model, opt, before_p, before_o)


# ---------------------------------------------------------------------------------------- 6. huge finite grads
@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_finite_gradients_are_not_non_finite(backend):
    model = _model()
    opt = DLRT(model.parameters(), lr=1e-22, base="sgd", nonfinite="raise", backend=backend, rank_rule="tolerance", s_direction="own")
    _backward(model)
    for p in model.parameters():
        p.grad.mul_(1e20 / p.grad.abs().max())  # ‖g‖₂ overflows float32; every entry is finite
    assert not torch.isfinite(torch.linalg.vector_norm(model[2].weight.grad))
    before = _snap_params(model)
    opt.step()
    after = _snap_params(model)
    assert opt.skipped_steps == 0
    assert all(torch.isfinite(a).all() for a in after)
    assert all(not torch.equal(b, a) for b, a in zip(before[3:], after[3:]))  # the dense head stepped
    assert not torch.equal(model[0].dense_weight(), _dense(before[:3]))  # the layer stepped


def _dense(usv):
    U, S, V = usv
    return U @ S @ V.T


# ---------------------------------------------------------------------------------------- 7. arguments
class _NoAdjust:
    pass


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(betas=(0.9,)), TypeError, "betas must be a pair"),
    (dict(betas=0.9), TypeError, "betas must be a pair"),
    (dict(betas=(0.9, float("nan"))), ValueError, "betas must be in"),
    (dict(betas=(0.9, "x")), TypeError, "betas must be in"),
    (dict(lr="0.01"), TypeError, "lr must be >= 0"),
    (dict(tau="0.1"), TypeError, "tau must be >= 0"),
    (dict(lr=float("inf")), ValueError, "lr must be >= 0 \\(a finite"),
    (dict(lr=True), TypeError, "lr must be"),
    (dict(eps=float("nan")), ValueError, "eps must be >= 0"),
    (dict(weight_decay=float("inf")), ValueError, "weight_decay must be >= 0"),
    (dict(base="sgd", dampening=float("nan")), ValueError, "dampening must be in \\[0, 1\\]"),
    (dict(base="sgd", dampening=5), ValueError, "dampening must be in \\[0, 1\\]"),
    (dict(base="sgd", dampening=-3), ValueError, "dampening must be in \\[0, 1\\]"),
    (dict(base="sgd", momentum=1.0), ValueError, "momentum must be in \\[0, 1\\)"),
    (dict(base="sgd", nesterov=True), ValueError, "nesterov=True requires momentum > 0"),
    (dict(base="sgd", nesterov=True, momentum=0.9, dampening=0.1), ValueError, "and dampening = 0"),
    (dict(base="sgd", nesterov="yes"), TypeError, "nesterov must be True or False"),
    (dict(min_rank=True), TypeError, "min_rank must be an int >= 1"),
    (dict(min_rank=2.0), TypeError, "min_rank must be an int >= 1"),
    (dict(base=None), TypeError, "base must be one of"),
    (dict(guide=object()), TypeError, "guide must be None or have a method adjust"),
    (dict(guide=_NoAdjust()), TypeError, "guide must be None or have a method adjust"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
    (dict(backend=None), ValueError, "backend must be one of"),
    (dict(nonfinite=None), ValueError, "nonfinite must be"),
])
def test_bad_constructor_arguments_are_refused_naming_the_argument(kwargs, exc, match):
    layer = LowRankLinear(8, 8, 2)
    with pytest.raises(exc, match=match):
        DLRT(layer.parameters(), **kwargs)


@pytest.mark.parametrize("key,value", [("lr", "0.01"), ("betas", 0.9), ("dampening", math.nan), ("min_rank", True)])
def test_bad_group_options_are_refused_by_add_param_group(key, value):
    a, b = LowRankLinear(8, 8, 2), nn.Linear(3, 3)
    opt = DLRT(a.parameters())
    n = len(opt.param_groups)
    with pytest.raises((TypeError, ValueError), match=key):
        opt.add_param_group({"params": list(b.parameters()), key: value})
    assert len(opt.param_groups) == n


def test_legal_arguments_are_normalized_and_accepted():
    opt = DLRT(LowRankLinear(8, 8, 2).parameters(), betas=[0.8, 0.9], lr=1, tau=0, eps=0,
               base="sgd", momentum=0.9, nesterov=True, guide=None)
    assert opt.param_groups[0]["betas"] == (0.8, 0.9)
