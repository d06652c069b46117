"""The demo's model: a multilayer perceptron of ``nn.Linear`` layers, which ``lrtrain.lowrank`` factorizes."""
from __future__ import annotations

from torch import nn

__all__ = ["mlp"]


def mlp(in_features: int, hidden, num_classes: int) -> nn.Sequential:
    """Flatten -> [Linear -> ReLU] per hidden width -> Linear."""
    layers: list[nn.Module] = [nn.Flatten()]
    prev = in_features
    for h in hidden:
        layers += [nn.Linear(prev, h), nn.ReLU()]
        prev = h
    layers.append(nn.Linear(prev, num_classes))
    return nn.Sequential(*layers)
