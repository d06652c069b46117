"""compact(model, optimizer, headroom): capacity follows the rank, DLRT's state is carried exactly (issue 18 item 3)."""
import copy

import pytest
import torch
from torch import nn

from lrtrain import DLRT, LowRankLinear, compact


def _model():
    torch.manual_seed(0)
    return nn.Sequential(LowRankLinear(40, 36, 6, capacity=32), nn.Tanh(), LowRankLinear(36, 30, 5, capacity=30),
                         nn.Tanh(), nn.Linear(30, 8)).double()


def _batch(g):
    return torch.randn(32, 40, generator=g, dtype=torch.float64), torch.randn(32, 8, generator=g, dtype=torch.float64)


def _step(model, opt, x, y):
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def _state_numel(opt):
    return sum(v.numel() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))


@pytest.mark.parametrize("kw", [dict(weight_decay=1e-3), dict(base="sgd", momentum=0.9, lr=0.05), dict(refresh=3)])
def test_the_steps_after_compact_are_the_steps_without_it(kw):
    model = _model()
    opt = DLRT(model.parameters(), tau=0.2, rank_rule="tolerance", s_direction="own", **{"lr": 1e-2, **kw})
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        _step(model, opt, *_batch(g))
    twin, twin_opt = copy.deepcopy((model, opt))
    numel = _state_numel(twin_opt)
    report = compact(twin, twin_opt, headroom=2)
    assert set(report) == {"0", "2"}
    for name, (old, new) in report.items():
        layer = twin[int(name)]
        assert new == max(2 * layer.rank, layer.rank) < old and layer.capacity == new and layer.U.shape[1] == new
    assert _state_numel(twin_opt) < numel
    for _ in range(20):
        x, y = _batch(g)
        _step(model, opt, x, y)
        _step(twin, twin_opt, x, y)
        for a, b in ((model[0], twin[0]), (model[2], twin[2])):
            assert a.rank == b.rank < b.capacity
            for fa, fb in zip(a.factors(), b.factors()):
                torch.testing.assert_close(fa, fb, rtol=0, atol=1e-12)
        torch.testing.assert_close(model[4].weight, twin[4].weight, rtol=0, atol=1e-12)


def test_compact_keeps_frozen_layers_frozen_and_carries_masters():
    model = _model()
    model[2].requires_grad_(False)
    model = model.to(torch.bfloat16)
    opt = DLRT([p for p in model.parameters() if p.requires_grad])
    nn.functional.mse_loss(model(torch.randn(4, 40, dtype=torch.bfloat16)).float(), torch.randn(4, 8)).backward()
    opt.step()
    compact(model, opt)
    assert not any(p.requires_grad for p in model[2].parameters())
    c = model[0].capacity
    assert opt.state[model[0].U]["master"].shape == (36, c) and opt.state[model[0].S]["exp_avg_sq"].shape == (c, c)


def _snapshot(model, opt):
    return ([id(p) for g in opt.param_groups for p in g["params"]], [p.detach().clone() for p in model.parameters()],
            copy.deepcopy(opt.state_dict()))


@pytest.mark.parametrize("case", ["other_optimizer", "partial_layer", "headroom"])
def test_refused_compact_changes_nothing(case):
    model = _model()
    if case == "other_optimizer":
        opt, kw = torch.optim.SGD(model[4].parameters(), lr=0.1), {}
    elif case == "partial_layer":
        opt, kw = DLRT([model[0].U, model[0].S, model[0].V, *model[4].parameters()]), {}
        del opt.param_groups[0]["params"][2]  # V (a group edited by hand: the constructor would refuse it)
    else:
        opt, kw = DLRT(model.parameters()), dict(headroom=0.5)
    caps = [model[0].capacity, model[2].capacity]
    params = [id(p) for p in model.parameters()]
    with pytest.raises(ValueError):
        compact(model, opt, **kw)
    assert [model[0].capacity, model[2].capacity] == caps and [id(p) for p in model.parameters()] == params


def test_compact_without_an_optimizer_and_what_the_optimizer_then_says():
    model = _model()
    old = DLRT(model.parameters())
    compact(model)
    assert model[0].capacity == 12 and model[2].capacity == 10
    with pytest.raises(ValueError, match="set_capacity|fully_shard"):  # it holds the replaced parameters
        nn.functional.mse_loss(model(torch.randn(4, 40, dtype=torch.float64)), torch.randn(4, 8, dtype=torch.float64)).backward()
        old.step()


def test_compact_of_a_ddp_wrapped_model_is_refused_naming_what_to_do():
    import socket

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model = _model()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = DLRT(ddp.parameters())
        caps = [model[0].capacity, model[2].capacity]
        with pytest.raises(ValueError, match="before wrapping"):
            compact(ddp, opt)
        assert [model[0].capacity, model[2].capacity] == caps
    finally:
        dist.destroy_process_group()
