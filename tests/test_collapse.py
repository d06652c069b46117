"""CollapseMonitor, the rank-collapse bound, CollapseGuide and a quick neural-rank-collapse sweep (real MNIST)."""
import copy
import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrtrain
from lrtrain.collapse import scatter_reference
from lrtrain.collapse.analysis import dense_weight
from lrtrain.layers.factors import FactorizedMixin
from lrtrain.cli.data import batches
from lrtrain.cli.models import mlp
from lrtrain.update.spec import LayerStep
from lrtrain.rank import CollapseGuide
from lrtrain.cli.train import evaluate, ranks

K = 10
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests run many small ops: one thread is as fast, and does not collapse on a busy shared machine
    (OpenMP threads spinning against other processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sweep_module():
    spec = importlib.util.spec_from_file_location("collapse_sweep", ROOT / "benchmarks" / "collapse_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _capture(model, names):
    """Forward hooks storing each layer's input and output gradient (the reference, with embeddings)."""
    store, handles = {}, []
    for name, mod in model.named_modules():
        if name in names:
            def hook(m, inp, out, name=name):
                store[name] = [inp[0].detach()]
                if out.requires_grad:
                    out.register_hook(lambda g: store[name].append(g.detach()))
            handles.append(mod.register_forward_hook(hook))
    return store, handles


def _exact(mod, x, g, y, lam):
    """tail_K(W), ‖R‖_F and the bound B from stored embeddings, in float64 (R formed explicitly)."""
    W = dense_weight(mod).double()
    if isinstance(mod, (nn.Conv2d, lrtrain.LowRankConv2d)):
        cols = F.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride)
        P = cols.shape[2]
        X = cols.transpose(1, 2).reshape(-1, cols.shape[1]).double()
        G = g.movedim(1, -1).reshape(-1, g.shape[1]).double()
        yy = y.repeat_interleave(P)
    else:
        X, G, yy = x.reshape(x.shape[0], -1).double(), g.double(), y
    R = G.mT @ X + lam * W
    cnt = torch.bincount(yy, minlength=K).double()
    mu = torch.zeros(K, X.shape[1], dtype=torch.float64).index_add_(0, yy, X) / cnt.clamp_min(1)[:, None]
    tcv = (X - mu[yy]).square().sum()
    B = (R.norm() + torch.linalg.matrix_norm(G, 2) * tcv.sqrt()) / lam
    s = torch.linalg.svdvals(W)
    return float(s[K:].square().sum().sqrt()), float(R.norm()), float(B)


@pytest.mark.parametrize("factorized", [False, True], ids=["dense", "factorized"])
def test_bound_holds_every_step(mnist, factorized):
    lam = 1e-3
    model = mlp(784, [96, 64], K)
    if factorized:
        model = lrtrain.lowrank(model, rank=24)
        opt = lrtrain.DLRT(model.parameters(), lr=0.05, base="sgd", momentum=0.9, weight_decay=lam, tau=0.1,
                                   rank_rule="tolerance", s_direction="own")
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=lam)
    mon = lrtrain.CollapseMonitor(model, K, weight_decay=lam, spectral="exact")
    power = lrtrain.CollapseMonitor(model, K, weight_decay=lam)  # default: warm-started power iteration
    names = mon.layer_names
    assert len(names) == 3
    ratios = []
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for i, (xb, yb) in enumerate(batches(mnist.train_x[:3000], mnist.train_y[:3000], 100, gen)):
        store, handles = _capture(model, names)
        mon.set_labels(yb)
        with power.labels(yb):
            F.cross_entropy(model(xb), yb).backward()
        mon.clear_labels()
        for h in handles:
            h.remove()
        for n in names:
            ratios.append(power.batch_values(n)["grad_norm"] / mon.batch_values(n)["grad_norm"])
        if i % 3 == 0:
            mods = dict(model.named_modules())
            for n in names:
                tail, res, B = _exact(mods[n], store[n][0], store[n][1], yb, lam)
                v = mon.batch_values(n)
                assert tail <= B * (1 + 1e-6), (i, n, tail, B)
                assert v["residual"] == pytest.approx(res, rel=2e-4, abs=1e-7)
                assert v["bound"] == pytest.approx(B, rel=2e-4)
                assert tail <= v["bound"] * (1 + 1e-4)
                checked += 1
        opt.step()
        opt.zero_grad()
    assert checked == 3 * 10
    assert max(ratios) <= 1 + 1e-4 and sum(ratios) / len(ratios) > 0.9, ratios  # power: a lower estimate
    power.remove()
    s = mon.summary()
    assert all(l.residual_exact for l in s.values())
    assert s[names[0]].backward_batches == 30


