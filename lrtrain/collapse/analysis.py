"""Offline, exact collapse measurements of a trained model on a whole data set.

:func:`full_data_collapse` evaluates, for every layer the collapse monitor covers (Linear, Conv2d, Conv1D; dense or
factorized), the objective

    F(W) = (1/N) Σ_i ℓ_i + (λ/2) ‖W‖_F²        over all N samples of the data set,

with one forward/backward pass per minibatch (each minibatch's mean loss weighted by n_b/N, so the sum of
the batch gradients is the full-data gradient). Per layer it accumulates, in float64 and without keeping
embeddings: the pooled class statistics of the inputs, X̃ᵀX̃-free NC1 via Σ xxᵀ (n × n), the data gradient
G_W = Σ_j g_j x_jᵀ (m × n), and GᵀG (m × m) for ‖G‖₂ of the stacked output gradients. Then, with
Δ = N·G the per-sample gradients of the paper and TCV over the whole data set,

    tail_K(W) ≤ B = ( ‖R‖_F + ‖Δ‖₂·TCV^{1/2}/N ) / λ,    R = G_W + λW                        (exact)

The ranks reported for W (singular values σ_1 ≥ σ_2 ≥ ...):

* ``rank_rel``: numerical rank #{j : σ_j > rel·σ_1} (rel = 1e-3 unless given);
* ``rank_tau``: the DLRT truncation rank, smallest k with (Σ_{j>k} σ_j²)^{1/2} ≤ τ‖W‖_F
  (:func:`lrtrain.rank.tolerance_rank`), the quantity a factorized layer trained with tolerance τ settles at.

This costs O(N·m·n) per layer (a dense gradient); it is meant for evaluation, not for a training loop.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.factors import FactorizedMixin
from ..layers.kinds import kind_of
from ..update.rank_rule import tolerance_rank
from .monitor import unmonitored
from .stats import ClassStats, check_labels, one_hot

__all__ = ["dense_weight", "numerical_rank", "tau_rank", "tail", "full_data_collapse"]


def dense_weight(module: nn.Module) -> torch.Tensor:
    """W (out × in_flat) of a layer of a layer kind (Linear, Conv2d, Conv1D), dense or factorized (detached)."""
    if isinstance(module, FactorizedMixin):
        return module.dense_weight().detach()
    return kind_of(module).weight_matrix(module).detach()


def numerical_rank(sigma: torch.Tensor, rel: float = 1e-3) -> int:
    """#{j : σ_j > rel·σ_1} for singular values sorted descending."""
    if not rel >= 0:
        raise ValueError(f"rel must be >= 0, got {rel!r}")
    return int((sigma > rel * sigma[0]).sum()) if sigma.numel() else 0


def tau_rank(sigma: torch.Tensor, tau: float) -> int:
    """Smallest k with tail_k ≤ τ‖σ‖ (the DLRT truncation rule, :func:`lrtrain.rank.tolerance_rank`)."""
    if not tau >= 0:
        raise ValueError(f"tau must be >= 0, got {tau!r}")
    return int(tolerance_rank(sigma.double(), tau))


def tail(sigma: torch.Tensor, k: int) -> float:
    """tail_k = (Σ_{j>k} σ_j²)^{1/2}."""
    return float(sigma[k:].double().square().sum().sqrt())


def _layers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if unmonitored(m) is None]


