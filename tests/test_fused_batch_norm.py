"""FusedBatchNormalization equals Keras' BatchNormalization (values, gradients, stats),
and `model.batch_norm` switches the builders and loaded models between the two."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from sokd_tf import models
from sokd_tf.errors import ConfigError
from sokd_tf.models import fused_batch_norm
from sokd_tf.models.fused_batch_norm import FusedBatchNormalization

SHAPE = (6, 5, 4, 3)


def _pair(dtype="float32", **kwargs):
    """A stock and a fused layer with the same (non-trivial) weights."""
    stock = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, dtype=dtype, **kwargs)
    fused = FusedBatchNormalization(momentum=0.9, epsilon=1e-5, dtype=dtype, **kwargs)
    stock.build(SHAPE)
    fused.build(SHAPE)
    rng = np.random.default_rng(0)
    weights = [
        rng.uniform(0.5, 1.5, 3).astype("float32"),  # gamma
        rng.normal(size=3).astype("float32"),  # beta
        rng.normal(size=3).astype("float32"),  # moving mean
        rng.uniform(0.5, 2.0, 3).astype("float32"),  # moving variance
    ]
    stock.set_weights(weights)
    fused.set_weights(weights)
    return stock, fused


def _inputs():
    rng = np.random.default_rng(1)
    return tf.constant(2.0 + 3.0 * rng.normal(size=SHAPE).astype("float32"))


def _run(layer, inputs, training):
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        outputs = layer(inputs, training=training)
        # A non-symmetric loss so every gradient path matters.
        loss = tf.reduce_sum(tf.cast(outputs, tf.float32) ** 2 * tf.range(3, dtype=tf.float32))
    gradients = tape.gradient(loss, [inputs, layer.gamma.value, layer.beta.value])
    return outputs, gradients


@pytest.mark.parametrize("training", [True, False])
def test_matches_stock_batch_norm_in_float32(training):
    stock, fused = _pair()
    inputs = _inputs()
    expected, expected_gradients = _run(stock, inputs, training)
    actual, actual_gradients = _run(fused, inputs, training)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(actual_gradients, expected_gradients, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    for got, want in zip(fused.get_weights(), stock.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    if training:
        # Hand check of the moving update with the biased batch variance.
        batch = np.array(inputs).reshape(-1, 3)
        moving_variance_before = _pair()[0].get_weights()[3]
        np.testing.assert_allclose(
            fused.get_weights()[3],
            0.9 * moving_variance_before + 0.1 * batch.var(axis=0),
            rtol=1e-5,
        )


@pytest.mark.parametrize("dtype", ["mixed_bfloat16", "mixed_float16"])
def test_16_bit_policies_keep_float32_statistics(dtype):
    stock, fused = _pair(dtype=dtype)
    inputs = tf.cast(_inputs(), keras.DTypePolicy(dtype).compute_dtype)
    expected, _ = _run(stock, inputs, True)
    actual, gradients = _run(fused, inputs, True)
    assert actual.dtype == expected.dtype == keras.DTypePolicy(dtype).compute_dtype
    assert fused.moving_mean.dtype == "float32"
    np.testing.assert_allclose(
        tf.cast(actual, tf.float32), tf.cast(expected, tf.float32), rtol=0.05, atol=0.05
    )
    np.testing.assert_allclose(fused.get_weights()[2], stock.get_weights()[2], rtol=0.02)
    assert all(np.all(np.isfinite(np.array(tf.cast(g, tf.float32)))) for g in gradients)


def test_synchronized_bn_takes_the_stock_path():
    stock, fused = _pair(synchronized=True)
    inputs = _inputs()
    np.testing.assert_array_equal(fused(inputs, training=True), stock(inputs, training=True))


def test_serializes_as_itself(tmp_path):
    inputs = keras.Input(SHAPE[1:])
    model = keras.Model(inputs, FusedBatchNormalization(name="bn")(inputs))
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored.get_layer("bn"), FusedBatchNormalization)
    data = _inputs()
    np.testing.assert_allclose(restored(data), model(data), rtol=1e-6)


def _norms(model):
    return [layer for layer in model._flatten_layers()
            if isinstance(layer, keras.layers.BatchNormalization)]


def _randomize_batch_norm(model, seed=0):
    """Non-trivial gamma, beta and moving statistics, as a trained model has."""
    rng = np.random.default_rng(seed)
    for layer in _norms(model):
        channels = layer.gamma.shape[0]
        layer.set_weights([
            rng.uniform(0.5, 1.5, channels).astype("float32"),
            rng.normal(0.0, 0.2, channels).astype("float32"),
            rng.normal(0.0, 0.3, channels).astype("float32"),
            rng.uniform(0.5, 2.0, channels).astype("float32"),
        ])


def _images():
    return np.random.default_rng(2).normal(size=(4, 12, 12, 3)).astype("float32")


def test_builders_build_the_chosen_batch_norm_with_the_same_weights_and_outputs():
    keras.utils.set_random_seed(0)
    fused = models.build("wrn_16_1", (12, 12, 3), 5, batch_norm="fused")
    keras.utils.set_random_seed(0)
    stock = models.build("wrn_16_1", (12, 12, 3), 5, batch_norm="stock")
    assert all(isinstance(layer, FusedBatchNormalization) for layer in _norms(fused))
    assert not any(isinstance(layer, FusedBatchNormalization) for layer in _norms(stock))
    assert len(_norms(fused)) == len(_norms(stock)) == 2 * 6 + 1
    # Same layers, variables (names, shapes, order) and seeded initial values.
    assert [layer.name for layer in fused.layers] == [layer.name for layer in stock.layers]
    assert [(v.path, v.shape) for v in fused.weights] == [(v.path, v.shape) for v in stock.weights]
    for got, want in zip(stock.get_weights(), fused.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
    _randomize_batch_norm(fused)
    stock.set_weights(fused.get_weights())
    images = _images()
    for training in (False, True):
        np.testing.assert_allclose(stock(images, training=training),
                                   fused(images, training=training), rtol=1e-4, atol=1e-4)
    assert fused.count_params() == stock.count_params()
    with pytest.raises(ConfigError, match="model.batch_norm.*'layer'"):
        models.build("wrn_10_1", (12, 12, 3), 5, batch_norm="layer")


def test_with_batch_norm_switches_a_trained_model_and_back():
    keras.utils.set_random_seed(0)
    fused = models.build("wrn_10_1", (12, 12, 3), 5, model_name="teacher")
    _randomize_batch_norm(fused)
    assert fused_batch_norm.with_batch_norm(fused, "fused") is fused
    stock = fused_batch_norm.with_batch_norm(fused, "stock")
    assert stock is not fused and stock.name == "teacher"
    assert not any(isinstance(layer, FusedBatchNormalization) for layer in _norms(stock))
    assert len(_norms(stock)) == len(_norms(fused)) == 7
    for got, want in zip(stock.get_weights(), fused.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
    images = _images()
    np.testing.assert_allclose(stock(images, training=False), fused(images, training=False),
                               rtol=1e-5, atol=1e-5)
    back = fused_batch_norm.with_batch_norm(stock, "fused")
    assert all(isinstance(layer, FusedBatchNormalization) for layer in _norms(back))
    np.testing.assert_allclose(back(images, training=False), fused(images, training=False),
                               rtol=1e-5, atol=1e-5)


def test_with_batch_norm_keeps_policies_and_other_layers():
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = models.build("wrn_10_1", (12, 12, 3), 5)
    finally:
        keras.config.set_dtype_policy("float32")
    stock = fused_batch_norm.with_batch_norm(model, "stock")
    assert stock.get_layer("group1_block1_bn1").dtype_policy.name == "mixed_bfloat16"
    assert stock.get_layer("logits").dtype_policy.name == "float32"
    assert [type(layer) for layer in stock.layers if not isinstance(
        layer, keras.layers.BatchNormalization)] == [type(layer) for layer in model.layers
                                                     if not isinstance(
                                                         layer, keras.layers.BatchNormalization)]


def test_a_loaded_teacher_follows_the_runs_batch_norm(tmp_path):
    import types

    from sokd_tf.stages import teacher as teacher_stage

    keras.utils.set_random_seed(0)
    teacher = models.build("wrn_10_1", (12, 12, 3), 5, model_name="teacher")
    _randomize_batch_norm(teacher)
    path = str(tmp_path / "teacher.keras")
    teacher.save(path)
    info = types.SimpleNamespace(image_shape=(12, 12, 3), num_classes=5)
    as_saved = teacher_stage.load_teacher(path, info)
    assert all(isinstance(layer, FusedBatchNormalization) for layer in _norms(as_saved))
    stock = teacher_stage.load_teacher(path, info, batch_norm="stock")
    assert not any(isinstance(layer, FusedBatchNormalization) for layer in _norms(stock))
    images = _images()
    np.testing.assert_allclose(stock(images, training=False), teacher(images, training=False),
                               rtol=1e-5, atol=1e-5)
