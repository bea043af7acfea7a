"""Hinton knowledge distillation from a frozen teacher.

Reference: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015);
docs/METHOD.md, "Baselines".
"""

from __future__ import annotations

from collections.abc import Mapping

import keras

from sokd_tf import losses
from sokd_tf.config import LossConfig, TrainConfig
from sokd_tf.distillers import base, keras_terms


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
      extra_losses: `keras.distillation.DistillationLoss` objects added as terms named
        `student/{snake_case class name}` (weight 1 unless `weights` names them), e.g.
        `FeatureDistillation("mse", "group2", "group2")` between equal-shape layers.
        See `keras_terms.DistillationTerms`.
      **kwargs: `keras.Model` arguments.

    Metrics: `loss`, `student/ce`, `student/kd_from_teacher`, the extra terms,
    `student/top1`, `student/top5` (more than 5 classes). `call()` returns the student's
    logits.

    Relation to `keras.distillation`: with `teacher_bn_mode="frozen"` one step equals
    `keras.distillation.Distiller(teacher, student, LogitsDistillation(T,
    loss=keras.losses.KLDivergence()), student_loss_weight=0.1)` compiled with
    `SparseCategoricalCrossentropy(from_logits=True)` (tested).
    """

    needs_teacher = True

    def __init__(self, teacher: keras.Model, student: keras.Model,
                 temperature: float = LossConfig.temperature,
                 weights: Mapping[str, float] | None = None,
                 teacher_bn_mode: str = TrainConfig.teacher_bn_mode,
                 extra_losses=None, **kwargs):
        super().__init__(**kwargs)
        self.teacher = teacher
        self.student = student
        self.temperature = float(temperature)
        self.teacher_bn_mode = teacher_bn_mode
        self.teacher_training = base.prepare_teacher(teacher, teacher_bn_mode)
        self.extra_losses = list(extra_losses or ())
        self.extra_terms = keras_terms.DistillationTerms(
            self.extra_losses, teacher, student, taken=losses.KD_TERMS
        )
        default_weights = {**LossConfig().kd_weights(),
                           **dict.fromkeys(self.extra_terms.term_names, 1.0)}
        self._setup(
            term_names=(*losses.KD_TERMS, *self.extra_terms.term_names),
            weights=default_weights if weights is None else weights,
            trained_roles=("student",),
            num_classes=student.output.shape[-1],
        )

    def call(self, images, training=False):
        return self.student(images, training=training)

    def forward(self, images, labels, training):
        teacher_outputs = self.extra_terms.teacher_outputs(
            images, training=self.teacher_training and training
        )
        student_outputs = self.extra_terms.student_outputs(images, training=training)
        student_logits = student_outputs[keras_terms.LOGITS]
        terms = losses.kd_loss_terms(
            teacher_outputs[keras_terms.LOGITS], student_logits, labels, self.temperature
        )
        terms.update(self.extra_terms(teacher_outputs, student_outputs))
        return terms, {"student": student_logits}

    def get_config(self):
        return {
            "name": self.name,
            "teacher": base.serialize(self.teacher),
            "student": base.serialize(self.student),
            "temperature": self.temperature,
            "weights": dict(self.loss_weights_by_term),
            "teacher_bn_mode": self.teacher_bn_mode,
            "extra_losses": [keras.saving.serialize_keras_object(loss)
                             for loss in self.extra_losses],
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for role in ("teacher", "student"):
            config[role] = base.deserialize(config[role])
        config["extra_losses"] = [
            base.deserialize(loss) for loss in config.get("extra_losses", ())
        ]
        return cls(**config)
