"""Fashion-MNIST from the real IDX files (Debian package dataset-fashion-mnist)."""

import gzip
import os

import numpy as np
import pytest

from sokd_tf import config
from sokd_tf.data import fashion_mnist, load_dataset
from sokd_tf.errors import DataError

REAL_DIR = config.FASHION_MNIST_DIR


def _config(**overrides):
    values = dict(source="fashion_mnist", name="fashion_mnist", normalization="dataset",
                  validation_size=0)
    values.update(overrides)
    return config.DataConfig(**values)


@pytest.fixture(scope="module")
def full():
    return load_dataset(_config())


def test_real_files_have_the_published_sizes_and_classes(full):
    info = full.info
    assert info.split_sizes == {"train": 60000, "test": 10000}
    assert info.num_classes == 10
    assert info.image_shape == (28, 28, 1)
    assert info.class_names[0] == "T-shirt/top" and info.class_names[9] == "Ankle boot"
    images, labels = full.raw_images("train")
    assert images.shape == (60000, 28, 28, 1) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == [6000] * 10
    assert images.min() == 0 and images.max() == 255
    test_images, test_labels = full.raw_images("test")
    assert test_images.shape == (10000, 28, 28, 1)
    assert np.bincount(test_labels, minlength=10).tolist() == [1000] * 10


def test_known_statistics_match_the_training_pixels(full):
    images, _ = full.raw_images("train")
    histogram = np.bincount(images.ravel(), minlength=256)
    values = np.arange(256) / 255.0
    mean = (histogram * values).sum() / histogram.sum()
    std = np.sqrt((histogram * (values - mean) ** 2).sum() / histogram.sum())
    assert full.info.mean == (0.2860,) and full.info.std == (0.3530,)
    assert mean == pytest.approx(0.2860, abs=5e-5)
    assert std == pytest.approx(0.3530, abs=5e-5)


def test_validation_hold_out_is_seeded_and_partitions_train(full):
    held = load_dataset(_config(validation_size=5000), seed=8888)
    assert held.info.split_sizes == {"train": 55000, "validation": 5000, "test": 10000}
    train_images, train_labels = held.raw_images("train")
    validation_images, validation_labels = held.raw_images("validation")
    all_images, all_labels = full.raw_images("train")
    counts = np.bincount(train_labels, minlength=10) + np.bincount(validation_labels,
                                                                    minlength=10)
    assert counts.tolist() == [6000] * 10
    # Same pixels in total: the two parts partition the original train split.
    assert (train_images.sum(dtype=np.int64) + validation_images.sum(dtype=np.int64)
            == all_images.sum(dtype=np.int64))
    again = load_dataset(_config(validation_size=5000), seed=8888)
    np.testing.assert_array_equal(again.raw_images("validation")[1], validation_labels)
    other = load_dataset(_config(validation_size=5000), seed=1)
    assert not np.array_equal(other.raw_images("validation")[0], validation_images)


def test_read_idx_parses_a_hand_written_file(tmp_path):
    path = tmp_path / "tiny-images-idx3-ubyte.gz"
    header = np.array([2051, 2, 2, 3], ">i4").tobytes()
    with gzip.open(path, "wb") as handle:
        handle.write(header + bytes(range(12)))
    images = fashion_mnist.read_idx(str(path), fashion_mnist.IMAGES_MAGIC)
    np.testing.assert_array_equal(images, np.arange(12, dtype=np.uint8).reshape(2, 2, 3))


# ----- bad input -----------------------------------------------------------------------

def _write_idx(path, magic, dims, payload):
    with gzip.open(path, "wb") as handle:
        handle.write(np.array([magic, *dims], ">i4").tobytes() + payload)


def _small_images(directory, count=3):
    for stem in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        _write_idx(directory / f"{stem}.gz", 2051, (count, 28, 28), bytes(count * 784))


def _small_labels(directory, labels):
    for stem in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
        _write_idx(directory / f"{stem}.gz", 2049, (len(labels),), bytes(labels))


def test_missing_directory_says_how_to_get_the_files(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset(_config(data_dir=str(tmp_path / "nowhere")))


def test_missing_file_is_named(tmp_path):
    _small_labels(tmp_path, [0, 1, 2])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz not found.*dataset-fashion"):
        load_dataset(_config(data_dir=str(tmp_path)))


def test_bad_magic_is_named(tmp_path):
    _small_labels(tmp_path, [0, 1, 2])
    for stem in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        _write_idx(tmp_path / f"{stem}.gz", 2049, (3, 28, 28), bytes(3 * 784))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: IDX magic number 2049, "
                                        "expected 2051"):
        load_dataset(_config(data_dir=str(tmp_path)))


def test_truncated_gzip_is_named(tmp_path):
    _small_labels(tmp_path, [0, 1, 2])
    _small_images(tmp_path)
    with open(os.path.join(REAL_DIR, "train-images-idx3-ubyte.gz"), "rb") as handle:
        head = handle.read(50_000)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(head)
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: corrupt or truncated gzip"):
        load_dataset(_config(data_dir=str(tmp_path)))


def test_payload_shorter_than_header_is_named(tmp_path):
    _small_labels(tmp_path, [0, 1, 2])
    _small_images(tmp_path)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", 2051, (3, 28, 28), bytes(2 * 784))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: header announces shape "
                                        r"\(3, 28, 28\) = 2352 bytes of data, file holds 1568"):
        load_dataset(_config(data_dir=str(tmp_path)))


def test_image_and_label_counts_must_agree(tmp_path):
    _small_labels(tmp_path, [0, 1])
    _small_images(tmp_path)
    with pytest.raises(DataError, match="holds 3 images but .* holds 2 labels"):
        load_dataset(_config(data_dir=str(tmp_path)))


def test_label_outside_range_is_named(tmp_path):
    _small_images(tmp_path)
    _small_labels(tmp_path, [0, 10, 2])
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz, label 1: label 10 is "
                                        r"outside \[0, 10\)"):
        load_dataset(_config(data_dir=str(tmp_path)))


def test_empty_split_is_rejected(tmp_path):
    _small_images(tmp_path, count=0)
    _small_labels(tmp_path, [])
    with pytest.raises(DataError, match="split 'train' is empty"):
        load_dataset(_config(data_dir=str(tmp_path)))
