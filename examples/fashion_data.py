"""Data for the bundled example: the synthetic stand-in, real Fashion-MNIST, and the latency code.

* :func:`load_bundled` reads ``examples/data/synthetic_fashion_small.npz`` (made by
  ``examples/data/make_synthetic_fashion.py``; 2000 train + 500 test images, ten classes).
* :func:`load_fashion_mnist` reads the real data set from the IDX files as distributed
  (``train-images-idx3-ubyte.gz`` etc., gzipped or not) with :func:`read_idx`.
* :func:`latency_code` turns images into spike trains as the seed paper does.

Example::

    >>> x_train, y_train, x_test, y_test = load_bundled()
    >>> latency_code(x_train[:2], steps=100).shape
    torch.Size([2, 100, 784])
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import torch

BUNDLED = Path(__file__).with_name("data") / "synthetic_fashion_small.npz"

# IDX type codes (third byte of the magic number) and their big-endian numpy dtypes.
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (the MNIST / Fashion-MNIST format), gzipped if its name ends in ``.gz``.

    The header is two zero bytes, a type code, the number of dimensions, then each dimension as a
    big-endian uint32; the data follow in row-major order.

    Example::

        >>> read_idx("train-labels-idx1-ubyte.gz").shape
        (60000,)
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({ndim} dimensions announced)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: IDX data has {len(raw) - header} bytes, the header {dims} promises {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find_idx(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: neither {stem} nor {stem}.gz found; expected the Fashion-MNIST IDX files")


def load_fashion_mnist(folder: str | Path):
    """Real Fashion-MNIST from a folder holding its four IDX files; returns ``(x_train, y_train, x_test, y_test)``.

    Images are uint8 arrays ``(N, 28, 28)``, labels uint8 ``(N,)``. The test pair is ``None`` when the
    ``t10k-*`` files are absent.
    """
    folder = Path(folder)
    x_train = read_idx(_find_idx(folder, "train-images-idx3-ubyte"))
    y_train = read_idx(_find_idx(folder, "train-labels-idx1-ubyte"))
    if len(x_train) != len(y_train):
        raise ValueError(f"{folder}: {len(x_train)} training images but {len(y_train)} labels")
    try:
        x_test = read_idx(_find_idx(folder, "t10k-images-idx3-ubyte"))
        y_test = read_idx(_find_idx(folder, "t10k-labels-idx1-ubyte"))
    except FileNotFoundError:
        x_test = y_test = None
    return x_train, y_train, x_test, y_test


def load_bundled(path: str | Path = BUNDLED):
    """The bundled synthetic data set; returns ``(x_train, y_train, x_test, y_test)`` like :func:`load_fashion_mnist`."""
    with np.load(path) as data:
        return data["x_train"], data["y_train"], data["x_test"], data["y_test"]


def latency_code(images: np.ndarray, steps: int, *, tau_eff: float = 20.0, threshold: float = 0.2) -> torch.Tensor:
    """Spike trains ``(N, steps, H*W)``: a pixel of intensity x in [0, 1] fires once, at step
    ``floor(tau_eff * ln(x / (x - threshold)))``, if x > threshold and that step is < ``steps``.

    ``tau_eff`` is in time steps (the seed paper: 20 ms at dt = 1 ms). Bright pixels fire first.
    """
    x = images.reshape(len(images), -1).astype(np.float64) / 255.0
    fires = x > threshold
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(fires, np.floor(tau_eff * np.log(x / (x - threshold))), steps)
    fires &= t < steps
    spikes = np.zeros((len(images), steps, x.shape[1]), dtype=np.float32)
    n, j = np.nonzero(fires)
    spikes[n, t[n, j].astype(np.int64), j] = 1.0
    return torch.from_numpy(spikes)
