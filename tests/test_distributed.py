"""DLRT under torch.distributed: DDP and FSDP2 (``fully_shard``) train exactly like one process on the
global batch, ranks changing; FSDP1 (``FullyShardedDataParallel``) is refused.

Each test spawns 2 processes (gloo, CPU, float64, MASTER_ADDR 127.0.0.1 on a free port); each process
takes its own half of every global batch. The single-process reference runs here, in the test process,
on the whole batch (mean loss), which is what the averaged gradients of the 2 processes compute.
"""
from __future__ import annotations

import os
import socket
import tempfile
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

import lrtrain

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")

WORLD = 2
BATCH = 64  # global batch; each process takes BATCH // WORLD of it
# AdamW-DLRT from rank 24 (= capacity = max_rank): tau = 0.1 lets both 64 x 64 layers fall gradually
# (8 and 7 rank changes in 40 steps, 6 and 5 in the first 20).
HP = dict(lr=0.03, tau=0.1, rank_rule="tolerance", s_direction="own")


# ---------------------------------------------------------------------------- shared pieces
def _model() -> nn.Module:
    """MLP 64-64-64-10 (float64) with both hidden layers factorized at rank 24; the 10-wide head stays dense."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)).double()
    lrtrain.lowrank(m, rank=24, max_rank=24)
    assert [type(l).__name__ for l in m[::2]] == ["LowRankLinear", "LowRankLinear", "Linear"]
    return m


def _layers(m: nn.Module) -> list:
    return [l for l in m.modules() if isinstance(l, lrtrain.LowRankLinear)]


def _batches(n: int, steps: int) -> list:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, n, (BATCH,), generator=g) for _ in range(steps)]


def _data(digits):
    return digits.train_x.reshape(len(digits.train_x), -1).double(), digits.train_y


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _rank_changes(ranks: list) -> list:
    """Per layer, how many steps changed its rank (ranks: per step, per layer; starts before step 1)."""
    return [sum(a[i] != b[i] for a, b in zip(ranks, ranks[1:])) for i in range(len(ranks[0]))]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, port: int, out_dir: str, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if os.path.isdir("/sys/class/net/lo"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's own sockets on the loopback interface too
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    try:
        torch.save(fn(rank, *args), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(fn, *args) -> list:
    """Run ``fn(rank, *args)`` in WORLD gloo processes; returns what each returned (torch.save'd)."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_entry, args=(_free_port(), d, fn, args), nprocs=WORLD, join=True)
        return [torch.load(os.path.join(d, f"{r}.pt"), weights_only=False) for r in range(WORLD)]


def _global_mean(loss: torch.Tensor) -> float:
    t = loss.detach().clone()
    dist.all_reduce(t)
    return t.item() / WORLD


# ---------------------------------------------------------------------------- 1. DDP
def _ddp_worker(rank, X, Y, steps, hp=HP):
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)  # default arguments
    opt = lrtrain.DLRT(ddp.parameters(), **hp)  # backend="auto": the fused CPU kernels where built
    out = dict(loss=[], ranks=[[l.rank for l in _layers(model)]], params=[], data=[])
    for idx in _batches(len(X), steps):
        mine = idx.chunk(WORLD)[rank]
        out["data"].append(mine)
        loss = F.cross_entropy(ddp(X[mine]), Y[mine])
        opt.zero_grad()
        loss.backward()
        opt.step()
        out["loss"].append(_global_mean(loss))
        out["ranks"].append([l.rank for l in _layers(model)])
        out["params"].append(_flat(model.parameters()))
    out["state"] = _flat(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    out["dense"] = [l.dense_weight().detach() for l in _layers(model)]
    return out


def _reference(X, Y, steps, poison=None, **hp):
    """One process on the global batches. ``poison``: {step: [(param name, index)]} set to NaN in .grad."""
    model = _model()
    opt = lrtrain.DLRT(model.parameters(), **hp)
    named = dict(model.named_parameters())
    out = dict(loss=[], ranks=[[l.rank for l in _layers(model)]], params=[])
    for t, idx in enumerate(_batches(len(X), steps)):
        loss = F.cross_entropy(model(X[idx]), Y[idx])
        opt.zero_grad()
        loss.backward()
        for name, where in (poison or {}).get(t, []):
            named[name].grad[where] = float("nan")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            opt.step()
        out["loss"].append(loss.item())
        out["ranks"].append([l.rank for l in _layers(model)])
        out["params"].append(_flat(model.parameters()))
    out["named"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    out["dense"] = [l.dense_weight().detach() for l in _layers(model)]
    out["skipped"] = opt.skipped_steps
    return out


def test_ddp_replicas_bitwise_identical_and_equal_to_one_process(digits):
    X, Y = _data(digits)
    steps = 40
    r0, r1 = _spawn(_ddp_worker, X, Y, steps)
    ref = _reference(X, Y, steps, **HP)

    # the two processes saw different data at every step
    assert all(not torch.equal(a, b) for a, b in zip(r0["data"], r1["data"]))
    # replicas: bitwise identical parameters after every step, same ranks, same optimizer state
    for t in range(steps):
        assert torch.equal(r0["params"][t], r1["params"][t]), f"replicas differ after step {t + 1}"
    assert r0["ranks"] == r1["ranks"]
    assert torch.equal(r0["state"], r1["state"])
    # ranks fell step by step, at least 3 changes per layer, identical to the single process
    changes = _rank_changes(r0["ranks"])
    assert min(changes) >= 3, changes
    assert r0["ranks"] == ref["ranks"]
    assert all(r[i] < 24 for r in r0["ranks"][-1:] for i in range(2))
    # equal to one process on the global batch, at every step
    dp = max((a - b).abs().max().item() for a, b in zip(r0["params"], ref["params"]))
    dl = max(abs(a - b) for a, b in zip(r0["loss"], ref["loss"]))
    dw = max((a - b).abs().max().item() for a, b in zip(r0["dense"], ref["dense"]))
    assert dp <= 1e-5 and dl <= 1e-5 and dw <= 1e-5, (dp, dl, dw)
    assert sum(ref["loss"][-5:]) / 5 < 0.5 * ref["loss"][0]  # it trained
    print(f"DDP: rank changes {changes}, final ranks {r0['ranks'][-1]}, max |params - ref| {dp:.2e}, "
          f"|loss - ref| {dl:.2e}, |W - ref| {dw:.2e}")


# ---------------------------------------------------------------------------- 2. FSDP2
# NaN put into one gradient entry on rank 1's shard only (rank 1: gloo's MAX all-reduce would drop it):
# the dense head's weight (a plain DTensor param) at step 5 and layer 2's V (a factor) at step 8, by
# (parameter name, index in rank 1's local shard); the reference poisons the same global entries.
POISON = {5: [("4.weight", (0, 3))], 8: [("2.V", (1, 2))]}


def _fsdp2_worker(rank, X, Y, steps, hp, poison):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from lrtrain.optim.params import find_layers

    mesh = init_device_mesh("cpu", (WORLD,))
    model = _model()
    for m in model:
        if any(True for _ in m.parameters()):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    assert all(isinstance(getattr(l, r), DTensor) for l in _layers(model) for r in "USV")
    # fully_shard replaced the factors by DTensor parameters; they are linked to their layers as well
    assert find_layers(model.parameters())[0] == _layers(model)
    named = dict(model.named_parameters())
    opt = lrtrain.DLRT(model.parameters(), **hp)
    out = dict(loss=[], ranks=[[l.rank for l in _layers(model)]], params=[], warned=0)
    for t, idx in enumerate(_batches(len(X), steps)):
        mine = idx.chunk(WORLD)[rank]
        loss = F.cross_entropy(model(X[mine]), Y[mine])
        opt.zero_grad()
        loss.backward()
        if rank == 1:
            for name, where in poison.get(t, []):
                named[name].grad.to_local()[where] = float("nan")
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always", RuntimeWarning)
            opt.step()
        out["warned"] += sum("non-finite" in str(x.message) for x in w)
        out["loss"].append(_global_mean(loss))
        out["ranks"].append([l.rank for l in _layers(model)])
        out["params"].append(_flat(p.full_tensor() for p in model.parameters()))
    out["named"] = {n: p.full_tensor() for n, p in model.named_parameters()}
    out["dense"] = [l.dense_weight().full_tensor() for l in _layers(model)]
    out["skipped"] = opt.skipped_steps
    out["local_shapes"] = {n: tuple(p.to_local().shape) for n, p in model.named_parameters()}
    return out


def _global_poison(poison, shapes):
    """Rank 1's local indices -> global indices (Shard(0): rank 1's rows start at ceil(rows / WORLD))."""
    return {t: [(n, (i + -(-shapes[n][0] // WORLD),) + tuple(rest)) for n, (i, *rest) in lst]
            for t, lst in poison.items()}


def test_ddp_with_the_importance_rule_decides_alike_everywhere(digits):
    """The importance rule (non-prefix selections from moments of all-reduced gradients): replicas
    bitwise identical after every step, with the ranks and the parameters of one process on the global batches."""
    X, Y = _data(digits)
    steps, hp = 20, dict(lr=0.03, tau=0.3)  # the importance rule at a coarse tolerance: the ranks fall
    r0, r1 = _spawn(_ddp_worker, X, Y, steps, hp)
    ref = _reference(X, Y, steps, **hp)
    for t in range(steps):
        assert torch.equal(r0["params"][t], r1["params"][t]), f"replicas differ after step {t + 1}"
    assert r0["ranks"] == r1["ranks"] == ref["ranks"]
    assert torch.equal(r0["state"], r1["state"])
    assert min(_rank_changes(r0["ranks"])) >= 1, r0["ranks"]
    dp = max((a - b).abs().max().item() for a, b in zip(r0["params"], ref["params"]))
    assert dp <= 1e-8, dp


@pytest.mark.parametrize("hp", [dict(HP, weight_decay=0.01),
                                dict(lr=0.03, tau=0.35, base="sgd", momentum=0.9, nesterov=True, weight_decay=1e-3, refresh=3,
                                         rank_rule="tolerance", s_direction="own")],
                         ids=["adamw", "sgd-nesterov-refresh3"])
def test_fsdp2_fully_shard_matches_one_process(digits, hp):
    X, Y = _data(digits)
    steps = 20
    r0, r1 = _spawn(_fsdp2_worker, X, Y, steps, hp, POISON)
    shapes = {n: tuple(p.shape) for n, p in r0["named"].items()}
    ref = _reference(X, Y, steps, poison=_global_poison(POISON, shapes), **hp)

    assert r0["local_shapes"]["0.U"] == (32, 24) and r0["local_shapes"]["0.S"] == (12, 24)  # really sharded
    # both poisoned steps were caught on BOTH ranks (the NaN sat on rank 1's shard only): the head's step 5
    # and layer 2's step 8 skipped, as in the reference; nothing non-finite reached the parameters
    assert r0["skipped"] == r1["skipped"] == ref["skipped"] == 2
    assert r0["warned"] >= 2 and r1["warned"] >= 2
    assert all(torch.isfinite(p).all() for p in r0["params"])
    for t in range(steps):
        assert torch.equal(r0["params"][t], r1["params"][t]), f"ranks' gathered parameters differ after step {t + 1}"
    assert r0["ranks"] == r1["ranks"] == ref["ranks"]
    changes = _rank_changes(r0["ranks"])
    assert min(changes) >= 3, changes
    dl = max(abs(a - b) for a, b in zip(r0["loss"], ref["loss"]))
    dp = max((a - b).abs().max().item() for a, b in zip(r0["params"], ref["params"]))
    dw = max((a - b).abs().max().item() for a, b in zip(r0["dense"], ref["dense"]))
    assert dl <= 1e-4 and dp <= 1e-4 and dw <= 1e-4, (dl, dp, dw)
    for n, p in ref["named"].items():
        assert torch.allclose(r0["named"][n], p, rtol=0, atol=1e-4), n
    print(f"FSDP2 {hp.get('base', 'adamw')}: rank changes {changes}, final ranks {r0['ranks'][-1]}, "
          f"|loss - ref| {dl:.2e}, |params - ref| {dp:.2e}, |W - ref| {dw:.2e}")


# ---------------------------------------------------------------------------- 3. FSDP1 refused
def _fsdp1_worker(rank, X, Y):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    cases = {"flat": dict(use_orig_params=False),
             "flat-no-shard": dict(use_orig_params=False, sharding_strategy=ShardingStrategy.NO_SHARD),
             "orig": dict(use_orig_params=True),
             "orig-no-shard": dict(use_orig_params=True, sharding_strategy=ShardingStrategy.NO_SHARD)}
    out = {}
    for name, kw in cases.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # NO_SHARD is deprecated
            model = FSDP(_model(), device_id=torch.device("cpu"), **kw)
        mine = torch.arange(rank, BATCH, WORLD)
        F.cross_entropy(model(X[mine]), Y[mine]).backward()  # FSDP1 itself works; gradients are there
        params = list(model.parameters())
        before = [p.detach().clone() for p in params] + [p.grad.clone() for p in params if p.grad is not None]
        res = dict(shapes=[tuple(p.shape) for p in params])
        try:
            lrtrain.DLRT(params, **HP)
            res["init"] = None
        except ValueError as e:
            res["init"] = str(e)
        # a DLRT already training other parameters refuses the group and keeps nothing of it
        other = nn.Linear(4, 2).double()
        opt = lrtrain.DLRT(other.parameters(), **HP)
        try:
            opt.add_param_group({"params": params})
            res["add"] = None
        except ValueError as e:
            res["add"] = str(e)
        res["groups"] = len(opt.param_groups)
        after = [p.detach() for p in params] + [p.grad for p in params if p.grad is not None]
        res["unchanged"] = len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))
        other(torch.ones(3, 4, dtype=torch.float64)).sum().backward()
        w = other.weight.detach().clone()
        opt.step()  # still a working optimizer
        res["other_stepped"] = not torch.equal(w, other.weight)
        out[name] = res
    return out


def test_fsdp1_is_refused_before_anything_changes(digits):
    X, Y = _data(digits)
    for r in _spawn(_fsdp1_worker, X, Y):
        assert set(r) == {"flat", "flat-no-shard", "orig", "orig-no-shard"}
        # what FSDP1 hands the optimizer: one flat 1-D parameter, or 1-D shards (empty on rank 1's side
        # where a tensor lies in rank 0's half), or, without sharding, views of the original shapes
        assert all(len(s) == 1 for s in r["flat"]["shapes"])
        assert (64, 24) in r["orig-no-shard"]["shapes"]
        for name, res in r.items():
            for msg in (res["init"], res["add"]):
                assert msg is not None, f"{name}: DLRT accepted FSDP1 parameters"
                assert "FSDP1" in msg and "fully_shard" in msg and "use_orig_params" in msg, msg
            assert ("use_orig_params=False" if name.startswith("flat") else "use_orig_params=True") in res["init"]
            assert res["unchanged"], name
            assert res["groups"] == 1 and res["other_stepped"], name


# ---------------------------------------------------------------------------- 4. FSDP2 after the optimizer
def _fsdp2_late_worker(rank, X, Y):
    """DLRT built before fully_shard holds the replaced parameters: its first step refuses, changing nothing."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model()
    opt = lrtrain.DLRT(model.parameters(), **HP)
    fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
    mine = torch.arange(rank, BATCH, WORLD)
    F.cross_entropy(model(X[mine]), Y[mine]).backward()
    before = [p.detach().full_tensor().clone() for p in model.parameters()]
    try:
        opt.step()
        msg = None
    except ValueError as e:
        msg = str(e)
    after = [p.detach().full_tensor() for p in model.parameters()]
    return dict(msg=msg, unchanged=all(torch.equal(a, b) for a, b in zip(before, after)), state=len(opt.state))


def test_fsdp2_after_the_optimizer_is_refused_at_the_first_step(digits):
    X, Y = _data(digits)
    for r in _spawn(_fsdp2_late_worker, X, Y):
        assert r["msg"] is not None and "fully_shard" in r["msg"] and "nothing was updated" in r["msg"], r["msg"]
        assert r["unchanged"] and r["state"] == 0
