"""Mixed and low precision: autocast(bfloat16) through forward, backward and DLRT's step; bfloat16 /
float16 models trained through fp32 masters; optimizer checkpoints of a bfloat16 model.

All on scikit-learn's digits (lrtrain.cli.data.load_digits), small models, CPU.
"""
import copy
import io

import pytest
import torch
from torch import nn

from lrtrain import DLRT, LowRankConv2d, LowRankLinear

FACTORED = (LowRankLinear, LowRankConv2d)


def mlp():
    return nn.Sequential(nn.Flatten(), LowRankLinear(64, 64, 16, max_rank=32), nn.ReLU(),
                         LowRankLinear(64, 64, 16, max_rank=32), nn.ReLU(), nn.Linear(64, 10))


def cnn():
    return nn.Sequential(LowRankConv2d(1, 16, 3, rank=4, max_rank=9, padding=1), nn.ReLU(),
                         LowRankConv2d(16, 32, 3, rank=8, max_rank=16, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), LowRankLinear(32 * 16, 10, rank=4, max_rank=10))


MODELS = {"mlp": mlp, "cnn": cnn}


def layers(model):
    return [m for m in model.modules() if isinstance(m, FACTORED)]


def batches(data, steps, batch=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(data.train_y)
    perm = torch.randperm(n, generator=g)
    for i in range(steps):
        if (i + 1) * batch > len(perm):
            perm = torch.cat([perm, torch.randperm(n, generator=g)])
        idx = perm[i * batch:(i + 1) * batch]
        yield data.train_x[idx], data.train_y[idx]


def accuracy(model, data, dtype=torch.float32):
    with torch.no_grad():
        return (model(data.test_x.to(dtype)).argmax(1) == data.test_y).double().mean().item()


# ---------------------------------------------------------------------------------------- autocast
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_autocast_bf16_forward_backward_step(arch, digits):
    model = MODELS[arch]()
    ref = copy.deepcopy(model)
    opt = DLRT(model.parameters(), lr=0.01, tau=0.1)
    x, y = next(batches(digits, 1))

    # One forward/backward under autocast against the fp32 computation: bf16 output and fp32 gradients
    # that agree with fp32 ones to bf16 accuracy (and are not the fp32 ones bit for bit).
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = nn.functional.cross_entropy(out.float(), y)
    loss.backward()
    nn.functional.cross_entropy(ref(x), y).backward()
    assert out.dtype == torch.bfloat16
    for la, lr_ in zip(layers(model), layers(ref)):
        for role in "USV":
            g, g32 = getattr(la, role).grad, getattr(lr_, role).grad
            assert g.dtype == torch.float32
            rel = ((g - g32).norm() / g32.norm()).item()
            assert 1e-6 < rel < 5e-2, (role, rel)

    losses = []
    for x, y in batches(digits, 30):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x).float(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()  # inside the autocast region on purpose
        losses.append(loss.item())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(getattr(la, r).grad.dtype == torch.float32 for la in layers(model) for r in "USV")
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert first > 2.0 and last < 0.6 * first, (first, last)
    for la in layers(model):  # the step ran in fp32: bases orthonormal to fp32 rounding
        U = la.U[:, :la.rank]
        assert (U.mT @ U - torch.eye(la.rank)).norm() < 1e-5


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_step_inside_autocast_is_bitwise_the_step_outside(arch, backend, digits):
    a = MODELS[arch]()
    b = copy.deepcopy(a)
    oa = DLRT(a.parameters(), lr=0.02, tau=0.45, backend=backend)
    ob = DLRT(b.parameters(), lr=0.02, tau=0.45, backend=backend)
    ranks = set()
    for x, y in batches(digits, 8):
        oa.zero_grad()
        ob.zero_grad()
        nn.functional.cross_entropy(a(x), y).backward()
        for pa, pb in zip(a.parameters(), b.parameters()):
            pb.grad = pa.grad.clone()
        oa.step()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ob.step()
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert pb.dtype == torch.float32 and torch.equal(pa, pb)
        assert [la.rank for la in layers(a)] == [lb.rank for lb in layers(b)]
        ranks.add(tuple(la.rank for la in layers(a)))
    assert len(ranks) >= 2  # the ranks moved: truncation and state transport ran under the region too
    for pa, pb in zip(a.parameters(), b.parameters()):
        for key, v in oa.state[pa].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(ob.state[pb][key])), key


