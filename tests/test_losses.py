"""Loss functions against hand-computed values, invariants and gradient flow."""

import math

import numpy as np
import pytest
import tensorflow as tf

from sokd_tf import losses

LN3 = math.log(3.0)


def value(x):
    return np.asarray(x, np.float64)


def test_softened_kl_hand_values():
    target = tf.constant([[0.0, 0.0]])
    learner = tf.constant([[2 * LN3, 0.0]])
    # p_t = [.5, .5], p_l = [.75, .25]: KL = .5 ln(4/3) = 0.1438410; x T^2 = 4.
    assert value(losses.softened_kl(target, learner, 2.0)) == pytest.approx([0.5753641], abs=1e-6)
    # KL([.75, .25] || [.5, .5]) = .75 ln 1.5 + .25 ln .5 = 0.1308120; x 4.
    assert value(losses.softened_kl(learner, target, 2.0)) == pytest.approx([0.5232481], abs=1e-6)


def test_kl_at_temperature_one_on_probabilities():
    target = tf.math.log(tf.constant([[0.5, 0.5]]))
    learner = tf.math.log(tf.constant([[0.75, 0.25]]))
    assert value(losses.softened_kl(target, learner, 1.0)) == pytest.approx([0.1438410], abs=1e-6)
    assert value(losses.kl_divergence(target, learner, 1.0)) == pytest.approx([0.1438410], abs=1e-6)


def test_kl_of_a_distribution_with_itself_is_zero_and_shapes():
    logits = tf.random.stateless_normal((5, 7), seed=(1, 2))
    kl = losses.softened_kl(logits, logits, 4.0)
    assert kl.shape == (5,) and kl.dtype == tf.float32
    np.testing.assert_allclose(kl, 0.0, atol=1e-6)
    # Shifting logits by a constant leaves the distribution unchanged.
    np.testing.assert_allclose(losses.softened_kl(logits + 3.0, logits, 4.0), 0.0, atol=1e-5)


def test_temperature_squared_scaling():
    rng = np.random.default_rng(0)
    target = rng.normal(size=(3, 4)).astype(np.float32)
    learner = rng.normal(size=(3, 4)).astype(np.float32)
    unscaled = value(losses.kl_divergence(target, learner, 3.0))
    np.testing.assert_allclose(losses.softened_kl(target, learner, 3.0), 9.0 * unscaled, rtol=1e-5)


def numpy_batchmean_kl(target, learner, temperature):
    """PyTorch F.kl_div(log_softmax(learner/T), softmax(target/T), 'batchmean') * T^2."""
    def log_softmax(z):
        z = z / temperature
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    log_p, log_q = log_softmax(target), log_softmax(learner)
    return (np.exp(log_p) * (log_p - log_q)).sum() / target.shape[0] * temperature**2


def test_batch_mean_equals_pytorch_batchmean_on_a_short_last_batch():
    rng = np.random.default_rng(1)
    target = rng.normal(size=(3, 10)).astype(np.float64)  # e.g. 50_003 % 128 == 3
    learner = rng.normal(size=(3, 10)).astype(np.float64)
    per_example = losses.softened_kl(target, learner, 4.0)
    assert per_example.shape == (3,)
    assert float(np.mean(per_example)) == pytest.approx(
        numpy_batchmean_kl(target, learner, 4.0), rel=1e-5
    )
    total = losses.weighted_total({"k": per_example}, {"k": 1.0}, 3)
    assert float(total) == pytest.approx(numpy_batchmean_kl(target, learner, 4.0), rel=1e-5)


def test_cross_entropy_hand_value_and_float32():
    logits = tf.constant([[2 * LN3, 0.0], [0.0, 0.0]], tf.float16)
    ce = losses.cross_entropy(tf.constant([0, 1]), logits)
    assert ce.dtype == tf.float32 and ce.shape == (2,)
    np.testing.assert_allclose(ce, [-math.log(0.9), math.log(2.0)], rtol=1e-3)


def test_weighted_total_divides_by_the_global_batch():
    terms = {"a": tf.constant([1.0, 3.0]), "b": tf.constant([2.0, 2.0])}
    # (0.5 * 4 + 2 * 4) / 8: two replicas of 2 examples each.
    assert float(losses.weighted_total(terms, {"a": 0.5, "b": 2.0}, 8)) == pytest.approx(1.25)
    with pytest.raises(KeyError):
        losses.weighted_total(terms, {"a": 1.0}, 2)