def test_bound_conv_unfolded_patches(mnist):
    """Conv2d (dense and factorized): the embedding is the unfolded patch matrix, the bound is exact."""
    lam = 1e-3
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 13 * 13, K))
    model[2] = lrtrain.LowRankConv2d.from_dense(model[2], rank=6)
    mon = lrtrain.CollapseMonitor(model, K, weight_decay=lam, spectral="exact")
    store, handles = _capture(model, mon.layer_names)
    xb, yb = mnist.train_x[:32], mnist.train_y[:32]
    with mon.labels(yb):
        F.cross_entropy(model(xb), yb).backward()
    mods = dict(model.named_modules())
    for n in ("0", "2"):
        tail, res, B = _exact(mods[n], store[n][0], store[n][1], yb, lam)
        v = mon.batch_values(n)
        assert tail <= B
        assert v["bound"] == pytest.approx(B, rel=1e-3)
    assert mon.summary()["2"].rows == 32 * 13 * 13


def test_streaming_stats_match_stored_embeddings(mnist):
    model = mlp(784, [64, 64], K)
    mon = lrtrain.CollapseMonitor(model, K, nc1=True)
    store_all = {n: [] for n in mon.layer_names}
    per_batch_nc1 = {n: [] for n in mon.layer_names}
    ys = []
    model.eval()
    with torch.no_grad():
        for xb, yb in batches(mnist.train_x[:1000], mnist.train_y[:1000], 125, shuffle=False):
            store, handles = _capture(model, mon.layer_names)
            with mon.labels(yb):
                model(xb)
            for h in handles:
                h.remove()
            for n in mon.layer_names:
                x = store[n][0]
                store_all[n].append(x)
                per_batch_nc1[n].append(float(scatter_reference(x, yb, K)["nc1"]))
            ys.append(yb)
    y = torch.cat(ys)
    s = mon.summary()
    for n in mon.layer_names:
        ref = scatter_reference(torch.cat(store_all[n]), y, K)
        assert s[n].tcv == pytest.approx(float(ref["tcv"]), rel=1e-6)
        assert s[n].bcv == pytest.approx(float(ref["bcv"]), rel=1e-6)
        assert s[n].ntcv == pytest.approx(float(ref["ntcv"]), rel=1e-6)
        assert s[n].nc1 == pytest.approx(sum(per_batch_nc1[n]) / len(per_batch_nc1[n]), rel=1e-4)
        assert torch.allclose(s[n].counts, ref["counts"])
        assert torch.allclose(s[n].class_means, ref["means"], rtol=1e-5, atol=1e-5)
        assert s[n].backward_batches == 0  # no_grad: forward statistics only


def test_streaming_tcv_no_cancellation():
    """Embeddings with a huge common mean (float32): the streaming TCV keeps its digits."""
    torch.manual_seed(1)
    lin = nn.Linear(32, 4)
    mon = lrtrain.CollapseMonitor(nn.Sequential(lin), K)
    xs, ys = [], []
    with torch.no_grad():
        for _ in range(6):
            x = 1e3 + torch.randn(200, 32)  # one-pass float32 Σ‖x‖² − Σ‖S_c‖²/n_c would lose ~5% here
            y = torch.randint(0, K, (200,))
            with mon.labels(y):
                lin(x)
            xs.append(x)
            ys.append(y)
    ref = scatter_reference(torch.cat(xs), torch.cat(ys), K)
    assert mon.summary()["0"].tcv == pytest.approx(float(ref["tcv"]), rel=1e-4)


def test_remove_and_no_grad_eval(mnist):
    model = lrtrain.lowrank(mlp(784, [64, 64], K), rank=16)
    mon = lrtrain.CollapseMonitor(model, K, weight_decay=1e-3)
    xb, yb = mnist.train_x[:64], mnist.train_y[:64]
    model.eval()
    with torch.no_grad(), mon.labels(yb):
        model(xb)
    s = mon.summary()
    assert all(v.batches == 1 and v.backward_batches == 0 for v in s.values())
    assert mon.batch_values("1") is None
    with pytest.raises(ValueError):
        mon.set_labels(torch.tensor([0, K]))
    mon.remove()
    for m in model.modules():
        assert not m._forward_hooks
    for p in model.parameters():
        assert not getattr(p, "_post_accumulate_grad_hooks", None)
    model.train()
    F.cross_entropy(model(xb), yb).backward()  # still trains, nothing recorded
    assert mon.summary()["1"].batches == 1


