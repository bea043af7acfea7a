"""Keras conventions of the trainers: compile(metrics=, loss=, loss_weights=), sample
weights, and the relation to `keras.distillation` (KD equals its Distiller; its
DistillationLoss objects as extra KD terms).

The models here have no BatchNorm or dropout, so a forward pass does not depend on the
rest of the batch or on the training flag: that is what makes "a zero weight equals
leaving the example out" exact, and logits computed outside `fit` equal those inside.
"""

import warnings

import keras
import numpy as np
import pytest

from sokd_tf import distillers, losses
from sokd_tf.config import TrainConfig
from sokd_tf.errors import ConfigError
from sokd_tf.models import peer as peer_lib

SHAPE = (8, 8, 1)
CLASSES = 10


def tiny(name, seed, width=4):
    """BN-free functional model with the stage names the peer builder needs."""
    keras.utils.set_random_seed(seed)
    images = keras.Input(SHAPE)
    x = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name="stem")(images)
    x = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name="group1")(x)
    x = keras.layers.Conv2D(width, 3, strides=2, padding="same", activation="relu",
                            name="group2")(x)
    x = keras.layers.Conv2D(width, 3, strides=2, padding="same", activation="relu",
                            name="group3")(x)
    x = keras.layers.GlobalAveragePooling2D(name="features")(x)
    return keras.Model(images, keras.layers.Dense(CLASSES, name="logits")(x), name=name)


def batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, *SHAPE)).astype(np.float32)
    return images, (np.arange(n) % CLASSES).astype(np.int32)


def make_trainer(method):
    teacher, student = tiny("teacher", 1), tiny("student", 2)
    if method == "vanilla":
        return distillers.VanillaTrainer(student)
    if method == "kd":
        return distillers.KnowledgeDistiller(teacher, student)
    if method == "dml":
        return distillers.MutualLearner(tiny("peer", 3), student)
    keras.utils.set_random_seed(3)
    return distillers.SemiOnlineDistiller(teacher, peer_lib.build_peer(teacher), student)


def models_of(trainer):
    """Every network of a trainer by role (the teacher too, where it has one)."""
    found = dict(trainer.role_models)
    teacher = getattr(trainer, "teacher", None)
    if teacher is not None:
        found["teacher"] = teacher
    return found


def copy_weights(source, target):
    for role, model in models_of(source).items():
        models_of(target)[role].set_weights(model.get_weights())


def cross_entropy(labels, logits):
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return -log_probs[np.arange(len(labels)), labels]


# --- compile(metrics=...) ------------------------------------------------------------


def test_user_metrics_are_tracked_per_role_on_each_roles_logits():
    trainer = make_trainer("sokd")
    images, _ = batch()
    student_logits = trainer.student.predict(images, verbose=0)
    peer_logits = trainer.peer.predict(trainer.teacher_trunk(images)[0], verbose=0)
    # 5 of 8 labels are the student's own prediction: its accuracy is 5/8 by construction.
    predicted = student_logits.argmax(-1)
    labels = np.where(np.arange(8) < 5, predicted, (predicted + 1) % CLASSES).astype(np.int32)
    weights = np.array([1, 2, 0, 1, 0, 3, 1, 0], np.float32)
    trainer.compile(
        optimizer=keras.optimizers.SGD(0.1),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="acc"), "crossentropy"],
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(name="weighted_acc")],
    )
    history = trainer.fit(images, labels, sample_weight=weights, batch_size=8, epochs=1,
                          shuffle=False, verbose=0).history

    assert history["student/acc"] == [pytest.approx(5 / 8)]
    for role, logits in (("student", student_logits), ("peer", peer_logits)):
        correct = (logits.argmax(-1) == labels).astype(np.float32)
        assert history[f"{role}/acc"] == [pytest.approx(correct.mean())]
        assert history[f"{role}/weighted_acc"] == [
            pytest.approx((weights * correct).sum() / weights.sum())
        ]
        assert history[f"{role}/crossentropy"] == [
            pytest.approx(cross_entropy(labels, logits).mean(), rel=1e-5)
        ]
    # Hand value: the correct five carry weights 1+2+0+1+0 = 4 of the total 8.
    assert history["student/weighted_acc"] == [pytest.approx(0.5)]
    # The same metrics again, on the test step.
    results = trainer.evaluate(images, labels, verbose=0, return_dict=True)
    assert {"peer/acc", "student/acc", "peer/crossentropy"} <= set(results)


