"""The contenders: dense AdamW, GaLoreAdamW (``galore-torch``) and lrtrain's DLRT with the reference
update and with each compiled fused backend, each as a :class:`Method` that builds its model and
optimizer from the same dense model.

GaLore is the real ``galore_torch.GaLoreAdamW`` (installed by the ``bench`` extra), with its parameter groups
built by :func:`galore_adamw`; when it does not import, :func:`galore_status` says why and the benchmarks skip
it. There is no stand-in.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lrtrain import DLRT, lowrank
from lrtrain.cli.bench import active_backends

_GALORE: tuple | None = None


def galore_status() -> tuple:
    """(True, version) when ``galore_torch.GaLoreAdamW`` imports, else (False, why)."""
    global _GALORE
    if _GALORE is None:
        try:
            from importlib.metadata import version

            from galore_torch import GaLoreAdamW  # noqa: F401  (imports transformers and bitsandbytes)

            _GALORE = (True, version("galore-torch"))
        except Exception as e:  # ImportError, or a broken transformers/bitsandbytes install
            _GALORE = (False, f"galore-torch does not import ({type(e).__name__}: {e}); "
                              "install the bench extra: pip install --no-build-isolation -e '.[bench]'")
    return _GALORE


@dataclass
class Method:
    """How one contender builds its model and optimizer from a dense model."""

    key: str  # "dense", "galore", "lrtrain-reference", "lrtrain-cpu", "lrtrain-cuda"
    label: str
    dlrt_kwargs: dict = field(default_factory=dict)

    @property
    def is_lrtrain(self) -> bool:
        return self.key.startswith("lrtrain")

    def prepare(self, model: nn.Module, rank: int, fixed_rank: bool = False) -> nn.Module:
        """The model this method trains (factorized at ``rank`` for lrtrain; ``fixed_rank`` caps it there)."""
        if self.is_lrtrain:
            return lowrank(model, rank=rank, max_rank=rank if fixed_rank else None)
        return model

    def optimizer(self, model: nn.Module, lr: float, weight_decay: float, rank: int, tau: float,
                  galore_gap: int = 200, galore_scale: float = 0.25):
        """AdamW (eps 1e-8, decoupled weight decay) in each method's form; ``rank`` is GaLore's
        projection rank, ``tau`` DLRT's truncation tolerance."""
        if self.key == "dense":
            return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, eps=1e-8)
        if self.key == "galore":
            return galore_adamw(model.parameters(), galore_targets(model, rank), lr, weight_decay, rank, galore_gap,
                                galore_scale)
        return DLRT(model.parameters(), lr=lr, base="adamw", weight_decay=weight_decay, tau=tau, eps=1e-8,
                    rank_rule="tolerance", s_direction="own",                     **self.dlrt_kwargs)


def galore_targets(model: nn.Module, rank: int, min_features: int = 16) -> list:
    """The weights GaLore projects: those of the nn.Linear layers :func:`lrtrain.lowrank` factorizes
    at ``rank`` (min(out, in) >= ``min_features`` and r(out + in) + r² < out·in), so both methods
    compress the same layers."""
    out = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            o, i = m.weight.shape
            r = min(rank, o, i)
            if min(o, i) >= min_features and r * (o + i) + r * r < o * i:
                out.append(m.weight)
    return out


def galore_adamw(params, projected: list, lr: float, weight_decay: float, rank: int, gap: int = 200,
                 scale: float = 0.25):
    """``galore_torch.GaLoreAdamW`` (eps 1e-8): the tensors ``projected`` in a group with rank ``rank``,
    ``update_proj_gap`` ``gap``, ``scale`` and ``proj_type "std"``; the other tensors of ``params`` in a plain group."""
    from galore_torch import GaLoreAdamW

    ids = {id(p) for p in projected}
    groups = [{"params": [p for p in params if id(p) not in ids]},
              {"params": list(projected), "rank": rank, "update_proj_gap": gap, "scale": scale, "proj_type": "std"}]
    return GaLoreAdamW(groups, lr=lr, weight_decay=weight_decay, eps=1e-8, no_deprecation_warning=True)


DENSE = Method("dense", "dense AdamW")
GALORE = Method("galore", "GaLoreAdamW")


def dlrt_methods() -> list:
    """lrtrain DLRT with the reference update (plain PyTorch), each usable fused backend for every layer, and
    the default ``backend="auto"`` (fused where :mod:`lrtrain.update.dispatch` expects a gain) when one is usable."""
    out = [Method("lrtrain-reference", "lrtrain DLRT (reference)", {"backend": "reference"})]
    fused = [Method(f"lrtrain-{b}", f"lrtrain DLRT (fused {b})", {"backend": b}) for b in active_backends()]
    return out + fused + ([Method("lrtrain-auto", "lrtrain DLRT (auto, default)", {"backend": "auto"})] if fused else [])


def available_methods(include_galore: bool = True) -> list:
    """dense AdamW, GaLoreAdamW (when galore-torch imports) and the DLRT variants usable here."""
    return [DENSE] + ([GALORE] if include_galore and galore_status()[0] else []) + dlrt_methods()
