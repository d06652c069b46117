"""The layer-kind registry (each kind round-trips dense -> factorized -> dense and through its checkpoint record;
its embedding is what the layer multiplies by W) and the links from factor parameters to their layer (found
from the parameters given, with no registry of layers: copies, pickles, .to(), assign-loads, retired params)."""
import copy
import io
import json

import pytest
import torch
from torch import nn

import lrtrain
from lrtrain import LowRankConv2d, LowRankLinear
from lrtrain.hf import _rebuild, _record
from lrtrain.layers.kinds import CONV1D, CONV2D, KINDS, LINEAR, kind_named, kind_of
from lrtrain.layers.links import factor_of, factor_of_view
from lrtrain.optim.params import find_layers

f64 = dict(dtype=torch.float64)


def _dense(kind):
    """(a dense module of ``kind`` with a bias, an input for it)."""
    torch.manual_seed(0)
    if kind is LINEAR:
        return nn.Linear(12, 9, **f64), torch.randn(4, 7, 12, **f64)
    if kind is CONV2D:
        return nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=(1, 2), **f64), torch.randn(4, 3, 9, 11, **f64)
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
    conv = Conv1D(9, 12).double()  # y = x W + b, W stored (in, out) = (12, 9)
    with torch.no_grad():
        conv.bias.normal_()
    return conv, torch.randn(4, 7, 12, **f64)


@pytest.fixture(params=[k.name for k in KINDS])
def kind(request):
    return kind_named(request.param)


def test_registry_names_and_lookups():
    assert [k.name for k in KINDS] == ["linear", "conv1d", "conv2d"]
    assert kind_of(nn.Linear(4, 4)) is LINEAR and kind_of(nn.Conv2d(2, 2, 3)) is CONV2D
    assert kind_of(LowRankLinear(8, 8, 2)) is LINEAR and kind_of(LowRankConv2d(2, 4, 3, 2)) is CONV2D
    assert kind_of(nn.Conv1d(4, 4, 3)) is None and kind_of(nn.Embedding(5, 4)) is None and kind_named("conv3d") is None
    assert CONV2D.refusal(nn.Conv2d(4, 4, 3, groups=2)) == "grouped / non-zero-padded / string-padded conv"
    assert CONV2D.refusal(nn.Conv2d(4, 4, 3, padding="same")) is not None and CONV2D.refusal(nn.Conv2d(4, 4, 3)) is None


def test_full_rank_conversion_round_trips_to_the_dense_weight(kind):
    dense, x = _dense(kind)
    W = kind.weight_matrix(dense).detach().clone()
    layer = kind.from_dense(dense, rank=min(W.shape))
    assert kind_of(dense) is kind and kind_of(layer) is kind and isinstance(layer, kind.layer_type)
    assert kind.structure(layer) == kind.dense_structure(dense)
    torch.testing.assert_close(layer.dense_weight(), W, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-12, atol=1e-12)
    back = kind.to_dense(layer)
    assert type(back) is type(dense) and kind.dense_structure(back) == kind.dense_structure(dense)
    torch.testing.assert_close(back.weight, dense.weight, rtol=0, atol=1e-12)
    torch.testing.assert_close(back.bias, dense.bias, rtol=0, atol=0)
    # densify and lowrank go through the same kind
    assert type(lrtrain.densify(layer, inplace=False)) is type(dense)
    assert kind_of(lrtrain.lowrank(copy.deepcopy(dense), rank=2, min_features=1)) is kind


def test_checkpoint_record_rebuilds_the_layer(kind):
    dense, x = _dense(kind)
    layer = kind.from_dense(dense, rank=3, capacity=5, max_rank=4)
    rec = json.loads(json.dumps(_record("0", layer)))  # as lrtrain.json stores it
    assert rec["kind"] == kind.name and (rec["rank"], rec["capacity"], rec["max_rank"], rec["bias"]) == (3, 5, 4, True)
    target = nn.Sequential(copy.deepcopy(dense))
    new = _rebuild(target, rec)
    assert target[0] is new and kind_of(new) is kind and new.capacity == 5 and new.max_rank == 4
    target.load_state_dict(nn.Sequential(layer).state_dict())
    assert new.rank == 3 and kind.structure(new) == kind.structure(layer)
    torch.testing.assert_close(new(x), layer(x), rtol=0, atol=0)
    assert type(kind.to_dense(new)) is type(dense)
    other = nn.Sequential(_dense(LINEAR if kind is CONV2D else CONV2D)[0])
    with pytest.raises(ValueError, match=f"was a {kind.name}"):
        _rebuild(other, rec)


def test_embedding_rows_times_W_are_the_output_rows(kind):
    dense, x = _dense(kind)
    for mod in (dense, kind.from_dense(dense, rank=4)):
        X, per = kind.embed(mod, x)
        W = mod.dense_weight() if mod is not dense else kind.weight_matrix(mod)
        assert X.shape == (x.shape[0] * per, W.shape[1])
        torch.testing.assert_close(kind.output_rows(mod(x)), X @ W.mT + mod.bias, rtol=1e-10, atol=1e-10)