def _step(r=20, m=50, n=40):
    U = torch.linalg.qr(torch.randn(m, r))[0]
    V = torch.linalg.qr(torch.randn(n, r))[0]
    z = lambda *s: torch.randn(*s)  # noqa: E731
    return LayerStep(U, torch.diag(torch.rand(r) + 1), V, z(m, r), z(n, r), z(m, r), z(n, r), z(r, r), max_rank=r * 2)


def test_guide_rule_branches():
    g = CollapseGuide(K, theta=0.5)
    grp = {"lr": 0.1, "base": "sgd", "momentum": 0.0, "tau": 0.1, "weight_decay": 1e-3, "min_rank": 1}
    dirs = (torch.randn(K, 50), torch.randn(K, 40))
    # certified: B ≤ τ‖W‖ -> rank cap K and K class directions
    it = _step()
    assert g.apply(it, {"bound": 0.5, "within": 100.0, "weight_norm": 10.0, "class_dirs": dirs}, grp) == "certified"
    assert it.max_rank == K and it.augment == K and torch.equal(it.G_K[:, :K], dirs[0].mT)
    assert torch.count_nonzero(it.G_K[:, K:]) == 0 and torch.equal(it.G_L[:, :K], dirs[1].mT)
    # class: η·E ≤ θ·τ‖W‖ (0.1·4 ≤ 0.5·0.1·10), rank cap untouched
    it = _step()
    assert g.apply(it, {"bound": 1e9, "within": 4.0, "weight_norm": 10.0, "class_dirs": dirs}, grp) == "class"
    assert it.max_rank == 40 and it.augment == K
    # plain: η·E too large, or AdamW, or rank ≤ K, or no class directions
    for vals, group, r in [({"within": 6.0}, grp, 20), ({"within": 1.0}, {**grp, "base": "adamw"}, 20),
                           ({"within": 1.0}, grp, K)]:
        it = _step(r=r)
        G_K = it.G_K.clone()
        assert g.apply(it, {"bound": 1e9, "weight_norm": 10.0, "class_dirs": dirs, **vals}, group) == "plain"
        assert it.augment is None and torch.equal(it.G_K, G_K) and it.max_rank == 2 * r
    assert g.apply(_step(), {"bound": 1e9, "within": 1.0, "weight_norm": 10.0}, grp) == "plain"
    # within="exact" uses the measured E_c (≤ E) when the monitor provides it
    vals = {"bound": 1e9, "within": 6.0, "within_exact": 4.0, "weight_norm": 10.0, "class_dirs": dirs}
    assert g.apply(_step(), dict(vals), grp) == "plain"
    assert CollapseGuide(K, theta=0.5, within="exact").apply(_step(), dict(vals), grp) == "class"
    # momentum raises the step gain η = lr/(1 − β)
    assert CollapseGuide.step_gain({**grp, "momentum": 0.9}) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        CollapseGuide(K, theta=0)


def test_guided_training_is_safe(mnist):
    """Guided DLRT reaches the unguided accuracy (same τ) and takes the class branch."""
    data = mnist.subset(4000, 3000)
    acc, rk = {}, {}
    _guided_vs_plain(data, acc, rk)
    dec = rk.pop("decisions")
    assert acc[True] >= acc[False] - 1.0, (acc, rk)
    assert sum(d["class"] + d["certified"] for d in dec.values()) > 0, dec
    assert all(rk[True][n] <= rk[False][n] + 8 for n in rk[True])


def _guided_vs_plain(data, acc, rk):
    for guided in (False, True):
        torch.manual_seed(0)
        model = lrtrain.lowrank(mlp(784, [96, 96], K), rank=24)
        mon = lrtrain.CollapseMonitor(model, K)
        opt = lrtrain.DLRT(model.parameters(), lr=0.05, base="sgd", momentum=0.9, weight_decay=5e-4, tau=0.1,
                           guide=mon if guided else None, rank_rule="tolerance", s_direction="own")
        gen = torch.Generator().manual_seed(0)
        for _ in range(2):
            for xb, yb in batches(data.train_x, data.train_y, 128, gen):
                with mon.labels(yb):
                    F.cross_entropy(model(xb), yb).backward()
                opt.step()
                opt.zero_grad()
        acc[guided] = evaluate(model, data.test_x, data.test_y)
        rk[guided] = ranks(model)
        if guided:
            rk["decisions"] = {n: s.guide for n, s in mon.summary().items() if s.factorized}