def full_data_collapse(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                       weight_decay: float, batch_size: int = 1024, rel: float = 1e-3,
                       tau: float = 0.1, loss_fn=None) -> dict:
    """Exact per-layer collapse quantities of ``model`` on (x, y); see the module docstring.

    Args:
        x: (N, ...) inputs; y: (N,) labels in [0, num_classes).
        weight_decay: λ > 0 of the objective.
        loss_fn: per-batch mean loss ``loss_fn(logits, y)`` (default cross-entropy).
    Returns {layer name: dict} with keys sigma, weight_norm, tail_K, rank_rel, rank_tau, tcv, bcv, ntcv,
    nc1, residual (‖R‖_F), data_grad_norm (‖G_W‖_F), grad_norm (‖G‖₂), delta_norm (‖Δ‖₂ = N‖G‖₂),
    within (‖Δ‖₂ TCV^{1/2}/N), bound (B), samples, rows. Parameter gradients are left as they were.
    """
    if not (isinstance(weight_decay, (int, float)) and weight_decay > 0):
        raise ValueError(f"weight_decay must be a float > 0, got {weight_decay!r}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    check_labels(y, num_classes)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of samples, got {x.shape[0]} and {y.shape[0]}")
    loss_fn = loss_fn or F.cross_entropy
    K, N = num_classes, y.shape[0]
    layers = _layers(model)
    acc: dict = {}
    cur: dict = {}
    state: dict = {}

    def fwd(name, mod):
        kind = kind_of(mod)

        def hook(module, inputs, output):
            X, per = kind.embed(mod, inputs[0].detach())
            yb = state["y"]
            if per not in state["onehot"]:
                state["onehot"][per] = one_hot(yb if per == 1 else yb.repeat_interleave(per), K, torch.float64, check=False)
            oh = state["onehot"][per]
            a = acc[name]
            Xd = X.double()
            a["stats"].update(Xd, oh, oh.sum(0))
            a["XtX"] += Xd.mT @ Xd
            a["rows"] += X.shape[0]
            cur[name] = Xd
            output.register_hook(lambda g: _on_grad(name, g, kind))

        return hook

    def _on_grad(name, g, kind):
        X = cur.pop(name)
        G = kind.output_rows(g.detach()).double()
        a = acc[name]
        a["GW"] += G.mT @ X
        a["GtG"] += G.mT @ G

    handles = []
    for name, mod in layers:
        W = dense_weight(mod)
        m, n = W.shape
        acc[name] = {"GW": torch.zeros(m, n, dtype=torch.float64), "GtG": torch.zeros(m, m, dtype=torch.float64),
                     "XtX": torch.zeros(n, n, dtype=torch.float64), "stats": ClassStats(K, n), "rows": 0}
        handles.append(mod.register_forward_hook(fwd(name, mod)))
    saved = {p: p.grad for p in model.parameters()}
    try:
        for p in saved:
            p.grad = None
        for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
            state["y"], state["onehot"] = yb, {}
            loss = loss_fn(model(xb), yb) * (yb.shape[0] / N)
            loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p, g in saved.items():
            p.grad = g
    lam = float(weight_decay)
    out = {}
    for name, mod in layers:
        a = acc[name]
        W = dense_weight(mod).double()
        sigma = torch.linalg.svdvals(W)
        st = a["stats"]
        rows = a["rows"]
        # Pooled NC1 = tr(Σ_W Σ_B⁺)/K with Σ_W = (Σ x xᵀ − Σ_c n_c μ_c μ_cᵀ)/rows, Σ_B over present classes.
        cnt, mu_c = st.count, st.mean
        present = cnt > 0
        Sw = (a["XtX"] - (mu_c * cnt[:, None]).mT @ mu_c) / rows
        Mt = (mu_c - st.global_mean)[present]
        Sb = Mt.mT @ Mt / Mt.shape[0]
        nc1 = float(torch.trace(Sw @ torch.linalg.pinv(Sb, hermitian=True)) / Mt.shape[0])
        R = a["GW"] + lam * W
        gspec = float(torch.linalg.eigvalsh(a["GtG"])[-1].clamp_min(0).sqrt())
        tcv = float(st.tcv)
        within = gspec * tcv ** 0.5
        res = float(R.norm())
        out[name] = {
            "sigma": sigma, "weight_norm": float(W.norm()), "tail_K": tail(sigma, K),
            "rank_rel": numerical_rank(sigma, rel), "rank_tau": tau_rank(sigma, tau), "rank_full": min(W.shape),
            "tcv": tcv, "bcv": float(st.bcv), "ntcv": float(st.ntcv), "nc1": nc1, "residual": res,
            "data_grad_norm": float(a["GW"].norm()), "grad_norm": gspec, "delta_norm": gspec * N,
            "within": within, "bound": (res + within) / lam, "samples": N, "rows": rows,
        }
    return out
