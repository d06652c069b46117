"""Small reference models used by the demo, tests and benchmarks."""
from __future__ import annotations

from torch import nn

__all__ = ["mlp", "small_cnn"]


def mlp(in_features: int, hidden, num_classes: int) -> nn.Sequential:
    """Flatten -> [Linear -> ReLU] per hidden width -> Linear."""
    layers: list[nn.Module] = [nn.Flatten()]
    prev = in_features
    for h in hidden:
        layers += [nn.Linear(prev, h), nn.ReLU()]
        prev = h
    layers.append(nn.Linear(prev, num_classes))
    return nn.Sequential(*layers)


def small_cnn(in_channels: int = 1, num_classes: int = 10, width: int = 32) -> nn.Sequential:
    """conv3x3(w) -> conv3x3(2w, stride 2) -> conv3x3(2w, stride 2) -> global pool -> Linear."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes),
    )
