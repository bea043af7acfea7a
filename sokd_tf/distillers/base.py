"""Plumbing shared by the distillers: metric trackers, teacher BN modes, batch size.

Reference: docs/METHOD.md, "Teacher BatchNorm" and "Objective"; docs/DESIGN.md,
"Distillers".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import keras
import tensorflow as tf

from sokd_tf import losses
from sokd_tf.config import TEACHER_BN_MODES
from sokd_tf.distillers import optimization
from sokd_tf.distillers.finite_checks import FiniteChecks
from sokd_tf.errors import ConfigError


def global_batch_size(labels):
    """The step's actual global batch size (all replicas; a short last batch included).

    In a replica context the local batch size is all-reduced with SUM; without a
    strategy that is the local batch size.

    Args:
      labels: `[batch]` of this replica.

    Returns:
      Scalar float32.
    """
    local = tf.cast(tf.shape(labels)[0], tf.float32)
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return local
    return context.all_reduce(tf.distribute.ReduceOp.SUM, local)


def prepare_teacher(teacher: keras.Model, teacher_bn_mode: str) -> bool:
    """Freezes `teacher` for distillation; returns the `training` flag to call it with.

    - "official": the teacher's layers stay trainable, so called with `training=True`
      its BatchNorm layers normalise with batch statistics and update their moving
      statistics, as the authors' code (a teacher in train mode whose parameters are not
      in the optimizer). Every teacher *variable* is marked non-trainable, so no gradient
      is computed for it and no optimizer ever sees it.
    - "frozen": `teacher.trainable = False`; called with `training=False` (moving
      statistics), the teacher is bit-for-bit unchanged.

    Raises:
      ConfigError: unknown mode.
    """
    if teacher_bn_mode not in TEACHER_BN_MODES:
        raise ConfigError(
            f"teacher_bn_mode must be one of {list(TEACHER_BN_MODES)}, got {teacher_bn_mode!r}"
        )
    if teacher_bn_mode == "frozen":
        teacher.trainable = False
        return False
    teacher.trainable = True
    for variable in teacher.weights:
        variable.trainable = False
    return True


def check_weights(weights: Mapping[str, float], term_names: Sequence[str]) -> dict:
    """Validated copy of `weights`: exactly one non-negative float per term name."""
    weights = {str(name): float(value) for name, value in dict(weights).items()}
    if set(weights) != set(term_names):
        raise ConfigError(
            f"loss weights must name exactly the terms {list(term_names)}, got {sorted(weights)}"
        )
    negative = [name for name, value in weights.items() if value < 0]
    if negative:
        raise ConfigError(f"loss weights must be >= 0, got negative weights for {negative}")
    return weights


def serialize(model):
    return keras.saving.serialize_keras_object(model)


def deserialize(config):
    return keras.saving.deserialize_keras_object(config)


class Distiller(keras.Model):
    """Base of the trainers: named-term trackers, accuracy per role, the update step.

    Subclasses set their role models as attributes before calling `_setup`, and
    implement `train_step`, `test_step`, `call` and `get_config`.

    Class attribute `needs_teacher`: whether the method distills from a trained teacher
    (the stages train or load one only then).
    """

    needs_teacher = False

    def _setup(self, *, term_names: Sequence[str], weights: Mapping[str, float],
               trained_roles: Sequence[str], num_classes: int) -> None:
        """Creates the trackers; marks the model built (its sub-models already are)."""
        self.loss_weights_by_term = check_weights(weights, term_names)
        self.trained_roles = tuple(trained_roles)
        self.total_tracker = keras.metrics.Mean(name="loss")
        self.term_trackers = [keras.metrics.Mean(name=name) for name in term_names]
        self.accuracy_trackers = {}
        for role in self.trained_roles:
            trackers = [keras.metrics.SparseCategoricalAccuracy(name=f"{role}/top1")]
            if num_classes > 5:
                trackers.append(
                    keras.metrics.SparseTopKCategoricalAccuracy(k=5, name=f"{role}/top5")
                )
            self.accuracy_trackers[role] = trackers
        # Not in `metrics`: read by the divergence check, never logged or reset by Keras.
        self.finite_checks = FiniteChecks(term_names, self.trained_roles)
        # The sub-models are built functional models; BackupAndRestore and load_model
        # need the container marked built too.
        self.built = True

    @property
    def metrics(self):
        accuracies = [t for role in self.trained_roles for t in self.accuracy_trackers[role]]
        return [self.total_tracker, *self.term_trackers, *accuracies]

    @property
    def role_models(self) -> dict[str, keras.Model]:
        """Role -> model, for every role this trainer updates."""
        return {role: getattr(self, role) for role in self.trained_roles}

    def forward(self, images, labels, training):
        """Runs the roles; returns (per-example terms by name, logits by role).

        Each method defines this; `train_step`/`test_step` below are the same plumbing
        for every method: one forward pass, one loss, one backward pass.
        """
        raise NotImplementedError

    def train_step(self, data):
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            terms, logits = self.forward(images, labels, training=True)
            scaled_loss = self.optimizer.scale_loss(self.total_loss(terms, labels))
        gradient_norms = self.minimize(tape, scaled_loss)
        self.finite_checks.update_state(terms, gradient_norms)
        return self.update_metrics(terms, labels, logits)

    def test_step(self, data):
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        terms, logits = self.forward(images, labels, training=False)
        self.finite_checks.update_state(terms)
        return self.update_metrics(terms, labels, logits)

    def total_loss(self, terms, labels):
        """Weighted terms summed over the batch / the step's global batch size."""
        return losses.weighted_total(terms, self.loss_weights_by_term, global_batch_size(labels))

    def minimize(self, tape: tf.GradientTape, scaled_loss) -> dict:
        """Applies one step to every trained role (coupled L2, per-role rates).

        Returns:
          Role -> global norm of its applied gradient (empty under loss scaling).
        """
        return optimization.apply_role_gradients(
            self.optimizer,
            tape,
            scaled_loss,
            {role: model.trainable_variables for role, model in self.role_models.items()},
        )

    def update_metrics(self, terms, labels, logits_by_role) -> dict:
        """Updates every tracker from this batch; returns all current results."""
        batch = tf.shape(labels)[0]
        local_loss = losses.weighted_total(terms, self.loss_weights_by_term, batch)
        self.total_tracker.update_state(local_loss, sample_weight=batch)
        for tracker in self.term_trackers:
            tracker.update_state(terms[tracker.name])
        for role, logits in logits_by_role.items():
            for tracker in self.accuracy_trackers[role]:
                tracker.update_state(labels, logits)
        return {tracker.name: tracker.result() for tracker in self.metrics}
