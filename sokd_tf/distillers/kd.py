"""Hinton knowledge distillation from a frozen teacher.

Reference: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015);
docs/METHOD.md, "Baselines".
"""

from __future__ import annotations

from collections.abc import Mapping

import keras

from sokd_tf import losses
from sokd_tf.config import LossConfig, TrainConfig
from sokd_tf.distillers import base


@keras.saving.register_keras_serializable(package="sokd_tf")
class KnowledgeDistiller(base.Distiller):
    """KD: `0.1 * CE + 0.9 * T^2 * KL(p_teacher || p_student)` by default (T = 4).

    Teacher BatchNorm (`teacher_bn_mode`): "official" by default, like SOKD's teacher,
    so the two methods are compared under the same teacher; RepDistiller's KD runs its
    teacher in eval mode, which is `teacher_bn_mode="frozen"`. See
    `base.prepare_teacher`.

    Args:
      teacher: trained model images -> logits.
      student: model images -> logits.
      temperature: T of the KL term.
      weights: `{"student/ce": w, "student/kd_from_teacher": w}`; default
        `LossConfig().kd_weights()` (0.1 / 0.9).
      teacher_bn_mode: "official" or "frozen".
      **kwargs: `keras.Model` arguments.

    Metrics: `loss`, `student/ce`, `student/kd_from_teacher`, `student/top1`,
    `student/top5` (more than 5 classes). `call()` returns the student's logits.
    """

    needs_teacher = True

    def __init__(self, teacher: keras.Model, student: keras.Model,
                 temperature: float = LossConfig.temperature,
                 weights: Mapping[str, float] | None = None,
                 teacher_bn_mode: str = TrainConfig.teacher_bn_mode, **kwargs):
        super().__init__(**kwargs)
        self.teacher = teacher
        self.student = student
        self.temperature = float(temperature)
        self.teacher_bn_mode = teacher_bn_mode
        self.teacher_training = base.prepare_teacher(teacher, teacher_bn_mode)
        self._setup(
            term_names=losses.KD_TERMS,
            weights=LossConfig().kd_weights() if weights is None else weights,
            trained_roles=("student",),
            num_classes=student.output.shape[-1],
        )

    def call(self, images, training=False):
        return self.student(images, training=training)

    def forward(self, images, labels, training):
        teacher_logits = self.teacher(images, training=self.teacher_training and training)
        student_logits = self.student(images, training=training)
        terms = losses.kd_loss_terms(teacher_logits, student_logits, labels, self.temperature)
        return terms, {"student": student_logits}

    def get_config(self):
        return {
            "name": self.name,
            "teacher": base.serialize(self.teacher),
            "student": base.serialize(self.student),
            "temperature": self.temperature,
            "weights": dict(self.loss_weights_by_term),
            "teacher_bn_mode": self.teacher_bn_mode,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for role in ("teacher", "student"):
            config[role] = base.deserialize(config[role])
        return cls(**config)