def test_monitor_watches_a_dense_conv1d_like_a_linear():
    dense, x = _dense(CONV1D)
    model = nn.Sequential(dense, nn.Tanh(), nn.Linear(9, 3, **f64))
    y = torch.arange(4) % 3
    with lrtrain.CollapseMonitor(model, 3, weight_decay=0.0) as mon:
        with mon.labels(y):
            model(x).sum().backward()
        s = mon.summary()["0"]
    assert (s.kind, s.factorized, s.in_dim, s.out_dim, s.rows) == ("linear", False, 12, 9, 28)
    rows = x.reshape(4, 7, 12)
    means = torch.stack([rows[y == c].reshape(-1, 12).mean(0) for c in range(3)])
    torch.testing.assert_close(s.class_means, means, rtol=1e-12, atol=1e-12)
    from lrtrain.collapse.analysis import dense_weight

    torch.testing.assert_close(dense_weight(dense), dense.weight.detach().mT, rtol=0, atol=0)


# ---------------------------------------------------------------- links from the parameters to their layer

def _model():
    return lrtrain.lowrank(nn.Sequential(nn.Linear(20, 24), nn.ReLU(), nn.Linear(24, 20), nn.ReLU(), nn.Linear(20, 3)),
                           rank=4, min_features=16)


def test_find_layers_finds_only_the_layers_of_the_parameters_given():
    a, b = _model(), _model()  # both alive
    layers, plain = find_layers(a.parameters())
    assert layers == [a[0], a[2]]
    assert [id(p) for p in plain] == [id(p) for p in a[4].parameters()]  # a layer's bias joins its layer
    assert find_layers(b.parameters())[0] == [b[0], b[2]]
    mixed = [b[2].V, b[2].S, b[2].U, *a[0].parameters()]  # order: the U's in the order given
    assert find_layers(mixed)[0] == [b[2], a[0]]
    assert find_layers(a[4].parameters()) == ([], list(a[4].parameters()))
    assert not hasattr(lrtrain.layers, "live_layers")  # no registry of layers to scan
    with pytest.raises(ValueError, match="partly missing"):
        find_layers([a[0].U, a[0].S])


def test_copies_link_to_their_own_layers():
    model = _model()
    for clone in (copy.deepcopy(model), torch.load(io.BytesIO(_saved(model)), weights_only=False)):
        assert find_layers(clone.parameters())[0] == [clone[0], clone[2]]
        assert find_layers(model.parameters())[0] == [model[0], model[2]]
        assert factor_of(clone[0].U) == (clone[0], "U") and factor_of_view(clone[2].V.detach()) == (clone[2], "V")


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_a_pickled_factor_parameter_loads_unlinked_with_weights_only():
    layer = LowRankLinear(8, 8, 2)
    p = torch.load(io.BytesIO(_saved(layer.U)), weights_only=True)
    assert torch.equal(p, layer.U) and factor_of(p) is None and factor_of(layer.U) == (layer, "U")


def test_replaced_and_orphaned_parameters_are_not_factors():
    model = _model()
    old = list(model[0].parameters())
    model[0].set_capacity(6)
    assert find_layers(old) == ([], old)  # retired: the layer holds new parameters
    assert find_layers(model.parameters())[0] == [model[0], model[2]]
    U = model[2].U
    del model
    assert factor_of(U) is None  # the link is weak: the layer is gone


def test_links_follow_to_assign_loads_and_swapped_conversions():
    model = _model()
    model.double()  # new storages: detached views still resolve
    assert factor_of_view(model[0].S.detach()) == (model[0], "S") and factor_of_view(model[0].S[:2].detach()) is None
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    assert find_layers(model.parameters())[0] == [model[0], model[2]]
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)  # .float() swaps the parameters' contents
    try:
        model.float()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    assert model[0].U.dtype == torch.float32 and find_layers(model.parameters())[0] == [model[0], model[2]]
    assert factor_of_view(model[2].U.detach()) == (model[2], "U")


def test_guard_refuses_a_copy_s_factors_and_dlrt_steps_them():
    clone = copy.deepcopy(_model())
    sgd = torch.optim.SGD(clone[0].parameters(), lr=0.1)
    clone(torch.randn(5, 20)).sum().backward()
    with pytest.raises(RuntimeError, match=r"SGD was given the factor U of a LowRankLinear"):
        sgd.step()
    torch.optim.SGD(clone[4].parameters(), lr=0.1).step()  # plain parameters: fine
    before = clone[0].S.detach().clone()
    lrtrain.DLRT(clone.parameters(), lr=0.1).step()
    assert not torch.equal(clone[0].S, before)
