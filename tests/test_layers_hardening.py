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


# ---------------------------------------------------------------------------------------- unbatched conv input
@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 0, 1), ((2, 1), (1, 0), (1, 2))])
def test_conv_accepts_unbatched_input_like_nn_conv2d(stride, padding, dilation):
    """(C, H, W) -> (C_out, H', W') as nn.Conv2d computes it; the input gradient is nn.Conv2d's and the factor
    gradients are DLRT's coordinates of nn.Conv2d's weight gradient."""
    torch.manual_seed(0)
    layer = LowRankConv2d(3, 8, 3, 2, stride=stride, padding=padding, dilation=dilation, capacity=4,
                          dtype=torch.float64)
    dense = layer.to_dense()
    x = torch.randn(3, 9, 10, dtype=torch.float64, requires_grad=True)
    xd = x.detach().clone().requires_grad_()
    y, yd = layer(x), dense(xd)
    assert y.shape == yd.shape and y.dim() == 3
    torch.testing.assert_close(y, yd, rtol=1e-12, atol=1e-12)
    assert torch.equal(y, layer(x.detach()[None])[0])  # the same computation as a batch of one
    g = torch.randn_like(y)
    y.backward(g)
    yd.backward(g)
    torch.testing.assert_close(x.grad, xd.grad, rtol=1e-12, atol=1e-12)
    G_W = dense.weight.grad.reshape(8, -1)
    U, S, V = (t.detach() for t in layer.factors())
    r = layer.rank
    torch.testing.assert_close(layer.U.grad[:, :r], G_W @ V, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.V.grad[:, :r], G_W.T @ U, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.S.grad[:r, :r], U.T @ G_W @ V, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.bias.grad, dense.bias.grad)
    assert not layer.U.grad[:, r:].any() and not layer.S.grad[r:].any() and not layer.V.grad[:, r:].any()


@pytest.mark.parametrize("shape", [(3, 9), (1, 1, 3, 9, 9), (9,)])
def test_conv_refuses_other_input_ranks_as_nn_conv2d_does(shape):
    layer = LowRankConv2d(3, 8, 3, 2)
    with pytest.raises(RuntimeError, match=r"Expected 3D \(unbatched\) or 4D \(batched\) input"):
        layer(torch.randn(shape))
    with pytest.raises(RuntimeError, match=r"Expected 3D \(unbatched\) or 4D \(batched\) input"):
        nn.Conv2d(3, 8, 3)(torch.randn(shape))


# ---------------------------------------------------------------------------------------- corrupt checkpoints
def _orthonormal(layer, tol):
    r = layer.rank
    eye = torch.eye(r, dtype=torch.float64)
    return all((getattr(layer, f)[:, :r].detach().double().mT @ getattr(layer, f)[:, :r].detach().double()
                - eye).abs().max() <= tol for f in "UV")


def _zero_past_rank(layer):
    r = layer.rank
    return not (layer.U[:, r:].any() or layer.V[:, r:].any() or layer.S[r:].any() or layer.S[:, r:].any())


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("role,edit", [("U", lambda t: t[0, 0].mul_(2)), ("V", lambda t: t[:, 1].mul_(1.01)),
                                       ("U", lambda t: t[:, 2].copy_(t[:, 0])), ("V", lambda t: t[3, :4].add_(1e-2))])
def test_load_refuses_factors_that_are_not_orthonormal(role, edit, strict):
    """A finite checkpoint whose U or V lost orthonormality (U[0, 0] doubled: |UᵀU - I| ~ 0.5) is refused
    before anything is copied."""
    src = LowRankLinear.from_dense(nn.Linear(20, 30), rank=4, capacity=8)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    edit(sd[role])
    layer = LowRankLinear(20, 30, 2, capacity=8)
    snap = _snapshot(layer)
    with pytest.raises(RuntimeError, match=rf"{role}: the active columns are not orthonormal \(checkpoint\)"):
        layer.load_state_dict(sd, strict=strict)
    assert _unchanged(layer, snap) and layer.rank == 2


def test_load_checks_the_current_factors_at_a_new_rank():
    """Loading only S and active_rank: the layer's own U, V must be orthonormal at the new rank."""
    layer = LowRankLinear(20, 30, 2, capacity=8)
    src = LowRankLinear(20, 30, 4, capacity=8).state_dict()
    snap = _snapshot(layer)
    sd = {"S": src["S"], "active_rank": src["active_rank"]}
    with pytest.raises(RuntimeError, match=r"U: the active columns are not orthonormal \(current layer\)"):
        layer.load_state_dict(sd, strict=False)
    assert _unchanged(layer, snap) and layer.rank == 2
    S = torch.zeros(8, 8)
    S[:2, :2] = torch.randn(2, 2) * 1e3
    layer.load_state_dict({"S": S}, strict=False)  # at the layer's own rank: S is unconstrained
    assert torch.equal(layer.S, S)