def test_quick_sweep_ranks_fall_with_weight_decay(mnist):
    sweep = _sweep_module()
    data = mnist.subset(2000, 1000)
    res = [sweep.sweep_point(data, lam, epochs=12, lowrank=False, lr=0.1, tau=0.05, width=64, depth=2)
           for lam in (1e-4, 3e-3, 3e-2)]
    tau_ranks = [sum(v["rank_tau"] for n, v in r["layers"].items() if n != "5") for r in res]
    num_ranks = [sum(v["rank_rel"] for n, v in r["layers"].items() if n != "5") for r in res]
    assert tau_ranks[0] > tau_ranks[1] > tau_ranks[2], tau_ranks
    assert num_ranks[0] >= num_ranks[1] >= num_ranks[2] and num_ranks[0] > num_ranks[2], num_ranks
    for r in res:  # the bound holds on the full training set too (exact, from an identity)
        for v in r["layers"].values():
            assert v["tail_K"] <= v["bound"] * (1 + 1e-6)


def _hooks(model):
    """Every forward hook and post-accumulate-grad hook on the model's modules and parameters."""
    fwd = sum(len(m._forward_hooks) for m in model.modules())
    post = sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters())
    return fwd + post


@pytest.mark.parametrize("kwargs,match", [
    (dict(layers=["1", "missing"]), r"layers: no supported Linear/Conv2d layer named \['missing'\]"),
    (dict(layers="13"), r"no supported .* named \['13'\]"),  # a str is ONE name (was: the names '1', '3')
    (dict(layers=[1]), r"layers must be a module name \(str\) or a list"),
    (dict(power_iters=0), r"power_iters must be an int >= 1"),
    (dict(power_block=True), r"power_block must be an int >= 1"),
    (dict(spectral="svd"), r"spectral must be 'power' or 'exact'"),
    (dict(every=0), r"every must be an int >= 1"),
    (dict(nc1=-1), r"nc1 must be"),
    (dict(weight_decay=float("nan")), r"weight_decay must be"),
    (dict(weight_decay=float("inf")), r"weight_decay must be"),
    (dict(exact_residual="yes"), r"exact_residual must be True or False"),
])
def test_monitor_bad_arguments_leave_no_hook(kwargs, match):
    model = lrtrain.lowrank(mlp(40, [40, 40], K), rank=4)
    with pytest.raises(ValueError, match=match):
        lrtrain.CollapseMonitor(model, K, **kwargs)
    assert _hooks(model) == 0
    assert all(not m._forward_hooks for m in model.modules())


def test_monitor_failing_while_hooking_leaves_no_hook(monkeypatch):
    """A failure after some layers were hooked (here: the third layer's hook registration) removes them."""
    model = mlp(40, [40, 40], K)
    calls = {"n": 0}
    real = torch.Tensor.register_post_accumulate_grad_hook

    def flaky(self, hook):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real(self, hook)

    monkeypatch.setattr(torch.Tensor, "register_post_accumulate_grad_hook", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        lrtrain.CollapseMonitor(model, K)
    monkeypatch.undo()
    assert _hooks(model) == 0


def test_monitor_skips_frozen_layers_and_refuses_them_by_name():
    model = mlp(40, [40, 40], K)
    model[1].requires_grad_(False)
    mon = lrtrain.CollapseMonitor(model, K)
    assert "1" not in mon.layer_names and ("1", "frozen (a weight parameter does not require grad)") in mon.skipped
    mon.remove()
    with pytest.raises(ValueError, match="'1' is frozen"):
        lrtrain.CollapseMonitor(model, K, layers=["1", "3"])
    assert _hooks(model) == 0


def _empty_batch_model(net: str, factorized: bool):
    torch.manual_seed(0)
    if net == "mlp":
        model, shape = mlp(40, [32, 32], K), (40,)
    else:
        model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 16),
                              nn.ReLU(), nn.Linear(16, K))
        shape = (1, 6, 6)
    return (lrtrain.lowrank(model, rank=4) if factorized else model), shape


