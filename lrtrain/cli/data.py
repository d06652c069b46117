"""The demo's offline datasets: scikit-learn's bundled digits (default) and MNIST-format IDX directories.

Images come as float32 tensors (N, 1, H, W) standardized with the training set's mean and std;
labels as int64 (N,). Nothing is downloaded; scikit-learn is imported only by :func:`load_digits`.
Imported by the console script, never by ``import lrtrain``.
"""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Dataset", "load_dataset", "load_digits", "load_idx", "read_idx", "batches"]


@dataclass
class Dataset:
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    @property
    def in_features(self) -> int:
        return self.train_x[0].numel()

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> "Dataset":
        """The first ``n_train`` / ``n_test`` examples (all when None)."""
        return Dataset(self.name, self.train_x[:n_train], self.train_y[:n_train], self.test_x[:n_test],
                       self.test_y[:n_test], self.num_classes)


def _standardize(train: np.ndarray, test: np.ndarray):
    mean, std = train.mean(), train.std()
    return [torch.from_numpy(((a - mean) / std).astype(np.float32)) for a in (train, test)]


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """scikit-learn's 1,797 8×8 digit images (bundled with the package, works offline)."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data set needs scikit-learn: pip install 'lrtrain[demo]'") from e
    d = sk_digits()
    x = d.images.astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    te, tr = perm[:n_test], perm[n_test:]
    xtr, xte = _standardize(x[tr], x[te])
    return Dataset("digits", xtr, torch.from_numpy(y[tr]), xte, torch.from_numpy(y[te]), 10)


def read_idx(path: str) -> np.ndarray:
    """Read one IDX file (optionally .gz): big-endian header, then the array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        zero, dtype_code, ndim = struct.unpack(">HBB", f.read(4))
        if zero != 0 or dtype_code != 0x08:
            raise ValueError(f"{path}: not an unsigned-byte IDX file")
        shape = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        data = np.frombuffer(f.read(), dtype=np.uint8)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, found {data.size} values")
    return data.reshape(shape)


def _find(directory: str, stem: str) -> str:
    for name in (stem, stem + ".gz"):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"{directory}: no {stem}[.gz]")


def load_idx(directory: str) -> Dataset:
    """MNIST / Fashion-MNIST style directory: train-images-idx3-ubyte[.gz], train-labels-…, t10k-…."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"data directory {directory!r} does not exist")
    xtr = read_idx(_find(directory, "train-images-idx3-ubyte")).astype(np.float32)[:, None] / 255.0
    ytr = read_idx(_find(directory, "train-labels-idx1-ubyte")).astype(np.int64)
    xte = read_idx(_find(directory, "t10k-images-idx3-ubyte")).astype(np.float32)[:, None] / 255.0
    yte = read_idx(_find(directory, "t10k-labels-idx1-ubyte")).astype(np.int64)
    xtr_t, xte_t = _standardize(xtr, xte)
    return Dataset(os.path.basename(os.path.normpath(directory)) or "idx", xtr_t, torch.from_numpy(ytr),
                   xte_t, torch.from_numpy(yte), int(ytr.max()) + 1)


def load_dataset(spec: str | None = None) -> Dataset:
    """``None`` or ``"digits"``: the bundled digits; anything else: a directory of IDX files."""
    return load_digits() if spec in (None, "digits") else load_idx(spec)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator | None = None,
            shuffle: bool = True):
    """Yield (x, y) minibatches; a fresh permutation from ``generator`` each call when shuffling."""
    n = len(y)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        idx = order[i:i + batch_size]
        yield x[idx], y[idx]
