"""The five named terms of Semi-Online Knowledge Distillation.

Reference: Liu, Liu & Huang, "Semi-Online Knowledge Distillation" (BMVC 2021,
arXiv 2111.11747), Eq. 4-6; docs/METHOD.md, "Objective".
"""

from __future__ import annotations

from sokd_tf.losses.kd import cross_entropy, softened_kl

SOKD_TERMS = (
    "peer/ce",
    "peer/kd_from_teacher",
    "peer/ml_from_student",
    "student/ce",
    "student/ml_from_peer",
)


def sokd_loss_terms(teacher_logits, peer_logits, student_logits, labels, temperature=4.0):
    """Per-example SOKD terms, unweighted.

    The peer learns from the labels, the (frozen) teacher and the student; the student
    learns from the labels and the peer only (no direct teacher -> student term). Every
    target is gradient-stopped, so `peer/*` terms reach only the peer and `student/*`
    terms only the student.

    Args:
      teacher_logits: z_t `[batch, num_classes]`.
      peer_logits: z_p `[batch, num_classes]`.
      student_logits: z_s `[batch, num_classes]`.
      labels: integer `[batch]`.
      temperature: T of every KL term (each scaled by T^2).

    Returns:
      Dict with exactly the keys of `SOKD_TERMS`, each `[batch]` float32; the batch mean
      of each equals the official term.
    """
    return {
        "peer/ce": cross_entropy(labels, peer_logits),
        "peer/kd_from_teacher": softened_kl(teacher_logits, peer_logits, temperature),
        "peer/ml_from_student": softened_kl(student_logits, peer_logits, temperature),
        "student/ce": cross_entropy(labels, student_logits),
        "student/ml_from_peer": softened_kl(peer_logits, student_logits, temperature),
    }
