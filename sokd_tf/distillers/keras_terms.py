"""`keras.distillation.DistillationLoss` objects as extra named terms of a distiller.

Keras (>= 3.12) expresses teacher -> student losses as `DistillationLoss` objects, e.g.
`keras.distillation.FeatureDistillation(loss="mse", teacher_layer_name=...,
student_layer_name=...)`. `DistillationTerms` runs teacher and student once each (with
the named layers as extra outputs) and turns every such loss into a per-example `[batch]`
term named `student/{loss class in snake case}`, so it is weighted, sample-weighted,
scaled under tf.distribute and logged exactly like the method's own terms.

A `DistillationLoss` returns one scalar for a batch; the per-example value is that
scalar on a batch of one example (`ops.vectorized_map`), whose batch mean is the Keras
value for losses that average over examples (all of Keras' own).

Reference: docs/DESIGN.md, "Distillers".
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import keras
from keras import ops

from sokd_tf.errors import ConfigError

LOGITS = "logits"


def term_name(loss, taken) -> str:
    """`student/feature_distillation`, `student/feature_distillation_2`, ..."""
    stem = re.sub(r"(?<!^)(?=[A-Z])", "_", type(loss).__name__).lower()
    name, index = f"student/{stem}", 1
    while name in taken:
        index += 1
        name = f"student/{stem}_{index}"
    return name


def _layer_output(model: keras.Model, layer_name: str | None, role: str):
    if layer_name is None:
        return model.output
    try:
        return model.get_layer(layer_name).output
    except ValueError as err:
        raise ConfigError(
            f"extra distillation loss names {role} layer {layer_name!r}, which {role} "
            f"{model.name!r} does not have"
        ) from err


def _outputs_model(model: keras.Model, layer_names: Sequence[str], role: str):
    """Callable images -> {"logits": ..., layer name: output, ...} in one forward pass."""
    if not layer_names:
        return lambda images, training: {LOGITS: model(images, training=training)}
    outputs = {LOGITS: model.output}
    for name in layer_names:
        outputs[name] = _layer_output(model, name, role)
    extractor = keras.Model(model.input, outputs, name=f"{model.name}_with_features")
    return lambda images, training: extractor(images, training=training)


class DistillationTerms:
    """Teacher and student outputs for a distiller, plus the extra terms from them.

    Args:
      distillation_losses: `keras.distillation.DistillationLoss` objects (teacher ->
        student), e.g. `FeatureDistillation`, `LogitsDistillation`.
      teacher: functional model images -> logits.
      student: functional model images -> logits.
      taken: term names already used by the method (the new names avoid them).

    Raises:
      ConfigError: an object that is not a `DistillationLoss`, a layer name a model
        lacks, or `FeatureDistillation` between layers of different shapes (it has no
        trainable adapter).
    """

    def __init__(self, distillation_losses, teacher: keras.Model, student: keras.Model,
                 taken: Sequence[str] = ()):
        self.losses = list(distillation_losses or ())
        names = list(taken)
        self.term_names = []
        teacher_layers, student_layers = [], []
        for loss in self.losses:
            if not isinstance(loss, keras.distillation.DistillationLoss):
                raise ConfigError(
                    f"extra_losses takes keras.distillation.DistillationLoss objects, "
                    f"got {loss!r}"
                )
            teacher_layer = getattr(loss, "teacher_layer_name", None)
            student_layer = getattr(loss, "student_layer_name", None)
            teacher_output = _layer_output(teacher, teacher_layer, "teacher")
            student_output = _layer_output(student, student_layer, "student")
            if isinstance(loss, keras.distillation.FeatureDistillation) and (
                tuple(teacher_output.shape[1:]) != tuple(student_output.shape[1:])
            ):
                raise ConfigError(
                    f"FeatureDistillation between teacher {teacher_layer or 'logits'!r} "
                    f"{tuple(teacher_output.shape[1:])} and student "
                    f"{student_layer or 'logits'!r} {tuple(student_output.shape[1:])}: the "
                    "shapes must match (a DistillationLoss has no trainable adapter)"
                )
            try:
                loss.validate_model_compatibility(teacher, student)
                loss.validate_outputs(teacher_output, student_output)
            except ValueError as err:
                raise ConfigError(f"extra distillation loss {loss!r}: {err}") from err
            for layer, layers in ((teacher_layer, teacher_layers),
                                  (student_layer, student_layers)):
                if layer is not None and layer not in layers:
                    layers.append(layer)
            self.term_names.append(term_name(loss, names))
            names.append(self.term_names[-1])
        self.teacher_outputs = _outputs_model(teacher, teacher_layers, "teacher")
        self.student_outputs = _outputs_model(student, student_layers, "student")

    def __call__(self, teacher_outputs: dict, student_outputs: dict) -> dict:
        """Per-example extra terms `{name: [batch]}` from the two models' outputs.

        Args:
          teacher_outputs: `self.teacher_outputs(images, training)` (gradient-stopped
            here: the teacher is the target).
          student_outputs: `self.student_outputs(images, training)`.
        """
        terms = {}
        for name, loss in zip(self.term_names, self.losses, strict=True):
            target = teacher_outputs[getattr(loss, "teacher_layer_name", None) or LOGITS]
            learner = student_outputs[getattr(loss, "student_layer_name", None) or LOGITS]
            terms[name] = ops.vectorized_map(
                lambda pair, loss=loss: loss.compute_loss(pair[0][None], pair[1][None]),
                (ops.stop_gradient(target), learner),
            )
        return terms
