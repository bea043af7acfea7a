"""FitNet hint and attention-transfer terms: hand values, invariants, gradient flow."""

import doctest
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from sokd_tf import losses
from sokd_tf.losses import feature


def maps(values, height, width, channels=1, batch=1):
    return tf.constant(np.asarray(values, np.float32).reshape(batch, height, width, channels))


def value(x):
    return np.asarray(x, np.float64)


def random_maps(shape, seed):
    return tf.random.stateless_normal(shape, seed=(seed, 7))


def test_docstring_examples_hold():
    assert doctest.testmod(feature).failed == 0


def test_hint_hand_values_per_example():
    target = maps([1, 2, 3, 4, 1, 2, 3, 4], 2, 2, batch=2)
    learner = maps([0, 2, 3, 6, 1, 2, 3, 4], 2, 2, batch=2)
    # Example 0: differences 1, 0, 0, -2 -> (1 + 0 + 0 + 4) / 4; example 1 identical.
    loss = losses.hint_loss(target, learner)
    assert loss.shape == (2,) and loss.dtype == tf.float32
    assert value(loss) == pytest.approx([1.25, 0.0])


def test_hint_averages_over_channels_too():
    # One position, two channels: differences 1 and 3 -> (1 + 9) / 2.
    assert value(losses.hint_loss(maps([0, 0], 1, 1, 2), maps([1, 3], 1, 1, 2))) == (
        pytest.approx([5.0])
    )


def test_hint_resizes_the_learner_to_the_target_size():
    # Shrinking averages: [[1, 2], [3, 4]] -> 2.5; target 3 -> (3 - 2.5)^2.
    assert value(losses.hint_loss(maps([3], 1, 1), maps([1, 2, 3, 4], 2, 2))) == (
        pytest.approx([0.25])
    )
    # Growing interpolates: row [0, 4] -> [0, 1, 3, 4]; against zeros (0 + 1 + 9 + 16) / 4.
    assert value(losses.hint_loss(maps([0, 0, 0, 0], 1, 4), maps([0, 4], 1, 2))) == (
        pytest.approx([6.5])
    )
    assert value(losses.hint_loss(maps([0, 1, 3, 4], 1, 4), maps([0, 4], 1, 2))) == (
        pytest.approx([0.0])
    )


def test_hint_needs_equal_channels():
    with pytest.raises(ValueError, match="channel"):
        losses.hint_loss(random_maps((1, 2, 2, 3), 0), random_maps((1, 2, 2, 2), 1))


def test_resize_shrinks_by_adaptive_average_and_grows_bilinearly():
    # 3 -> 2 cells: bins {0, 1} and {1, 2} (PyTorch adaptive_avg_pool2d): [0, 3, 6] -> [1.5, 4.5].
    shrunk = losses.resize_features(maps([0, 3, 6], 1, 3), (1, 2))
    assert value(shrunk).ravel() == pytest.approx([1.5, 4.5])
    # Integer ratios agree with TF's area resize (which has no gradient), growth with
    # TF's bilinear resize (half-pixel centres).
    features = random_maps((2, 8, 6, 3), 2)
    np.testing.assert_allclose(
        losses.resize_features(features, (4, 3)),
        tf.image.resize(features, (4, 3), method="area"), atol=1e-6,
    )
    small = random_maps((2, 3, 5, 3), 3)
    np.testing.assert_allclose(
        losses.resize_features(small, (7, 9)),
        tf.image.resize(small, (7, 9), method="bilinear"), atol=1e-5,
    )
    # Equal sizes: the input, unchanged.
    np.testing.assert_array_equal(losses.resize_features(small, (3, 5)), small)


def test_attention_map_hand_values():
    features = np.zeros((1, 2, 2, 2), np.float32)
    features[0, 0, 0] = [3.0, 4.0]  # channel mean of squares 12.5 at one position.
    np.testing.assert_allclose(losses.attention_map(features), [[1.0, 0.0, 0.0, 0.0]])
    # Ones: every position 1, norm 2.
    np.testing.assert_allclose(losses.attention_map(tf.ones((1, 2, 2, 3))), [[0.5] * 4])
    # An all-zero map stays zero (PyTorch's normalize eps), no NaN.
    np.testing.assert_array_equal(losses.attention_map(tf.zeros((1, 2, 2, 1))), [[0.0] * 4])


def test_attention_loss_hand_values():
    # a_t = [.5] * 4, a_l = [1, 1, 0, 0] / sqrt(2): ||a_t - a_l||^2 = 2 - sqrt(2), over 4.
    loss = losses.attention_loss(tf.ones((1, 2, 2, 1)), maps([1, 1, 0, 0], 2, 2))
    assert value(loss) == pytest.approx([(2 - math.sqrt(2)) / 4], abs=1e-7)
    assert value(loss) == pytest.approx([0.1464466], abs=1e-7)
    # a_t = [1, 0, 0, 0], a_l = [.5] * 4: differences .5, -.5, -.5, -.5 -> .25 each.
    assert value(losses.attention_loss(maps([1, 0, 0, 0], 2, 2), tf.ones((1, 2, 2, 1)))) == (
        pytest.approx([0.25])
    )


def test_attention_loss_compares_maps_across_channel_counts():
    learner = np.zeros((1, 2, 2, 2), np.float32)
    learner[0, 0, 0] = [3.0, 4.0]
    assert value(losses.attention_loss(maps([1, 0, 0, 0], 2, 2), learner)) == (
        pytest.approx([0.0], abs=1e-7)
    )


