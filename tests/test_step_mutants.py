"""Deliberately broken steps fail the exact-step comparison of tests/test_step_exact.py.

Each mutant replaces one trainer's `forward` (or the shared `train_step`) with a copy
carrying one mistake: a term dropped or doubled, a stop-gradient removed, two roles'
logits swapped, the teacher's BatchNorm in the wrong mode, the wrong temperature, the
loss not scaled under mixed_float16. Every mutant must move the update beyond the
tolerance that the real step meets, which shows the step tests catch a mis-wired step.

The mutants run `fit` eagerly (`run_eagerly=True`: no graph to trace per mutant); the
control test shows the unmutated step passes the same comparison eagerly, so a failure
is the mutation's doing.

Two mistakes are left out because no step can show them: removing the stop-gradient on
the teacher's features or logits (no teacher variable is trainable, so no gradient
reaches one either way; tests/test_step_exact.py checks the teacher's parameters stay
bit-for-bit), and swapping DML's two networks (its loss is symmetric in them).
"""

from __future__ import annotations

import keras
import pytest
import step_reference as reference
import tensorflow as tf

from sokd_tf import distillers, losses

SOKD = distillers.SemiOnlineDistiller
KD = distillers.KnowledgeDistiller
DML = distillers.MutualLearner


@pytest.fixture(scope="module")
def cases():
    return reference.case_cache()


def term_mutant(method, change):
    """`method.forward` whose terms pass through `change(self, terms, logits)`."""
    original = method.forward

    def forward(self, images, labels, training):
        terms, logits = original(self, images, labels, training)
        terms = dict(terms)
        change(self, terms, logits)
        return terms, logits

    return forward


def drop(name):
    def change(self, terms, logits):
        terms[name] = terms[name] * 0.0

    return change


def double(name):
    def change(self, terms, logits):
        terms[name] = terms[name] * 2.0

    return change


def without_stop_gradient(name, target_role, learner_role):
    """Term `name` recomputed (same value) with gradient flowing into its target too."""

    def change(self, terms, logits):
        temperature = self.temperature
        target = tf.nn.log_softmax(logits[target_role] / temperature, axis=-1)
        learner = tf.nn.log_softmax(logits[learner_role] / temperature, axis=-1)
        value = tf.reduce_sum(tf.exp(target) * (target - learner), axis=-1)
        squared = getattr(self, "temperature_squared", True)
        terms[name] = value * temperature**2 if squared else value

    return change


def sokd_forward(*, swap_peer_student=False, teacher_training=None, temperature=None):
    """`SemiOnlineDistiller.forward` rewritten with one deliberate change."""

    def forward(self, images, labels, training):
        teacher_mode = self.teacher_training if teacher_training is None else teacher_training
        features, teacher_logits = self.teacher_trunk(images, training=teacher_mode and training)
        peer_logits = self.peer(tf.stop_gradient(features), training=training)
        student_logits = self.student(images, training=training)
        first, second = (
            (student_logits, peer_logits) if swap_peer_student else (peer_logits, student_logits)
        )
        terms = losses.sokd_loss_terms(
            teacher_logits, first, second, labels, temperature or self.temperature
        )
        return terms, {"peer": peer_logits, "student": student_logits}

    return forward


def kd_forward(*, swap_teacher_student=False, teacher_training=None, temperature=None):
    """`KnowledgeDistiller.forward` rewritten with one deliberate change."""

    def forward(self, images, labels, training):
        teacher_mode = self.teacher_training if teacher_training is None else teacher_training
        teacher_logits = self.teacher(images, training=teacher_mode and training)
        student_logits = self.student(images, training=training)
        target, learner = (
            (student_logits, teacher_logits) if swap_teacher_student
            else (teacher_logits, student_logits)
        )
        kd_term = losses.softened_kl(target, learner, temperature or self.temperature)
        terms = {"student/ce": losses.cross_entropy(labels, student_logits),
                 "student/kd_from_teacher": kd_term}
        return terms, {"student": student_logits}

    return forward


