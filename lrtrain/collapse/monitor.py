"""CollapseMonitor: streaming neural-collapse statistics and the rank-collapse bound, per layer.

For a layer z = W x + b (W: m × n; Conv2d: W is the kernel reshaped to out × in·kh·kw) and one batch:

* embeddings x_j: the layer's inputs, one row per sample (Linear, Hugging Face Conv1D; inputs with extra
  leading dims (N, T, n) give N·T rows, each labelled with its sample's class) or one row per output
  position (Conv2d: the unfolded input patches, ``F.unfold``, each labelled with its image's class — the
  matrix the convolution multiplies by W, so z_j = W x_j + b holds row by row); each layer kind says
  which (:meth:`lrtrain.layers.kinds.LayerKind.embed`);
* output gradients g_j = ∂L/∂z_j of the scalar L that was backpropagated, stacked into G (rows × m).
  With L the mean loss over the N samples of the batch, the paper's per-sample gradients are
  δ_j = N·g_j, i.e. Δ = N·G and (1/N)‖Δ‖₂ = ‖G‖₂;
* R = ∂/∂W [L + (λ/2)‖W‖_F²] = Σ_j g_j x_jᵀ + λW  (= (1/N) Σ_j δ_j x_jᵀ + λW).

With μ_c the batch class means of the embeddings, λW = R − Σ_c (Σ_{j∈c} g_j) μ_cᵀ − Σ_j g_j (x_j − μ_{c(j)})ᵀ;
the middle term has rank ≤ K, so for every batch

    tail_K(W) := (Σ_{i>K} σ_i(W)²)^{1/2} ≤ B := ( ‖R‖_F + ‖G‖₂ · TCV^{1/2} ) / λ            (1)
    tail_K(G_W) ≤ E := ‖G‖₂ · TCV^{1/2}      (G_W = Σ_j g_j x_jᵀ, the data gradient)           (2)

with TCV = Σ_j ‖x_j − μ_{c(j)}‖² of this batch.

What is measured, per layer and batch (no embeddings are kept; the work is O(rows × width) plus
O(rows × width × K) for NC1):

* forward hook: class counts and sums, TCV_b (centred on the batch's class means, no cancellation),
  merged into float64 running class statistics (:class:`~lrtrain.collapse.stats.ClassStats`: pooled TCV,
  BCV, ν = TCV/(TCV+BCV)); the batch's NC1 = tr(Σ_W Σ_B⁺)/K (every ``nc1``-th batch);
* output-gradient hook (a tensor hook on the layer output, registered only when it requires grad, so
  ``torch.no_grad`` evaluation records the forward statistics only): ‖G‖₂
  (:class:`~lrtrain.collapse.spectral.SpectralNorm`);
* factorized layers: the class sums of the output gradients Σ_{j∈c} g_j (K × m), which with the class
  means of the inputs span the rank-K term (used by the guide to choose augmentation directions);
* post-accumulate-grad hooks on the weight: dense layers ‖G_W‖_F², ⟨G_W, W⟩, ‖W‖_F² from ``weight.grad``
  (so ‖R‖_F is exact: ‖R‖² = ‖G_W‖² + 2λ⟨G_W, W⟩ + λ²‖W‖²); factorized layers (DLRT gradients, see
  :mod:`lrtrain.layers.factors`: U.grad = G_W V, V.grad = G_Wᵀ U, S.grad = Uᵀ G_W V): ⟨G_W, W⟩ = ⟨G_S, S⟩,
  ‖W‖ = ‖S‖, and ‖G_W‖_F² exactly from X and G in the output-gradient hook (``exact_residual=True``, the
  default: ⟨XXᵀ, GGᵀ⟩, no m × n matrix), or with ``exact_residual=False`` the tangent part
  ‖G_K‖² + ‖G_L‖² − ‖G_S‖² plus the bound ‖(I−UUᵀ) G_W (I−VVᵀ)‖_F ≤ ‖G‖₂ ‖X‖_F for the part the factor
  gradients do not see (‖R‖_F then over-estimated, B still a bound; ``residual_exact`` False).
  ``.grad`` is read as accumulated: zero the gradients every batch.

Running values are averages over the batches since :meth:`CollapseMonitor.reset` (pooled for the
class statistics). Labels: ``monitor.set_labels(y)`` before the forward pass, or
``with monitor.labels(y): ...``; forward passes without labels are not recorded, and neither is an empty
batch (0 samples with 0 labels, or samples without rows): it trains as usual and leaves every statistic as it
was (DLRT's guide sees no measurement for that step). An unbatched input (Linear: (n,), Conv2d: (C, H, W))
is one sample, labelled by a label tensor of one entry.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..layers.factors import FactorizedMixin
from ..layers.kinds import kind_of
from ..validation import flag, integer, real
from .spectral import SpectralNorm
from .stats import ClassStats, check_labels, nc1_from_terms, nc1_terms, one_hot

__all__ = ["CollapseMonitor", "LayerCollapse"]

NOT_A_LAYER = "not a Linear / Conv2d layer"


def unmonitored(mod: nn.Module) -> str | None:
    """Why the collapse measurements do not cover ``mod``; None for a layer of a layer kind (dense or factorized)
    they do cover: NOT_A_LAYER for other modules, the kind's refusal for a dense layer (a Conv2d must be
    ungrouped with numeric zero padding: its unfolded patches are its inputs)."""
    kind = kind_of(mod)
    if kind is None:
        return NOT_A_LAYER
    return None if isinstance(mod, FactorizedMixin) else kind.refusal(mod)


def _weights(mod: nn.Module) -> list:
    """The parameters whose gradients the monitor hooks: U, S, V (factorized) or weight."""
    return [getattr(mod, r) for r in (("U", "S", "V") if isinstance(mod, FactorizedMixin) else ("weight",))]


@dataclass
class LayerCollapse:
    """Collapse statistics of one layer (see the module docstring for the definitions).

    Pooled over all recorded batches: ``counts`` (K,), ``class_sums`` (K, d), ``class_means`` (K, d),
    ``tcv``, ``bcv``, ``ntcv``. Averages over the recorded batches: ``nc1`` (per-batch NC1), ``grad_norm``
    (‖G‖₂), ``delta_norm`` (‖Δ‖₂ = N‖G‖₂), ``within`` (E of (2)), ``residual`` (‖R‖_F), ``bound`` (B of (1)).
    ``last``: the same per-batch quantities of the most recent batch with a backward pass.
    """

    name: str
    kind: str  # the embedding: "linear" (the input's rows) or "conv" (unfolded patches)
    factorized: bool
    in_dim: int
    out_dim: int
    batches: int
    backward_batches: int
    samples: int
    rows: int
    counts: torch.Tensor
    class_sums: torch.Tensor
    class_means: torch.Tensor
    tcv: float
    bcv: float
    ntcv: float
    nc1: float
    grad_norm: float
    delta_norm: float
    within: float
    residual: float
    bound: float
    residual_exact: bool
    weight_decay: float | None
    last: dict = field(default_factory=dict)
    guide: dict = field(default_factory=dict)


class _Record:
    """What one layer measured on one batch (no embeddings: K × d class sums, K × K NC1 terms, scalars)."""

    __slots__ = ("bid", "n", "rows", "counts", "sums", "tcv", "x_fro2", "nc1_A", "nc1_G", "gspec", "pieces", "grad",
                 "done", "X", "dev", "onehot", "gsums", "gw2", "wc2")

    def __init__(self, bid, n, rows, counts, sums, tcv, x_fro2, nc1_A, nc1_G):
        self.bid, self.n, self.rows, self.counts, self.sums = bid, n, rows, counts, sums
        self.tcv, self.x_fro2, self.nc1_A, self.nc1_G = tcv, x_fro2, nc1_A, nc1_G
        self.gspec = None
        self.pieces: dict = {}
        self.grad = None  # (‖G_W‖² or its tangent part, ⟨G_W, W⟩, ‖W‖²) once all weight gradients are in
        self.done = False
        self.X = None  # factorized + exact residual: the batch's embedding, held only until its backward hook
        self.onehot = None  # (rows, K) labels of the rows (shared, cached per batch)
        self.gsums = None  # (K, m) class sums of the output gradients, Σ_{j∈c} g_j
        self.gw2 = None  # factorized + exact residual: ‖G_W‖_F² of this batch
        self.dev = None  # factorized + exact residual: X − μ_{c(j)}, held until the backward hook
        self.wc2 = None  # factorized + exact residual: ‖Σ_j g_j (x_j − μ_{c(j)})ᵀ‖_F² (≤ E²)


def _batch_values(gspec, tcv, x_fro2, n, grad, lam):
    """Per-batch quantities (vectorized over batches): see the module docstring.

    gspec, tcv, x_fro2, n: (B,); grad: (B, 3) = (g2 base, ⟨G_W, W⟩, ‖W‖²), g2 base = ‖G_W‖² (dense) or the
    tangent part ‖G_K‖² + ‖G_L‖² − ‖G_S‖² (factorized, then x_fro2 carries ‖X‖_F², else 0).
    """
    g2 = grad[:, 0] + gspec.square() * x_fro2
    within = gspec * tcv.clamp_min(0).sqrt()
    out = {"grad_norm": gspec, "delta_norm": gspec * n, "within": within, "tcv": tcv,
           "weight_norm": grad[:, 2].sqrt(), "data_grad_norm": g2.clamp_min(0).sqrt()}
    if lam is not None:
        out["residual"] = (g2 + 2.0 * lam * grad[:, 1] + lam * lam * grad[:, 2]).clamp_min(0).sqrt()
        out["bound"] = (out["residual"] + within) / lam if lam > 0 else torch.full_like(within, math.inf)
    return out


def _data_grad_sq(X: torch.Tensor, D: torch.Tensor, G: torch.Tensor):
    """(‖GᵀX‖_F², ‖GᵀD‖_F²) for X, D (rows, n), G (rows, m): ‖G_W‖_F² and the squared norm of the
    within-class part of G_W (D = X − class means), by the cheaper of ⟨XXᵀ, GGᵀ⟩ (rows²·(m+n)) and
    forming GᵀX (rows·m·n); float32 or wider."""
    dt = torch.promote_types(X.dtype, torch.float32)
    X, D, G = X.to(dt), D.to(dt), G.to(dt)
    rows, n = X.shape
    m = G.shape[1]
    if rows * (m + 2 * n) <= 2 * m * n:
        GG = G @ G.mT
        return ((X @ X.mT) * GG).sum(), ((D @ D.mT) * GG).sum()
    return (G.mT @ X).square().sum(), (G.mT @ D).square().sum()


class _Layer:
    def __init__(self, monitor, name: str, module: nn.Module):
        self.monitor, self.name, self.module = monitor, name, module
        self.factorized = isinstance(module, FactorizedMixin)
        self.layer_kind = kind_of(module)
        if self.factorized:
            self.out_dim, self.in_dim = module.U.shape[0], module.V.shape[0]
        else:
            self.out_dim, self.in_dim = self.layer_kind.weight_matrix(module).shape
        self.spectral = SpectralNorm(monitor.spectral, monitor.power_iters, monitor.power_block)
        self.roles = ("U", "S", "V") if self.factorized else ("weight",)
        self.record: _Record | None = None
        self.reset()
        self.guide_counts = {"certified": 0, "class": 0, "plain": 0, "no_data": 0}
        self.handles = []
        try:
            self.handles.append(module.register_forward_hook(self._make_forward(monitor)))
            for role in self.roles:
                p = getattr(module, role)
                self.handles.append(p.register_post_accumulate_grad_hook(self._make_param_hook(monitor, role)))
        except BaseException:  # no half-hooked layer
            for h in self.handles:
                h.remove()
            raise

    def reset(self):
        self.stats: ClassStats | None = None
        self.pending: list = []
        self.batches = self.bwd_batches = self.samples = self.rows = 0
        z = lambda: torch.zeros((), dtype=torch.float64)  # noqa: E731
        self.sums = {k: z() for k in ("nc1", "grad_norm", "delta_norm", "within", "residual", "bound")}
        self.n_nc1 = 0
        self.n_bound = 0
        self.last_record: _Record | None = None

    # ------------------------------------------------------------------ hooks
    def _make_forward(self, monitor):
        def hook(module, inputs, output):
            lab = monitor._labels
            if lab is None or not monitor.enabled or (self.record is not None and self.record.bid == monitor._bid):
                return  # no labels, or this layer already recorded this batch (labels cover one forward)
            if monitor._bid % monitor.every:
                return
            x = inputs[0].detach()
            # an unbatched input (Linear: (n,), Conv2d: (C, H, W)) is one sample, its output gradient too
            unbatched = x.dim() == (3 if self.layer_kind.embedding == "conv" else 1)
            if unbatched:
                x = x[None]
            if x.shape[0] != lab.shape[0]:
                raise ValueError(f"CollapseMonitor: labels have {lab.shape[0]} entries but layer {self.name!r} "
                                 f"received a batch of {x.shape[0]}; call set_labels with this batch's labels")
            if lab.shape[0] == 0:
                return  # an empty batch: nothing to measure, nothing recorded (no hook on its backward)
            X, per = self.layer_kind.embed(self.module, x)
            if X.shape[0] == 0:
                return  # samples without rows (a Linear input (N, 0, n)): nothing to measure either
            onehot, counts, inv = monitor._onehot(X.dtype, per)
            sums = onehot.mT @ X
            means = sums * inv[:, None]
            dev = torch.addmm(X, onehot, means, alpha=-1.0)
            flat = dev.reshape(-1)
            tcv = flat @ flat
            A = G = None
            if monitor.nc1 and self.batches % monitor.nc1 == 0:
                A, G = nc1_terms(dev, means, counts)
            x_fro2 = None
            backward = isinstance(output, torch.Tensor) and output.requires_grad
            if self.factorized and not monitor.exact_residual:
                xf = X.reshape(-1)
                x_fro2 = xf @ xf
            self._finish()
            self.record = rec = _Record(monitor._bid, lab.shape[0], X.shape[0], counts, sums, tcv, x_fro2, A, G)
            rec.onehot = onehot
            if backward and self.factorized and monitor.exact_residual:
                rec.X, rec.dev = X, dev  # dropped in _on_grad (autograd keeps X for the backward anyway)
            self.batches += 1
            self.samples += lab.shape[0]
            self.rows += X.shape[0]
            if backward:
                output.register_hook(lambda g: self._on_grad(g[None] if unbatched else g, rec))

        return hook

    def _on_grad(self, g: torch.Tensor, rec: _Record):
        g = g.detach()
        G = self.layer_kind.output_rows(g)
        rec.gspec = self.spectral(G)
        if self.factorized and rec.onehot is not None and rec.onehot.shape[0] == G.shape[0]:
            rec.gsums = rec.onehot.to(G.dtype).mT @ G  # (K, m): the column space of the rank-K term (guide)
        X, dev, rec.X, rec.dev = rec.X, rec.dev, None, None
        if X is not None:
            rec.gw2, rec.wc2 = _data_grad_sq(X, dev, G)
            self._complete(rec)

    def _make_param_hook(self, monitor, role: str):
        def hook(p):
            rec = self.record
            if rec is None or rec.done or rec.bid != monitor._bid or p.grad is None or not monitor.enabled:
                return
            g = p.grad.detach().reshape(-1)
            if role in ("U", "V"):
                rec.pieces[role] = g @ g
            else:
                w = p.detach().reshape(-1)
                rec.pieces[role] = torch.stack([g @ g, g @ w, w @ w])
            self._complete(rec)

        return hook

    def _complete(self, rec: _Record) -> None:
        """Set ``rec.grad`` once every piece of ‖R‖ is in (weight gradients, and ‖G_W‖² if measured)."""
        if rec.grad is not None or len(rec.pieces) != len(self.roles):
            return
        pc = rec.pieces
        if not self.factorized:
            rec.grad = pc["weight"].double()
        elif self.monitor.exact_residual:  # ‖G_W‖² from the output hook; ⟨G_W, W⟩ = ⟨G_S, S⟩, ‖W‖ = ‖S‖
            if rec.gw2 is not None:
                rec.grad = torch.stack([rec.gw2.double(), pc["S"][1].double(), pc["S"][2].double()])
        else:  # tangent part of ‖G_W‖²: ‖G_K‖² + ‖G_L‖² − ‖G_S‖² (the rest is bounded via ‖G‖₂‖X‖_F)
            base = pc["U"] + pc["V"] - pc["S"][0]
            rec.grad = torch.stack([base, pc["S"][1], pc["S"][2]]).double()

    # ------------------------------------------------------------------ per-batch values
    def values(self, rec: _Record, lam: float | None) -> dict | None:
        """Per-batch ‖G‖₂, ‖Δ‖₂, E, TCV, ‖W‖_F, ‖G_W‖_F, ‖R‖_F, B of ``rec``; None if incomplete."""
        if rec is None or rec.gspec is None or rec.grad is None:
            return None
        d = torch.float64
        xf = rec.x_fro2.to(d) if rec.x_fro2 is not None else torch.zeros((), dtype=d)
        v = _batch_values(rec.gspec.to(d)[None], rec.tcv.to(d)[None], xf[None],
                          torch.tensor([float(rec.n)], dtype=d), rec.grad[None], lam)
        out = {k: t[0] for k, t in v.items()}
        if rec.wc2 is not None:
            out["within_exact"] = rec.wc2.to(d).clamp_min(0).sqrt()
        return out

    def _finish(self):
        """Queue the current batch record for the running statistics (once)."""
        rec = self.record
        if rec is None or rec.done:
            return
        rec.done = True
        rec.X = rec.dev = rec.onehot = None  # a forward pass whose backward never came must not pin its input
        self.pending.append(rec)
        if len(self.pending) >= 64:
            self.flush()

    def flush(self):
        """Fold the queued batch records into the running statistics, vectorized over batches."""
        lam = self.monitor.weight_decay
        recs, self.pending = self.pending, []
        if not recs:
            return
        d = torch.float64
        if self.stats is None:
            self.stats = ClassStats(self.monitor.num_classes, self.in_dim, device=recs[0].sums.device)
        self.stats.add(torch.stack([r.sums for r in recs]), torch.stack([r.counts for r in recs]),
                       torch.stack([r.tcv for r in recs]))
        with_nc1 = [r for r in recs if r.nc1_A is not None]
        if with_nc1:
            nc1 = nc1_from_terms(torch.stack([r.nc1_A for r in with_nc1]), torch.stack([r.nc1_G for r in with_nc1]),
                                 torch.tensor([float(r.rows) for r in with_nc1], dtype=d, device=with_nc1[0].nc1_A.device),
                                 torch.stack([r.counts for r in with_nc1]))
            self.sums["nc1"] += nc1.sum().cpu()
            self.n_nc1 += len(with_nc1)
        full = [r for r in recs if r.gspec is not None and r.grad is not None]
        if not full:
            return
        zero = torch.zeros((), dtype=d, device=full[0].grad.device)
        v = _batch_values(torch.stack([r.gspec.to(d) for r in full]), torch.stack([r.tcv.to(d) for r in full]),
                          torch.stack([r.x_fro2.to(d) if r.x_fro2 is not None else zero for r in full]),
                          torch.tensor([float(r.n) for r in full], dtype=d, device=zero.device),
                          torch.stack([r.grad for r in full]), lam)
        self.bwd_batches += len(full)
        for key in ("grad_norm", "delta_norm", "within"):
            self.sums[key] += v[key].sum().cpu()
        if "bound" in v:
            self.sums["residual"] += v["residual"].sum().cpu()
            self.sums["bound"] += v["bound"].sum().cpu()
            self.n_bound += len(full)
        self.last_record = full[-1]


class CollapseMonitor:
    """Per-layer within-class variability, ‖Δ‖ and the rank-collapse bound, measured during training.

    Args:
        model: the module whose layers of a layer kind (:mod:`lrtrain.layers.kinds`: nn.Linear, nn.Conv2d,
            Hugging Face Conv1D, and the factorized LowRankLinear / LowRankConv2d) are watched (Conv2d: groups = 1,
            zero, numeric padding; a refused layer of a known kind is listed in ``skipped``).
        num_classes: K >= 2.
        weight_decay: λ >= 0 of the objective L + (λ/2)‖W‖² used for ‖R‖ and the bound in
            :meth:`summary`; None: taken from the optimizer's param group the first time DLRT calls
            :meth:`adjust` (bound reported as NaN until known).
        layers: optional qualified module names to watch (a str is one name; default: all supported layers,
            frozen ones — a weight that does not require grad — listed in ``skipped``). Every argument is
            checked before any hook is registered: a refused construction leaves the model without hooks.
        nc1: compute NC1 on every ``nc1``-th recorded batch of each layer (True or 1: every batch; False or
            0: never; default 4 — it is a secondary metric, and its K × K float64 work is a large part of
            the monitor's cost on small layers). The reported NC1 is the average over those batches.
        every: measure every ``every``-th labelled batch (1: all) — the running averages stay unbiased
            and the overhead drops by that factor.
        spectral: "power" (warm-started power iteration, the default) or "exact" (small Gram + eigvalsh)
            for ‖G‖₂; power_iters, power_block: its iterations and block size
            (see :mod:`lrtrain.collapse.spectral` for cost and measured accuracy).
        guide: the rank rule used by :meth:`adjust` (default ``CollapseGuide(num_classes)``).
        exact_residual: factorized layers only (dense layers are always exact). True (default): ‖G_W‖_F² of
            the batch exactly, as ⟨XXᵀ, GGᵀ⟩ (O(rows²·(m+n))) or ‖GᵀX‖² (O(rows·m·n)), whichever is cheaper,
            in the output-gradient hook (the input x is held until then; autograd holds it anyway).
            False: the cheaper tangent part plus the bound ‖G‖₂‖X‖_F for the rest (‖R‖_F, B over-estimated).

    A refused argument raises ValueError naming it and its allowed values (the shared checkers of
    :mod:`lrtrain.validation`).

    Use ``opt = lrtrain.DLRT(..., guide=monitor)`` to let the measured bound steer the ranks
    (:mod:`lrtrain.rank.guided`). ``monitor.remove()`` detaches every hook.
    """

    def __init__(self, model: nn.Module, num_classes: int, weight_decay: float | None = None, layers=None,
                 nc1: int = 4, every: int = 1, spectral: str = "power", power_iters: int = 3, power_block: int = 1,
                 guide=None, exact_residual: bool = True):
        # Every argument is checked, and the layers to watch are found, before any hook is registered.
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        # The shared checkers (lrtrain.validation), ValueError for every refusal as before (type_error off).
        num_classes = integer("num_classes", num_classes, 2)
        if weight_decay is not None:
            try:
                weight_decay = real("weight_decay", weight_decay, 0.0)
            except TypeError as e:  # a non-number: ValueError, like every other refused monitor argument
                raise ValueError(str(e)) from None
        every = integer("every", every, 1)
        nc1 = int(nc1) if isinstance(nc1, bool) else integer("nc1", nc1, 0)  # True: every batch, False: never
        exact_residual = flag("exact_residual", exact_residual)
        power_iters, power_block = integer("power_iters", power_iters, 1), integer("power_block", power_block, 1)
        SpectralNorm(spectral, power_iters, power_block)  # checks spectral ('power' or 'exact')
        if isinstance(layers, str):
            layers = [layers]  # one name, not its characters
        if layers is not None and not (isinstance(layers, (list, tuple, set, frozenset)) and all(isinstance(n, str) for n in layers)):
            raise ValueError(f"layers must be a module name (str) or a list of them, got {layers!r}")
        wanted = None if layers is None else set(layers)
        watch, skipped = [], []
        for name, mod in model.named_modules():
            if wanted is not None and name not in wanted:
                continue
            reason = unmonitored(mod)
            if reason is None and not all(p.requires_grad for p in _weights(mod)):
                if wanted is not None:
                    raise ValueError(f"layers: {name!r} is frozen (a weight parameter does not require grad): "
                                     f"its gradient statistics cannot be measured")
                skipped.append((name, "frozen (a weight parameter does not require grad)"))
            elif reason is None:
                watch.append((name, mod))
            elif reason != NOT_A_LAYER:  # a layer of a known kind that the measurements cannot cover
                skipped.append((name, reason))
        if wanted is not None and wanted - {n for n, _ in watch}:
            raise ValueError(f"layers: no supported Linear/Conv2d layer named {sorted(wanted - {n for n, _ in watch})}")
        if not watch:
            raise ValueError("model has no nn.Linear / nn.Conv2d / LowRankLinear / LowRankConv2d layer to monitor")

        self.num_classes = num_classes
        self.weight_decay = weight_decay
        self.nc1, self.every = nc1, every
        self.exact_residual = exact_residual
        self.spectral, self.power_iters, self.power_block = spectral, power_iters, power_block
        self.enabled = True
        self._labels: torch.Tensor | None = None
        self._onehot_cache: dict = {}
        self._bid = 0
        if guide is None:
            from ..rank.guided import CollapseGuide

            guide = CollapseGuide(num_classes)
        self.guide = guide
        self.skipped: list = skipped
        self._layers: dict[str, _Layer] = {}
        try:
            for name, mod in watch:
                self._layers[name] = _Layer(self, name, mod)
        except BaseException:  # leave the model as it was: no hook of a half-built monitor stays on it
            for l in self._layers.values():
                for h in l.handles:
                    h.remove()
            raise
        self._by_module = {id(l.module): l for l in self._layers.values() if l.factorized}

    # ------------------------------------------------------------------ labels
    def set_labels(self, y: torch.Tensor) -> None:
        """Labels (N,) of the batch whose forward pass comes next (values in [0, num_classes)).

        The labels cover one forward pass: each layer records the first pass after this call and
        ignores later ones (a closure re-evaluation, an evaluation pass) until the next call."""
        check_labels(y, self.num_classes)
        self._finish_all()
        self._labels = y.detach()
        self._onehot_cache = {}
        self._bid += 1

    def clear_labels(self) -> None:
        """Stop recording forward passes until the next :meth:`set_labels`."""
        self._labels = None

    @contextlib.contextmanager
    def labels(self, y: torch.Tensor):
        """``with monitor.labels(y): loss = ...; loss.backward()`` — record this batch."""
        self.set_labels(y)
        try:
            yield self
        finally:
            self.clear_labels()

    def _onehot(self, dtype, per: int):
        """(one-hot (rows, K), class counts (K,), 1/max(count, 1) (K,)) for ``per`` rows per sample."""
        key = (dtype, per)
        if key not in self._onehot_cache:
            y = self._labels if per == 1 else self._labels.repeat_interleave(per)
            oh = one_hot(y, self.num_classes, dtype, check=False)
            counts = oh.sum(0)
            self._onehot_cache[key] = (oh, counts, 1.0 / counts.clamp_min(1.0))
        return self._onehot_cache[key]

    # ------------------------------------------------------------------ lifecycle
    @property
    def layer_names(self) -> list:
        return list(self._layers)

    def _finish_all(self) -> None:
        for l in self._layers.values():
            l._finish()

    def reset(self) -> None:
        """Forget all running statistics (hooks stay)."""
        for l in self._layers.values():
            l.record = None
            l.reset()

    def remove(self) -> None:
        """Remove every hook; the monitor records nothing afterwards and :meth:`adjust` is a no-op."""
        self._finish_all()
        for l in self._layers.values():
            for h in l.handles:
                h.remove()
            l.handles = []
        self.enabled = False
        self._labels = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    # ------------------------------------------------------------------ results
    def batch_values(self, name: str, weight_decay: float | None = None) -> dict | None:
        """Per-batch values (grad_norm, delta_norm, within, tcv, weight_norm, data_grad_norm, residual,
        bound) of the latest recorded batch of layer ``name`` (None until its backward pass has run)."""
        if name not in self._layers:
            raise ValueError(f"name must be one of {self.layer_names}, got {name!r}")
        l = self._layers[name]
        lam = self.weight_decay if weight_decay is None else weight_decay
        v = l.values(l.record, lam)
        return None if v is None else {k: float(t) for k, t in v.items()}

    def summary(self) -> dict[str, LayerCollapse]:
        """{layer name: :class:`LayerCollapse`} of everything recorded since :meth:`reset`."""
        self._finish_all()
        out = {}
        nan = float("nan")
        K = self.num_classes
        for name, l in self._layers.items():
            l.flush()
            st = l.stats
            nb, nbd = l.n_bound, l.bwd_batches
            avg = lambda key, n: float(l.sums[key]) / n if n else nan  # noqa: E731
            last = l.values(l.last_record, self.weight_decay)
            out[name] = LayerCollapse(
                name=name, kind=l.layer_kind.embedding, factorized=l.factorized, in_dim=l.in_dim, out_dim=l.out_dim,
                batches=l.batches, backward_batches=nbd, samples=l.samples, rows=l.rows,
                counts=st.count.clone() if st else torch.zeros(K, dtype=torch.float64),
                class_sums=st.sums if st else torch.zeros(K, l.in_dim, dtype=torch.float64),
                class_means=st.mean.clone() if st else torch.zeros(K, l.in_dim, dtype=torch.float64),
                tcv=float(st.tcv) if st else nan, bcv=float(st.bcv) if st else nan,
                ntcv=float(st.ntcv) if st else nan, nc1=avg("nc1", l.n_nc1),
                grad_norm=avg("grad_norm", nbd), delta_norm=avg("delta_norm", nbd), within=avg("within", nbd),
                residual=avg("residual", nb), bound=avg("bound", nb), residual_exact=(not l.factorized) or self.exact_residual,
                weight_decay=self.weight_decay, last={} if last is None else {k: float(t) for k, t in last.items()},
                guide=dict(l.guide_counts))
        return out

    def table(self) -> str:
        """The summary as a markdown table."""
        rows = ["| layer | kind | TCV/(TCV+BCV) | NC1 | ‖Δ‖₂ | ‖R‖_F | bound B |", "|---|---|---:|---:|---:|---:|---:|"]
        for s in self.summary().values():
            kind = ("lowrank " if s.factorized else "") + s.kind
            rows.append(f"| {s.name} | {kind} | {s.ntcv:.4f} | {s.nc1:.4g} | {s.delta_norm:.4g} | "
                        f"{s.residual:.4g} | {s.bound:.4g} |")
        return "\n".join(rows)

    # ------------------------------------------------------------------ DLRT guide
    def adjust(self, module, item, param_group) -> None:
        """DLRT's guide hook: lower ``item.augment`` / ``item.max_rank`` of this layer's step by the rule
        of :mod:`lrtrain.rank.guided`, from this batch's measurements of the layer (with ``every`` > 1,
        from the latest measured batch, at most ``every - 1`` steps old). Unknown layers or no
        measurement: no change (the plain τ rule)."""
        if not self.enabled:
            return
        layer = self._by_module.get(id(module))
        if layer is None:
            return
        lam = float(param_group.get("weight_decay", 0.0))
        if self.weight_decay is None:
            self.weight_decay = lam
        rec = layer.record
        v = None if rec is None or rec.bid <= self._bid - self.every else layer.values(rec, lam)
        if v is None:
            layer.guide_counts["no_data"] += 1
            return
        v = {k: float(t) for k, t in v.items()}
        v["current"] = rec.bid == self._bid
        if rec.gsums is not None and v["current"]:  # class directions only from this very batch
            v["class_dirs"] = (rec.gsums, rec.sums)
        branch = self.guide.apply(item, v, param_group)
        layer.guide_counts[branch] = layer.guide_counts.get(branch, 0) + 1