def test_attention_loss_invariances():
    features = random_maps((3, 4, 4, 5), 4)
    # p = 2 ignores signs; the normalisation ignores scale.
    np.testing.assert_allclose(losses.attention_loss(features, -features), 0.0, atol=1e-7)
    np.testing.assert_allclose(losses.attention_loss(features, 3.0 * features), 0.0, atol=1e-7)


def test_attention_loss_pools_features_to_the_smaller_size():
    target = maps([1, 0, 0, 0], 2, 2)
    # Nearest 2x upsampling of the target pools back to it: loss 0, whichever side is larger.
    upsampled = tf.repeat(tf.repeat(target, 2, axis=1), 2, axis=2)
    np.testing.assert_allclose(losses.attention_loss(target, upsampled), [0.0], atol=1e-7)
    np.testing.assert_allclose(losses.attention_loss(upsampled, target), [0.0], atol=1e-7)
    # The features are pooled before squaring: a +-1 checkerboard in the learner's
    # top-left 2x2 block pools to 0, so a_l = 0 and the loss is |a_t|^2 / 4 = .25 (pooling
    # the attention map instead would give a_l = a_t and 0).
    learner = np.zeros((1, 4, 4, 1), np.float32)
    learner[0, :2, :2, 0] = [[1, -1], [-1, 1]]
    assert value(losses.attention_loss(target, learner)) == pytest.approx([0.25])


@pytest.mark.parametrize("loss", [losses.hint_loss, losses.attention_loss])
def test_zero_for_identical_features_and_batch_shape(loss):
    features = random_maps((4, 3, 3, 2), 5)
    result = loss(features, features)
    assert result.shape == (4,) and result.dtype == tf.float32
    np.testing.assert_allclose(result, 0.0, atol=1e-7)
    assert np.all(value(loss(features, random_maps((4, 3, 3, 2), 6))) > 0)


@pytest.mark.parametrize("loss", [losses.hint_loss, losses.attention_loss])
def test_mixed_precision_features_give_float32(loss):
    features = tf.cast(random_maps((2, 2, 2, 2), 7), tf.bfloat16)
    assert loss(features, features * 2).dtype == tf.float32


def test_hint_gradient_hand_values_and_no_gradient_into_the_target():
    target = tf.Variable(maps([1, 2, 3, 4], 2, 2))
    learner = tf.Variable(maps([0, 2, 3, 6], 2, 2))
    with tf.GradientTape(persistent=True) as tape:
        loss = tf.reduce_sum(losses.hint_loss(target, learner))
    assert tape.gradient(loss, target) is None
    # d/dl mean((t - l)^2) = 2 (l - t) / 4.
    np.testing.assert_allclose(
        tf.reshape(tape.gradient(loss, learner), [-1]), [-0.5, 0.0, 0.0, 1.0]
    )


@pytest.mark.parametrize(
    ("loss", "learner_size"),
    # Target 2x2; learner equal, larger (integer and fractional ratio) and, for the hint,
    # smaller (AT at a 1x1 common size is constant, so it has no gradient there).
    [(losses.hint_loss, 2), (losses.hint_loss, 4), (losses.hint_loss, 3), (losses.hint_loss, 1),
     (losses.attention_loss, 2), (losses.attention_loss, 4), (losses.attention_loss, 3)],
)
def test_gradient_reaches_the_learner_and_its_regressor_only(loss, learner_size):
    target = tf.Variable(random_maps((2, 2, 2, 4), 8))
    learner_input = random_maps((2, learner_size, learner_size, 3), 9)
    keras.utils.set_random_seed(0)
    regressor = keras.layers.Conv2D(4, 1)  # what a distiller puts on the learner side.
    with tf.GradientTape(persistent=True) as tape:
        learner = regressor(learner_input)
        total = tf.reduce_sum(loss(target, learner))
    assert tape.gradient(total, target) is None
    for gradient in [tape.gradient(total, learner), *tape.gradient(total, regressor.weights)]:
        assert gradient is not None and np.any(gradient.numpy() != 0)


def test_paired_feature_loss_sums_over_stages():
    pairs = [(random_maps((2, 4, 4, 2), 10), random_maps((2, 4, 4, 3), 11)),
             (random_maps((2, 2, 2, 5), 12), random_maps((2, 2, 2, 2), 13))]
    targets, learners = zip(*pairs, strict=True)
    np.testing.assert_allclose(
        losses.paired_feature_loss("at", targets, learners),
        sum(value(losses.attention_loss(t, s)) for t, s in pairs), rtol=1e-6,
    )
    with pytest.raises(ValueError, match="one learner map per target map"):
        losses.paired_feature_loss("at", targets, learners[:1])
    with pytest.raises(ValueError, match="kind"):
        losses.paired_feature_loss("crd", targets, learners)


def test_term_names():
    assert losses.feature_term_name("student", "at", "peer") == "student/at_from_peer"
    assert losses.parse_feature_term("peer/hint_from_teacher") == ("peer", "hint", "teacher")
    assert losses.parse_feature_term("student/kd_from_teacher") is None
    for name in losses.KD_FEATURE_TERMS + losses.SOKD_FEATURE_TERMS:
        assert losses.feature_term_name(*losses.parse_feature_term(name)) == name
