"""The Beam converter: ExampleGen layout, deterministic shards, identical read-back."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from sokd_tf import config
from sokd_tf.beam import make_tfrecords
from sokd_tf.data import load_dataset, tfrecord
from sokd_tf.errors import DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _source(data_dir):
    return config.DataConfig(source="fashion_mnist", name="fashion_mnist", data_dir=data_dir,
                             normalization="dataset", validation_size=0)


def _records(path):
    return [r.numpy() for r in tf.data.TFRecordDataset(path, compression_type="GZIP")]


@pytest.fixture(scope="module")
def converted(small_fashion_mnist, tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("examplegen") / "examples")
    written = make_tfrecords.run(_source(small_fashion_mnist), out_dir, num_shards=3)
    return out_dir, written


def test_writes_examplegen_layout_with_counters(converted):
    out_dir, written = converted
    assert sorted(os.listdir(out_dir)) == ["Split-eval", "Split-train", "dataset_info.json"]
    assert sorted(os.listdir(os.path.join(out_dir, "Split-train"))) == [
        f"data_tfrecord-0000{i}-of-00003.gz" for i in range(3)]
    # 256 test images / 640 train images * 3 shards = 1.2 -> one eval shard.
    assert os.listdir(os.path.join(out_dir, "Split-eval")) == ["data_tfrecord-00000-of-00001.gz"]
    for path in written["train"] + written["eval"]:
        with open(path, "rb") as handle:
            assert handle.read(2) == b"\x1f\x8b"  # GZIP magic, as ExampleGen writes
    assert written["counters"] == {
        "examples_read": 896, "examples_written": 896, "shards_written": 4}


def test_shards_are_contiguous_ranges_of_the_source(converted, small_fashion_mnist):
    _, written = converted
    images, labels = load_dataset(_source(small_fashion_mnist)).raw_images("train")
    bounds = [0, 213, 426, 640]  # 640 * i // 3
    for shard, path in enumerate(written["train"]):
        records = _records(path)
        assert len(records) == bounds[shard + 1] - bounds[shard]
        first = tf.train.Example.FromString(records[0]).features.feature
        decoded = tf.io.decode_png(first[tfrecord.IMAGE_KEY].bytes_list.value[0]).numpy()
        np.testing.assert_array_equal(decoded, images[bounds[shard]])
        assert first[tfrecord.LABEL_KEY].int64_list.value[0] == labels[bounds[shard]]


def test_data_layer_reads_the_layout_back_identically(converted, small_fashion_mnist):
    out_dir, _ = converted
    original = load_dataset(_source(small_fashion_mnist))
    copy = load_dataset(config.DataConfig(
        source="tfrecord", data_dir=out_dir, normalization="dataset", validation_size=0))
    assert copy.info == original.info
    for split in ("train", "test"):
        for got, want in zip(copy.raw_images(split), original.raw_images(split), strict=True):
            np.testing.assert_array_equal(got, want)


def test_rerun_on_two_threads_is_byte_identical(converted, small_fashion_mnist, tmp_path):
    out_dir, written = converted
    again = make_tfrecords.run(
        _source(small_fashion_mnist), str(tmp_path / "again"), num_shards=3,
        beam_args=["--direct_num_workers=2", "--direct_running_mode=multi_threading"])
    for first, second in zip(written["train"] + written["eval"],
                             again["train"] + again["eval"], strict=True):
        with open(first, "rb") as a, open(second, "rb") as b:
            assert a.read() == b.read(), (first, second)


def test_refuses_an_existing_output(converted, small_fashion_mnist):
    out_dir, _ = converted
    with pytest.raises(DataError, match="already holds a converted dataset"):
        make_tfrecords.run(_source(small_fashion_mnist), out_dir)


def test_reader_rejects_a_split_mixing_compressions(converted, tmp_path):
    out_dir, written = converted
    mixed = tmp_path / "mixed"
    (mixed / "Split-train").mkdir(parents=True)
    (mixed / "Split-eval").mkdir()
    tf.io.gfile.copy(written["train"][0], str(mixed / "Split-train" / "a.gz"))
    with tf.io.TFRecordWriter(str(mixed / "Split-train" / "b.tfrecord")) as writer:
        writer.write(_records(written["train"][1])[0])
    tf.io.gfile.copy(written["eval"][0], str(mixed / "Split-eval" / "a.gz"))
    with pytest.raises(DataError, match="mix GZIP"):
        tfrecord.load(str(mixed))


def test_reader_names_examplegen_dirs_when_a_split_is_missing(tmp_path):
    (tmp_path / "Split-train").mkdir()
    with pytest.raises(DataError, match="Split-train"):
        tfrecord.load(str(tmp_path))


@pytest.mark.slow
def test_entry_point_prints_counters(small_fashion_mnist, tmp_path):
    out_dir = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.make_tfrecords_beam", "--source=fashion_mnist",
         f"--data_dir={small_fashion_mnist}", f"--out_dir={out_dir}", "--num_shards=2",
         "--runner=FnApiRunner"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Split-train: 2 file(s)" in result.stdout
    assert "make_tfrecords: examples_written = 896" in result.stdout
    assert sorted(os.listdir(out_dir / "Split-train")) == [
        "data_tfrecord-00000-of-00002.gz", "data_tfrecord-00001-of-00002.gz"]
