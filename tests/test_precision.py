"""Mixed precision: a SOKD step in float16 / bfloat16 is finite and learns.

Losses and softmaxes stay float32 (the models' logits layers are float32); under
mixed_float16 Keras' `compile` wraps the optimizer in a `LossScaleOptimizer` and the
distiller's `train_step` scales the loss with it.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from sokd_tf import distillers, distribute, models
from sokd_tf.config import TrainConfig
from sokd_tf.models import peer as peer_lib

IMAGE_SHAPE = (8, 8, 3)
NUM_CLASSES = 4


def _learnable_batch(count=32):
    """Images = a fixed pattern per class + noise: a few steps can fit them."""
    rng = np.random.default_rng(0)
    patterns = rng.normal(size=(NUM_CLASSES, *IMAGE_SHAPE)).astype("float32")
    labels = np.arange(count, dtype="int32") % NUM_CLASSES
    images = patterns[labels] + 0.3 * rng.normal(size=(count, *IMAGE_SHAPE)).astype("float32")
    return images, labels


@pytest.fixture
def precision(request):
    policy = distribute.set_precision(request.param)
    try:
        yield policy
    finally:
        distribute.set_precision("float32")


@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"], indirect=True)
def test_sokd_step_is_finite_and_decreasing(precision):
    keras.utils.set_random_seed(1)
    teacher = models.build("wrn_16_1", IMAGE_SHAPE, NUM_CLASSES, model_name="teacher")
    student = models.build("wrn_16_1", IMAGE_SHAPE, NUM_CLASSES, model_name="student")
    peer = peer_lib.build_peer(teacher)
    distiller = distillers.SemiOnlineDistiller(teacher, peer, student)
    distiller.compile(
        optimizer=distillers.make_optimizer(
            TrainConfig(student_learning_rate=0.05, peer_learning_rate=0.05), 1
        )
    )
    compute_dtype = precision.compute_dtype
    assert student.get_layer("stem").compute_dtype == compute_dtype
    assert student.get_layer("stem").kernel.dtype == "float32"
    is_loss_scaled = isinstance(distiller.optimizer, keras.optimizers.LossScaleOptimizer)
    assert is_loss_scaled == (precision.name == "mixed_float16")

    images, labels = _learnable_batch()
    terms, logits = distiller.forward(tf.constant(images), tf.constant(labels), training=False)
    assert all(term.dtype == tf.float32 for term in terms.values())
    assert all(value.dtype == tf.float32 for value in logits.values())

    dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()
    history = distiller.fit(dataset, epochs=8, steps_per_epoch=1, verbose=0).history
    losses = np.array(history["loss"])
    assert np.all(np.isfinite(losses)), losses
    assert losses[-1] < 0.8 * losses[0], losses
    for variable in distiller.student.trainable_variables + distiller.peer.trainable_variables:
        assert np.all(np.isfinite(keras.ops.convert_to_numpy(variable))), variable.path
