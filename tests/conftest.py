import os
from pathlib import Path

import pytest
import torch

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
    from lrtrain.data import load_idx

    if not MNIST_DIR.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"MNIST not found at {MNIST_DIR}")
        pytest.skip(f"MNIST not found at {MNIST_DIR}")
    return load_idx(str(MNIST_DIR))


@pytest.fixture(scope="session")
def digits():
    from lrtrain.data import load_digits

    return load_digits()
