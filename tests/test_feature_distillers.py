"""Feature terms (FitNet hint, attention transfer) in the KD and SOKD distillers."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from sokd_tf import distillers, losses, models
from sokd_tf.config import LossConfig, TrainConfig
from sokd_tf.distillers import features
from sokd_tf.errors import ConfigError
from sokd_tf.models import peer as peer_lib

SHAPE = (16, 16, 3)
CLASSES = 10
BATCH = 8
SOKD_ON = {name: 1.0 for name in losses.SOKD_FEATURE_TERMS}
KD_ON = {name: 1.0 for name in losses.KD_FEATURE_TERMS}


def random_data(n=BATCH, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, *SHAPE)).astype(np.float32)
    return images, (np.arange(n) % CLASSES).astype(np.int32)


def build(name, seed, architecture):
    keras.utils.set_random_seed(seed)
    return models.BUILDERS[architecture](SHAPE, CLASSES, name=name)


def two_stage_student(seed=3):
    """Two groups (16x16x8, 4x4x12) against a WRN's three (16x16, 8x8, 4x4)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(SHAPE)
    x = keras.layers.Conv2D(8, 3, padding="same", name="group1")(inputs)
    x = keras.layers.Conv2D(12, 3, strides=4, padding="same", name="group2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="features")(x)
    return keras.Model(inputs, keras.layers.Dense(CLASSES, name="logits")(x), name="student")


def sokd_models(seed=0):
    # WRN-16-2 teacher/peer (32, 64, 128 channels), WRN-10-1 student (16, 32, 64).
    teacher = build("teacher", seed + 1, "wrn_16_2")
    peer = peer_lib.build_peer(teacher)
    return teacher, peer, build("student", seed + 2, "wrn_10_1")


def snapshot(variables):
    return [np.array(v.numpy(), copy=True) for v in variables]


def same(before, variables):
    return all(np.array_equal(b, v.numpy()) for b, v in zip(before, variables, strict=True))


def all_changed(before, variables):
    return all(not np.array_equal(b, v.numpy()) for b, v in zip(before, variables, strict=True))


def fit_one_step(trainer, validate=False, run_eagerly=True):
    # Eager steps skip the tracing that dominates one-step tests; one test runs the graph.
    trainer.compile(
        optimizer=distillers.make_optimizer(TrainConfig(), 1), run_eagerly=run_eagerly
    )
    images, labels = random_data()
    return trainer.fit(
        images, labels, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
        validation_data=(images, labels) if validate else None,
    )


def test_pair_stages_pairs_the_deepest_stages():
    groups = ["group1", "group2", "group3"]
    assert features.pair_stages(groups, groups) == list(zip(groups, groups, strict=True))
    # A SOKD peer has only the teacher's last group: the student's last group pairs with it.
    assert features.pair_stages(groups, ["group3"]) == [("group3", "group3")]
    # Four target stages, three learner stages: target stages 2..4.
    assert features.pair_stages(groups, ["s1", "s2", "s3", "s4"]) == [
        ("group1", "s2"), ("group2", "s3"), ("group3", "s4")
    ]
    assert features.pair_stages(groups, groups, max_pairs=1) == [("group3", "group3")]
    assert features.pair_stages(groups, []) == []


def test_defaults_are_off_and_map_from_the_config():
    config = LossConfig()
    assert set(config.kd_feature_weights().values()) == {0.0}
    assert set(config.sokd_feature_weights().values()) == {0.0}
    assert set(config.kd_feature_weights()) == set(losses.KD_FEATURE_TERMS)
    assert set(config.sokd_feature_weights()) == set(losses.SOKD_FEATURE_TERMS)
    config = LossConfig(hint_weight=100.0, peer_attention_weight=1000.0, feature_pairs=2)
    assert config.sokd_feature_weights()["student/hint_from_peer"] == 100.0
    assert config.kd_feature_weights()["student/hint_from_teacher"] == 100.0
    assert config.sokd_feature_weights()["peer/at_from_teacher"] == 1000.0
    for bad in ({"attention_weight": -1.0}, {"feature_pairs": 0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            LossConfig(**bad)


class ModelCallsSOKD(distillers.SemiOnlineDistiller):
    """SOKD's forward as it was before feature terms: the role models called directly."""

    def forward(self, images, labels, training):
        teacher_features, teacher_logits = self.teacher_trunk(
            images, training=self.teacher_training and training
        )
        peer_logits = self.peer(tf.stop_gradient(teacher_features), training=training)
        student_logits = self.student(images, training=training)
        terms = losses.sokd_loss_terms(
            teacher_logits, peer_logits, student_logits, labels, self.temperature
        )
        return terms, {"peer": peer_logits, "student": student_logits}


class ModelCallsKD(distillers.KnowledgeDistiller):
    """KD's forward as it was before feature terms."""

    def forward(self, images, labels, training):
        teacher_logits = self.teacher(images, training=self.teacher_training and training)
        student_logits = self.student(images, training=training)
        terms = losses.kd_loss_terms(teacher_logits, student_logits, labels, self.temperature)
        return terms, {"student": student_logits}


@pytest.mark.parametrize("method", ["sokd", "kd"])
def test_zero_weights_give_todays_step_exactly(method):
    def trainer(cls, **feature_options):
        teacher, peer, student = sokd_models()
        if method == "sokd":
            return cls(teacher, peer, student, **feature_options)
        return cls(teacher, student, **feature_options)

    if method == "sokd":
        names, legacy_class, new_class = (
            losses.SOKD_FEATURE_TERMS, ModelCallsSOKD, distillers.SemiOnlineDistiller
        )
    else:
        names, legacy_class, new_class = (
            losses.KD_FEATURE_TERMS, ModelCallsKD, distillers.KnowledgeDistiller
        )
    legacy = trainer(legacy_class)
    plain = trainer(new_class)
    zero = trainer(new_class, feature_weights={name: 0.0 for name in names}, feature_pairs=1,
                   feature_layers={"student": ["group2", "group3"]})
    assert not zero.feature_terms.terms and not zero.feature_regressors
    assert zero.loss_weights_by_term == plain.loss_weights_by_term == legacy.loss_weights_by_term
    histories = [fit_one_step(t).history for t in (legacy, plain, zero)]
    assert histories[0] == histories[1] == histories[2]
    for role in ("teacher", "student") + (("peer",) if method == "sokd" else ()):
        expected = snapshot(getattr(legacy, role).weights)
        assert same(expected, getattr(plain, role).weights), role
        assert same(expected, getattr(zero, role).weights), role


def test_sokd_feature_fit_step_trains_student_peer_and_regressor():
    teacher, peer, student = sokd_models()
    trainer = distillers.SemiOnlineDistiller(
        teacher, peer, student, teacher_bn_mode="frozen", feature_weights=SOKD_ON
    )
    assert trainer.feature_terms.names == losses.SOKD_FEATURE_TERMS
    # Only the student's hint needs a regressor (64 -> 128 channels); the peer has the
    # teacher's architecture.
    (regressor,) = trainer.feature_regressors
    assert tuple(regressor.kernel.shape) == (1, 1, 64, 128)
    regressor_ids = {id(v) for v in regressor.trainable_variables}
    assert regressor_ids <= {id(v) for v in trainer.role_variables["student"]}
    assert not regressor_ids & {id(v) for v in trainer.role_variables["peer"]}
    assert not regressor_ids & {id(v) for v in student.weights}  # not in the export
    before = {
        "teacher": snapshot(teacher.weights), "peer": snapshot(peer.weights),
        "student": snapshot(student.weights),
        "regressor": snapshot(regressor.trainable_variables),
    }

    history = fit_one_step(trainer, validate=True, run_eagerly=False)

    for name in losses.SOKD_FEATURE_TERMS:
        assert name in history.history and f"val_{name}" in history.history
        assert np.isfinite(history.history[name][0]) and history.history[name][0] > 0
    assert same(before["teacher"], teacher.weights)
    assert all_changed(before["peer"], peer.weights)
    assert all_changed(before["student"], student.weights)
    assert all_changed(before["regressor"], regressor.trainable_variables)
    # Momentum slots for exactly the optimised variables, the regressor's included.
    slots = [v for v in trainer.optimizer.variables if "momentum" in v.path]
    assert len(slots) == len(trainer.trainable_variables) == sum(
        len(v) for v in trainer.role_variables.values()
    )


def test_kd_fitnet_and_at_baselines_across_stage_counts():
    teacher = build("teacher", 1, "wrn_16_2")
    student = two_stage_student()
    trainer = distillers.KnowledgeDistiller(
        teacher, student, teacher_bn_mode="frozen",
        weights={"student/ce": 1.0, "student/kd_from_teacher": 0.0},
        feature_weights={"student/hint_from_teacher": 100.0, "student/at_from_teacher": 1000.0},
    )
    # Two student stages pair with the teacher's two deepest: group1 (16x16x8) with
    # group2 (8x8x64, the hint shrinks the student map), group2 (4x4x12) with group3.
    for term in trainer.feature_terms.terms:
        assert term.pairs == (("group1", "group2"), ("group2", "group3"))
    kernels = [tuple(r.kernel.shape) for r in trainer.feature_regressors]
    assert kernels == [(1, 1, 8, 64), (1, 1, 12, 128)]
    before_teacher, before_student = snapshot(teacher.weights), snapshot(student.weights)
    before_regressors = snapshot([v for r in trainer.feature_regressors for v in r.weights])

    history = fit_one_step(trainer)

    assert set(history.history) == {
        "loss", "student/ce", "student/kd_from_teacher", *losses.KD_FEATURE_TERMS,
        "student/top1", "student/top5",
    }
    assert same(before_teacher, teacher.weights)
    assert all_changed(before_student, student.weights)
    assert all_changed(before_regressors, [v for r in trainer.feature_regressors for v in r.weights])


def test_each_term_reaches_only_its_learner_and_the_hint_regressor_only_its_term():
    teacher, peer, student = sokd_models()
    trainer = distillers.SemiOnlineDistiller(teacher, peer, student, feature_weights=SOKD_ON)
    (regressor,) = trainer.feature_regressors
    images, labels = random_data(4)
    with tf.GradientTape(persistent=True) as tape:
        terms, _ = trainer.forward(images, labels, training=True)
        totals = {name: tf.reduce_sum(values) for name, values in terms.items()}
    owners = {"peer": peer.trainable_variables, "student": student.trainable_variables}
    assert set(totals) == {*losses.SOKD_TERMS, *losses.SOKD_FEATURE_TERMS}
    for name, total in totals.items():
        learner = name.split("/")[0]
        regressor_gradients = tape.gradient(total, regressor.trainable_variables)
        if name == "student/hint_from_peer":
            assert all(g is not None and np.any(g.numpy() != 0) for g in regressor_gradients)
        else:
            assert all(g is None for g in regressor_gradients), name
        for role, variables in owners.items():
            reached = any(g is not None for g in tape.gradient(total, variables))
            assert reached == (role == learner), (name, role)


def test_feature_terms_do_not_depend_on_the_temperature():
    teacher, peer, student = sokd_models()
    trainer = distillers.SemiOnlineDistiller(
        teacher, peer, student, temperature=1.0, feature_weights=SOKD_ON
    )
    images, labels = random_data(4)
    cold, _ = trainer.forward(images, labels, training=False)
    trainer.temperature = 8.0
    hot, _ = trainer.forward(images, labels, training=False)
    for name in losses.SOKD_FEATURE_TERMS:
        np.testing.assert_array_equal(cold[name], hot[name])
    assert not np.allclose(cold["student/ml_from_peer"], hot["student/ml_from_peer"])


def test_feature_layers_and_pairs_select_stages():
    teacher, peer, student = sokd_models()
    trainer = distillers.KnowledgeDistiller(
        teacher, student, feature_weights={"student/at_from_teacher": 1.0}, feature_pairs=2,
    )
    (term,) = trainer.feature_terms.terms
    assert term.pairs == (("group2", "group2"), ("group3", "group3"))
    assert trainer.feature_terms.layers("teacher") == ["group2", "group3"]
    trainer = distillers.KnowledgeDistiller(
        teacher, student, feature_weights={"student/hint_from_teacher": 1.0},
        feature_layers={"teacher": ["group2"], "student": ["group2"]},
    )
    (term,) = trainer.feature_terms.terms
    assert term.pairs == (("group2", "group2"),)  # RepDistiller's FitNet hint layer.


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"feature_weights": {"student/at_from_teacher": 1.0}}, "unknown feature terms"),
        ({"feature_weights": {"student/at_from_peer": -1.0}}, "must be >= 0"),
        ({"feature_weights": SOKD_ON, "feature_layers": {"student": ["nope"]}}, "'nope'"),
        ({"feature_weights": SOKD_ON, "feature_layers": {"student": ["features"]}},
         "must output a"),
        ({"feature_weights": SOKD_ON, "feature_layers": {"tutor": ["group3"]}}, "tutor"),
        ({"feature_weights": SOKD_ON, "feature_pairs": 0}, "feature_pairs"),
    ],
)
def test_bad_feature_options_are_config_errors(options, message):
    teacher, peer, student = sokd_models()
    with pytest.raises(ConfigError, match=message):
        distillers.SemiOnlineDistiller(teacher, peer, student, **options)


def test_trainer_with_features_round_trips(tmp_path):
    teacher, peer, student = sokd_models()
    trainer = distillers.SemiOnlineDistiller(
        teacher, peer, student, feature_weights={**SOKD_ON, "student/at_from_peer": 1000.0},
        feature_layers={"student": ["group2", "group3"]},
    )
    fit_one_step(trainer)
    trainer.save(tmp_path / "sokd.keras")
    loaded = keras.models.load_model(tmp_path / "sokd.keras", safe_mode=True)
    assert loaded.get_config()["feature_weights"] == trainer.feature_terms.weights
    assert loaded.loss_weights_by_term == trainer.loss_weights_by_term
    assert loaded.feature_terms.stage_layers == trainer.feature_terms.stage_layers
    for original, restored in zip(
        trainer.feature_regressors, loaded.feature_regressors, strict=True
    ):
        for a, b in zip(original.weights, restored.weights, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    images, labels = random_data(4)
    expected, _ = trainer.forward(images, labels, training=False)
    actual, _ = loaded.forward(images, labels, training=False)
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-6, atol=1e-7)
    # The student file carries the student alone: no regressor.
    fresh = build("fresh", 9, "wrn_10_1")
    assert trainer.student.count_params() == fresh.count_params()
