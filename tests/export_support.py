"""Shared pieces of the export tests, computed once per test session.

A module (not conftest fixtures) so several test files share one trained student: the
cached functions below run once however many files call them.
"""

from __future__ import annotations

import functools
import os

import keras
import numpy as np

from sokd_tf import export
from sokd_tf.config import FASHION_MNIST_DIR, ExportConfig
from sokd_tf.data import fashion_mnist
from sokd_tf.data.info import DatasetInfo
from sokd_tf.models import BUILDERS

TRAIN_STEPS = 200
BATCH_SIZE = 64
TEST_SIZE = 1000


@functools.cache
def data():
    """Real Fashion-MNIST: (info, train images, train labels, test images, test labels).

    Images are raw uint8 `[n, 28, 28, 1]`; the statistics come from the training images.
    """
    source = fashion_mnist.load(FASHION_MNIST_DIR)
    train = source.splits["train"]
    test = source.splits["test"]
    used = TRAIN_STEPS * BATCH_SIZE
    pixels = train.images[:used].astype(np.float32) / 255.0
    info = DatasetInfo(
        name="fashion_mnist",
        num_classes=len(source.class_names),
        image_shape=source.image_shape,
        class_names=source.class_names,
        split_sizes={"train": train.size, "test": test.size},
        mean=(float(pixels.mean()),),
        std=(float(pixels.std()),),
    )
    return (info, train.images[:used], train.labels[:used],
            test.images[:TEST_SIZE], test.labels[:TEST_SIZE])


@functools.cache
def trained_student() -> keras.Model:
    """WRN-16-1 trained for `TRAIN_STEPS` SGD steps on real Fashion-MNIST (~75 % top-1)."""
    info, train_images, train_labels, _, _ = data()
    keras.utils.set_random_seed(1)
    student = BUILDERS["wrn_16_1"](info.image_shape, info.num_classes, name="student")
    student.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    student.fit(export.normalize_numpy(train_images, info), train_labels,
                batch_size=BATCH_SIZE, epochs=1, shuffle=False, verbose=0)
    return student


def tiny_student(info: DatasetInfo, *, seed: int = 0, input_shape=None) -> keras.Model:
    """A small untrained conv + BN functional model (fast to export)."""
    keras.utils.set_random_seed(seed)
    images = keras.Input(input_shape or info.image_shape)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(images)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    logits = keras.layers.Dense(info.num_classes)(x)
    return keras.Model(images, logits, name="tiny")


EXPORT_CONFIG = ExportConfig(representative_size=100, qat_max_steps=10, latency_runs=20)


@functools.cache
def exported(root: str):
    """`export_student` of the trained student with every variant: (export_dir, report)."""
    info, train_images, _, test_images, test_labels = data()
    export_dir = os.path.join(root, "export")
    report = export.export_student(
        trained_student(), info, export_dir, EXPORT_CONFIG,
        train_images_uint8=train_images, test_images_uint8=test_images,
        test_labels=test_labels,
    )
    return export_dir, report


def keras_logits(student: keras.Model, images_uint8: np.ndarray, info: DatasetInfo):
    return student.predict(export.normalize_numpy(images_uint8, info), batch_size=256,
                           verbose=0)
