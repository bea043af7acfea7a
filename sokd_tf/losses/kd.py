"""Cross-entropy, the temperature-softened KL divergence, and Hinton KD's terms.

Pure functions of tensors with per-example `[batch]` outputs, always computed in float32
(logits are cast, so mixed-precision models give float32 losses). Argument order is
always target first, learner second; the target side is gradient-stopped inside, so the
direction of knowledge flow is written once, here.

Reference: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015);
docs/METHOD.md, "Objective".
"""

from __future__ import annotations

from collections.abc import Mapping

from keras import ops

KD_TERMS = ("student/ce", "student/kd_from_teacher")


def cross_entropy(labels, logits):
    """Softmax cross-entropy at temperature 1.

    Args:
      labels: integer class ids `[batch]`.
      logits: `[batch, num_classes]`.

    Returns:
      `[batch]` float32.
    """
    logits = ops.cast(logits, "float32")
    labels = ops.cast(labels, "int32")
    return ops.sparse_categorical_crossentropy(labels, logits, from_logits=True)


def kl_divergence(target_logits, learner_logits, temperature):
    """KL(softmax(target / T) || softmax(learner / T)), unscaled; target gradient-stopped.

    Args:
      target_logits: `[batch, num_classes]`, the distribution to imitate.
      learner_logits: `[batch, num_classes]`, the distribution being trained.
      temperature: softening temperature T > 0.

    Returns:
      `[batch]` float32 (sum over classes, no batch reduction).
    """
    target = ops.stop_gradient(ops.cast(target_logits, "float32"))
    learner = ops.cast(learner_logits, "float32")
    target_log_probs = ops.log_softmax(target / temperature, axis=-1)
    learner_log_probs = ops.log_softmax(learner / temperature, axis=-1)
    return ops.sum(
        ops.exp(target_log_probs) * (target_log_probs - learner_log_probs), axis=-1
    )


def softened_kl(target_logits, learner_logits, temperature):
    """T^2 * KL(softmax(target / T) || softmax(learner / T)), per example.

    The batch mean of the result equals PyTorch's
    `F.kl_div(log_softmax(learner / T), softmax(target / T), reduction="batchmean") * T**2`
    (sum over classes, divided by the batch size, short last batch included).

    Args:
      target_logits: `[batch, num_classes]`; gradient-stopped.
      learner_logits: `[batch, num_classes]`.
      temperature: T > 0.

    Returns:
      `[batch]` float32.

    Reference: docs/METHOD.md, "Objective".
    """
    return kl_divergence(target_logits, learner_logits, temperature) * (temperature**2)


def kd_loss_terms(teacher_logits, student_logits, labels, temperature=4.0):
    """Hinton KD's two named terms, per example and unweighted.

    Args:
      teacher_logits: `[batch, num_classes]` (gradient-stopped inside).
      student_logits: `[batch, num_classes]`.
      labels: integer `[batch]`.
      temperature: T of the KL term (scaled by T^2).

    Returns:
      `{"student/ce": [batch], "student/kd_from_teacher": [batch]}`. The usual weights
      are 0.1 / 0.9 (`LossConfig.kd_weights()`).
    """
    return {
        "student/ce": cross_entropy(labels, student_logits),
        "student/kd_from_teacher": softened_kl(teacher_logits, student_logits, temperature),
    }


def weighted_total(terms: Mapping, weights: Mapping[str, float], global_batch_size,
                   sample_weight=None):
    """sum_k weights[k] * sum_i w_i * terms[k][i] / global_batch_size.

    With `global_batch_size` the step's actual global batch (all replicas, a short last
    batch included), the sum of this value over replicas is the weighted batch mean, so N
    replicas compute the same update as one device.

    Sample weights `w_i` scale each example's terms; the denominator stays the number of
    examples, not `sum(w)` (Keras' "sum_over_batch_size" reduction): a weight of 0 removes
    an example's contribution without renormalising the others.

    Args:
      terms: name -> per-example `[batch]` values.
      weights: name -> float, one entry for every term.
      global_batch_size: scalar.
      sample_weight: per-example weights `[batch]`; None means all 1.

    Returns:
      Scalar float32.

    Raises:
      KeyError: a term has no weight.

    Example (hand values): terms `{"a": [1, 3]}`, weights `{"a": 2}`, sample weights
    `[1, 0]`, global batch 2 -> 2 * (1 * 1 + 0 * 3) / 2 = 1.
    """
    total = 0.0
    for name, values in terms.items():
        values = ops.cast(values, "float32")
        if sample_weight is not None:
            values = values * ops.cast(sample_weight, "float32")
        total = total + float(weights[name]) * ops.sum(values)
    return total / ops.cast(global_batch_size, "float32")
