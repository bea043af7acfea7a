"""The tf.data pipeline: determinism, resumption, epochs, augmentation, normalisation."""

import itertools

import numpy as np
import pytest
import tensorflow as tf

from sokd_tf import config
from sokd_tf.data import DatasetInfo, ImageDataset, load_dataset, normalize
from sokd_tf.data.augment import pad_crop_flip
from sokd_tf.data.source import SourceSplit
from sokd_tf.errors import ConfigError, DataError

FASHION = config.DataConfig(source="fashion_mnist", name="fashion_mnist",
                            normalization="dataset", validation_size=5000)


@pytest.fixture(scope="module")
def fashion():
    return load_dataset(FASHION)


def _synthetic(size=50, shape=(6, 6, 3), **kwargs):
    """Images whose label is their index, so batches reveal the order exactly."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (size, *shape), dtype=np.uint8)
    labels = np.arange(size, dtype=np.int32)
    info = DatasetInfo(name="synthetic", num_classes=size, image_shape=shape,
                       class_names=tuple(map(str, range(size))),
                       split_sizes={"train": size, "test": size},
                       mean=(0.5,) * shape[-1], std=(0.25,) * shape[-1])
    split = SourceSplit(size=size, images=images, labels=labels)
    return ImageDataset(info, {"train": split, "test": split}, **kwargs)


def _epochs(dataset, batch_size, seed, first_epoch, count, **kwargs):
    steps = dataset.steps_per_epoch(batch_size, kwargs.get("drop_remainder"))
    batches = list(dataset.train_batches(batch_size, seed=seed, first_epoch=first_epoch,
                                         **kwargs).take(steps * count).as_numpy_iterator())
    return [batches[i * steps:(i + 1) * steps] for i in range(count)]


def test_fixed_seed_batch_is_identical_across_independent_builds(fashion):
    other = load_dataset(FASHION)
    first = next(iter(fashion.train_batches(128, seed=8888)))
    second = next(iter(other.train_batches(128, seed=8888)))
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert first[0].shape == (128, 28, 28, 1) and first[0].dtype == tf.float32
    assert first[1].dtype == tf.int32
    different = next(iter(fashion.train_batches(128, seed=1)))
    assert not np.array_equal(first[1], different[1])


def test_resumed_pipeline_sees_the_same_epoch_on_real_data(fashion):
    steps = fashion.steps_per_epoch(128)
    assert steps == 430  # ceil(55,000 / 128)
    uninterrupted = fashion.train_batches(128, seed=7).skip(2 * steps).take(3)
    resumed = fashion.train_batches(128, seed=7, first_epoch=2).take(3)
    for (x1, y1), (x2, y2) in zip(uninterrupted, resumed, strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)


def test_each_epoch_is_a_permutation_with_its_own_partial_batch():
    dataset = _synthetic(size=50)
    assert dataset.steps_per_epoch(16) == 4
    epochs = _epochs(dataset, 16, seed=3, first_epoch=0, count=3)
    orders = []
    for batches in epochs:
        assert [len(labels) for _, labels in batches] == [16, 16, 16, 2]
        order = np.concatenate([labels for _, labels in batches])
        assert sorted(order.tolist()) == list(range(50))
        orders.append(order)
    assert not np.array_equal(orders[0], orders[1])
    resumed = _epochs(dataset, 16, seed=3, first_epoch=2, count=1)[0]
    for (x1, y1), (x2, y2) in zip(epochs[2], resumed, strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)


def test_steps_per_epoch_cap_keeps_epochs_aligned():
    dataset = _synthetic(size=50)
    full = _epochs(dataset, 16, seed=3, first_epoch=0, count=3)
    capped = list(dataset.train_batches(16, seed=3, steps_per_epoch=2).take(6))
    for epoch in range(3):
        for step in range(2):
            np.testing.assert_array_equal(capped[2 * epoch + step][1], full[epoch][step][1])
            np.testing.assert_array_equal(capped[2 * epoch + step][0], full[epoch][step][0])
    with pytest.raises(DataError, match=r"steps_per_epoch=5 must be in \[1, 4\]"):
        dataset.train_batches(16, seed=3, steps_per_epoch=5)


def test_drop_remainder_gives_full_batches_only():
    dataset = _synthetic(size=50, drop_remainder=True)
    assert dataset.steps_per_epoch(16) == 3
    assert dataset.steps_per_epoch(16, drop_remainder=False) == 4
    batches = _epochs(dataset, 16, seed=0, first_epoch=0, count=2)
    assert all(len(labels) == 16 for epoch in batches for _, labels in epoch)
    with pytest.raises(DataError, match="no full batch"):
        dataset.steps_per_epoch(64)


def test_unaugmented_training_batches_are_the_normalised_images_in_epoch_order():
    dataset = _synthetic(size=20)
    images, _ = dataset.raw_images("train")
    (batch_images, batch_labels), = _epochs(dataset, 20, seed=5, first_epoch=0, count=1,
                                            augment=False)[0]
    expected = (images[batch_labels].astype(np.float32) / 255.0 - 0.5) / 0.25
    np.testing.assert_allclose(batch_images, expected, atol=1e-6)


def _candidates(image, pad):
    """Every crop of the reflect-padded image, and each crop flipped."""
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    height, width = image.shape[:2]
    out = []
    for top, left in itertools.product(range(2 * pad + 1), repeat=2):
        crop = padded[top:top + height, left:left + width]
        out += [(top, left, False, crop), (top, left, True, crop[:, ::-1])]
    return out


def test_augmentation_is_a_reflect_pad_crop_then_flip():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (64, 7, 5, 2), dtype=np.uint8)
    out = pad_crop_flip(tf.constant(images), tf.constant([4, 2], tf.int64), pad=2,
                        flip=True).numpy()
    assert out.shape == images.shape and out.dtype == np.uint8
    chosen = []
    for image, augmented in zip(images, out, strict=True):
        matches = [(top, left, flipped) for top, left, flipped, crop in _candidates(image, 2)
                   if np.array_equal(crop, augmented)]
        assert matches, "output is not a reflect-pad crop (+flip) of its input"
        chosen.append(matches[0])
    assert len({(top, left) for top, left, _ in chosen}) > 10  # offsets vary per image
    flips = sum(flipped for _, _, flipped in chosen)
    assert 16 < flips < 48  # about half flipped
    again = pad_crop_flip(tf.constant(images), tf.constant([4, 2], tf.int64), pad=2,
                          flip=True).numpy()
    np.testing.assert_array_equal(out, again)
    identity = pad_crop_flip(tf.constant(images), tf.constant([4, 2], tf.int64), pad=0,
                             flip=False)
    np.testing.assert_array_equal(identity, images)


def test_training_batches_are_augmented_and_evaluation_is_not(fashion):
    images, labels = fashion.raw_images("test", limit=256)
    eval_images, eval_labels = next(iter(fashion.eval_batches("test", 256)))
    np.testing.assert_array_equal(eval_labels, labels)
    np.testing.assert_allclose(eval_images, fashion.normalize(images), atol=0)
    plain = next(iter(fashion.train_batches(64, seed=2, augment=False)))
    augmented = next(iter(fashion.train_batches(64, seed=2)))
    np.testing.assert_array_equal(plain[1], augmented[1])
    assert augmented[0].shape == (64, 28, 28, 1)
    changed = np.any(plain[0].numpy() != augmented[0].numpy(), axis=(1, 2, 3))
    assert changed.mean() > 0.8


def test_eval_batches_are_finite_and_cover_each_split(fashion):
    sizes = {split: sum(len(labels) for _, labels in fashion.eval_batches(split, 1000))
             for split in ("validation", "test")}
    assert sizes == {"validation": 5000, "test": 10000}
    with pytest.raises(DataError, match="unknown split 'dev'"):
        fashion.eval_batches("dev", 10)


def test_no_validation_split_in_paper_mode():
    dataset = _synthetic()
    with pytest.raises(DataError, match="no 'validation' split"):
        dataset.eval_batches("validation", 10)


def test_normalize_is_pixels_over_255_minus_mean_over_std():
    out = normalize(tf.constant([[0, 255, 51]], tf.uint8)[..., None], (0.2,), (0.5,))
    np.testing.assert_allclose(out.numpy().ravel(), [-0.4, 1.6, 0.0], atol=1e-6)
    dataset = _synthetic(shape=(2, 2, 3), pad=1)
    np.testing.assert_allclose(dataset.normalize(np.full([1, 2, 2, 3], 127.5)), 0.0, atol=1e-6)


def test_normalisation_modes(fashion):
    none = load_dataset(config.DataConfig(source="fashion_mnist", normalization="none",
                                          validation_size=0))
    assert none.info.mean == (0.0,) and none.info.std == (1.0,)
    with pytest.raises(ConfigError, match="normalization='cifar10' needs 3-channel"):
        load_dataset(config.DataConfig(source="fashion_mnist", normalization="cifar10"))


def test_validation_size_must_leave_training_images():
    with pytest.raises(DataError, match="validation_size=60000 leaves no training images"):
        load_dataset(config.DataConfig(source="fashion_mnist", normalization="none",
                                       validation_size=60000))


def test_pad_must_be_smaller_than_the_image():
    with pytest.raises(ConfigError, match="data.pad=6"):
        _synthetic(shape=(6, 6, 3), pad=6)


def test_batches_feed_keras_fit():
    import keras

    dataset = _synthetic(size=40, shape=(8, 8, 1))
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(40)])
    model.compile(optimizer="sgd",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(dataset.train_batches(16, seed=0), epochs=2,
                        steps_per_epoch=dataset.steps_per_epoch(16), shuffle=False, verbose=0)
    assert len(history.history["loss"]) == 2


def test_random_resized_crop_full_box_is_the_image_or_its_mirror():
    from sokd_tf.data.augment import random_resized_crop_flip
    images = np.random.default_rng(0).integers(0, 256, (16, 7, 9, 3)).astype(np.uint8)
    seed = tf.constant([4, 2], tf.int64)
    same = random_resized_crop_flip(images, seed, flip=False, scale=(1, 1), ratio=(1, 1))
    np.testing.assert_allclose(same, images, atol=1e-4)
    flipped = random_resized_crop_flip(images, seed, flip=True, scale=(1, 1), ratio=(1, 1))
    mirrored = [np.allclose(f, i[:, ::-1], atol=1e-4) for f, i in zip(flipped, images, strict=True)]
    kept = [np.allclose(f, i, atol=1e-4) for f, i in zip(flipped, images, strict=True)]
    assert all(m or k for m, k in zip(mirrored, kept, strict=True)) and 0 < sum(mirrored) < 16
    crops = random_resized_crop_flip(images, seed, flip=True)
    assert crops.shape == images.shape and crops.dtype == tf.float32
    np.testing.assert_array_equal(crops, random_resized_crop_flip(images, seed, flip=True))
    assert not np.allclose(crops, random_resized_crop_flip(images, seed + 1, flip=True))
    # Bilinear resampling stays within the pixel range.
    assert float(tf.reduce_min(crops)) >= 0 and float(tf.reduce_max(crops)) <= 255


def test_random_resized_crop_is_the_configured_training_augmentation():
    dataset = _synthetic(size=20, augmentation="random_resized_crop")
    first = next(iter(dataset.train_batches(8, seed=1)))
    again = next(iter(dataset.train_batches(8, seed=1)))
    plain = next(iter(dataset.train_batches(8, seed=1, augment=False)))
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], plain[1])
    assert not np.allclose(first[0], plain[0])
