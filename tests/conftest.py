import os
from pathlib import Path

import pytest
import torch
from torch import nn

MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """torch on one thread for the test: tiny ops with 2 threads crawl when other processes load the cores
    (nothing timed depends on it)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def mnist():
    """Real MNIST from ../shared/data/mnist (required in CI, skipped elsewhere when absent)."""
    from lrtrain.cli.data import load_idx

    if not MNIST_DIR.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"MNIST not found at {MNIST_DIR}")
        pytest.skip(f"MNIST not found at {MNIST_DIR}")
    return load_idx(str(MNIST_DIR))


@pytest.fixture
def small_cnn():
    """Builds a small CNN: conv3x3(w) -> conv3x3(2w, stride 2) -> conv3x3(2w, stride 2) -> global pool -> Linear."""
    def build(in_channels: int = 1, num_classes: int = 10, width: int = 32) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes),
        )

    return build


@pytest.fixture(scope="session")
def digits():
    from lrtrain.cli.data import load_digits

    return load_digits()
