import gzip
import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load_fashion_data():
    spec = importlib.util.spec_from_file_location("fashion_data", EXAMPLES / "fashion_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fashion_data = _load_fashion_data()


def _write_idx(path: Path, array: np.ndarray, type_code: int, compress: bool) -> Path:
    # Written by hand from the format description, independently of the reader under test.
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_images_and_labels_round_trip(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = np.array([9, 0, 3, 3, 7], dtype=np.uint8)
    images_path = _write_idx(tmp_path / "train-images-idx3-ubyte", images, 0x08, compress)
    labels_path = _write_idx(tmp_path / "train-labels-idx1-ubyte", labels, 0x08, compress)

    np.testing.assert_array_equal(fashion_data.read_idx(images_path), images)
    np.testing.assert_array_equal(fashion_data.read_idx(labels_path), labels)


@pytest.mark.parametrize("dtype,type_code", [(np.int16, 0x0B), (np.int32, 0x0C), (np.float32, 0x0D), (np.float64, 0x0E)])
def test_read_idx_multibyte_types_are_big_endian(tmp_path, dtype, type_code):
    array = np.arange(-6, 6, dtype=dtype).reshape(3, 4) * 1000
    path = _write_idx(tmp_path / "data-idx2", array, type_code, compress=False)

    result = fashion_data.read_idx(path)

    assert result.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(result, array)


def test_read_idx_rejects_bad_magic_and_wrong_length(tmp_path):
    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(b"\x01\x02\x08\x01" + struct.pack(">I", 2) + b"\x00\x00")
    with pytest.raises(ValueError, match="not an IDX file"):
        fashion_data.read_idx(bad_magic)

    truncated = tmp_path / "short"
    truncated.write_bytes(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="promises 10"):
        fashion_data.read_idx(truncated)


def test_load_fashion_mnist_finds_gzipped_and_plain_files(tmp_path):
    images = np.full((3, 28, 28), 200, dtype=np.uint8)
    labels = np.array([1, 2, 3], dtype=np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte", images, 0x08, compress=True)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", labels, 0x08, compress=False)

    x_train, y_train, x_test, y_test = fashion_data.load_fashion_mnist(tmp_path)

    np.testing.assert_array_equal(x_train, images)
    np.testing.assert_array_equal(y_train, labels)
    assert x_test is None and y_test is None


def test_load_fashion_mnist_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        fashion_data.load_fashion_mnist(tmp_path)


def test_latency_code_fires_bright_pixels_once_and_early():
    images = np.array([[0, 40, 52, 128, 255]], dtype=np.uint8)  # 40/255 < 0.2 never fires

    spikes = fashion_data.latency_code(images, steps=100)

    assert spikes.shape == (1, 100, 5)
    counts = spikes.sum(dim=1)[0].tolist()
    assert counts == [0.0, 0.0, 1.0, 1.0, 1.0]
    first = spikes[0].argmax(dim=0).tolist()
    assert first[4] == 4  # floor(20 ln(1/0.8)) = floor(4.46)
    assert first[4] < first[3] < first[2]


def test_latency_code_drops_spikes_after_the_last_step():
    images = np.array([[52]], dtype=np.uint8)  # fires at step floor(20 ln(0.2039/0.0039)) = 79

    assert fashion_data.latency_code(images, steps=100).sum() == 1
    assert fashion_data.latency_code(images, steps=50).sum() == 0


def test_bundled_data_has_ten_balanced_classes_of_28x28_images():
    x_train, y_train, x_test, y_test = fashion_data.load_bundled()

    assert x_train.shape[1:] == (28, 28) and x_train.dtype == np.uint8
    assert len(x_train) == len(y_train) and len(x_test) == len(y_test)
    assert np.bincount(y_train, minlength=10).min() == len(y_train) // 10