@pytest.mark.parametrize("net", ["mlp", "conv"])
@pytest.mark.parametrize("factorized", [False, True], ids=["dense", "factorized"])
def test_monitor_records_nothing_for_an_empty_batch(net, factorized):
    """Issue 20 item 2: a batch of 0 samples with labels of 0 entries goes through forward and backward (and a
    no_grad forward) like any empty batch, and records nothing: every statistic equals that of a monitor that
    never saw it (was: IndexError in the output-gradient hook; a no_grad empty batch made NC1 NaN)."""
    model, shape = _empty_batch_model(net, factorized)
    seen = lrtrain.CollapseMonitor(model, K, weight_decay=1e-3, nc1=1)
    ref = lrtrain.CollapseMonitor(model, K, weight_decay=1e-3, nc1=1)
    empty_x, empty_y = torch.randn(0, *shape), torch.zeros(0, dtype=torch.long)
    for _ in range(3):
        x, y = torch.randn(16, *shape), torch.randint(0, K, (16,))
        model.zero_grad()
        with seen.labels(y), ref.labels(y):
            F.cross_entropy(model(x), y).backward()
        model.zero_grad()
        with seen.labels(empty_y):
            F.cross_entropy(model(empty_x), empty_y).backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
        with torch.no_grad(), seen.labels(empty_y):
            model(empty_x)
    a, b = seen.summary(), ref.summary()
    for name in seen.layer_names:
        sa, sb = a[name], b[name]
        assert (sa.batches, sa.backward_batches, sa.samples) == (sb.batches, sb.backward_batches, sb.samples) == (3, 3, 48)
        assert torch.equal(sa.counts, sb.counts) and torch.equal(sa.class_sums, sb.class_sums)
        for key in ("tcv", "bcv", "ntcv", "nc1", "grad_norm", "delta_norm", "within", "residual", "bound"):
            va, vb = getattr(sa, key), getattr(sb, key)
            assert math.isfinite(va) and va == vb, (name, key, va, vb)
        assert sa.last == sb.last and all(math.isfinite(v) for v in sa.last.values())
        assert seen.batch_values(name) == ref.batch_values(name)  # the latest recorded batch: the last non-empty one


def test_guided_dlrt_steps_through_empty_batches_without_a_measurement():
    """DLRT(guide=monitor) on an empty batch: the step is taken as usual (not skipped) and the guide sees no
    measurement for it (its "no_data" branch), while the non-empty batches are measured."""
    model, shape = _empty_batch_model("conv", True)
    mon = lrtrain.CollapseMonitor(model, K)
    opt = lrtrain.DLRT(model.parameters(), lr=0.05, base="sgd", momentum=0.9, weight_decay=1e-3, tau=0.1, guide=mon,
                       rank_rule="tolerance", s_direction="own")
    factorized = [n for n, m in model.named_modules() if isinstance(m, FactorizedMixin)]
    assert factorized
    for i in range(6):
        n = 0 if i % 2 else 16
        x, y = torch.randn(n, *shape), torch.randint(0, K, (n,))
        with mon.labels(y):
            F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.skipped_steps == 0
    s = mon.summary()
    for name in factorized:
        assert s[name].batches == s[name].backward_batches == 3
        assert s[name].guide["no_data"] == 3 and sum(s[name].guide.values()) == 6, s[name].guide
        assert all(math.isfinite(getattr(s[name], k)) for k in ("tcv", "nc1", "grad_norm", "residual", "bound"))


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("factorized", [False, True], ids=["dense", "factorized"])
def test_monitor_records_an_unbatched_input_as_one_sample(kind, factorized):
    """An unbatched input (Conv2d: (C, H, W); Linear: (n,)), as nn.Conv2d / nn.Linear accept it, is one sample
    labelled by one label: the same statistics as the batch of one (was: a labels/batch mismatch error, or an
    IndexError in the hook)."""
    torch.manual_seed(0)
    layer, shape = (nn.Conv2d(2, 6, 3, padding=1), (2, 5, 5)) if kind == "conv" else (nn.Linear(12, 8), (12,))
    if factorized:
        layer = (lrtrain.LowRankConv2d if kind == "conv" else lrtrain.LowRankLinear).from_dense(layer, rank=2)
    one, batched = nn.Sequential(layer), nn.Sequential(copy.deepcopy(layer))
    kw = dict(weight_decay=1e-3, nc1=1, spectral="exact")
    mon_one, mon_batched = lrtrain.CollapseMonitor(one, K, **kw), lrtrain.CollapseMonitor(batched, K, **kw)
    for _ in range(3):
        x, y = torch.randn(*shape), torch.randint(0, K, (1,))
        for model, mon, inp in ((one, mon_one, x), (batched, mon_batched, x[None])):
            with mon.labels(y):
                model(inp).square().sum().backward()
    a, b = mon_one.summary()["0"], mon_batched.summary()["0"]
    assert (a.batches, a.backward_batches, a.samples, a.rows) == (b.batches, b.backward_batches, b.samples, b.rows)
    assert a.batches == a.backward_batches == a.samples == 3
    for key in ("tcv", "nc1", "grad_norm", "residual", "bound"):
        assert getattr(a, key) == pytest.approx(getattr(b, key), rel=1e-5, abs=1e-9), key
