"""Base optimizer rules (SGD with momentum, AdamW) as out-of-place functional updates.

Every rule maps gradients g and their states to *directions* D (the update is p ← decay(p) - lr·D)
and new states, without touching its inputs: DLRT applies them to dense parameters and to the factor
coordinates K = U S, L = V Sᵀ and S, and commits a layer's new state only when its step succeeds.
Weight decay λ applies where ``decay_params`` has a tensor (dense parameters and S, never K or L):
SGD adds λp to the gradient (coupled L2), AdamW scales p by (1 - lr·λ) (decoupled).

State is kept per tensor in the same coordinates as its gradient. ``linear_keys`` transform like the
gradient under a change of basis (momentum, Adam's first moment); ``square_keys`` like its square
(Adam's second moment).
"""
from __future__ import annotations

import math

import torch

__all__ = ["SGD", "AdamW", "make_rule", "BASES"]


class SGD:
    """buf ← μ·buf + (1-dampening)·g (buf = g at the first step); D = g + μ·buf (Nesterov) or buf."""

    linear_keys = ("momentum_buffer",)
    square_keys = ()

    def directions(self, grads, decay_params, states, group):
        wd, mu = group["weight_decay"], group["momentum"]
        if wd:
            grads = [g if p is None else g.add(p, alpha=wd) for g, p in zip(grads, decay_params)]
        if mu == 0:
            return list(grads), [{} for _ in grads]
        bufs = []
        for g, st in zip(grads, states):
            buf = st.get("momentum_buffer")
            bufs.append(g.clone() if buf is None else buf.mul(mu).add_(g, alpha=1.0 - group["dampening"]))
        dirs = torch._foreach_add(grads, bufs, alpha=mu) if group["nesterov"] else bufs
        return dirs, [{"momentum_buffer": b} for b in bufs]

    def decayed(self, p, group):
        return p


class AdamW:
    """m ← β1 m + (1-β1) g, v ← β2 v + (1-β2) g², D = (m / (1-β1ᵗ)) / (√(v / (1-β2ᵗ)) + eps)."""

    linear_keys = ("exp_avg",)
    square_keys = ("exp_avg_sq",)

    def directions(self, grads, decay_params, states, group):
        b1, b2 = group["betas"]
        ms = [st["exp_avg"] if "exp_avg" in st else torch.zeros_like(g) for g, st in zip(grads, states)]
        vs = [st["exp_avg_sq"] if "exp_avg_sq" in st else torch.zeros_like(g) for g, st in zip(grads, states)]
        steps = [st.get("step", 0) + 1 for st in states]
        ms = torch._foreach_lerp(ms, grads, 1.0 - b1)
        vs = torch._foreach_mul(vs, b2)
        torch._foreach_addcmul_(vs, grads, grads, value=1.0 - b2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, [math.sqrt(1.0 - b2 ** t) for t in steps])
        torch._foreach_add_(denom, group["eps"])
        dirs = torch._foreach_div(ms, denom)
        torch._foreach_div_(dirs, [1.0 - b1 ** t for t in steps])
        return dirs, [{"exp_avg": m, "exp_avg_sq": v, "step": t} for m, v, t in zip(ms, vs, steps)]

    def decayed(self, p, group):
        wd = group["weight_decay"]
        return p.mul(1.0 - group["lr"] * wd) if wd else p


BASES = {"sgd": SGD, "adamw": AdamW}


def make_rule(base: str):
    if base not in BASES:
        raise ValueError(f"base must be one of {sorted(BASES)}, got {base!r}")
    return BASES[base]()
