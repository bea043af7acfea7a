"""Streamed file splits: the same batches as cached ones, the budget, errors, interleave."""

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

from sokd_tf import config
from sokd_tf.data import data_errors, load_dataset, tfrecord, write_dataset_info, write_tfrecords
from sokd_tf.errors import DataError
from sokd_tf.runtime import loop

SHAPE = (6, 5, 3)
# About 6 records of these tiny PNGs per shuffle window: many windows per epoch.
TINY_WINDOW_MB = 0.0006


def _records(directory, sizes=(9, 4, 7, 6, 5), test_size=6, shape=SHAPE):
    """GZIP shards whose labels are the examples' global indices (labels reveal order)."""
    rng = np.random.default_rng(0)
    total = sum(sizes)
    images = rng.integers(0, 256, (total, *shape), dtype=np.uint8)
    labels = np.arange(total, dtype=np.int32)
    split_dir = directory / "Split-train"
    split_dir.mkdir(parents=True)
    start = 0
    for shard, size in enumerate(sizes):
        path = split_dir / f"data_tfrecord-{shard:05d}-of-{len(sizes):05d}.gz"
        with tf.io.TFRecordWriter(str(path), options="GZIP") as writer:
            for index in range(start, start + size):
                writer.write(tfrecord.make_example(
                    tf.io.encode_png(images[index]).numpy(), labels[index]).SerializeToString())
        start += size
    test = (images[:test_size], labels[:test_size])
    write_tfrecords(test, str(directory / "Split-eval"), "test", 1)
    for path in (directory / "Split-eval").iterdir():
        path.rename(directory / "Split-eval" / path.name.replace("test", "data_tfrecord"))
    # Known statistics, as the converters write them: no statistics pass over the pixels.
    write_dataset_info(str(directory), name="ids", class_names=[str(i) for i in range(total)],
                       image_shape=shape, mean=(0.5,) * shape[-1], std=(0.25,) * shape[-1])
    return images, labels


def _config(directory, **overrides):
    values = dict(source="tfrecord", name="ids", data_dir=str(directory),
                  normalization="dataset", validation_size=0, pad=1,
                  shuffle_window_mb=TINY_WINDOW_MB)
    values.update(overrides)
    return config.DataConfig(**values)


def _two_epochs(dataset, batch_size=4, seed=3):
    steps = dataset.steps_per_epoch(batch_size)
    return list(dataset.train_batches(batch_size, seed=seed).take(2 * steps)
                .as_numpy_iterator()), steps


def _assert_same_batches(first, second):
    assert len(first) == len(second)
    for (images_a, labels_a), (images_b, labels_b) in zip(first, second, strict=True):
        np.testing.assert_array_equal(labels_a, labels_b)
        np.testing.assert_array_equal(images_a, images_b)


def test_streamed_tfrecord_shards_give_the_cached_batches_over_two_epochs(tmp_path):
    _records(tmp_path)
    cached = load_dataset(_config(tmp_path, cache="always", validation_size=5), seed=1)
    streamed = load_dataset(_config(tmp_path, cache="never", validation_size=5), seed=1)
    assert cached.is_cached("train") and not streamed.is_cached("train")
    cached_batches, steps = _two_epochs(cached)
    streamed_batches, _ = _two_epochs(streamed)
    _assert_same_batches(streamed_batches, cached_batches)
    orders = [np.concatenate([labels for _, labels in cached_batches[e * steps:(e + 1) * steps]])
              for e in range(2)]
    validation = cached.raw_images("validation")[1]
    for order in orders:  # each epoch: every training example once
        assert sorted(order.tolist()) == sorted(set(range(31)) - set(validation.tolist()))
    assert not np.array_equal(orders[0], orders[1])
    # Resuming at epoch 1 gives epoch 1, streamed as cached.
    resumed = list(streamed.train_batches(4, seed=3, first_epoch=1).take(steps)
                   .as_numpy_iterator())
    _assert_same_batches(resumed, cached_batches[steps:])
    for split in ("validation", "test"):
        _assert_same_batches(list(streamed.eval_batches(split, 4).as_numpy_iterator()),
                             list(cached.eval_batches(split, 4).as_numpy_iterator()))


def test_streamed_image_folder_gives_the_cached_batches_over_two_epochs(tmp_path):
    rng = np.random.default_rng(1)
    for split, count in (("train", 7), ("test", 3)):
        for label in ("a", "b", "c"):
            (tmp_path / split / label).mkdir(parents=True)
            for index in range(count):
                (tmp_path / split / label / f"{index}.png").write_bytes(tf.io.encode_png(
                    rng.integers(0, 256, SHAPE, dtype=np.uint8)).numpy())
    values = dict(source="image_folder", data_dir=str(tmp_path), normalization="dataset",
                  validation_size=4, pad=2)
    cached = load_dataset(config.DataConfig(**values, cache="always"))
    streamed = load_dataset(config.DataConfig(**values, cache="never"))
    _assert_same_batches(_two_epochs(streamed, 5)[0], _two_epochs(cached, 5)[0])


