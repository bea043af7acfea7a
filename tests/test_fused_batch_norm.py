"""FusedBatchNormalization equals Keras' BatchNormalization (values, gradients, stats)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

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
