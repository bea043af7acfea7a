"""batch_predict on Beam's in-process runner: Keras-equal predictions, dead letters, counters."""

import base64
import gzip
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from sokd_tf import models
from sokd_tf.beam import batch_predict
from sokd_tf.data import fashion_mnist, tfrecord
from sokd_tf.data.info import DatasetInfo
from sokd_tf.errors import DataError, ExportError
from sokd_tf.export import normalize_numpy
from sokd_tf.export.saved_model import export_saved_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example(image, label, **extra):
    features = {
        tfrecord.IMAGE_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(
            value=[tf.io.encode_png(image).numpy()])),
        tfrecord.LABEL_KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
    }
    for key, value in extra.items():
        features[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


@pytest.fixture(scope="module")
def served(small_fashion_mnist, tmp_path_factory):
    """(SavedModel dir, Keras student, info, test images uint8) for a seeded wrn_10_1."""
    source = fashion_mnist.load(small_fashion_mnist)
    images = source.splits["test"].images
    info = DatasetInfo(name="fashion_mnist", num_classes=10, image_shape=(28, 28, 1),
                       class_names=source.class_names, split_sizes={"test": len(images)},
                       mean=(0.2860,), std=(0.3530,))
    keras.utils.set_random_seed(3)
    student = models.build("wrn_10_1", (28, 28, 1), 10)
    root = str(tmp_path_factory.mktemp("serving"))
    version_dir = export_saved_model(student, info, root, "student",
                                     warmup_images_uint8=images[:4])
    return version_dir, student, info, images, source.splits["test"].labels


@pytest.fixture(scope="module")
def inputs(served, tmp_path_factory):
    """Two GZIP ExampleGen-style shards of 60 good records, one file of bad records and
    one truncated GZIP file (its first records readable)."""
    _, _, _, images, labels = served
    directory = tmp_path_factory.mktemp("inputs")
    good = []
    for shard in range(2):
        path = str(directory / f"data_tfrecord-0000{shard}-of-00002.gz")
        with tf.io.TFRecordWriter(path, options="GZIP") as writer:
            for index in range(shard * 60, shard * 60 + 60):
                writer.write(_example(images[index], labels[index]))
        good.append(path)
    bad = str(directory / "bad.tfrecord")
    png = tf.io.encode_png(images[0]).numpy()
    not_an_image = tf.train.Example(features=tf.train.Features(feature={
        tfrecord.IMAGE_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(
            value=[b"these bytes are no image"]))})).SerializeToString()
    truncated_png = tf.train.Example(features=tf.train.Features(feature={
        tfrecord.IMAGE_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(
            value=[png[:40]]))})).SerializeToString()
    no_image = tf.train.Example(features=tf.train.Features(feature={
        tfrecord.LABEL_KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=[3]))
    })).SerializeToString()
    with tf.io.TFRecordWriter(bad) as writer:
        for record in (b"\xff\xfe not a protocol buffer", no_image, not_an_image,
                       truncated_png, _example(images[120], labels[120])):
            writer.write(record)
    # A GZIP shard cut in the middle: its first records are readable, the rest is lost.
    whole = str(directory / "whole.gz")
    with tf.io.TFRecordWriter(whole, options="GZIP") as writer:
        for index in range(121, 141):
            writer.write(_example(images[index], labels[index]))
    with open(whole, "rb") as handle:
        raw = gzip.decompress(handle.read())
    cut = str(directory / "cut.gz")
    with open(cut, "wb") as handle:
        handle.write(gzip.compress(raw[: len(raw) // 2], mtime=0)[:-12])
    os.remove(whole)
    readable = sum(1 for _ in _readable_prefix(cut))
    return {"good": good, "bad": bad, "cut": cut, "cut_readable": readable,
            "dir": str(directory)}


def _readable_prefix(path):
    try:
        yield from tf.data.TFRecordDataset(path, compression_type="GZIP")
    except tf.errors.OpError:
        return


def _keras_probabilities(student, info, images):
    return keras.ops.convert_to_numpy(keras.ops.softmax(student(normalize_numpy(images, info))))


def test_predictions_equal_keras_and_bad_records_are_dead_letters(served, inputs, tmp_path):
    version_dir, student, info, images, _ = served
    written = batch_predict.run(version_dir, f"{inputs['dir']}/*", str(tmp_path / "out"),
                                batch_size=16)
    predictions = {row["key"]: row for row in batch_predict.read_jsonl(written["predictions"])}
    # 120 good + 1 good record in the bad file + the readable prefix of the cut file.
    expected_keys = {f"{path}:{i}" for path in inputs["good"] for i in range(60)}
    expected_keys |= {f"{inputs['bad']}:4"}
    expected_keys |= {f"{inputs['cut']}:{i}" for i in range(inputs["cut_readable"])}
    assert set(predictions) == expected_keys
    reference = _keras_probabilities(student, info, images[:141])
    for key, row in predictions.items():
        path, index = key.rsplit(":", 1)
        position = {inputs["good"][0]: 0, inputs["good"][1]: 60, inputs["bad"]: 116,
                    inputs["cut"]: 121}[path] + int(index)
        np.testing.assert_allclose(row["probabilities"], reference[position], atol=1e-5)
        assert row["class"] == int(np.argmax(reference[position]))
        assert row["class_name"] == info.class_names[row["class"]]

    letters = {row["key"]: row for row in batch_predict.read_jsonl(written["dead_letter"])}
    bad = inputs["bad"]
    assert sorted(letters) == sorted(
        [f"{bad}:0", f"{bad}:1", f"{bad}:2", f"{bad}:3",
         f"{inputs['cut']}:{inputs['cut_readable']}"])
    assert letters[f"{bad}:0"]["reason"].startswith("not a serialized tf.Example")
    assert "expected one encoded image (bytes) under 'image/encoded', found 0" in (
        letters[f"{bad}:1"]["reason"])
    assert letters[f"{bad}:2"]["reason"].startswith("undecodable image under 'image/encoded'")
    assert letters[f"{bad}:3"]["reason"].startswith("undecodable image")
    assert base64.b64decode(letters[f"{bad}:0"]["record_base64"]) == (
        b"\xff\xfe not a protocol buffer")
    assert "corrupt or truncated TFRecord file" in (
        letters[f"{inputs['cut']}:{inputs['cut_readable']}"]["reason"])

    counters = written["counters"]
    assert counters["records_read"] == 120 + 5 + inputs["cut_readable"]
    assert counters["predictions_written"] == len(expected_keys)
    assert counters["dead_lettered"] == 5
    assert counters["unreadable_file_tails"] == 1
    assert (counters["records_read"] + counters["unreadable_file_tails"]
            == counters["predictions_written"] + counters["dead_lettered"])


def test_a_record_failing_inside_the_model_is_retried_alone(served, inputs, tmp_path):
    version_dir, student, info, images, labels = served
    path = str(tmp_path / "keyed.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        for index in range(6):
            writer.write(_example(images[index], labels[index], **{"image/id": f"id{index}".encode()}))
        writer.write(tf.train.Example(features=tf.train.Features(feature={
            tfrecord.IMAGE_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(
                value=[b"no image"]))})).SerializeToString())
    # Without the pre-inference check the bad record reaches the SavedModel, fails its
    # whole batch, and the batch is retried record by record.
    written = batch_predict.run(version_dir, path, str(tmp_path / "out"), batch_size=8,
                                validate=False)
    predictions = {row["key"]: row for row in batch_predict.read_jsonl(written["predictions"])}
    assert sorted(predictions) == [f"{path}:{i}" for i in range(6)]
    reference = _keras_probabilities(student, info, images[:6])
    for index in range(6):
        np.testing.assert_allclose(predictions[f"{path}:{index}"]["probabilities"],
                                   reference[index], atol=1e-5)
    (letter,) = batch_predict.read_jsonl(written["dead_letter"])
    assert letter["key"] == f"{path}:6"
    assert letter["reason"].startswith("inference failed:")

    keyed = batch_predict.run(version_dir, path, str(tmp_path / "keyed"), key_feature="image/id")
    keys = sorted(row["key"] for row in batch_predict.read_jsonl(keyed["predictions"]))
    assert keys == [f"id{i}" for i in range(6)]
    (letter,) = batch_predict.read_jsonl(keyed["dead_letter"])
    assert letter["reason"].startswith("undecodable image")


def test_user_errors_name_the_culprit(served, inputs, tmp_path):
    version_dir = served[0]
    with pytest.raises(DataError, match="matches no files"):
        batch_predict.run(version_dir, str(tmp_path / "nothing-*.gz"), str(tmp_path / "o"))
    with pytest.raises(ExportError, match="holds no SavedModel"):
        batch_predict.run(str(tmp_path), f"{inputs['dir']}/*", str(tmp_path / "o"))
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "predictions-00000-of-00001.jsonl").write_text("")
    with pytest.raises(DataError, match="already holds predictions"):
        batch_predict.run(version_dir, f"{inputs['dir']}/*", str(tmp_path / "done"))


@pytest.mark.slow
def test_entry_point_prints_counters(served, inputs, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.batch_predict", f"--saved_model={served[0]}",
         f"--input={inputs['good'][0]}", f"--output={tmp_path / 'cli'}",
         "--runner=FnApiRunner"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "batch_predict: predictions_written = 60" in result.stdout
    assert "batch_predict: records_read = 60" in result.stdout
    rows = batch_predict.read_jsonl(sorted(
        str(p) for p in (tmp_path / "cli").glob("predictions-*.jsonl")))
    assert len(rows) == 60
