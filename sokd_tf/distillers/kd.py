"""Hinton knowledge distillation from a frozen teacher.

Reference: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015);
docs/METHOD.md, "Baselines".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import keras

from sokd_tf import losses
from sokd_tf.config import METHOD_RECIPES, LossConfig
from sokd_tf.distillers import base, features


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
      feature_weights: weights of the feature terms `student/hint_from_teacher` (FitNet)
        and `student/at_from_teacher` (attention transfer); default
        `LossConfig().kd_feature_weights()` (all 0: off). A term with weight > 0 is added
        to the loss and logged under its name; with `weights` `{"student/ce": 1,
        "student/kd_from_teacher": 0}` it gives the FitNet or AT baseline.
      feature_layers: role ("teacher", "student") -> stage layer names in forward order;
        default each model's named groups. See `features` for the pairing rule.
      feature_pairs: the deepest stage pairs each feature term uses; None = all.
      **kwargs: `keras.Model` arguments.

    Metrics: `loss`, `student/ce`, `student/kd_from_teacher`, the active feature terms,
    `student/top1`, `student/top5` (more than 5 classes). `call()` returns the
    student's logits; hint regressors belong to the student's role (its learning rate
    and L2) and are not part of the student model.
    """

    needs_teacher = True

    def __init__(self, teacher: keras.Model, student: keras.Model,
                 temperature: float = LossConfig.temperature,
                 weights: Mapping[str, float] | None = None,
                 teacher_bn_mode: str = METHOD_RECIPES["kd"]["train.teacher_bn_mode"],
                 feature_weights: Mapping[str, float] | None = None,
                 feature_layers: Mapping[str, Sequence[str]] | None = None,
                 feature_pairs: int | None = LossConfig.feature_pairs, **kwargs):
        super().__init__(**kwargs)
        self.teacher = teacher
        self.student = student
        self.temperature = float(temperature)
        self.teacher_bn_mode = teacher_bn_mode
        self.teacher_training = base.prepare_teacher(teacher, teacher_bn_mode)
        self.feature_terms = features.FeatureTerms(
            LossConfig().kd_feature_weights() if feature_weights is None else feature_weights,
            {"teacher": teacher, "student": student},
            losses.KD_FEATURE_TERMS,
            feature_layers=feature_layers,
            max_pairs=feature_pairs,
        )
        self.feature_regressors = self.feature_terms.regressors
        self.teacher_taps = features.tap_model(
            teacher, self.feature_terms.layers("teacher"), name="teacher_taps"
        )
        self.student_taps = features.tap_model(
            student, self.feature_terms.layers("student"), name="student_taps"
        )
        weights = LossConfig().kd_weights() if weights is None else weights
        self._setup(
            term_names=(*losses.KD_TERMS, *self.feature_terms.names),
            weights={**weights, **self.feature_terms.weights},
            trained_roles=("student",),
            num_classes=student.output.shape[-1],
        )

    @property
    def role_variables(self):
        return self.feature_terms.add_role_variables(super().role_variables)

    def call(self, images, training=False):
        return self.student(images, training=training)

    def forward(self, images, labels, training):
        teacher_logits, teacher_stages = self.teacher_taps(
            images, training=self.teacher_training and training
        )
        student_logits, student_stages = self.student_taps(images, training=training)
        terms = losses.kd_loss_terms(teacher_logits, student_logits, labels, self.temperature)
        terms.update(self.feature_terms({"teacher": teacher_stages, "student": student_stages}))
        return terms, {"student": student_logits}

    def get_config(self):
        return {
            "name": self.name,
            "teacher": base.serialize(self.teacher),
            "student": base.serialize(self.student),
            "temperature": self.temperature,
            "weights": {name: self.loss_weights_by_term[name] for name in losses.KD_TERMS},
            "teacher_bn_mode": self.teacher_bn_mode,
            **self.feature_terms.config(),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for role in ("teacher", "student"):
            config[role] = base.deserialize(config[role])
        return cls(**config)
