"""Deep Mutual Learning: two networks trained from scratch, each imitating the other.

Reference: Zhang, Xiang, Hospedales & Lu, "Deep Mutual Learning" (CVPR 2018);
docs/METHOD.md, "Baselines".
"""

from __future__ import annotations

from collections.abc import Mapping

import keras

from sokd_tf import losses
from sokd_tf.config import LossConfig
from sokd_tf.distillers import base


@keras.saving.register_keras_serializable(package="sokd_tf")
class MutualLearner(base.Distiller):
    """DML: each network minimises CE + KL(p_other || p_self); simultaneous update.

    The second network is called `peer` (it usually has the teacher's architecture but
    starts from scratch; there is no teacher).

    Args:
      peer: model images -> logits.
      student: model images -> logits.
      temperature: T of the KL terms (1 in DML).
      temperature_squared: scale the KL terms by T^2 (off in DML).
      weights: one weight per DML term; default all 1.
      **kwargs: `keras.Model` arguments.

    Metrics: `loss`, `peer/ce`, `peer/ml_from_student`, `student/ce`,
    `student/ml_from_peer`, `{peer,student}/top1` and `/top5` (more than 5 classes).
    `call()` returns the student's logits.
    """

    def __init__(self, peer: keras.Model, student: keras.Model,
                 temperature: float = LossConfig.dml_temperature,
                 temperature_squared: bool = LossConfig.dml_temperature_squared,
                 weights: Mapping[str, float] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.peer = peer
        self.student = student
        self.temperature = float(temperature)
        self.temperature_squared = bool(temperature_squared)
        self._setup(
            term_names=losses.DML_TERMS,
            weights={name: 1.0 for name in losses.DML_TERMS} if weights is None else weights,
            trained_roles=("peer", "student"),
            num_classes=student.output.shape[-1],
        )

    def call(self, images, training=False):
        return self.student(images, training=training)

    def forward(self, images, labels, training):
        peer_logits = self.peer(images, training=training)
        student_logits = self.student(images, training=training)
        terms = losses.dml_loss_terms(
            peer_logits, student_logits, labels, self.temperature, self.temperature_squared
        )
        return terms, {"peer": peer_logits, "student": student_logits}

    def get_config(self):
        return {
            "name": self.name,
            "peer": base.serialize(self.peer),
            "student": base.serialize(self.student),
            "temperature": self.temperature,
            "temperature_squared": self.temperature_squared,
            "weights": dict(self.loss_weights_by_term),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for role in ("peer", "student"):
            config[role] = base.deserialize(config[role])
        return cls(**config)