def test_seeded_bit_flips_are_refused_or_leave_a_valid_layer():
    """300 single-bit flips in the active block of U, S or V of a float32 checkpoint. A flip in U or V loads
    only when the factor stays orthonormal within the float32 tolerance (the low mantissa bits: the layer's
    function moves by < 1e-3 relative); S is unconstrained, so every finite flip of S loads. Refused loads
    change nothing. Counts with this seed: S 107 loaded / 0 refused, U 45 / 46, V 43 / 59."""
    from lrtrain.layers.factors import ORTHONORMALITY_TOLERANCE

    tol = ORTHONORMALITY_TOLERANCE[torch.float32]
    torch.manual_seed(0)
    src = LowRankLinear.from_dense(nn.Linear(48, 40), rank=8)  # capacity 16
    sd = {k: v.detach().clone() for k, v in src.state_dict().items()}
    W0 = src.dense_weight().detach().double()
    r, g = src.rank, torch.Generator().manual_seed(1234)
    counts = {(role, out): 0 for role in "USV" for out in ("loaded", "refused")}
    for _ in range(300):
        role = "USV"[int(torch.randint(3, (1,), generator=g))]
        t = sd[role].clone()
        a = int(torch.randint(t.shape[0] if role != "S" else r, (1,), generator=g))
        b = int(torch.randint(r, (1,), generator=g))
        bit = int(torch.randint(32, (1,), generator=g))
        t.view(torch.int32)[a, b] ^= (1 << bit) if bit < 31 else -(1 << 31)
        layer = LowRankLinear(48, 40, 1, capacity=16)
        snap = _snapshot(layer)
        try:
            layer.load_state_dict(dict(sd, **{role: t}))
        except RuntimeError as e:
            assert "not orthonormal" in str(e) or "non-finite" in str(e), str(e)
            assert _unchanged(layer, snap) and layer.rank == 1
            counts[role, "refused"] += 1
            continue
        counts[role, "loaded"] += 1
        assert layer.rank == r and _zero_past_rank(layer) and _orthonormal(layer, tol)
        assert torch.isfinite(layer.S).all()
        if role != "S":
            rel = (layer.dense_weight().detach().double() - W0).norm() / W0.norm()
            assert rel < 1e-3, (role, bit, float(rel))
    assert counts[("S", "refused")] == 0 and counts[("U", "refused")] >= 30 and counts[("V", "refused")] >= 30, counts
    assert sum(counts.values()) == 300


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_checkpoints_of_low_and_cast_precisions_load(dtype):
    """The tolerance follows the precision the values carry: a bfloat16 checkpoint (orthonormal only to its
    rounding), and the same values cast up to float32 / float64, load; float32 factors as far from orthonormal
    as bfloat16 rounding, but not bfloat16 values, are refused."""
    src = LowRankLinear.from_dense(nn.Linear(48, 40, dtype=torch.float64), rank=8).to(dtype)
    for cast in (dtype, torch.float32, torch.float64):
        layer = LowRankLinear(48, 40, 1, capacity=16, dtype=cast)
        layer.load_state_dict({k: v.to(cast) if v.is_floating_point() else v for k, v in src.state_dict().items()})
        assert layer.rank == 8 and torch.equal(layer.U, src.U.detach().to(cast))
    if dtype == torch.bfloat16:  # the rounding error of bfloat16 > the float32 tolerance
        sd = {k: v.float() if v.is_floating_point() else v for k, v in src.state_dict().items()}
        err = (sd["U"][:, :8].double().mT @ sd["U"][:, :8].double() - torch.eye(8, dtype=torch.float64)).abs().max()
        assert 1e-4 < err < 5e-2
        sd["U"][:, :8] *= 1 + 1e-6 * torch.randn(40, 8)  # no longer bfloat16 values: judged as float32
        layer = LowRankLinear(48, 40, 1, capacity=16)
        with pytest.raises(RuntimeError, match=r"U: the active columns are not orthonormal"):
            layer.load_state_dict(sd)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_layers_are_constructed_like_nn_linear(dtype):
    """nn.Linear(..., dtype=torch.bfloat16) works on CPU; so does the factorized layer (its random orthonormal
    init is drawn in float32 and rounded: no bfloat16 QR needed)."""
    from lrtrain.layers.factors import ORTHONORMALITY_TOLERANCE

    for layer in (LowRankLinear(40, 30, 4, dtype=dtype), LowRankConv2d(3, 8, 3, 2, dtype=dtype)):
        assert all(p.dtype == dtype for p in layer.parameters())
        assert _orthonormal(layer, ORTHONORMALITY_TOLERANCE[dtype]) and _zero_past_rank(layer)
        layer.load_state_dict(layer.state_dict())  # its own state passes the checkpoint checks


def test_ema_checkpoints_load_after_every_update(digits):
    """AveragedModel copies the source model's buffers (active_rank) into the average after each update while
    the average keeps a rank of its own, and its first update copies the model's factors: the saved
    active_rank is the rank the factors have either way, so the average's checkpoint loads and computes what
    the average computes."""
    import copy

    from torch.optim.swa_utils import AveragedModel

    import lrtrain

    torch.manual_seed(0)
    model = lrtrain.lowrank(nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                                          nn.Linear(32, 10)), rank=16)
    opt = lrtrain.DLRT(model.parameters(), lr=3e-3, tau=0.2, rank_rule="tolerance", s_direction="own")
    ema = AveragedModel(model, multi_avg_fn=lrtrain.get_ema_multi_avg_fn(0.9))
    x, differ = digits.test_x[:32], 0
    for i in range(12):
        xb, yb = digits.train_x[64 * i:64 * (i + 1)], digits.train_y[64 * i:64 * (i + 1)]
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
        opt.zero_grad()
        ema.update_parameters(model)
        differ += ema.module[1].rank != model[1].rank or ema.module[3].rank != model[3].rank
        fresh = copy.deepcopy(model)
        fresh.load_state_dict(ema.module.state_dict())
        assert [fresh[1].rank, fresh[3].rank] == [ema.module[1].rank, ema.module[3].rank]
        torch.testing.assert_close(fresh(x), ema.module(x))
    assert differ >= 3  # the average's ranks were not the model's
