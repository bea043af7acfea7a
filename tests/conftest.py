"""Shared fixtures: a small real Fashion-MNIST subset in IDX format."""

import gzip
import os
import struct

import numpy as np
import pytest

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def _read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, count = struct.unpack(">II", data[:8])
    if magic == 2051:
        rows, cols = struct.unpack(">II", data[8:16])
        return np.frombuffer(data, np.uint8, offset=16).reshape(count, rows, cols)
    return np.frombuffer(data, np.uint8, offset=8)


def _write_idx(path, array):
    with gzip.open(path, "wb") as f:
        if array.ndim == 3:
            f.write(struct.pack(">IIII", 2051, *array.shape))
        else:
            f.write(struct.pack(">II", 2049, array.shape[0]))
        f.write(np.ascontiguousarray(array, np.uint8).tobytes())


def write_fashion_mnist_subset(directory, train_size, test_size):
    """Writes the first `train_size`/`test_size` real Fashion-MNIST images as IDX files."""
    os.makedirs(directory, exist_ok=True)
    for split, size in (("train", train_size), ("t10k", test_size)):
        images = _read_idx(os.path.join(FASHION_MNIST_DIR, f"{split}-images-idx3-ubyte.gz"))[:size]
        labels = _read_idx(os.path.join(FASHION_MNIST_DIR, f"{split}-labels-idx1-ubyte.gz"))[:size]
        _write_idx(os.path.join(directory, f"{split}-images-idx3-ubyte.gz"), images)
        _write_idx(os.path.join(directory, f"{split}-labels-idx1-ubyte.gz"), labels)
    return directory


@pytest.fixture(scope="session")
def small_fashion_mnist(tmp_path_factory):
    """Directory with 640 train and 256 test real Fashion-MNIST images (IDX, gzip)."""
    return write_fashion_mnist_subset(str(tmp_path_factory.mktemp("fmnist_small")), 640, 256)


def pytest_report_header(config):
    """The CPU in the header: float kernels, and so the last digits, differ by CPU class."""
    from sokd_tf.runtime import cpu

    return f"CPU: {cpu.detect(gpu_compute_capabilities=[]).describe(with_gpu=False)}"
