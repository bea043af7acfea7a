"""tfds source, exercised offline with `tfds.testing.mock_data` (never a download)."""

import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from sokd_tf import config
from sokd_tf.data import load_dataset, tfds_source
from sokd_tf.errors import DataError


def _config(**overrides):
    values = dict(source="tfds", name="cifar100", normalization="dataset", validation_size=8)
    values.update(overrides)
    return config.DataConfig(**values)


def test_cifar100_reads_info_splits_and_statistics():
    with tfds.testing.mock_data(num_examples=40):
        dataset = load_dataset(_config())
        images, labels = dataset.raw_images("train")
        batch_images, batch_labels = next(iter(dataset.train_batches(16, seed=0)))
    info = dataset.info
    assert info.num_classes == 100 and len(info.class_names) == 100
    assert info.image_shape == (32, 32, 3)
    assert info.split_sizes == {"train": 32, "validation": 8, "test": 40}
    assert info.mean == (0.5071, 0.4865, 0.4409) and info.std == (0.2673, 0.2564, 0.2762)
    assert images.shape == (32, 32, 32, 3) and images.dtype == np.uint8
    assert labels.min() >= 0 and labels.max() < 100
    assert batch_images.shape == (16, 32, 32, 3) and batch_labels.shape == (16,)


def test_paper_preset_uses_the_cifar10_statistics():
    preset = config.resolve("cifar100_wrn40_2_wrn40_1").data
    with tfds.testing.mock_data(num_examples=12):
        dataset = load_dataset(config.DataConfig(**{**preset.__dict__, "validation_size": 0}))
    assert dataset.info.mean == (0.4914, 0.4822, 0.4465)
    assert dataset.info.std == (0.2470, 0.2435, 0.2616)


def test_streaming_mode_reads_the_same_examples():
    with tfds.testing.mock_data(num_examples=10):
        cached = load_dataset(_config(validation_size=0))
        streamed = load_dataset(_config(validation_size=0, cache="never"))
        np.testing.assert_array_equal(streamed.raw_images("test")[0], cached.raw_images("test")[0])


def test_unprepared_dataset_fails_fast_without_downloading(tmp_path):
    start = time.monotonic()
    with pytest.raises(DataError, match="'cifar100' is not prepared .*download_and_prepare"):
        tfds_source.load("cifar100", str(tmp_path), download=False)
    assert time.monotonic() - start < 30


def test_unknown_dataset_name():
    with pytest.raises(DataError, match="tfds has no dataset named 'no_such_dataset_xyz'"):
        tfds_source.load("no_such_dataset_xyz", download=False)


def test_non_image_dataset_is_rejected():
    with pytest.raises(DataError, match="expected an image-classification dataset|expected "
                                        "Image/ClassLabel"):
        tfds_source.load("imdb_reviews", download=False)
