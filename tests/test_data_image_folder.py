"""Image-folder source: round trip through PNG files and malformed folders."""

import numpy as np
import pytest
import tensorflow as tf

from sokd_tf import config
from sokd_tf.data import convert_to_tfrecords, load_dataset
from sokd_tf.errors import DataError

CLASSES = ("apple", "banana", "cherry")


def _config(data_dir, **overrides):
    values = dict(source="image_folder", name="fruit", data_dir=str(data_dir),
                  normalization="dataset", validation_size=0, pad=2)
    values.update(overrides)
    return config.DataConfig(**values)


def _save(path, image, encoder=tf.io.encode_png):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encoder(image).numpy())


def _make_folder(root, per_class=(4, 3, 5), shape=(6, 5, 3), seed=0):
    """Writes train/ and test/ PNGs; returns the expected (images, labels) per split."""
    rng = np.random.default_rng(seed)
    expected = {}
    for split in ("train", "test"):
        images, labels = [], []
        for label, name in enumerate(CLASSES):
            for index in range(per_class[label] if split == "train" else 2):
                image = rng.integers(0, 256, shape, dtype=np.uint8)
                _save(root / split / name / f"{index:03d}.png", image)
                images.append(image)
                labels.append(label)
        expected[split] = (np.stack(images), np.asarray(labels))
    return expected


def test_round_trip_gives_identical_images_labels_and_class_names(tmp_path):
    expected = _make_folder(tmp_path)
    (tmp_path / "train" / "apple" / "notes.txt").write_text("not an image")
    dataset = load_dataset(_config(tmp_path))
    assert dataset.info.class_names == CLASSES
    assert dataset.info.image_shape == (6, 5, 3)
    assert dataset.info.split_sizes == {"train": 12, "test": 6}
    for split, (images, labels) in expected.items():
        got_images, got_labels = dataset.raw_images(split)
        np.testing.assert_array_equal(got_images, images)
        np.testing.assert_array_equal(got_labels, labels)
    pixels = expected["train"][0] / 255.0
    np.testing.assert_allclose(dataset.info.mean, pixels.mean(axis=(0, 1, 2)), rtol=1e-9)
    batch = next(iter(dataset.train_batches(5, seed=0)))
    assert batch[0].shape == (5, 6, 5, 3)


def test_streaming_mode_matches_cached(tmp_path):
    _make_folder(tmp_path)
    cached = load_dataset(_config(tmp_path, validation_size=3))
    streamed = load_dataset(_config(tmp_path, validation_size=3, cache="never"))
    for split in ("train", "validation", "test"):
        np.testing.assert_array_equal(streamed.raw_images(split)[0], cached.raw_images(split)[0])
    np.testing.assert_array_equal(
        next(iter(streamed.eval_batches("test", 4)))[0], next(iter(cached.eval_batches("test", 4)))[0])


def test_converter_writes_tfrecords_that_read_back_identically(tmp_path):
    _make_folder(tmp_path / "folder")
    original = load_dataset(_config(tmp_path / "folder"))
    convert_to_tfrecords(_config(tmp_path / "folder"), str(tmp_path / "records"), num_shards=2)
    copy = load_dataset(_config(tmp_path / "records", source="tfrecord"))
    assert copy.info == original.info
    for split in ("train", "test"):
        np.testing.assert_array_equal(copy.raw_images(split)[0], original.raw_images(split)[0])
        np.testing.assert_array_equal(copy.raw_images(split)[1], original.raw_images(split)[1])


# ----- bad input -----------------------------------------------------------------------

def test_missing_directory(tmp_path):
    with pytest.raises(DataError, match="image-folder directory .*nowhere does not exist"):
        load_dataset(_config(tmp_path / "nowhere"))


def test_missing_split_directory(tmp_path):
    _save(tmp_path / "train" / "a" / "0.png", np.zeros((6, 5, 3), np.uint8))
    with pytest.raises(DataError, match="split directory .*test does not exist"):
        load_dataset(_config(tmp_path))


def test_no_class_directories(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    with pytest.raises(DataError, match="train has no class sub-directories"):
        load_dataset(_config(tmp_path))


def test_empty_split(tmp_path):
    _make_folder(tmp_path)
    for path in (tmp_path / "test").rglob("*.png"):
        path.unlink()
    with pytest.raises(DataError, match="split 'test' is empty"):
        load_dataset(_config(tmp_path))


def test_image_of_another_size_is_named(tmp_path):
    _make_folder(tmp_path)
    _save(tmp_path / "train" / "banana" / "001.png", np.zeros((7, 5, 3), np.uint8))
    with pytest.raises(DataError, match=r"banana/001.png: image of shape \(7, 5, 3\).*expected "
                                        r"\(6, 5, 3\)"):
        load_dataset(_config(tmp_path))


def test_image_with_other_channels_in_test_is_named(tmp_path):
    _make_folder(tmp_path)
    _save(tmp_path / "test" / "cherry" / "000.png", np.zeros((6, 5, 1), np.uint8))
    with pytest.raises(DataError, match=r"test/cherry/000.png: image of shape \(6, 5, 1\).*"
                                        r"expected \(6, 5, 3\) as in the train split"):
        load_dataset(_config(tmp_path))


def test_undecodable_file_is_named(tmp_path):
    _make_folder(tmp_path)
    (tmp_path / "train" / "apple" / "002.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match=r"apple/002.png: undecodable image"):
        load_dataset(_config(tmp_path))


def test_unknown_test_class_is_named(tmp_path):
    _make_folder(tmp_path)
    _save(tmp_path / "test" / "durian" / "0.png", np.zeros((6, 5, 3), np.uint8))
    with pytest.raises(DataError, match="class 'durian' is not among the training classes"):
        load_dataset(_config(tmp_path))