def train_step_without_loss_scaling(self, data):
    """`Distiller.train_step` with `optimizer.scale_loss` left out."""
    images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
    with tf.GradientTape() as tape:
        terms, logits = self.forward(images, labels, training=True)
        loss = self.total_loss(terms, labels)
    self.minimize(tape, loss)
    return self.update_metrics(terms, labels, logits)


# name -> (case, class whose attribute is replaced, attribute, make the replacement)
MUTANTS = {
    **{
        f"sokd-drop-{term}": ("sokd_official", SOKD, "forward",
                              lambda term=term: term_mutant(SOKD, drop(term)))
        for term in losses.SOKD_TERMS
    },
    **{
        f"sokd-double-{term}": ("sokd_official", SOKD, "forward",
                                lambda term=term: term_mutant(SOKD, double(term)))
        for term in losses.SOKD_TERMS
    },
    # The student learns from the peer's imitation term ...
    "sokd-no-stop-gradient-peer/ml_from_student": (
        "sokd_official", SOKD, "forward",
        lambda: term_mutant(
            SOKD, without_stop_gradient("peer/ml_from_student", "student", "peer"))),
    # ... the peer from the student's.
    "sokd-no-stop-gradient-student/ml_from_peer": (
        "sokd_official", SOKD, "forward",
        lambda: term_mutant(
            SOKD, without_stop_gradient("student/ml_from_peer", "peer", "student"))),
    # The student gets the direct teacher term that SOKD must not have.
    "sokd-swap-peer-student": ("sokd_official", SOKD, "forward",
                               lambda: sokd_forward(swap_peer_student=True)),
    "sokd-official-teacher-in-inference-mode": (
        "sokd_official", SOKD, "forward", lambda: sokd_forward(teacher_training=False)),
    "sokd-temperature-1": ("sokd_official", SOKD, "forward",
                           lambda: sokd_forward(temperature=1.0)),
    "kd-drop-student/ce": ("kd_frozen", KD, "forward",
                           lambda: term_mutant(KD, drop("student/ce"))),
    "kd-double-student/kd_from_teacher": (
        "kd_frozen", KD, "forward", lambda: term_mutant(KD, double("student/kd_from_teacher"))),
    # The classic bug: the teacher imitates the student (whose gradient is then stopped).
    "kd-swap-teacher-student": ("kd_frozen", KD, "forward",
                                lambda: kd_forward(swap_teacher_student=True)),
    "kd-official-teacher-in-inference-mode": (
        "kd_official", KD, "forward", lambda: kd_forward(teacher_training=False)),
    "kd-temperature-1": ("kd_frozen", KD, "forward", lambda: kd_forward(temperature=1.0)),
    "dml-drop-peer/ml_from_student": (
        "dml", DML, "forward", lambda: term_mutant(DML, drop("peer/ml_from_student"))),
    "dml-double-student/ce": ("dml", DML, "forward",
                              lambda: term_mutant(DML, double("student/ce"))),
    "dml-no-stop-gradient-student/ml_from_peer": (
        "dml", DML, "forward",
        lambda: term_mutant(
            DML, without_stop_gradient("student/ml_from_peer", "peer", "student"))),
    "float16-no-scale-loss": ("sokd_official_float16", distillers.Distiller, "train_step",
                              lambda: train_step_without_loss_scaling),
}


def tolerance(case_name):
    return reference.FLOAT16_TOLERANCE if case_name.endswith("_float16") else (
        reference.TOLERANCE)


@pytest.mark.parametrize("name", sorted({case for case, *_ in MUTANTS.values()}))
def test_the_unmutated_step_passes_eagerly(cases, name):
    case = cases(name)
    reference.real_step(case, run_eagerly=True)
    errors = reference.relative_errors(case)
    assert all(error < tolerance(name) for error in errors.values()), errors


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_a_mutated_step_fails_the_comparison(cases, monkeypatch, mutant):
    case_name, owner, attribute, make_replacement = MUTANTS[mutant]
    case = cases(case_name)
    monkeypatch.setattr(owner, attribute, make_replacement())
    reference.real_step(case, run_eagerly=True)
    errors = reference.relative_errors(case)
    assert max(errors.values()) > tolerance(case_name), errors
