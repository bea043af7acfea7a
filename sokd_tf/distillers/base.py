"""Plumbing shared by the distillers: metric trackers, teacher BN modes, batch size.

Reference: docs/METHOD.md, "Teacher BatchNorm" and "Objective"; docs/DESIGN.md,
"Distillers".
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import keras
import tensorflow as tf
from keras import ops

from sokd_tf import losses
from sokd_tf.config import TEACHER_BN_MODES
from sokd_tf.distillers import optimization, role_metrics
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
    implement `forward`, `call` and `get_config`.

    Class attribute `needs_teacher`: whether the method distills from a trained teacher
    (the stages train or load one only then).

    Keras conventions (see `compile`):
      - The method defines its loss: `compile(loss=...)` is refused (ConfigError); the
        term weights are the trainer's `weights=` argument, so `loss_weights=` is
        ignored with a warning.
      - `metrics=` / `weighted_metrics=` are tracked once per trained role, on that
        role's logits, as `{role}/{name}` (e.g. `student/acc`, `peer/acc`).
      - Sample weights (a dataset of `(images, labels, weights)`, `fit(sample_weight=)`
        or `fit(class_weight=)`) weight every per-example term: the loss is
        `sum_k weight_k * sum_i w_i * term_k[i] / global_batch`, the global batch being
        the number of examples (Keras' "sum_over_batch_size"). The `loss` and term
        metrics report the same normalisation (so `loss` = sum of weighted terms); the
        accuracies and `weighted_metrics` are `sum(w * value) / sum(w)`; `metrics` are
        unweighted, as in Keras.
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
        self.user_metric_trackers = {role: [] for role in self.trained_roles}
        self.weighted_user_metric_trackers = {role: [] for role in self.trained_roles}
        self._user_metric_specs = {"metrics": None, "weighted_metrics": None}
        # Not in `metrics`: read by the divergence check, never logged or reset by Keras.
        self.finite_checks = FiniteChecks(term_names, self.trained_roles)
        # The sub-models are built functional models; BackupAndRestore and load_model
        # need the container marked built too.
        self.built = True

    @property
    def metrics(self):
        accuracies = [t for role in self.trained_roles for t in self.accuracy_trackers[role]]
        user = [
            t
            for trackers in (self.user_metric_trackers, self.weighted_user_metric_trackers)
            for role in self.trained_roles
            for t in trackers[role]
        ]
        return [self.total_tracker, *self.term_trackers, *accuracies, *user]

    def compile(self, optimizer="rmsprop", loss=None, loss_weights=None, metrics=None,
                weighted_metrics=None, **kwargs):
        """`keras.Model.compile` for a trainer whose method defines the loss.

        Args:
          optimizer: as in Keras (the recipe's is `make_optimizer(...)`).
          loss: must be None: the method's terms are the loss.
          loss_weights: ignored, with a warning: the term weights are the trainer's
            `weights=` argument (saved in its config).
          metrics: extra metrics tracked once per trained role on its logits (labels are
            integer ids, predictions are logits), unweighted: a list, or a dict
            `{role: metrics}`; see `role_metrics.role_metrics`. Named `{role}/{name}`.
          weighted_metrics: like `metrics`, weighted by the sample weights.
          **kwargs: the other `keras.Model.compile` arguments (`jit_compile`,
            `run_eagerly`, `steps_per_execution`, `auto_scale_loss`), passed on.

        Raises:
          ConfigError: `loss` given, a metric that is not one, a role that is not
            trained, or a metric name taken by another metric.
        """
        if loss is not None:
            raise ConfigError(
                f"{type(self).__name__}.compile(loss={loss!r}): the method defines its loss "
                f"(terms {[t.name for t in self.term_trackers]}, weighted by the trainer's "
                "`weights=`); leave `loss` unset"
            )
        if loss_weights is not None:
            warnings.warn(
                f"{type(self).__name__}.compile: loss_weights is ignored; set the term "
                "weights with the trainer's `weights=` argument",
                stacklevel=2,
            )
        unweighted = role_metrics.role_metrics(metrics, self.trained_roles, "metrics")
        weighted = role_metrics.role_metrics(
            weighted_metrics, self.trained_roles, "weighted_metrics"
        )
        taken = {t.name for t in (self.total_tracker, *self.term_trackers)}
        taken |= {t.name for role in self.trained_roles for t in self.accuracy_trackers[role]}
        for tracker in (t for chosen in (unweighted, weighted) for ts in chosen.values()
                        for t in ts):
            if tracker.name in taken:
                raise ConfigError(
                    f"compile: metric name {tracker.name!r} is taken; rename the metric "
                    "(`name=`)"
                )
            taken.add(tracker.name)
        super().compile(optimizer=optimizer, **kwargs)
        self.user_metric_trackers = unweighted
        self.weighted_user_metric_trackers = weighted
        # Kept serialized (plain data): templates must not be tracked as metrics.
        self._user_metric_specs = {
            "metrics": keras.saving.serialize_keras_object(metrics),
            "weighted_metrics": keras.saving.serialize_keras_object(weighted_metrics),
        }

    def get_compile_config(self):
        config = super().get_compile_config()
        if config:
            config.update(self._user_metric_specs)
        return config

    def compile_from_config(self, config):
        # As `keras.Model.compile_from_config`, through this class's `compile`.
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if getattr(self, "optimizer", None) is not None and self.built:
            self.optimizer.build(self.trainable_variables)

    @property
    def role_models(self) -> dict[str, keras.Model]:
        """Role -> model, for every role this trainer updates."""
        return {role: getattr(self, role) for role in self.trained_roles}

    @property
    def role_variables(self) -> dict[str, list]:
        """Role -> the trainable variables stepped with that role's rate and L2.

        The role's model; methods with loss-side layers of a role (FitNet regressors) add
        them here.
        """
        return {role: model.trainable_variables for role, model in self.role_models.items()}

    def forward(self, images, labels, training):
        """Runs the roles; returns (per-example terms by name, logits by role).

        Each method defines this; `train_step`/`test_step` below are the same plumbing
        for every method: one forward pass, one loss, one backward pass.
        """
        raise NotImplementedError

    def train_step(self, data):
        images, labels, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            terms, logits = self.forward(images, labels, training=True)
            scaled_loss = self.optimizer.scale_loss(self.total_loss(terms, labels, sample_weight))
        gradient_norms = self.minimize(tape, scaled_loss)
        self.finite_checks.update_state(terms, gradient_norms)
        return self.update_metrics(terms, labels, logits, sample_weight)

    def test_step(self, data):
        images, labels, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        terms, logits = self.forward(images, labels, training=False)
        self.finite_checks.update_state(terms)
        return self.update_metrics(terms, labels, logits, sample_weight)

    def total_loss(self, terms, labels, sample_weight=None):
        """Weighted terms summed over the batch / the step's global batch size.

        `sample_weight` (`[batch]` or None) scales each example's terms; the denominator
        stays the number of examples (see `losses.weighted_total`).
        """
        return losses.weighted_total(
            terms, self.loss_weights_by_term, global_batch_size(labels),
            per_example_weights(sample_weight, labels),
        )

    def minimize(self, tape: tf.GradientTape, scaled_loss) -> dict:
        """Applies one step to every trained role (coupled L2, per-role rates).

        Returns:
          Role -> global norm of its applied gradient (empty under loss scaling).
        """
        return optimization.apply_role_gradients(
            self.optimizer, tape, scaled_loss, self.role_variables
        )

    def update_metrics(self, terms, labels, logits_by_role, sample_weight=None) -> dict:
        """Updates every tracker from this batch; returns all current results.

        With sample weights `w`: `loss` and the terms average `w * value` over the
        examples (the loss's own normalisation); accuracies and weighted user metrics
        are `sum(w * value) / sum(w)`; unweighted user metrics ignore `w`.
        """
        batch = tf.shape(labels)[0]
        weights = per_example_weights(sample_weight, labels)
        local_loss = losses.weighted_total(terms, self.loss_weights_by_term, batch, weights)
        self.total_tracker.update_state(local_loss, sample_weight=batch)
        for tracker in self.term_trackers:
            values = terms[tracker.name]
            tracker.update_state(values if weights is None else ops.cast(values, "float32") * weights)
        for role, logits in logits_by_role.items():
            for tracker in self.accuracy_trackers[role]:
                tracker.update_state(labels, logits, sample_weight=weights)
            for tracker in self.user_metric_trackers[role]:
                tracker.update_state(labels, logits)
            for tracker in self.weighted_user_metric_trackers[role]:
                tracker.update_state(labels, logits, sample_weight=weights)
        return {tracker.name: tracker.result() for tracker in self.metrics}


def per_example_weights(sample_weight, labels):
    """`sample_weight` as float32 `[batch]` (the batch of `labels`), or None."""
    if sample_weight is None:
        return None
    return ops.reshape(ops.cast(sample_weight, "float32"), (tf.shape(labels)[0],))