def gradients_of(terms_fn, *logits):
    variables = [tf.Variable(x) for x in logits]
    with tf.GradientTape(persistent=True) as tape:
        sums = {name: tf.reduce_sum(term) for name, term in terms_fn(*variables).items()}
    return {name: [tape.gradient(total, v) for v in variables] for name, total in sums.items()}


def reaches(grads):
    return [g is not None and bool(np.any(np.asarray(g) != 0)) for g in grads]


def random_logits(n, seed):
    return [
        np.random.default_rng(seed + i).normal(size=(4, 6)).astype(np.float32) for i in range(n)
    ]


def test_sokd_terms_gradient_flow():
    labels = tf.constant([0, 1, 2, 3])
    grads = gradients_of(
        lambda t, p, s: losses.sokd_loss_terms(t, p, s, labels, temperature=4.0),
        *random_logits(3, 10),
    )
    assert set(grads) == set(losses.SOKD_TERMS) == {
        "peer/ce", "peer/kd_from_teacher", "peer/ml_from_student", "student/ce",
        "student/ml_from_peer",
    }
    #                         teacher, peer, student
    assert reaches(grads["peer/ce"]) == [False, True, False]
    assert reaches(grads["peer/kd_from_teacher"]) == [False, True, False]
    assert reaches(grads["peer/ml_from_student"]) == [False, True, False]
    assert reaches(grads["student/ce"]) == [False, False, True]
    assert reaches(grads["student/ml_from_peer"]) == [False, False, True]


def test_sokd_terms_values():
    teacher, peer, student = random_logits(3, 20)
    labels = np.array([0, 1, 2, 3])
    terms = losses.sokd_loss_terms(teacher, peer, student, labels, temperature=4.0)
    for name, target, learner in [
        ("peer/kd_from_teacher", teacher, peer),
        ("peer/ml_from_student", student, peer),
        ("student/ml_from_peer", peer, student),
    ]:
        assert terms[name].shape == (4,)
        assert float(np.mean(terms[name])) == pytest.approx(
            numpy_batchmean_kl(target, learner, 4.0), rel=1e-5
        )
    np.testing.assert_allclose(terms["peer/ce"], losses.cross_entropy(labels, peer))
    np.testing.assert_allclose(terms["student/ce"], losses.cross_entropy(labels, student))


def test_kd_terms():
    labels = tf.constant([0, 1, 2, 3])
    grads = gradients_of(
        lambda t, s: losses.kd_loss_terms(t, s, labels, temperature=4.0), *random_logits(2, 30)
    )
    assert set(grads) == {"student/ce", "student/kd_from_teacher"} == set(losses.KD_TERMS)
    assert reaches(grads["student/kd_from_teacher"]) == [False, True]
    teacher, student = random_logits(2, 30)
    terms = losses.kd_loss_terms(teacher, student, labels, temperature=4.0)
    assert float(np.mean(terms["student/kd_from_teacher"])) == pytest.approx(
        numpy_batchmean_kl(teacher, student, 4.0), rel=1e-5
    )


def test_dml_terms_and_temperature_flag():
    labels = tf.constant([0, 1, 2, 3])
    grads = gradients_of(lambda p, s: losses.dml_loss_terms(p, s, labels), *random_logits(2, 40))
    assert set(grads) == set(losses.DML_TERMS)
    assert reaches(grads["peer/ml_from_student"]) == [True, False]
    assert reaches(grads["student/ml_from_peer"]) == [False, True]
    peer, student = random_logits(2, 40)
    plain = losses.dml_loss_terms(peer, student, labels, temperature=2.0)
    squared = losses.dml_loss_terms(peer, student, labels, temperature=2.0,
                                    temperature_squared=True)
    np.testing.assert_allclose(
        squared["student/ml_from_peer"], 4.0 * np.asarray(plain["student/ml_from_peer"]),
        rtol=1e-5,
    )
    assert float(np.mean(plain["student/ml_from_peer"])) == pytest.approx(
        numpy_batchmean_kl(peer, student, 2.0) / 4.0, rel=1e-5
    )
