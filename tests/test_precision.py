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

from sokd_tf import distillers, models
from sokd_tf.config import TrainConfig
from sokd_tf.models import peer as peer_lib
from sokd_tf.runtime import strategy as strategy_lib

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
    policy = strategy_lib.set_precision(request.param)
    try:
        yield policy
    finally:
        strategy_lib.set_precision("float32")


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


def _policies(model):
    """Layer name -> dtype policy name, nested layers included, input layers left out."""
    return {
        layer.name: layer.dtype_policy.name for layer in model._flatten_layers(include_self=False)
        if not isinstance(layer, keras.layers.InputLayer)
    }


def test_float32_teacher_file_runs_in_the_distillation_policy(tmp_path):
    """A teacher trained in float32 and its peer compute in bfloat16 in a bf16 run."""
    from sokd_tf.data.info import DatasetInfo
    from sokd_tf.stages import teacher as teacher_stage

    keras.utils.set_random_seed(0)
    teacher = models.BUILDERS["wrn_16_1"](IMAGE_SHAPE, NUM_CLASSES, name="teacher")
    path = str(tmp_path / "teacher.keras")
    teacher.save(path)
    images, _ = _learnable_batch(4)
    float32_logits = np.asarray(teacher(images, training=False))
    info = DatasetInfo(name="toy", num_classes=NUM_CLASSES, image_shape=IMAGE_SHAPE,
                       class_names=tuple("abcd"), split_sizes={}, mean=(0.0,), std=(1.0,))
    strategy_lib.set_precision("mixed_bfloat16")
    try:
        loaded = teacher_stage.load_teacher(path, info)
        peer = peer_lib.build_peer(loaded)
    finally:
        strategy_lib.set_precision("float32")
    for model in (loaded, peer):
        policies = _policies(model)
        assert policies.pop("logits") == "float32"
        assert set(policies.values()) == {"mixed_bfloat16"}, model.name
    for got, want in zip(loaded.get_weights(), teacher.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
    logits = np.asarray(loaded(images, training=False))
    assert logits.dtype == np.float32
    # bfloat16 keeps 8 bits of mantissa: the same network, rounded.
    np.testing.assert_allclose(logits, float32_logits, atol=0.1 * np.abs(float32_logits).max())
    # In float32 the file loads as it is.
    assert set(_policies(teacher_stage.load_teacher(path, info)).values()) == {"float32"}


def test_bfloat16_student_exports_float32_artifacts(tmp_path):
    import export_support as support

    from sokd_tf import export
    from sokd_tf.config import ExportConfig

    info, train_images, _, test_images, test_labels = support.data()
    strategy_lib.set_precision("mixed_bfloat16")
    try:
        student = models.BUILDERS["wrn_10_1"](info.image_shape, info.num_classes, name="student")
        assert _policies(student)["group1_block1_conv1"] == "mixed_bfloat16"
        report = export.export_student(
            student, info, str(tmp_path / "export"),
            ExportConfig(tflite_variants=("fp32",), latency_runs=3),
            train_images_uint8=train_images[:64], test_images_uint8=test_images[:200],
            test_labels=test_labels[:200],
        )
        assert keras.config.dtype_policy().name == "mixed_bfloat16", "caller's policy restored"
    finally:
        strategy_lib.set_precision("float32")
    # The artifacts reproduce the float32 twin of the student (checked inside the export).
    assert report["tflite"]["fp32"]["input_dtype"] == "float32"
    assert report["tflite"]["fp32"]["agreement"] >= 0.99
    # A bfloat16 SavedModel would differ from the float32 reference by ~1e-2.
    assert report["saved_model"]["verification"]["serving_default"]["max_abs_logit_error"] < 1e-4


def test_a_student_that_cannot_be_retyped_is_a_clear_export_error(tmp_path):
    import export_support as support

    from sokd_tf import export
    from sokd_tf.config import ExportConfig
    from sokd_tf.errors import ExportError

    info, train_images, _, test_images, test_labels = support.data()
    strategy_lib.set_precision("mixed_bfloat16")
    try:
        images = keras.Input(info.image_shape)
        x = keras.layers.Lambda(lambda t: t * 2.0, name="doubling")(images)
        x = keras.layers.GlobalAveragePooling2D()(x)
        student = keras.Model(images, keras.layers.Dense(info.num_classes, dtype="float32")(x))
        with pytest.raises(ExportError, match="cannot re-type model"):
            export.export_student(
                student, info, str(tmp_path / "export"),
                ExportConfig(tflite_variants=("fp32",), latency_runs=3),
                train_images_uint8=train_images[:64], test_images_uint8=test_images[:64],
                test_labels=test_labels[:64],
            )
        assert keras.config.dtype_policy().name == "mixed_bfloat16"
    finally:
        strategy_lib.set_precision("float32")
    assert not (tmp_path / "export").exists()
