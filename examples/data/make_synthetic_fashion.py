"""Recreate ``synthetic_fashion_small.npz``: a small, deterministic stand-in for Fashion-MNIST.

Fashion-MNIST cannot be downloaded everywhere snnopt is tried, so the bundled example trains on
28x28 greyscale images of ten synthetic classes instead. Every class is a simple shape (bars,
rings, crosses, blobs, ...) drawn with a random position, size, stroke and brightness, blurred and
sprinkled with noise: easy enough that the seed network learns visibly in 150 steps, varied enough
that it does not learn in one. Pixels are uint8 like the real data set, so the same latency code
applies to both.

Run from anywhere::

    python examples/data/make_synthetic_fashion.py            # rewrites the bundled file
    python examples/data/make_synthetic_fashion.py --check    # verifies it instead

The draw uses numpy's PCG64 generator with a fixed seed and reproduces the bundled file bit for bit
(checked with numpy 2.4; numpy does not promise identical streams across all versions, hence
``--check``).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

SIZE = 28
CLASSES = ("hbar", "vbar", "diagonal", "antidiagonal", "ring", "disk", "cross", "square", "two_blobs", "triangle")
N_TRAIN, N_TEST = 2000, 500
SEED = 20210508  # the seed paper's arXiv submission date
OUT = Path(__file__).with_name("synthetic_fashion_small.npz")


def _shape_mask(label: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    cy, cx = rng.uniform(12, 16, size=2)
    r = rng.uniform(5, 9)
    w = rng.uniform(1.2, 2.5)  # half stroke width
    name = CLASSES[label]
    if name == "hbar":
        return (np.abs(yy - cy) < w) & (np.abs(xx - cx) < r + 2)
    if name == "vbar":
        return (np.abs(xx - cx) < w) & (np.abs(yy - cy) < r + 2)
    if name == "diagonal":
        return (np.abs((yy - cy) - (xx - cx)) < 1.4 * w) & (np.abs(xx - cx) < r)
    if name == "antidiagonal":
        return (np.abs((yy - cy) + (xx - cx)) < 1.4 * w) & (np.abs(xx - cx) < r)
    dist = np.hypot(yy - cy, xx - cx)
    if name == "ring":
        return np.abs(dist - r) < w
    if name == "disk":
        return dist < r * 0.8
    if name == "cross":
        return ((np.abs(yy - cy) < w) | (np.abs(xx - cx) < w)) & (np.abs(yy - cy) < r) & (np.abs(xx - cx) < r)
    if name == "square":
        inside = np.maximum(np.abs(yy - cy), np.abs(xx - cx))
        return np.abs(inside - r) < w
    if name == "two_blobs":
        d = r * 0.7
        return (np.hypot(yy - cy, xx - cx + d) < 3) | (np.hypot(yy - cy, xx - cx - d) < 3)
    # triangle: apex up, base at cy + r/2
    return (yy < cy + r / 2) & (yy > cy - r) & (np.abs(xx - cx) < (yy - (cy - r)) * 0.6)


def _blur(img: np.ndarray) -> np.ndarray:
    kernel = np.array([0.25, 0.5, 0.25])
    img = np.apply_along_axis(lambda row: np.convolve(row, kernel, mode="same"), 1, img)
    return np.apply_along_axis(lambda col: np.convolve(col, kernel, mode="same"), 0, img)


def make_images(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    labels = np.arange(count) % len(CLASSES)
    rng.shuffle(labels)
    images = np.empty((count, SIZE, SIZE), dtype=np.uint8)
    for k, label in enumerate(labels):
        img = _shape_mask(int(label), rng) * rng.uniform(0.6, 1.0)
        img = _blur(img) + rng.normal(0.0, 0.06, size=(SIZE, SIZE))
        # Keep the background black as in Fashion-MNIST: faint noise must not fire in the latency code.
        img[img < 0.15] = 0.0
        images[k] = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    return images, labels.astype(np.uint8)


def make_dataset() -> dict[str, np.ndarray]:
    rng = np.random.Generator(np.random.PCG64(SEED))
    x_train, y_train = make_images(N_TRAIN, rng)
    x_test, y_test = make_images(N_TEST, rng)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test,
            "class_names": np.array(CLASSES)}


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        h.update(key.encode())
        h.update(np.ascontiguousarray(arrays[key]).tobytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the bundled file instead of writing it")
    args = parser.parse_args(argv)
    arrays = make_dataset()
    if args.check:
        with np.load(OUT) as stored:
            same = _digest(arrays) == _digest({k: stored[k] for k in stored.files})
        print(f"{OUT.name}: {'identical' if same else 'DIFFERENT'} to a fresh draw")
        return 0 if same else 1
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} KiB): {N_TRAIN} train + {N_TEST} test images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
