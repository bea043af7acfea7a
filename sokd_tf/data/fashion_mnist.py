"""Fashion-MNIST read directly from its IDX files (the offline default).

Data-dir convention: `data_dir` holds the four original files
`train-images-idx3-ubyte.gz`, `train-labels-idx1-ubyte.gz`, `t10k-images-idx3-ubyte.gz`,
`t10k-labels-idx1-ubyte.gz` (gzip-compressed, or the same names without `.gz`). The
Debian package `dataset-fashion-mnist` installs them under
`/usr/share/datasets/fashion-mnist` (`sokd_tf.config.FASHION_MNIST_DIR`).

The whole dataset is held in memory (55 MB of uint8), so `DataConfig.cache` does not
apply to this source.

IDX format: big-endian int32 magic (2051 images, 2049 labels), the item count, for
images the row and column counts, then the uint8 payload. Every header field and the
payload length are checked.

Reference: Xiao, Rasul & Vollgraf, "Fashion-MNIST", arXiv 1708.07747.
"""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

from sokd_tf.data.source import SourceData, SourceSplit, check_labels
from sokd_tf.errors import DataError

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
HOW_TO_GET = (
    "install the Debian package dataset-fashion-mnist (`apt-get install "
    "dataset-fashion-mnist`, files in /usr/share/datasets/fashion-mnist), pass "
    "--data_dir pointing at the four IDX files, or use --source=tfds --dataset=fashion_mnist "
    "when online"
)


def _find(data_dir: str, stem: str) -> str:
    for candidate in (stem + ".gz", stem):
        path = os.path.join(data_dir, candidate)
        if os.path.isfile(path):
            return path
    raise DataError(f"Fashion-MNIST file {os.path.join(data_dir, stem + '.gz')} not found; "
                    + HOW_TO_GET)


def _read_bytes(path: str) -> bytes:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                return handle.read()
        with open(path, "rb") as handle:
            return handle.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise DataError(f"{path}: corrupt or truncated gzip file ({error}); "
                        f"reinstall it: {HOW_TO_GET}") from error


def read_idx(path: str, magic: int) -> np.ndarray:
    """Parses one IDX file into a uint8 array.

    Args:
      path: `.gz` or uncompressed IDX file.
      magic: expected magic number (2051 images -> `[n, rows, cols]`, 2049 labels -> `[n]`).

    Raises:
      DataError: unreadable gzip, wrong magic, or a payload that does not match the header.
    """
    data = _read_bytes(path)
    num_dims = {IMAGES_MAGIC: 3, LABELS_MAGIC: 1}[magic]
    header_size = 4 * (1 + num_dims)
    if len(data) < header_size:
        raise DataError(f"{path}: {len(data)} bytes, too short for an IDX header "
                        f"({header_size} bytes expected)")
    header = np.frombuffer(data, dtype=">i4", count=1 + num_dims)
    if int(header[0]) != magic:
        raise DataError(f"{path}: IDX magic number {int(header[0])}, expected {magic} "
                        f"({'images' if magic == IMAGES_MAGIC else 'labels'} file)")
    shape = tuple(int(d) for d in header[1:])
    expected = int(np.prod(shape))
    payload = len(data) - header_size
    if payload != expected:
        raise DataError(f"{path}: header announces shape {shape} = {expected} bytes of "
                        f"data, file holds {payload}")
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


def load(data_dir: str) -> SourceData:
    """Reads the train and test splits of Fashion-MNIST from `data_dir`.

    Returns:
      SourceData with uint8 images `[n, 28, 28, 1]` (60,000 train, 10,000 test for the
      real files) and int32 labels in [0, 10).

    Raises:
      DataError: missing directory/files (the message says how to get them) or malformed
        files.
    """
    if not os.path.isdir(data_dir):
        raise DataError(f"Fashion-MNIST directory {data_dir} does not exist; " + HOW_TO_GET)
    splits = {}
    image_shape = None
    for split, (images_stem, labels_stem) in FILES.items():
        images_path = _find(data_dir, images_stem)
        labels_path = _find(data_dir, labels_stem)
        images = read_idx(images_path, IMAGES_MAGIC)[..., None]
        labels = read_idx(labels_path, LABELS_MAGIC).astype(np.int32)
        if len(images) != len(labels):
            raise DataError(f"{images_path} holds {len(images)} images but {labels_path} "
                            f"holds {len(labels)} labels; expected the same count")
        if len(images) == 0:
            raise DataError(f"{images_path}: split {split!r} is empty (expected >= 1 image)")
        if image_shape is None:
            image_shape = images.shape[1:]
        elif images.shape[1:] != image_shape:
            raise DataError(f"{images_path}: images of shape {images.shape[1:]}, expected "
                            f"{image_shape} as in the train split")
        check_labels(labels, len(CLASS_NAMES),
                     lambda i, path=labels_path: f"{path}, label {i}")
        splits[split] = SourceSplit(size=len(labels), images=images, labels=labels)
    return SourceData(
        name="fashion_mnist",
        class_names=CLASS_NAMES,
        image_shape=tuple(int(d) for d in image_shape),
        splits=splits,
    )
