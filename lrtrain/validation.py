"""Argument validation shared by the whole package: one checker per kind of value, one message format each.

Generic checkers (layers, conversion, the monitor, the optimizer): :func:`real`, :func:`integer`,
:func:`flag`, :func:`tolerance`. The optimizer's checks (:func:`dlrt_group`, :func:`dlrt_state`,
:func:`skipped_steps`) are what ``DLRT``'s constructor, ``add_param_group`` and ``load_state_dict`` run,
so a value refused by one is refused by all. Errors name the argument and its allowed range.
This module imports nothing from lrtrain.
"""
from __future__ import annotations

import math
import numbers

import torch

__all__ = ["real", "integer", "flag", "tolerance", "dlrt_group", "dlrt_state", "skipped_steps", "DLRT_HYPERPARAMETERS"]

# The hyperparameters of a DLRT param group (its constructor's per-group arguments).
DLRT_HYPERPARAMETERS = ("lr", "base", "momentum", "dampening", "nesterov", "betas", "eps", "weight_decay", "tau",
                        "min_rank", "spare", "refresh", "rank_rule", "s_direction", "budget")
# The values of the string-valued hyperparameters.
RANK_RULES = ("importance", "tolerance")
S_DIRECTIONS = ("projected", "own")


# torch.optim options DLRT does not implement, with the values that ask for nothing else than what DLRT does
# (so groups copied from torch's AdamW / SGD with their defaults are accepted). ``foreach`` is an
# implementation choice and any value is fine; other keys (a scheduler's ``initial_lr``, a user's ``name``)
# are kept and never read.
TORCH_OPTIONS = {"maximize": (False,), "amsgrad": (False,), "capturable": (False,), "differentiable": (False,),
                 "fused": (None, False)}


def real(key: str, v, lo: float, hi: float = float("inf"), hi_open: bool = False) -> float:
    """v as a finite float in [lo, hi] (or [lo, hi)); a one-element real tensor counts. TypeError for a
    non-number (bools included), ValueError out of range."""
    rng = f"in [{lo:g}, {hi:g})" if hi_open else f">= {lo:g}" if hi == float("inf") else f"in [{lo:g}, {hi:g}]"
    x = v.item() if torch.is_tensor(v) and v.numel() == 1 and not v.dtype.is_complex else v
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{key} must be {rng} (a finite real number), got {v!r} ({type(v).__name__})")
    x = float(x)
    if not (math.isfinite(x) and lo <= x and (x < hi if hi_open else x <= hi)):
        raise ValueError(f"{key} must be {rng} (a finite real number), got {v!r}")
    return x


def integer(name: str, value, lo: int, hi: int | None = None, type_error: bool = False) -> int:
    """value as an int in [lo, hi] (hi None: no upper bound); bools, floats and strings are refused
    (ValueError, or TypeError for a non-int when ``type_error``)."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    rng = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
    if not ok and type_error:
        raise TypeError(f"{name} must be an int {rng}, got {value!r} ({type(value).__name__})")
    if not ok or value < lo or (hi is not None and value > hi):
        raise ValueError(f"{name} must be an int {rng}, got {value!r}")
    return int(value)


def flag(name: str, value, type_error: bool = False) -> bool:
    """value if it is True or False (ValueError, or TypeError when ``type_error``)."""
    if not isinstance(value, bool):
        raise (TypeError if type_error else ValueError)(f"{name} must be True or False, got {value!r}")
    return value


def tolerance(tau) -> float | None:
    """τ of a conversion: None or a real number >= 0 (inf allowed: rank 1; NaN, bools and strings refused)."""
    if tau is None:
        return None
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not tau >= 0:
        raise ValueError(f"tau must be >= 0 (a real number), got {tau!r}")
    return float(tau)


def dlrt_group(g: dict, bases) -> None:
    """Check every hyperparameter of a DLRT param group (``bases``: the names ``base`` may take); normalizes
    ``betas`` to a tuple of two floats."""
    for key in DLRT_HYPERPARAMETERS:
        if key not in g:
            raise ValueError(f"param group lacks {key!r}")
    for key, fine in TORCH_OPTIONS.items():
        if key in g and not any(g[key] is v for v in fine):
            raise ValueError(f"{key}={g[key]!r}: DLRT does not implement {key} (allowed: "
                             f"{' or '.join(map(repr, fine))}); remove the key")
    for key, fine in (("base", sorted(bases)), ("rank_rule", RANK_RULES), ("s_direction", S_DIRECTIONS)):
        if not isinstance(g[key], str) or g[key] not in fine:
            exc = ValueError if isinstance(g[key], str) else TypeError
            raise exc(f"{key} must be one of {list(fine)}, got {g[key]!r}")
    if g["budget"] is not None:
        b = real("budget", g["budget"], 0.0, 1.0)
        if b == 0:
            raise ValueError("budget must be None or in (0, 1] (a fraction of the dense parameters), got 0")
        if g["rank_rule"] != "importance":
            raise ValueError(f"budget needs rank_rule='importance' (its scores allocate the ranks), got "
                             f"rank_rule={g['rank_rule']!r}")
    for key in ("lr", "tau", "weight_decay", "eps"):
        real(key, g[key], 0.0)
    mu = real("momentum", g["momentum"], 0.0, 1.0, hi_open=True)
    damp = real("dampening", g["dampening"], 0.0, 1.0)
    flag("nesterov", g["nesterov"], type_error=True)
    if "decoupled_weight_decay" in g and g["weight_decay"] and g["decoupled_weight_decay"] != (g["base"] == "adamw"):
        raise ValueError(f"decoupled_weight_decay={g['decoupled_weight_decay']!r}: DLRT's weight decay is decoupled "
                         "for base='adamw' and coupled (L2) for base='sgd'; remove the key or change base")
    if g["nesterov"] and (mu <= 0 or damp != 0):
        raise ValueError(f"nesterov=True requires momentum > 0 and dampening = 0, got momentum={g['momentum']!r}, "
                         f"dampening={g['dampening']!r}")
    for key, lo in (("min_rank", 1), ("spare", 0), ("refresh", 1)):
        integer(key, g[key], lo, type_error=True)
    betas = g["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), each in [0, 1), got {betas!r}")
    try:
        g["betas"] = tuple(real("betas", b, 0.0, 1.0, hi_open=True) for b in betas)
    except (TypeError, ValueError) as e:
        raise type(e)(f"betas must be in [0, 1) each (finite real numbers), got {betas!r}") from None


def skipped_steps(v) -> int:
    """A DLRT state dict's ``skipped_steps``: an int >= 0."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"state_dict['skipped_steps'] must be an int >= 0, got {v!r}")
    return v


