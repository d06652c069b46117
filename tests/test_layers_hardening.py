"""Hardening of the factorized layers: bad arguments refused at construction (naming the argument), and
``load_state_dict`` refusing bad U / S / V / active_rank before anything is copied."""
import pytest
import torch
from torch import nn

from lrtrain import LowRankConv2d, LowRankLinear


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _unchanged(module, snap):
    now = module.state_dict()
    return now.keys() == snap.keys() and all(torch.equal(now[k], snap[k]) for k in snap)


# ---------------------------------------------------------------------------------------- constructors
@pytest.mark.parametrize("args,kwargs,match", [
    ((20, 30), dict(rank=True), r"rank must be an int in \[1, 20\], got True"),
    ((20.7, 30, 4), {}, r"in_features must be an int >= 1, got 20.7"),
    (("20", 30, 4), {}, r"in_features must be an int >= 1"),
    ((0, 30, 4), {}, r"in_features must be an int >= 1, got 0"),
    ((-5, 30, 4), {}, r"in_features must be an int >= 1, got -5"),
    ((20, 0, 4), {}, r"out_features must be an int >= 1"),
    ((20, 30, 4), dict(bias="yes"), r"bias must be True or False"),
    ((20, 30, 4), dict(max_rank=2.5), r"max_rank must be an int"),
    ((20, 30, 4), dict(capacity=True), r"capacity must be an int"),
])
def test_linear_constructor_refuses_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LowRankLinear(*args, **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(kernel_size=-3), r"kernel_size must be an int >= 1 or a pair"),
    (dict(kernel_size=(3, 3, 3)), r"kernel_size must be"),
    (dict(kernel_size=2.0), r"kernel_size must be"),
    (dict(stride=0), r"stride must be an int >= 1"),
    (dict(stride=(1, -1)), r"stride must be"),
    (dict(stride=(1,)), r"stride must be"),
    (dict(padding=-1), r"padding must be an int >= 0"),
    (dict(padding=(1, 1, 1)), r"padding must be"),
    (dict(padding="same"), r"padding must be .*'same'"),
    (dict(dilation=0), r"dilation must be an int >= 1"),
    (dict(dilation=(2, 2, 2)), r"dilation must be"),
    (dict(in_channels=0), r"in_channels must be an int >= 1"),
    (dict(out_channels=2.5), r"out_channels must be an int >= 1"),
    (dict(groups=2), r"groups must be 1"),
    (dict(padding_mode="reflect"), r"padding_mode must be 'zeros'"),
    (dict(rank=True), r"rank must be an int in"),
])
def test_conv_constructor_refuses_bad_arguments(kwargs, match):
    args = dict(in_channels=3, out_channels=8, kernel_size=3, rank=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        LowRankConv2d(**args)


def test_conv_accepts_pairs_and_lists():
    layer = LowRankConv2d(3, 8, [3, 1], 2, stride=(2, 1), padding=[1, 0], dilation=(1, 1))
    assert layer.kernel_size == (3, 1) and layer.stride == (2, 1) and layer.padding == (1, 0)
    assert layer(torch.randn(1, 3, 6, 6)).shape == (1, 8, 3, 6)


@pytest.mark.parametrize("rank,match", [(0, r"rank must be an int in \[1, 8\], got 0"), (-3, r"rank must be .* got -3"),
                                        (20, r"rank must be an int in \[1, 8\], got 20"), (True, "rank must be"),
                                        (2.0, "rank must be")])
def test_from_dense_refuses_rank_outside_range(rank, match):
    with pytest.raises(ValueError, match=match):
        LowRankLinear.from_dense(nn.Linear(8, 8), rank=rank)


@pytest.mark.parametrize("tau", [float("nan"), -0.1, "0.1", True])
def test_from_dense_refuses_bad_tau(tau):
    with pytest.raises(ValueError, match="tau must be >= 0"):
        LowRankLinear.from_dense(nn.Linear(8, 8), tau=tau)


@pytest.mark.parametrize("conv,match", [
    (nn.Conv2d(4, 8, 3, groups=2), "groups must be 1"),
    (nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect"), "padding_mode must be 'zeros'"),
    (nn.Conv2d(4, 8, 3, padding="same"), "padding must be"),
])
def test_conv_from_dense_refuses_unsupported_convolutions(conv, match):
    with pytest.raises(ValueError, match=match):
        LowRankConv2d.from_dense(conv, rank=2)


def test_from_dense_refuses_the_wrong_layer_type():
    with pytest.raises(ValueError, match="layer must be an nn.Linear"):
        LowRankLinear.from_dense(nn.Conv2d(3, 8, 3), rank=2)
    with pytest.raises(ValueError, match="layer must be an nn.Conv2d"):
        LowRankConv2d.from_dense(nn.Linear(8, 8), rank=2)


# ---------------------------------------------------------------------------------------- load_state_dict
def _bad_state_dicts():
    """(description, state dict for a LowRankLinear(20, 30, rank 4, capacity 8), error regex)."""
    good = LowRankLinear(20, 30, 4, capacity=8).state_dict()
    cases = []
    sd = dict(good, U=LowRankLinear(20, 50, 4, capacity=8).U.detach())
    cases.append(("U from out=50", sd, r"size mismatch for U"))
    other = LowRankLinear(20, 30, 4, capacity=6).state_dict()
    cases.append(("another capacity", other, r"size mismatch for U.*capacity = 8"))
    sd = dict(good, V=torch.zeros(20, 6))
    cases.append(("inconsistent V", sd, r"size mismatch for V"))
    sd = dict(good, bias=torch.zeros(31))
    cases.append(("mis-shaped bias", sd, r"size mismatch for bias"))
    for r in (0, 9, -1):
        cases.append((f"rank {r}", dict(good, active_rank=torch.tensor(r)), rf"active_rank: rank {r} outside \[1, capacity = 8\]"))
    cases.append(("fractional rank", dict(good, active_rank=torch.tensor(2.5)), r"active_rank: must be an integer"))
    U = good["U"].clone()
    U[0, 0] = float("nan")
    cases.append(("NaN in U", dict(good, U=U), r"U: the factor holds non-finite values"))
    S = good["S"].clone()
    S[1, 1] = float("inf")
    cases.append(("inf in S", dict(good, S=S), r"S: the factor holds non-finite values"))
    V = good["V"].clone()
    V[:, 6] = 1.0
    cases.append(("V nonzero beyond the rank", dict(good, V=V), r"V: nonzero entries outside the active rank r = 4"))
    cases.append(("rank 3 < the checkpoint's active block", dict(good, active_rank=torch.tensor(3)),
                  r"nonzero entries outside the active rank r = 3"))
    cases.append(("U not a tensor", dict(good, U=[[0.0]]), r"expected torch.Tensor"))
    return cases


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("what,sd,match", _bad_state_dicts(), ids=[c[0] for c in _bad_state_dicts()])
def test_load_state_dict_refuses_bad_entries_and_changes_nothing(what, sd, match, strict):
    layer = LowRankLinear(20, 30, 4, capacity=8)
    snap, rank = _snapshot(layer), layer.rank
    with pytest.raises(RuntimeError, match=r"Error\(s\) in loading state_dict for LowRankLinear(.|\n)*" + match):
        layer.load_state_dict(sd, strict=strict)
    assert _unchanged(layer, snap) and layer.rank == rank


def test_conv_load_refuses_another_kernel_size():
    layer = LowRankConv2d(3, 8, 3, 2, capacity=4)
    snap = _snapshot(layer)
    with pytest.raises(RuntimeError, match=r"size mismatch for V"):
        layer.load_state_dict(LowRankConv2d(3, 8, 5, 2, capacity=4).state_dict())
    assert _unchanged(layer, snap)


@pytest.mark.parametrize("edit,match", [
    (lambda sd: sd.pop("bias"), r"Missing key\(s\).*\"bias\""),
    (lambda sd: sd.pop("active_rank"), r"Missing key\(s\).*\"active_rank\""),
    (lambda sd: sd.__setitem__("extra", torch.zeros(1)), r"Unexpected key\(s\).*\"extra\""),
])
def test_failed_strict_load_does_not_overwrite_factors(edit, match):
    """torch copies entry by entry and raises at the end: without the up-front check U/S/V were overwritten."""
    layer = LowRankLinear(20, 30, 4, capacity=8)
    snap = _snapshot(layer)
    sd = LowRankLinear(20, 30, 6, capacity=8).state_dict()
    edit(sd)
    with pytest.raises(RuntimeError, match=match):
        layer.load_state_dict(sd)
    assert _unchanged(layer, snap) and layer.rank == 4


def test_non_strict_load_with_missing_rank_keeps_the_invariant():
    layer = LowRankLinear(20, 30, 4, capacity=8)
    src = LowRankLinear(20, 30, 6, capacity=8).state_dict()
    src.pop("active_rank")  # factors of rank 6 into a layer of rank 4: would break "zero beyond r"
    snap = _snapshot(layer)
    with pytest.raises(RuntimeError, match="nonzero entries outside the active rank r = 4"):
        layer.load_state_dict(src, strict=False)
    assert _unchanged(layer, snap)
    src["active_rank"] = torch.tensor([6])  # torch's 1-element rule for 0-dim entries
    layer.load_state_dict(src, strict=False)
    assert layer.rank == 6 and int(layer.active_rank) == 6


def test_valid_load_moves_the_rank_and_the_function():
    src, dst = LowRankLinear(20, 30, 6, capacity=8), LowRankLinear(20, 30, 2, capacity=8, max_rank=3)
    dst.load_state_dict(src.state_dict())
    assert dst.rank == 6  # above dst.max_rank = 3: accepted (max_rank is configuration; DLRT truncates to it)
    x = torch.randn(3, 20)
    torch.testing.assert_close(dst(x), src(x))


def test_failed_model_load_leaves_the_bad_layer_unchanged():
    """Atomic per factorized layer: torch loads module by module, so an earlier module's valid entries are
    loaded even when a later one fails; the layer whose entries are bad keeps all of its values."""
    model = nn.Sequential(LowRankLinear(20, 30, 4, capacity=8), nn.ReLU(), LowRankLinear(30, 10, 3, capacity=6))
    other = nn.Sequential(LowRankLinear(20, 30, 5, capacity=8), nn.ReLU(), LowRankLinear(30, 10, 2, capacity=6))
    sd = other.state_dict()
    sd["2.V"] = torch.zeros(31, 6)  # the later layer's V is mis-shaped; its U and S are fine
    first, second = _snapshot(model[0]), _snapshot(model[2])
    with pytest.raises(RuntimeError, match=r"size mismatch for 2.V"):
        model.load_state_dict(sd)
    assert _unchanged(model[2], second) and model[2].rank == 3  # untouched: U, S not copied before V failed
    assert not _unchanged(model[0], first) and model[0].rank == 5  # the earlier module was loaded (torch's order)
