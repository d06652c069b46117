"""Hardening of ``lowrank`` / ``densify``: non-finite weights refused before anything changes, frozen layers,
training mode and hooks carried over to the replacement, the default capacity never allocating more than the
dense layer (and the summary saying when an explicit one does)."""
import math

import pytest
import torch
from torch import nn

import lrtrain
from lrtrain import LowRankConv2d, LowRankLinear
from lrtrain.layers.factors import dense_capacity
from lrtrain.layers.kinds import LINEAR


def _state(model):
    """Everything a refused call must leave as it was: the module tree (objects and types), each module's
    training flag and hooks, each parameter (object, value, requires_grad) and buffer."""
    mods = [(n, id(m), type(m), m.training,
             tuple((a, tuple(getattr(m, a).items())) for a in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks")))
            for n, m in model.named_modules()]
    params = [(n, id(p), p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()]
    bufs = [(n, b.clone()) for n, b in model.named_buffers()]
    return mods, params, bufs, hasattr(model, "lrtrain_summary")


def _bitwise(a, b):
    """Equal bit for bit (NaNs included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(-1).view(torch.uint8),
                                                                     b.contiguous().view(-1).view(torch.uint8))


def _same(a, b):
    (ma, pa, ba, sa), (mb, pb, bb, sb) = a, b
    return (ma == mb and sa == sb and len(pa) == len(pb) and len(ba) == len(bb)
            and all(x[:3] == y[:3] and _bitwise(x[3], y[3]) for x, y in zip(pa, pb))
            and all(x[0] == y[0] and _bitwise(x[1], y[1]) for x, y in zip(ba, bb)))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 32))


# ---------------------------------------------------------------------------------------- non-finite weights
@pytest.mark.parametrize("where,value", [("4.weight", float("nan")), ("4.weight", float("inf")),
                                         ("2.bias", float("-inf")), ("0.weight", float("nan"))])
@pytest.mark.parametrize("inplace", [True, False])
def test_non_finite_weight_refused_before_any_layer_is_converted(where, value, inplace):
    model = _model()
    with torch.no_grad():
        model.get_parameter(where).view(-1)[3] = value
    model[0].register_forward_hook(lambda *a: None)
    before = _state(model)
    layer = where.split(".")[0]
    with pytest.raises(ValueError, match=rf"lowrank: the {where.split('.')[1]} of layer '{layer}' \(Linear\) holds "
                                         r"non-finite values \(NaN or inf\); nothing was converted"):
        lrtrain.lowrank(model, rank=4, inplace=inplace)
    assert _same(_state(model), before)


def test_non_finite_weights_of_layers_left_dense_do_not_matter():
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 8), nn.ReLU(), nn.Linear(8, 32))
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")  # min(out, in) = 8 < min_features: never factorized
    lrtrain.lowrank(model, rank=4)
    assert isinstance(model[0], LowRankLinear) and type(model[2]) is nn.Linear
    assert all(torch.isfinite(p).all() for p in model[0].parameters())


def test_a_failing_conversion_leaves_the_model_as_it_was(monkeypatch):
    """Every new layer is built before the model changes: an error in a later layer's conversion (here
    from_dense raising on the third layer) undoes nothing because nothing was done."""
    model = _model()
    before = _state(model)
    calls = []
    real = type(LINEAR).from_dense

    def flaky(self, module, **kw):
        calls.append(module)
        if len(calls) == 3:
            raise MemoryError("out of memory")
        return real(self, module, **kw)

    monkeypatch.setattr(type(LINEAR), "from_dense", flaky)
    with pytest.raises(MemoryError):
        lrtrain.lowrank(model, rank=4)
    assert len(calls) == 3 and _same(_state(model), before)


# ---------------------------------------------------------------------------------------- what the replacement keeps
class Counter:
    def __init__(self):
        self.n = {}

    def hook(self, key):
        def f(*args, **kwargs):
            self.n[key] = self.n.get(key, 0) + 1
        return f


def _hooked(counter):
    model = _model()
    model[0].requires_grad_(False)  # a frozen layer (weight and bias)
    model[2].weight.requires_grad_(False)  # BitFit-style: weight frozen, bias trained
    handles = [model[4].register_forward_hook(counter.hook("fwd")),
               model[4].register_forward_pre_hook(counter.hook("pre")),
               model[4].register_forward_hook(counter.hook("fwd_kw"), with_kwargs=True, always_call=True),
               model[4].register_forward_pre_hook(counter.hook("pre_kw"), with_kwargs=True),
               model[4].register_full_backward_hook(counter.hook("bwd")),
               model[4].register_full_backward_pre_hook(counter.hook("bwd_pre"))]
    model.eval()
    model[2].train()  # modes per module
    return model, handles


def _call(model):
    x = torch.randn(5, 32, requires_grad=True)
    model(x).square().sum().backward()


def test_lowrank_keeps_frozen_layers_training_mode_and_hooks():
    counter = Counter()
    model, handles = _hooked(counter)
    lrtrain.lowrank(model, rank=4)
    assert all(isinstance(model[i], LowRankLinear) for i in (0, 2, 4))
    assert [p.requires_grad for p in model[0].parameters()] == [False] * 4  # U, S, V, bias
    assert [model[2].U.requires_grad, model[2].S.requires_grad, model[2].V.requires_grad, model[2].bias.requires_grad] \
        == [False, False, False, True]
    assert all(p.requires_grad for p in model[4].parameters())
    assert not model.training and [m.training for m in model] == [False, False, True, False, False]
    _call(model)
    assert counter.n == {k: 1 for k in ("fwd", "pre", "fwd_kw", "pre_kw", "bwd", "bwd_pre")}
    # DLRT, given the trainable parameters, leaves the frozen layer alone and trains the others (given all of
    # model.parameters(), DLRT refuses a layer with frozen factors)
    frozen = [p.detach().clone() for p in model[0].parameters()]
    trained = [p.detach().clone() for p in model[4].parameters()]
    bias2, usv2 = model[2].bias.detach().clone(), {f: getattr(model[2], f).detach().clone() for f in "USV"}
    opt = lrtrain.DLRT([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model[0].parameters(), frozen))
    assert not all(torch.equal(p, q) for p, q in zip(model[4].parameters(), trained))
    assert not torch.equal(model[2].bias, bias2) and all(torch.equal(getattr(model[2], f), v) for f, v in usv2.items())
    # the user's handles remove the hooks from the replacement
    for h in handles:
        h.remove()
    _call(model)
    assert counter.n == {k: 1 for k in ("fwd", "pre", "fwd_kw", "pre_kw", "bwd", "bwd_pre")}


def test_densify_keeps_frozen_layers_training_mode_and_hooks():
    counter = Counter()
    model, handles = _hooked(counter)
    lrtrain.lowrank(model, rank=4)
    lrtrain.densify(model)
    assert all(type(model[i]) is nn.Linear for i in (0, 2, 4))
    assert [p.requires_grad for p in model[0].parameters()] == [False, False]
    assert [model[2].weight.requires_grad, model[2].bias.requires_grad] == [False, True]
    assert all(p.requires_grad for p in model[4].parameters())
    assert not model.training and [m.training for m in model] == [False, False, True, False, False]
    _call(model)
    assert counter.n == {k: 1 for k in ("fwd", "pre", "fwd_kw", "pre_kw", "bwd", "bwd_pre")}
    for h in handles:
        h.remove()
    _call(model)
    assert counter.n["fwd"] == 1 and counter.n["bwd"] == 1


def test_copies_keep_them_too_and_the_original_is_untouched():
    counter = Counter()
    model, handles = _hooked(counter)
    before = _state(model)
    copy = lrtrain.lowrank(model, rank=4, inplace=False)
    assert _same(_state(model), before)
    assert not copy.training and not copy[0].U.requires_grad and copy[4].U.requires_grad
    _call(copy)
    assert counter.n["fwd"] == 1 and counter.n["bwd"] == 1
    dense = lrtrain.densify(copy, inplace=False)
    assert not dense[0].weight.requires_grad and not dense.training
    _call(dense)
    assert counter.n["fwd"] == 2


def test_a_bare_layer_keeps_them():
    conv = nn.Conv2d(16, 32, 3).eval().requires_grad_(False)
    counter = Counter()
    conv.register_forward_hook(counter.hook("fwd"))
    new = lrtrain.lowrank(conv, rank=4)
    assert isinstance(new, LowRankConv2d) and not new.training
    assert not any(p.requires_grad for p in new.parameters())
    new(torch.randn(1, 16, 8, 8))
    assert counter.n == {"fwd": 1}
    back = lrtrain.densify(new)
    assert type(back) is nn.Conv2d and not back.training and not any(p.requires_grad for p in back.parameters())
    back(torch.randn(1, 16, 8, 8))
    assert counter.n == {"fwd": 2}


# ---------------------------------------------------------------------------------------- capacity vs dense
def test_dense_capacity_is_the_largest_that_fits():
    for m in range(1, 70, 3):
        for n in range(1, 70, 5):
            c = dense_capacity(m, n)
            assert c * (m + n) + c * c <= m * n < (c + 1) * (m + n) + (c + 1) ** 2
            assert c < min(m, n)
    assert dense_capacity(128, 128) == 53


def test_default_capacity_never_allocates_more_than_the_dense_layer():
    model = lrtrain.lowrank(nn.Sequential(nn.Linear(128, 128)), rank=32)
    layer = model[0]
    assert (layer.rank, layer.capacity, layer.max_rank) == (32, 53, 53)  # 2·rank = 64 would allocate 20,480 > 16,384
    alloc = sum(p.numel() for p in layer.parameters())
    assert alloc <= 128 * 128 + 128
    s = model.lrtrain_summary
    assert s.layer_params == [("0", alloc, 128 * 128 + 128)] and s.oversized == []
    assert f"{alloc:,} allocated / {128 * 128 + 128:,} dense" in str(s) and "MORE" not in str(s)
    assert s.params_after <= s.params_before
    # where 2·rank fits, it is kept
    assert lrtrain.lowrank(nn.Linear(128, 128), rank=16).capacity == 32
    # tau alone: the same cap on the rank tau picks
    lin = nn.Linear(128, 128)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(128, 30) @ torch.randn(30, 128))
    new = lrtrain.lowrank(lin, tau=1e-6)
    assert new.rank == 30 and new.capacity == 53
    # every converted layer, any shape and rank: allocated <= dense
    for out_f, in_f in ((64, 200), (200, 64), (100, 100), (17, 300)):
        for r in range(1, min(out_f, in_f) + 1, 3):
            m = lrtrain.lowrank(nn.Sequential(nn.Linear(in_f, out_f)), rank=r, min_features=1)
            if isinstance(m[0], LowRankLinear):
                (_, a, d), = m.lrtrain_summary.layer_params
                assert a <= d and m[0].capacity >= m[0].rank == r


@pytest.mark.parametrize("kwargs", [dict(capacity=64), dict(max_rank=64)])
def test_explicit_capacity_above_dense_is_allowed_and_reported(kwargs, capsys):
    model = lrtrain.lowrank(nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128)), rank=32,
                            verbose=True, **kwargs)
    assert model[0].capacity == 64 and model[2].capacity == 64
    s = model.lrtrain_summary
    alloc = 64 * (128 + 128 + 64) + 128
    assert s.layer_params == [("0", alloc, 16_512), ("2", alloc, 16_512)] and s.oversized == ["0", "2"]
    out = capsys.readouterr().out
    assert out.count("capacity 64 allocates MORE than the dense layer") == 2 and "20,608 allocated / 16,512 dense" in out
    now = lrtrain.summary(model)
    assert now.layer_params == s.layer_params and now.oversized == ["0", "2"]
    assert math.isclose(s.params_after / s.params_before, 2 * alloc / (2 * 16_512))