# ---------------------------------------------------------------------------------------- bf16 / fp16 models
def train_with_rank_phases(model, data, dtype, steps=250):
    """DLRT on digits; for the first 100 steps τ alternates 0.05 / 0.4 every 10 steps (ranks grow and
    shrink), then stays 0.05. Returns the optimizer, the losses and the ranks after every step."""
    opt = DLRT(model.parameters(), lr=0.01, tau=0.05)
    hist, losses = [], []
    for i, (x, y) in enumerate(batches(data, steps)):
        for g in opt.param_groups:
            g["tau"] = 0.4 if i < 100 and (i // 10) % 2 else 0.05
        loss = nn.functional.cross_entropy(model(x.to(dtype)).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        hist.append([la.rank for la in layers(model)])
    return opt, losses, hist


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_low_precision_model_trains_through_fp32_masters(arch, dtype, digits):
    torch.manual_seed(0)
    model = MODELS[arch]()
    ref = copy.deepcopy(model)
    model = model.to(dtype)
    storage = [p.data_ptr() for p in model.parameters()]
    opt, losses, hist = train_with_rank_phases(model, digits, dtype)
    assert opt.skipped_steps == 0
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(p.dtype == dtype for p in model.parameters())
    assert [p.data_ptr() for p in model.parameters()] == storage
    changes = [sum(a[j] != b[j] for a, b in zip(hist, hist[1:])) for j in range(len(hist[0]))]
    assert sum(changes) >= 4 and max(changes) >= 3, changes
    for la in layers(model):
        r = la.rank
        for role in "UV":
            p = getattr(la, role)
            M = opt.state[p]["master"]
            assert M.dtype == torch.float32 and M.shape == p.shape
            assert torch.equal(M.to(dtype), p)  # the parameter is its master, rounded
            Mr, Pr = M[:, :r], p.detach()[:, :r].float()
            err = (Mr.mT @ Mr - torch.eye(r)).norm().item()
            err_low = (Pr.mT @ Pr - torch.eye(r)).norm().item()
            assert err < 1e-4, (role, err)
            # the low-precision copy is orthonormal only to its own rounding: the masters are what
            # keeps the bases orthonormal across steps
            assert err < 0.05 * err_low, (role, err, err_low)
            assert not M[:, r:].any()
    acc = accuracy(model, digits, dtype)
    train_with_rank_phases(ref, digits, torch.float32)
    acc32 = accuracy(ref, digits)
    assert acc > 0.85 and acc > acc32 - 0.03, (acc, acc32)


def test_bf16_optimizer_checkpoint_keeps_fp32_masters(digits):
    torch.manual_seed(0)
    model = mlp().to(torch.bfloat16)
    opt = DLRT(model.parameters(), lr=0.01, tau=0.2)
    data = list(batches(digits, 20))

    def train(m, o, part):
        for x, y in part:
            loss = nn.functional.cross_entropy(m(x.to(torch.bfloat16)).float(), y)
            o.zero_grad()
            loss.backward()
            o.step()

    train(model, opt, data[:10])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf)

    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    model2 = mlp().to(torch.bfloat16)
    model2.load_state_dict(ck["model"])
    opt2 = DLRT(model2.parameters(), lr=0.01, tau=0.2)
    opt2.load_state_dict(ck["opt"])
    assert [l.rank for l in layers(model2)] == [l.rank for l in layers(model)]
    for p, p2 in zip(model.parameters(), model2.parameters()):
        st, st2 = opt.state[p], opt2.state[p2]
        assert st2["master"].dtype == torch.float32
        assert st2["exp_avg"].dtype == torch.float32 and st2["exp_avg_sq"].dtype == torch.float32
        for key in ("master", "exp_avg", "exp_avg_sq"):
            assert torch.equal(st[key], st2[key]), key
        # the fp32 master holds more than the bf16 parameter does
        assert not torch.equal(st2["master"], st2["master"].bfloat16().float()) or p.numel() < 8

    train(model, opt, data[10:])
    train(model2, opt2, data[10:])
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, p2)
        assert torch.equal(opt.state[p]["master"], opt2.state[p2]["master"])