def dlrt_state(state, params: dict, roles: dict, layers: list) -> None:
    """Check a DLRT state dict's ``state`` against the optimizer's parameters before anything is loaded.

    ``params``: saved index → parameter; ``roles``: id(parameter) → "U" / "S" / "V" for factor parameters;
    ``layers``: the saved indices (U, S, V) of each factorized layer. Each entry must be a dict of tensors
    shaped like their parameter (``bias_mass``: (2, c) for U/V, (2, c, c) for S), finite and floating point;
    second moments >= 0, bias masses in [0, 1]; ``step`` an integer >= 0, ``basis_age`` an int >= 0; a layer's
    ``rank`` (in its S state) an int in [1, c], and every state tensor of the layer zero past that rank
    (columns, and rows too for S).
    """
    if not isinstance(state, dict):
        raise ValueError(f"state_dict['state'] must be a dict, got {type(state).__name__}")
    for idx, st in state.items():
        if idx not in params:
            raise ValueError(f"state_dict: state for parameter index {idx!r}, which no param group lists")
        if not isinstance(st, dict):
            raise ValueError(f"state_dict: state of parameter {idx!r} must be a dict")
        p = params[idx]
        for key, v in st.items():
            where = f"state_dict: state[{idx!r}][{key!r}]"
            if key == "basis_age":
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    raise ValueError(f"{where} must be an int >= 0, got {v!r}")
                continue
            if key == "rank":
                c = p.shape[-1]
                if roles.get(id(p)) != "S" or isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= c:
                    raise ValueError(f"{where} must be an int in [1, {c}] (in a factorized layer's S state), got {v!r}")
                continue
            if key == "step":
                n = v.item() if torch.is_tensor(v) and v.numel() == 1 else v
                if isinstance(n, bool) or not isinstance(n, (int, float)) or not (n >= 0 and float(n).is_integer()):
                    raise ValueError(f"{where} must be an integer >= 0, got {v!r}")
                continue
            if not torch.is_tensor(v):
                raise ValueError(f"{where} must be a tensor, got {type(v).__name__}")
            if not v.is_floating_point():
                raise ValueError(f"{where} must be floating point, got {v.dtype}")
            want = tuple(p.shape) if key != "bias_mass" else (2, *p.shape) if roles.get(id(p)) == "S" else (2, p.shape[-1])
            if tuple(v.shape) != want:
                raise ValueError(f"{where} has shape {tuple(v.shape)}; it must be {want}"
                                 + (" (its parameter's shape)" if key != "bias_mass" else ""))
            local = v.to_local() if hasattr(v, "to_local") else v  # a DTensor: its shard
            if not bool(torch.isfinite(local).all()):
                raise ValueError(f"{where} is not finite (NaN or inf)")
            if key == "exp_avg_sq" and bool((local < 0).any()):
                raise ValueError(f"{where} (a second moment) must be >= 0")
            if key == "bias_mass" and bool(((local < 0) | (local > 1.001)).any()):
                raise ValueError(f"{where} (bias-correction weights) must be in [0, 1] (up to rounding)")
    for iU, iS, iV in layers:
        k = state.get(iS, {}).get("rank")
        if k is None:
            continue
        for idx, two in ((iU, False), (iS, True), (iV, False)):
            for key, v in state.get(idx, {}).items():
                if not torch.is_tensor(v):
                    continue
                full = v.full_tensor() if hasattr(v, "full_tensor") else v
                past = full[..., k:] if not two else torch.cat([full[..., k:, :].flatten(), full[..., :, k:].flatten()])
                if bool(past.ne(0).any()):
                    raise ValueError(f"state_dict: state[{idx!r}][{key!r}] is not zero past the layer's rank {k} "
                                     "(a corrupt checkpoint)")
