"""pipelines/make_tfrecords.py end to end: flags -> converter -> readable TFRecords."""

import os
import subprocess
import sys

import numpy as np
import tensorflow as tf

from sokd_tf import config
from sokd_tf.data import load_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    return subprocess.run([sys.executable, "-m", "pipelines.make_tfrecords", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_converts_an_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split, name, count in (("train", "cat", 3), ("train", "dog", 2), ("test", "dog", 2)):
        os.makedirs(tmp_path / "folder" / split / name)
        for index in range(count):
            image = rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)
            (tmp_path / "folder" / split / name / f"{index}.png").write_bytes(
                tf.io.encode_png(image).numpy())
    result = _run("--source=image_folder", f"--data_dir={tmp_path / 'folder'}", "--dataset=pets",
                  f"--out_dir={tmp_path / 'records'}", "--num_shards=2", "--image_format=png")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "records")) == [
        "dataset_info.json", "test-00000-of-00001.tfrecord", "train-00000-of-00002.tfrecord",
        "train-00001-of-00002.tfrecord"]
    original = load_dataset(config.DataConfig(
        source="image_folder", name="pets", data_dir=str(tmp_path / "folder"),
        normalization="dataset", validation_size=0, pad=2))
    copy = load_dataset(config.DataConfig(
        source="tfrecord", data_dir=str(tmp_path / "records"), normalization="dataset",
        validation_size=0, pad=2))
    assert copy.info == original.info
    np.testing.assert_array_equal(copy.raw_images("train")[0], original.raw_images("train")[0])