def test_auto_streams_past_the_budget_and_caches_within_it(tmp_path, caplog):
    _records(tmp_path)
    decoded_mib = (31 + 6) * np.prod(SHAPE) / 2**20
    with caplog.at_level(logging.INFO, logger="sokd_tf.data.pipeline"):
        small = load_dataset(_config(tmp_path, cache_budget_mb=decoded_mib / 2))
    assert not small.is_cached("train") and not small.is_cached("test")
    assert "streaming" in caplog.text
    assert f"{decoded_mib:,.1f} MiB of decoded images exceed" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sokd_tf.data.pipeline"):
        fits = load_dataset(_config(tmp_path, cache_budget_mb=decoded_mib * 2))
    assert fits.is_cached("train") and fits.is_cached("test")
    assert "caching decoded images in memory" in caplog.text and "fit the" in caplog.text
    _assert_same_batches(_two_epochs(small)[0], _two_epochs(fits)[0])


def _corrupt(tmp_path, payload, shard=2, record=3):
    """Rewrites record `record` of train shard `shard` with an image of `payload` bytes."""
    path = sorted((tmp_path / "Split-train").iterdir())[shard]
    raws = list(tf.data.TFRecordDataset(str(path), "GZIP").as_numpy_iterator())
    raws[record] = tfrecord.make_example(payload, 0).SerializeToString()
    with tf.io.TFRecordWriter(str(path), options="GZIP") as writer:
        for raw in raws:
            writer.write(raw)
    return path


def test_corrupt_image_mid_shard_is_named_by_the_streaming_pipeline(tmp_path):
    images, _ = _records(tmp_path)
    path = _corrupt(tmp_path, b"\x89PNG\r\n\x1a\n truncated")
    dataset = load_dataset(_config(tmp_path, cache="never"))  # up-front checks pass
    expected = rf"{path.name}, record 3: undecodable image .*expected PNG, JPEG"
    with pytest.raises(DataError, match=expected), data_errors():
        for _ in dataset.train_batches(4, seed=0).take(dataset.steps_per_epoch(4)):
            pass
    # The same error out of Keras' fit, as training meets it.
    model = keras.Sequential([keras.Input(SHAPE), keras.layers.Flatten(), keras.layers.Dense(31)])
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(True))
    with pytest.raises(DataError, match=expected):
        loop.fit_model(model, dataset.train_batches(4, seed=0), epochs=1,
                       steps_per_epoch=dataset.steps_per_epoch(4), verbose=0,
                       strategy=tf.distribute.get_strategy())
    with pytest.raises(DataError, match=expected):
        load_dataset(_config(tmp_path, cache="always"))


def test_converting_a_streamed_split_names_the_corrupt_record(tmp_path):
    """The TFRecord writers (in-process and Beam) re-encode a streamed split: a bad image
    met on the way is the same DataError, not a TensorFlow traceback."""
    _records(tmp_path)
    path = _corrupt(tmp_path, b"\x89PNG\r\n\x1a\n truncated")
    dataset = load_dataset(_config(tmp_path, cache="never"))
    with pytest.raises(DataError, match=rf"{path.name}, record 3: undecodable image"):
        list(tfrecord.serialized_examples(dataset.raw_examples("train")))


def test_image_of_another_channel_count_mid_shard_is_named(tmp_path):
    images, _ = _records(tmp_path)
    path = _corrupt(tmp_path, tf.io.encode_png(images[0][..., :1]).numpy(), shard=1, record=2)
    dataset = load_dataset(_config(tmp_path, cache="never"))
    with pytest.raises(DataError, match=rf"{path.name}, record 2: image of shape \(6, 5, 1\) "
                                        r"\(height, width, channels\), expected \(6, 5, 3\) as "
                                        r"in .*dataset_info.json"), data_errors():
        list(dataset.eval_batches("train", 8))


def test_interleave_over_shards_reads_every_record_once_per_epoch(tmp_path):
    _records(tmp_path, sizes=(11, 3, 8, 1, 9, 6, 4, 7, 5, 2))  # more shards than SHARD_CYCLE
    dataset = load_dataset(_config(tmp_path, cache="never"))
    first_window = None
    for epoch in range(3):
        order = np.concatenate([labels for _, labels in dataset.train_batches(
            8, seed=5, first_epoch=epoch, augment=False).take(dataset.steps_per_epoch(8))])
        assert sorted(order.tolist()) == list(range(56))
        first_window = order[:6] if first_window is None else first_window
    # Records of one window come from several shards (the interleave), and their order
    # within a shard is not file order across the epoch (the window shuffle).
    shard_of = np.repeat(np.arange(10), (11, 3, 8, 1, 9, 6, 4, 7, 5, 2))
    assert len(set(shard_of[first_window].tolist())) > 1
    assert not np.array_equal(order, np.sort(order))


def test_a_split_within_one_window_is_shuffled_as_in_memory(tmp_path):
    images, labels = _records(tmp_path)
    streamed = load_dataset(_config(tmp_path, cache="never", shuffle_window_mb=256.0))
    batches = list(streamed.train_batches(31, seed=2, augment=False).take(1))
    order = tf.random.experimental.stateless_shuffle(
        tf.range(31), seed=tf.random.experimental.stateless_fold_in(
            tf.constant([2, 0], tf.int64), 0)).numpy()
    np.testing.assert_array_equal(batches[0][1], labels[order])


def test_boolean_cache_of_old_config_files_still_reads():
    assert config.DataConfig(cache=True).cache == "always"
    assert config.DataConfig(cache=False).cache == "never"
    with pytest.raises(config.ConfigError, match="data.cache must be one of"):
        config.DataConfig(cache="sometimes")