def test_a_metrics_dict_chooses_the_roles_and_names_are_checked():
    trainer = make_trainer("dml")
    images, labels = batch()
    trainer.compile(optimizer=keras.optimizers.SGD(0.1), metrics={"peer": "accuracy"})
    history = trainer.fit(images, labels, batch_size=8, epochs=1, verbose=0).history
    assert "peer/accuracy" in history and "student/accuracy" not in history

    with pytest.raises(ConfigError, match=r"no trained role \['teacher'\]"):
        trainer.compile(optimizer="sgd", metrics={"teacher": ["accuracy"]})
    with pytest.raises(ConfigError, match="'peer/top1' is taken"):
        trainer.compile(optimizer="sgd", metrics=[keras.metrics.MeanSquaredError(name="top1")])
    with pytest.raises(ConfigError, match="'peer/acc' is taken"):
        trainer.compile(optimizer="sgd", metrics=[keras.metrics.SparseCategoricalAccuracy(
            name="acc")], weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(name="acc")])
    with pytest.raises(ConfigError, match="expected metric objects"):
        trainer.compile(optimizer="sgd", metrics=[3])


def test_loss_is_refused_and_loss_weights_warn():
    trainer = make_trainer("kd")
    with pytest.raises(ConfigError, match="the method defines its loss"):
        trainer.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    with pytest.warns(UserWarning, match="loss_weights is ignored"):
        trainer.compile(optimizer="sgd", loss_weights={"student/ce": 1.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.compile(optimizer="sgd", metrics=["accuracy"], jit_compile=False)


def test_compiled_trainer_with_user_metrics_round_trips(tmp_path):
    trainer = make_trainer("sokd")
    images, labels = batch()
    trainer.compile(optimizer=distillers.make_optimizer(TrainConfig(), 1),
                    metrics=["accuracy"])
    trainer.fit(images, labels, batch_size=8, epochs=1, verbose=0)
    path = str(tmp_path / "sokd.keras")
    trainer.save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "compile() was not called" on load
        loaded = keras.saving.load_model(path)
    assert [m.name for m in loaded.metrics] == [m.name for m in trainer.metrics]
    assert "student/accuracy" in [m.name for m in loaded.metrics]
    assert int(loaded.optimizer.iterations) == 1
    for saved, restored in zip(trainer.optimizer.variables, loaded.optimizer.variables,
                               strict=True):
        np.testing.assert_array_equal(restored.numpy(), saved.numpy())


# --- sample weights ------------------------------------------------------------------


def test_weighted_total_scales_examples_and_keeps_the_count_as_denominator():
    # Hand values: 2 * (1 * 1 + 0 * 3) / 2 = 1; and 0.5 * (2 * 1 + 1 * 3) / 4 = 0.625.
    assert float(losses.weighted_total({"a": [1.0, 3.0]}, {"a": 2.0}, 2, [1.0, 0.0])) == 1.0
    assert float(losses.weighted_total({"a": [1.0, 3.0]}, {"a": 0.5}, 4, [2.0, 1.0])) == 0.625
    assert float(losses.weighted_total({"a": [1.0, 3.0]}, {"a": 1.0}, 2)) == 2.0


def test_evaluate_weights_the_terms_the_loss_and_the_accuracies():
    trainer = make_trainer("kd")
    trainer.compile(optimizer="sgd", metrics=[keras.metrics.SparseCategoricalAccuracy(
        name="acc")])
    images, labels = batch()
    weights = np.array([0.5, 2, 0, 1, 1, 0, 3, 1], np.float32)
    teacher_logits = trainer.teacher.predict(images, verbose=0)
    student_logits = trainer.student.predict(images, verbose=0)
    terms = {k: np.asarray(v) for k, v in losses.kd_loss_terms(
        teacher_logits, student_logits, labels, 4.0).items()}
    results = trainer.evaluate(images, labels, sample_weight=weights, batch_size=8,
                               verbose=0, return_dict=True)
    for name, values in terms.items():
        assert results[name] == pytest.approx((weights * values).sum() / 8, rel=1e-5)
    assert results["loss"] == pytest.approx(
        (weights * (0.1 * terms["student/ce"] + 0.9 * terms["student/kd_from_teacher"])).sum()
        / 8, rel=1e-5)
    correct = (student_logits.argmax(-1) == labels).astype(np.float32)
    assert results["student/top1"] == pytest.approx((weights * correct).sum() / weights.sum())
    assert results["student/acc"] == pytest.approx(correct.mean())  # unweighted metric


@pytest.mark.parametrize("method", ["vanilla", "kd", "dml", "sokd"])
def test_zero_weight_on_half_the_batch_equals_the_other_half_at_half_the_rate(method):
    """What is equal, exactly: the loss is sum(w * term) / (number of examples), so one
    step on 2n examples with weights [1]*n + [0]*n gives the gradient of the n weighted
    examples divided by 2n instead of n. With plain SGD that is one step on those n
    examples alone with half the learning rate (rate * n / 2n)."""
    n = 4
    images, labels = batch(2 * n)
    weights = np.array([1.0] * n + [0.0] * n, np.float32)
    weighted, alone, alone_full_rate = (make_trainer(method) for _ in range(3))
    copy_weights(weighted, alone)
    copy_weights(weighted, alone_full_rate)
    teacher_before = ([w.copy() for w in weighted.teacher.get_weights()]
                      if method in ("kd", "sokd") else None)

    weighted.compile(optimizer=keras.optimizers.SGD(0.2))
    weighted_history = weighted.fit(images, labels, sample_weight=weights, batch_size=2 * n,
                                    epochs=1, shuffle=False, verbose=0).history
    alone.compile(optimizer=keras.optimizers.SGD(0.1))
    alone_history = alone.fit(images[:n], labels[:n], batch_size=n, epochs=1, shuffle=False,
                              verbose=0).history
    alone_full_rate.compile(optimizer=keras.optimizers.SGD(0.2))
    alone_full_rate.fit(images[:n], labels[:n], batch_size=n, epochs=1, verbose=0)

    moved = 0.0
    for role, model in weighted.role_models.items():
        for got, want, full in zip(model.get_weights(), alone.role_models[role].get_weights(),
                                   alone_full_rate.role_models[role].get_weights(),
                                   strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=role)
            moved = max(moved, float(np.abs(full - want).max()))
    assert moved > 1e-4  # the weights are normalised by the count, not by sum(w)
    # The reported loss has the same normalisation: half of the n-example loss.
    assert weighted_history["loss"][0] == pytest.approx(alone_history["loss"][0] / 2, rel=1e-5)
    if teacher_before is not None:
        for before, after in zip(teacher_before, weighted.teacher.get_weights(), strict=True):
            np.testing.assert_array_equal(before, after)


# --- keras.distillation --------------------------------------------------------------


def test_kd_term_equals_keras_logits_distillation_with_a_kl_divergence_object():
    # Hand value: target [0, 0], learner [2 ln 3, 0], T = 2 -> 0.5753641.
    target = np.array([[0.0, 0.0]], np.float32)
    learner = np.array([[2 * np.log(3.0), 0.0]], np.float32)
    keras_term = keras.distillation.LogitsDistillation(
        temperature=2.0, loss=keras.losses.KLDivergence())
    assert float(keras_term.compute_loss(target, learner)) == pytest.approx(0.5753641, abs=1e-6)
    assert float(losses.softened_kl(target, learner, 2.0)[0]) == pytest.approx(0.5753641,
                                                                              abs=1e-6)
    rng = np.random.default_rng(0)
    teacher_logits, student_logits = (3 * rng.normal(size=(16, CLASSES)).astype(np.float32)
                                      for _ in range(2))
    keras_term = keras.distillation.LogitsDistillation(
        temperature=4.0, loss=keras.losses.KLDivergence())
    ours = losses.kd_loss_terms(teacher_logits, student_logits, np.zeros(16, np.int32), 4.0)
    assert float(np.mean(ours["student/kd_from_teacher"])) == pytest.approx(
        float(keras_term.compute_loss(teacher_logits, student_logits)), rel=1e-5)


def test_kd_step_equals_a_keras_distiller_step():
    teacher, student = tiny("teacher", 1), tiny("student", 2)
    twin = tiny("student_twin", 2)
    twin.set_weights(student.get_weights())
    ours = distillers.KnowledgeDistiller(teacher, student, teacher_bn_mode="frozen")
    reference = keras.distillation.Distiller(
        teacher, twin,
        keras.distillation.LogitsDistillation(temperature=4.0, loss=keras.losses.KLDivergence()),
        student_loss_weight=0.1,
    )
    images, labels = batch(16)
    ours.compile(optimizer=keras.optimizers.SGD(0.5))
    reference.compile(optimizer=keras.optimizers.SGD(0.5),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ours_loss = ours.fit(images, labels, batch_size=16, epochs=1, verbose=0).history["loss"]
    reference_loss = reference.fit(images, labels, batch_size=16, epochs=1,
                                   verbose=0).history["total_loss"]
    assert ours_loss == [pytest.approx(reference_loss[0], rel=1e-5)]
    for got, want in zip(student.get_weights(), twin.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
