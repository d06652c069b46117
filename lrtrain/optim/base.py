"""Base optimizer rules (SGD with momentum, AdamW) as out-of-place functional updates.

Every rule maps gradients g and their states to *directions* D (the update is p ← decay(p) - lr·D)
and new states, without touching its inputs: DLRT applies them to dense parameters and to the factor
coordinates K = U S, L = V Sᵀ and S, and commits a layer's new state only when its step succeeds.
Weight decay λ applies where ``decay_params`` has a tensor (dense parameters and S, never K or L):
SGD adds λp to the gradient (coupled L2), AdamW scales p by (1 - lr·λ) (decoupled).

State is kept per tensor in the same coordinates as its gradient. ``linear_keys`` transform like the
gradient under a change of basis (momentum, Adam's first moment); ``square_keys`` like its square
(Adam's second moment, and the bias-correction masses below).

Per-direction bias correction (AdamW): Adam divides m and v by 1 - β1ᵗ and 1 - β2ᵗ, the weight their
exponential averages have accumulated since the moments started at zero. In factor coordinates the
directions change at every basis update, and a direction that entered at step 1000 has moments that
started at zero there: the layer's step count would under-correct them (up to 5× too large a step).
So the accumulated weights are state too, ``bias_mass`` = (w1, w2) with w ← β w + (1 - β) each step
(w = 1 - βᵗ on a fixed basis, identical to Adam), carried through a basis change like v, by the squared
rotation: a direction new to the basis starts from w ≈ 0, a rotated one from the convex mix of the old.
Shapes: (2, r) for K- and L-state (one weight per column: a column is one direction of the other
side's basis), (2, r, r) for S-state. Dense parameters keep the scalar step count.
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
    """m ← β1 m + (1-β1) g, v ← β2 v + (1-β2) g², D = (m / c1) / (√(v / c2) + eps), with c = 1 - βᵗ, or
    c = w from the state's ``bias_mass`` (w1, w2), w ← β w + (1 - β), where the caller keeps one."""

    linear_keys = ("exp_avg",)
    square_keys = ("exp_avg_sq", "bias_mass")

    def directions(self, grads, decay_params, states, group):
        b1, b2 = group["betas"]
        ms = [st["exp_avg"] if "exp_avg" in st else torch.zeros_like(g) for g, st in zip(grads, states)]
        vs = [st["exp_avg_sq"] if "exp_avg_sq" in st else torch.zeros_like(g) for g, st in zip(grads, states)]
        steps = [st.get("step", 0) + 1 for st in states]
        ms = torch._foreach_lerp(ms, grads, 1.0 - b1)
        vs = torch._foreach_mul(vs, b2)
        torch._foreach_addcmul_(vs, grads, grads, value=1.0 - b2)
        denom = torch._foreach_sqrt(vs)
        masses = [None] * len(grads)
        for i, st in enumerate(states):
            if "bias_mass" in st:
                w = st["bias_mass"]
                masses[i] = torch.stack([w[0] * b1 + (1.0 - b1), w[1] * b2 + (1.0 - b2)])
        plain = [i for i, w in enumerate(masses) if w is None]
        if plain:
            torch._foreach_div_([denom[i] for i in plain], [math.sqrt(1.0 - b2 ** steps[i]) for i in plain])
        for i, w in enumerate(masses):
            if w is not None:
                denom[i].div_(w[1].sqrt())
        torch._foreach_add_(denom, group["eps"])
        dirs = torch._foreach_div(ms, denom)
        if plain:
            torch._foreach_div_([dirs[i] for i in plain], [1.0 - b1 ** steps[i] for i in plain])
        for i, w in enumerate(masses):
            if w is not None:
                dirs[i].div_(w[0])
        out = []
        for m, v, t, w in zip(ms, vs, steps, masses):
            out.append({"exp_avg": m, "exp_avg_sq": v, "step": t} | ({} if w is None else {"bias_mass": w}))
        return dirs, out

    def decayed(self, p, group):
        wd = group["weight_decay"]
        return p.mul(1.0 - group["lr"] * wd) if wd else p


BASES = {"sgd": SGD, "adamw": AdamW}


def make_rule(base: str):
    if base not in BASES:
        raise ValueError(f"base must be one of {sorted(BASES)}, got {base!r}")
    return BASES[base]()
