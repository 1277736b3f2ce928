import gzip
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def _write_idx_gz(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_example_trains_on_fashion_mnist_idx_files_and_the_held_out_loss_falls(tmp_path):
    with np.load(ROOT / "examples" / "data" / "synthetic_fashion_small.npz") as data:
        _write_idx_gz(tmp_path / "train-images-idx3-ubyte.gz", data["x_train"][:400])
        _write_idx_gz(tmp_path / "train-labels-idx1-ubyte.gz", data["y_train"][:400])
        _write_idx_gz(tmp_path / "t10k-images-idx3-ubyte.gz", data["x_test"][:64])
        _write_idx_gz(tmp_path / "t10k-labels-idx1-ubyte.gz", data["y_test"][:64])

    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_seed_network.py"), "--data", str(tmp_path),
         "--steps", "6", "--batch-size", "32", "--eval-images", "64", "--lr", "2e-3"],
        capture_output=True, text=True, timeout=600,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "400 training images, 64 held out" in result.stdout
    steps = re.findall(r"step +\d+/6 +loss (\S+) +acc .* active (\S+)% / (\S+)%", result.stdout)
    assert len(steps) == 6
    assert all(np.isfinite(float(loss)) for loss, _, _ in steps)
    assert all(0 < float(a1) < 100 and 0 < float(a2) < 100 for _, a1, a2 in steps)


def test_example_rejects_a_folder_without_idx_files(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_seed_network.py"), "--data", str(tmp_path), "--steps", "1"],
        capture_output=True, text=True, timeout=600,
    )

    assert result.returncode == 2
    assert result.stderr.startswith("error: --data:") and "train-images-idx3-ubyte" in result.stderr
    assert "Traceback" not in result.stderr
