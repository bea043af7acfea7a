"""`data.image_size` / `data.channels`: resized, 3-channel model inputs from Fashion-MNIST
for keras.applications models, while exported models still take raw 28x28x1 images."""

import os

import export_support as support
import keras
import numpy as np
import pytest

from sokd_tf import config, export
from sokd_tf.data import DatasetInfo, load_dataset, model_inputs, normalize
from sokd_tf.data.inputs import model_image_shape
from sokd_tf.errors import ConfigError
from sokd_tf.export import tflite
from sokd_tf.models import specs

FASHION_STATISTICS = ((0.2860,), (0.3530,))


def info_for(raw_shape, image_shape):
    return DatasetInfo(name="toy", num_classes=10, image_shape=image_shape,
                       class_names=tuple(map(str, range(10))),
                       split_sizes={"train": 4, "test": 4},
                       mean=FASHION_STATISTICS[0], std=FASHION_STATISTICS[1],
                       raw_image_shape=raw_shape)


def test_config_validation_and_channel_conversions():
    with pytest.raises(ConfigError, match="data.image_size must be >= 1"):
        config.DataConfig(image_size=0)
    with pytest.raises(ConfigError, match=r"data.channels must be one of \[1, 3\]"):
        config.DataConfig(channels=4)
    resolved = config.resolve("quickstart", {"data.image_size": 32, "data.channels": 3}).data
    assert (resolved.image_size, resolved.channels) == (32, 3)
    assert (config.DataConfig().image_size, config.DataConfig().channels) == (None, None)
    assert model_image_shape((28, 28, 1), 32, 3) == (32, 32, 3)
    assert model_image_shape((28, 28, 1), None, 1) == (28, 28, 1)
    assert model_image_shape((32, 32, 3), 64, 3) == (64, 64, 3)
    with pytest.raises(ConfigError, match="only grayscale -> 3 channels"):
        model_image_shape((32, 32, 3), None, 1, "cifar10")


def test_model_inputs_by_hand():
    # No resize, no channel change: exactly the normalisation.
    pixels = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 1), dtype=np.uint8)
    same = info_for((4, 4, 1), (4, 4, 1))
    np.testing.assert_array_equal(model_inputs(pixels, same), normalize(pixels, *FASHION_STATISTICS))
    # A constant image stays constant under bilinear resizing: 255 -> (1 - .286) / .353.
    grown = model_inputs(np.full((1, 4, 4, 1), 255, np.uint8), info_for((4, 4, 1), (8, 8, 3)))
    assert grown.shape == (1, 8, 8, 3)
    np.testing.assert_allclose(grown, (1 - 0.2860) / 0.3530, rtol=1e-6)
    # Upsampling 2 -> 4 with half-pixel centres: row [0, 255] -> [0, 63.75, 191.25, 255].
    ramp = np.array([0, 255], np.uint8).reshape(1, 1, 2, 1).repeat(2, axis=1)
    resized = model_inputs(ramp, info_for((2, 2, 1), (4, 4, 3)))
    expected = (np.array([0.0, 63.75, 191.25, 255.0]) / 255 - 0.2860) / 0.3530
    np.testing.assert_allclose(resized[0, 0, :, 0], expected, rtol=1e-5)
    np.testing.assert_array_equal(resized[..., 0], resized[..., 2])


@pytest.fixture(scope="module")
def fashion_32x32x3(small_fashion_mnist):
    data_config = config.DataConfig(
        source="fashion_mnist", name="fashion_mnist", data_dir=small_fashion_mnist,
        normalization="dataset", validation_size=0, image_size=32, channels=3)
    return load_dataset(data_config)


def test_pipeline_feeds_mobilenet_v3_small(fashion_32x32x3):
    dataset = fashion_32x32x3
    info = dataset.info
    assert info.image_shape == (32, 32, 3) and info.raw_image_shape == (28, 28, 1)
    images, labels = next(iter(dataset.train_batches(16, seed=1)))
    assert images.shape == (16, 32, 32, 3) and labels.shape == (16,)
    np.testing.assert_array_equal(images[..., 0], images[..., 2])
    raw, _ = dataset.raw_images("test", limit=8)
    assert raw.shape == (8, 28, 28, 1) and raw.dtype == np.uint8
    evaluated, _ = next(iter(dataset.eval_batches("test", 8)))
    np.testing.assert_allclose(evaluated, model_inputs(raw, info), atol=0)
    keras.utils.set_random_seed(0)
    student = specs.build_model("keras.applications.MobileNetV3Small", info.image_shape,
                                info.num_classes, role="student")
    assert student(images, training=False).shape == (16, 10)


def check_saved_model_takes_raw_images(student, info, raw, directory):
    version_dir = export.export_saved_model(student, info, str(directory), "student",
                                            warmup_images_uint8=raw)
    reference = student(model_inputs(raw, info), training=False).numpy()
    support.check_saved_model_signatures(version_dir, raw, reference)


def check_tflite_takes_raw_images(student, info, raw, directory, variant="fp32"):
    flatbuffer = tflite.convert_tflite(variant, student, info, representative_images_uint8=raw,
                                       representative_size=len(raw))
    path = tflite.write_tflite(flatbuffer, os.path.join(directory, f"{variant}.tflite"))
    classifier = tflite.LiteRTClassifier(path)
    assert list(classifier.input["shape"][1:]) == [28, 28, 1]
    return classifier.logits(raw), student(model_inputs(raw, info), training=False).numpy()


def test_exports_of_a_resized_student_take_raw_images(fashion_32x32x3, tmp_path):
    info = fashion_32x32x3.info
    raw, _ = fashion_32x32x3.raw_images("test", limit=8)
    keras.utils.set_random_seed(1)
    student = specs.build_model("wrn_10_1", info.image_shape, info.num_classes, role="student")
    check_saved_model_takes_raw_images(student, info, raw, tmp_path / "serving")
    logits, reference = check_tflite_takes_raw_images(student, info, raw, tmp_path)
    np.testing.assert_allclose(logits, reference, atol=1e-4)


@pytest.mark.slow
def test_exports_of_mobilenet_v3_small_take_raw_fashion_mnist(fashion_32x32x3, tmp_path):
    info = fashion_32x32x3.info
    raw, _ = fashion_32x32x3.raw_images("train", limit=64)
    keras.utils.set_random_seed(2)
    student = specs.build_model("keras.applications.MobileNetV3Small", info.image_shape,
                                info.num_classes, role="student")
    check_saved_model_takes_raw_images(student, info, raw[:8], tmp_path / "serving")
    logits, reference = check_tflite_takes_raw_images(student, info, raw[:8], tmp_path)
    np.testing.assert_allclose(logits, reference, atol=1e-4)
    # Full-integer: the resize and the channel repeat run as int8 builtins too.
    logits, reference = check_tflite_takes_raw_images(student, info, raw, tmp_path, "int8")
    assert logits.shape == reference.shape == (64, 10)
