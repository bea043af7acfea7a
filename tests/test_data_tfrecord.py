"""TFRecord source and writer: round trips and every kind of malformed input."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from sokd_tf import config
from sokd_tf.data import (
    convert_to_tfrecords,
    load_dataset,
    tfrecord,
    write_dataset_info,
    write_tfrecords,
)
from sokd_tf.errors import DataError


def _config(data_dir, **overrides):
    values = dict(source="tfrecord", name="mine", data_dir=str(data_dir),
                  normalization="dataset", validation_size=0, pad=1)
    values.update(overrides)
    return config.DataConfig(**values)


def _arrays(count, shape=(5, 4, 3), num_classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (count, *shape), dtype=np.uint8),
            rng.integers(0, num_classes, count).astype(np.int32))


def _write(directory, train, test, *, num_classes=4, shards=3, **kwargs):
    write_tfrecords(train, str(directory), "train", shards, **kwargs)
    write_tfrecords(test, str(directory), "test", 1, **kwargs)
    if num_classes:
        write_dataset_info(str(directory), name="mine",
                           class_names=[f"c{i}" for i in range(num_classes)],
                           image_shape=train[0].shape[1:])


def test_round_trip_gives_identical_images_and_labels(tmp_path):
    train, test = _arrays(23), _arrays(7, seed=1)
    paths = write_tfrecords(train, str(tmp_path), "train", 3)
    assert [os.path.basename(p) for p in paths] == [
        f"train-0000{i}-of-00003.tfrecord" for i in range(3)]
    write_tfrecords(test, str(tmp_path), "test", 1)
    write_dataset_info(str(tmp_path), name="mine", class_names=["a", "b", "c", "d"],
                       image_shape=(5, 4, 3))
    dataset = load_dataset(_config(tmp_path))
    assert dataset.info.class_names == ("a", "b", "c", "d")
    assert dataset.info.split_sizes == {"train": 23, "test": 7}
    for split, (images, labels) in (("train", train), ("test", test)):
        got_images, got_labels = dataset.raw_images(split)
        np.testing.assert_array_equal(got_images, images)
        np.testing.assert_array_equal(got_labels, labels)
    pixels = train[0].astype(np.float64) / 255
    np.testing.assert_allclose(dataset.info.mean, pixels.mean(axis=(0, 1, 2)), rtol=1e-9)
    np.testing.assert_allclose(dataset.info.std, pixels.std(axis=(0, 1, 2)), rtol=1e-9)


def test_real_fashion_mnist_images_round_trip(tmp_path):
    original = load_dataset(config.DataConfig(source="fashion_mnist", normalization="dataset",
                                              validation_size=0))
    train, test = original.raw_images("train", limit=3000), original.raw_images("test", 500)
    write_tfrecords(train, str(tmp_path), "train", 4)
    write_tfrecords(test, str(tmp_path), "test", 1)
    copy = load_dataset(_config(tmp_path))
    for split, (images, labels) in (("train", train), ("test", test)):
        np.testing.assert_array_equal(copy.raw_images(split)[0], images)
        np.testing.assert_array_equal(copy.raw_images(split)[1], labels)
    assert copy.info.num_classes == 10 and copy.info.image_shape == (28, 28, 1)


@pytest.mark.slow
def test_real_fashion_mnist_round_trip_through_the_converter(tmp_path):
    source = config.DataConfig(source="fashion_mnist", normalization="dataset", validation_size=5000)
    original = load_dataset(source, seed=3)
    written = convert_to_tfrecords(source, str(tmp_path), num_shards=6)
    assert len(written["train"]) == 6 and len(written["test"]) == 1
    with open(written["dataset_info"][0]) as handle:
        metadata = json.load(handle)
    assert metadata["num_classes"] == 10 and metadata["image_shape"] == [28, 28, 1]
    copy = load_dataset(_config(tmp_path, validation_size=5000, pad=4), seed=3)
    assert copy.info.name == "fashion_mnist"
    assert copy.info.mean == pytest.approx((0.2860,)) and copy.info.std == pytest.approx((0.3530,))
    assert copy.info.class_names == original.info.class_names
    assert copy.info.split_sizes == original.info.split_sizes
    for split in ("validation", "test"):
        np.testing.assert_array_equal(copy.raw_images(split)[0], original.raw_images(split)[0])
        np.testing.assert_array_equal(copy.raw_images(split)[1], original.raw_images(split)[1])
    first = next(iter(copy.train_batches(128, seed=5)))
    expected = next(iter(original.train_batches(128, seed=5)))
    np.testing.assert_array_equal(first[0], expected[0])


def test_streaming_mode_reads_the_same_data(tmp_path):
    train, test = _arrays(40), _arrays(9, seed=1)
    _write(tmp_path, train, test)
    cached = load_dataset(_config(tmp_path, validation_size=10), seed=2)
    streamed = load_dataset(_config(tmp_path, validation_size=10, cache="never"), seed=2)
    for split in ("train", "validation", "test"):
        np.testing.assert_array_equal(streamed.raw_images(split)[0], cached.raw_images(split)[0])
        np.testing.assert_array_equal(streamed.raw_images(split)[1], cached.raw_images(split)[1])
    epoch = [labels for _, labels in streamed.train_batches(8, seed=1).take(4)]
    again = [labels for _, labels in streamed.train_batches(8, seed=1).take(4)]
    assert [len(labels) for labels in epoch] == [8, 8, 8, 6]
    np.testing.assert_array_equal(np.concatenate(epoch), np.concatenate(again))
    assert sorted(np.concatenate(epoch)) == sorted(cached.raw_images("train")[1])
    resumed = next(iter(streamed.train_batches(8, seed=1, first_epoch=1)))
    uninterrupted = list(streamed.train_batches(8, seed=1).skip(4).take(1))[0]
    np.testing.assert_array_equal(resumed[0], uninterrupted[0])


def test_jpeg_and_custom_keys(tmp_path):
    train, test = _arrays(6, shape=(16, 16, 3)), _arrays(3, shape=(16, 16, 3), seed=1)
    keys = dict(image_key="jpg", label_key="y")
    write_tfrecords(train, str(tmp_path), "train", 2, image_format="jpeg", **keys)
    write_tfrecords(test, str(tmp_path), "test", 1, image_format="jpeg", **keys)
    write_dataset_info(str(tmp_path), name="mine", class_names="abcd", image_shape=(16, 16, 3),
                       **keys)
    dataset = load_dataset(_config(tmp_path))
    images, labels = dataset.raw_images("train")
    np.testing.assert_array_equal(labels, train[1])
    assert images.shape == train[0].shape
    with pytest.raises(DataError, match="bytes feature 'image/encoded'"):
        tfrecord.load(str(tmp_path), image_key="image/encoded", label_key="image/class/label")


def test_class_count_from_classes_txt_or_largest_label(tmp_path):
    train, test = _arrays(10, num_classes=3), _arrays(4, num_classes=3)
    _write(tmp_path, train, test, num_classes=0)
    inferred = load_dataset(_config(tmp_path))
    assert inferred.info.num_classes == int(max(train[1].max(), test[1].max())) + 1
    (tmp_path / "classes.txt").write_text("cat\ndog\nbird\nfish\nant\n")
    named = load_dataset(_config(tmp_path))
    assert named.info.class_names == ("cat", "dog", "bird", "fish", "ant")


# ----- bad input -----------------------------------------------------------------------

def _write_examples(path, examples):
    with tf.io.TFRecordWriter(str(path)) as writer:
        for example in examples:
            writer.write(example.SerializeToString())


def _png(shape=(5, 4, 3), value=0):
    return tf.io.encode_png(np.full(shape, value, np.uint8)).numpy()


def _good_dir(directory):
    _write(directory, _arrays(5), _arrays(3, seed=1), shards=1)
    return directory


def test_missing_directory(tmp_path):
    with pytest.raises(DataError, match="TFRecord directory .*nowhere does not exist"):
        load_dataset(_config(tmp_path / "nowhere"))


def test_missing_shards(tmp_path):
    write_tfrecords(_arrays(3), str(tmp_path), "train")
    with pytest.raises(DataError, match="no TFRecord files for split 'test'.*test-\\*.tfrecord"):
        load_dataset(_config(tmp_path))


def test_record_without_label_feature_is_named(tmp_path):
    _good_dir(tmp_path)
    example = tf.train.Example(features=tf.train.Features(feature={
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[_png()]))}))
    good = tfrecord.make_example(_png(), 1)
    _write_examples(tmp_path / "train-00000-of-00001.tfrecord", [good, good, example])
    with pytest.raises(DataError, match=r"train-00000-of-00001.tfrecord, record 2: has 1 value"
                                        r"\(s\) under 'image/encoded' and 0 under "
                                        r"'image/class/label' \(features present: "
                                        r"\['image/encoded'\]\)"):
        load_dataset(_config(tmp_path))


def test_feature_of_the_wrong_type_is_named(tmp_path):
    _good_dir(tmp_path)
    example = tf.train.Example(features=tf.train.Features(feature={
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[_png()])),
        "image/class/label": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"1"]))}))
    _write_examples(tmp_path / "test-00000-of-00001.tfrecord",
                    [tfrecord.make_example(_png(), 0), example])
    with pytest.raises(DataError, match=r"test-00000-of-00001.tfrecord, record 1: .*int64 "
                                        r"feature 'image/class/label'"):
        load_dataset(_config(tmp_path))


def test_undecodable_image_is_named(tmp_path):
    _good_dir(tmp_path)
    _write_examples(tmp_path / "train-00000-of-00001.tfrecord",
                    [tfrecord.make_example(_png(), 0), tfrecord.make_example(b"not a png", 0)])
    with pytest.raises(DataError, match=r"train-00000-of-00001.tfrecord, record 1: undecodable "
                                        r"image .*expected PNG, JPEG"):
        load_dataset(_config(tmp_path))


def test_label_outside_the_classes_is_named(tmp_path):
    _good_dir(tmp_path)
    _write_examples(tmp_path / "test-00000-of-00001.tfrecord",
                    [tfrecord.make_example(_png(), 3), tfrecord.make_example(_png(), 4)])
    with pytest.raises(DataError, match=r"test-00000-of-00001.tfrecord, record 1: label 4 is "
                                        r"outside \[0, 4\)"):
        load_dataset(_config(tmp_path))


def test_image_of_another_shape_is_named(tmp_path):
    _good_dir(tmp_path)
    _write_examples(tmp_path / "train-00000-of-00001.tfrecord",
                    [tfrecord.make_example(_png(), 0),
                     tfrecord.make_example(_png((5, 4, 1)), 0)])
    with pytest.raises(DataError, match=r"record 1: image of shape \(5, 4, 1\) .*expected "
                                        r"\(5, 4, 3\)"):
        load_dataset(_config(tmp_path))


def test_empty_split_is_rejected(tmp_path):
    _good_dir(tmp_path)
    _write_examples(tmp_path / "train-00000-of-00001.tfrecord", [])
    with pytest.raises(DataError, match="split 'train' is empty"):
        load_dataset(_config(tmp_path))


def test_truncated_file_is_named(tmp_path):
    _good_dir(tmp_path)
    path = tmp_path / "train-00000-of-00001.tfrecord"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DataError, match="train-00000-of-00001.tfrecord: corrupt or truncated"):
        load_dataset(_config(tmp_path))


def test_malformed_metadata_is_named(tmp_path):
    _good_dir(tmp_path)
    (tmp_path / "dataset_info.json").write_text("{not json")
    with pytest.raises(DataError, match="dataset_info.json: not valid JSON"):
        load_dataset(_config(tmp_path))
    (tmp_path / "dataset_info.json").unlink()
    (tmp_path / "classes.txt").write_text("\n\n")
    with pytest.raises(DataError, match="classes.txt: no class names"):
        load_dataset(_config(tmp_path))
