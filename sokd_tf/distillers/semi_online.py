"""Semi-Online Knowledge Distillation: frozen teacher, peer and student trained together.

Reference: Liu, Liu & Huang, "Semi-Online Knowledge Distillation" (BMVC 2021,
arXiv 2111.11747), Sec. 3; docs/METHOD.md, "Objective", "Teacher BatchNorm" and
"Optimisation".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import keras
import tensorflow as tf

from sokd_tf import losses, models
from sokd_tf.config import LossConfig, TrainConfig
from sokd_tf.distillers import base, features
from sokd_tf.errors import ConfigError
from sokd_tf.models import peer as peer_lib


@keras.saving.register_keras_serializable(package="sokd_tf")
class SemiOnlineDistiller(base.Distiller):
    """SOKD: the peer learns from labels, teacher and student; the student from labels and
    the peer. One loss, one backward pass; peer and student are updated simultaneously.

    The teacher trunk runs once per step (outside the gradient tape): its penultimate
    stage feeds the peer (gradient-stopped) and its logits are the peer's KD target.

    Teacher BatchNorm (`teacher_bn_mode`): default "official" because the authors'
    numbers were produced that way: their frozen teacher stays in train mode, so its BN
    layers normalise with batch statistics and keep updating their moving statistics,
    while no teacher parameter is optimised. "frozen" runs the teacher in inference mode
    and leaves it bit-for-bit unchanged. See `base.prepare_teacher`.

    Args:
      teacher: trained functional model with named stages.
      peer: `peer.build_peer(teacher)` (input: the teacher's penultimate stage output).
      student: model images -> logits.
      temperature: T of the three KL terms (scaled by T^2).
      weights: one weight per SOKD term; default `LossConfig().sokd_weights()` (all 1).
      teacher_bn_mode: "official" or "frozen".
      from_stage: teacher stage the peer branches from; default the penultimate stage
        (must be the stage the peer was built for).
      feature_weights: weights of the feature-based extension's terms
        `student/hint_from_peer`, `student/at_from_peer` (student features learn from
        the peer's) and `peer/hint_from_teacher`, `peer/at_from_teacher`; default
        `LossConfig().sokd_feature_weights()` (all 0: off). A term with weight > 0 is
        added to the loss and logged under its name.
      feature_layers: role ("teacher", "peer", "student") -> stage layer names in
        forward order; default each model's named groups. The peer's are its own stages
        (after `from_stage`): below the branch point the peer path is the frozen teacher,
        and SOKD has no direct teacher -> student term. See `features` for the pairing
        rule (deepest stages first: the student's last group pairs with the peer's).
      feature_pairs: the deepest stage pairs each feature term uses; None = all.
      **kwargs: `keras.Model` arguments (e.g. `name`).

    Raises:
      ConfigError: bad mode or weights, a peer that does not fit the teacher stage, or
        feature terms that cannot be resolved.

    Metrics: `loss`, the five term names, the active feature terms, `peer/top1`,
    `student/top1` (+ `/top5` when there are more than 5 classes). `call()` returns the
    student's logits. Hint regressors belong to their learner's role (its learning rate
    and L2) and are part of neither exported model.
    """

    needs_teacher = True

    def __init__(self, teacher: keras.Model, peer: keras.Model, student: keras.Model,
                 temperature: float = LossConfig.temperature,
                 weights: Mapping[str, float] | None = None,
                 teacher_bn_mode: str = TrainConfig.teacher_bn_mode,
                 from_stage: str | None = None,
                 feature_weights: Mapping[str, float] | None = None,
                 feature_layers: Mapping[str, Sequence[str]] | None = None,
                 feature_pairs: int | None = LossConfig.feature_pairs, **kwargs):
        super().__init__(**kwargs)
        self.teacher = teacher
        self.peer = peer
        self.student = student
        self.temperature = float(temperature)
        self.teacher_bn_mode = teacher_bn_mode
        self.teacher_training = base.prepare_teacher(teacher, teacher_bn_mode)
        self.from_stage = from_stage or models.penultimate_stage(teacher)
        self.teacher_trunk = peer_lib.build_teacher_trunk(teacher, from_stage=self.from_stage)
        features_shape = tuple(self.teacher_trunk.outputs[0].shape[1:])
        if tuple(peer.inputs[0].shape[1:]) != features_shape:
            raise ConfigError(
                f"peer {peer.name!r} takes {tuple(peer.inputs[0].shape[1:])} but teacher stage "
                f"{self.from_stage!r} gives {features_shape}; build the peer with "
                f"build_peer(teacher, from_stage={self.from_stage!r})"
            )
        self.feature_terms = features.FeatureTerms(
            LossConfig().sokd_feature_weights() if feature_weights is None else feature_weights,
            {"teacher": teacher, "peer": peer, "student": student},
            losses.SOKD_FEATURE_TERMS,
            feature_layers=feature_layers,
            max_pairs=feature_pairs,
        )
        self.feature_regressors = self.feature_terms.regressors
        self.teacher_taps = features.tap_model(
            teacher, self.feature_terms.layers("teacher"), outputs=self.teacher_trunk.outputs,
            name="teacher_taps",
        )
        self.peer_taps = features.tap_model(
            peer, self.feature_terms.layers("peer"), name="peer_taps"
        )
        self.student_taps = features.tap_model(
            student, self.feature_terms.layers("student"), name="student_taps"
        )
        weights = LossConfig().sokd_weights() if weights is None else weights
        self._setup(
            term_names=(*losses.SOKD_TERMS, *self.feature_terms.names),
            weights={**weights, **self.feature_terms.weights},
            trained_roles=("peer", "student"),
            num_classes=student.output.shape[-1],
        )

    @property
    def role_variables(self):
        return self.feature_terms.add_role_variables(super().role_variables)

    def call(self, images, training=False):
        return self.student(images, training=training)

    def forward(self, images, labels, training):
        """All three roles' logits and the per-example SOKD (and feature) terms."""
        (teacher_features, teacher_logits), teacher_stages = self.teacher_taps(
            images, training=self.teacher_training and training
        )
        peer_logits, peer_stages = self.peer_taps(
            tf.stop_gradient(teacher_features), training=training
        )
        student_logits, student_stages = self.student_taps(images, training=training)
        terms = losses.sokd_loss_terms(
            teacher_logits, peer_logits, student_logits, labels, self.temperature
        )
        terms.update(self.feature_terms(
            {"teacher": teacher_stages, "peer": peer_stages, "student": student_stages}
        ))
        return terms, {"peer": peer_logits, "student": student_logits}

    def get_config(self):
        return {
            "name": self.name,
            "teacher": base.serialize(self.teacher),
            "peer": base.serialize(self.peer),
            "student": base.serialize(self.student),
            "temperature": self.temperature,
            "weights": {name: self.loss_weights_by_term[name] for name in losses.SOKD_TERMS},
            "teacher_bn_mode": self.teacher_bn_mode,
            "from_stage": self.from_stage,
            **self.feature_terms.config(),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for role in ("teacher", "peer", "student"):
            config[role] = base.deserialize(config[role])
        return cls(**config)
