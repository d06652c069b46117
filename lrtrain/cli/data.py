"""The demo's offline datasets: scikit-learn's bundled digits (default) and MNIST-format IDX directories.

Images come as float32 tensors (N, 1, H, W) standardized with the training set's mean and std;
labels as int64 (N,). Nothing is downloaded; scikit-learn is imported only by :func:`load_digits`.
Imported by the console script, never by ``import lrtrain``.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from .args import one_line

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


_IDX_UBYTE = 0x08  # the IDX type code of unsigned bytes, MNIST's (and Fashion-MNIST's) only type
_WHAT = {1: "labels (N)", 3: "images (N x H x W)"}


def read_idx(path: str, ndim: int | None = None) -> np.ndarray:
    """Read one IDX file (optionally .gz): big-endian header (magic number 0x0000 08 D, then D sizes), then
    the array of unsigned bytes. ``ndim``: the dimensions required (1 for labels, 3 for images).

    ValueError (the path first) for a file that is not such an array: empty or shorter than its header,
    another magic number (type code or dimensions), a size of 0, fewer or more bytes than the header says,
    a broken gzip stream.
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise ValueError(f"{path}: not a readable gzip file ({one_line(e) or type(e).__name__})") from None
    if len(raw) < 4:
        raise ValueError(f"{path}: {'empty file' if not raw else f'{len(raw)} bytes'}, too short for an IDX "
                         "header (a 4-byte magic number, then the sizes)")
    zero, code, nd = struct.unpack(">HBB", raw[:4])
    want = f"0x000008{ndim:02x} for {_WHAT.get(ndim, f'{ndim} dimensions')}" if ndim else "0x000008NN"
    if zero != 0 or code != _IDX_UBYTE:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic number 0x{int.from_bytes(raw[:4], 'big'):08x}, "
                         f"expected {want})")
    if nd == 0 or (ndim is not None and nd != ndim):
        raise ValueError(f"{path}: an IDX array of {nd} dimensions (magic number 0x000008{nd:02x}), expected {want}")
    header = 4 + 4 * nd
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes; {nd} dimensions need {header})")
    shape = struct.unpack(">" + "I" * nd, raw[4:header])
    if 0 in shape:
        raise ValueError(f"{path}: empty IDX array (shape {shape})")
    expected, found = int(np.prod(shape, dtype=np.int64)), len(raw) - header
    if found != expected:
        how = "truncated file" if found < expected else "trailing bytes after the array"
        raise ValueError(f"{path}: header says {shape} ({expected:,} values), found {found:,} ({how})")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find(directory: str, stem: str) -> str:
    for name in (stem, stem + ".gz"):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"{directory}: no {stem}[.gz]")


def _check_split(directory: str, split: str, x: np.ndarray, y: np.ndarray) -> None:
    if len(y) != len(x):
        raise ValueError(f"{directory}: {len(y):,} {split} labels for {len(x):,} {split} images "
                         "(one label per image is needed)")
    if x.min() == x.max():
        raise ValueError(f"{directory}: every pixel of the {len(x):,} {split} images is {int(x.min())} "
                         "(constant images: nothing to learn)")


def load_idx(directory: str) -> Dataset:
    """MNIST / Fashion-MNIST style directory: train-images-idx3-ubyte[.gz], train-labels-…, t10k-….

    Besides the checks of :func:`read_idx` (images 3-dimensional, labels 1-dimensional), ValueError when a
    split has not one label per image, when all pixels of a split are equal, when train and test images
    differ in size, or when the labels are not the classes 0..K-1 (K >= 2, each with a training example;
    test labels among them).
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"data directory {directory!r} does not exist")
    xtr = read_idx(_find(directory, "train-images-idx3-ubyte"), 3)
    ytr = read_idx(_find(directory, "train-labels-idx1-ubyte"), 1)
    xte = read_idx(_find(directory, "t10k-images-idx3-ubyte"), 3)
    yte = read_idx(_find(directory, "t10k-labels-idx1-ubyte"), 1)
    _check_split(directory, "training", xtr, ytr)
    _check_split(directory, "test", xte, yte)
    if xtr.shape[1:] != xte.shape[1:]:
        raise ValueError(f"{directory}: training images are {'x'.join(map(str, xtr.shape[1:]))} pixels, test images "
                         f"{'x'.join(map(str, xte.shape[1:]))} (they must be the same size)")
    classes = np.unique(ytr)
    k = int(classes[-1]) + 1
    if len(classes) < 2:
        raise ValueError(f"{directory}: every training label is {int(classes[0])}; labels must be the classes "
                         "0..K-1 with K >= 2")
    if len(classes) != k:
        missing = sorted(set(range(k)) - set(classes.tolist()))
        shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
        raise ValueError(f"{directory}: training labels must be the classes 0..K-1 (here K = {k}, the largest label "
                         f"+ 1), each with an example; {len(missing)} have none: {shown}")
    if int(yte.max()) >= k:
        raise ValueError(f"{directory}: test label {int(yte.max())} is not a class of the training labels 0..{k - 1}")
    xtr_t, xte_t = _standardize(xtr.astype(np.float32)[:, None] / 255.0, xte.astype(np.float32)[:, None] / 255.0)
    name = os.path.basename(os.path.normpath(directory)) or "idx"
    return Dataset(name, xtr_t, torch.from_numpy(ytr.astype(np.int64)), xte_t, torch.from_numpy(yte.astype(np.int64)), k)


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
