"""Deep Mutual Learning's named terms.

Reference: Zhang, Xiang, Hospedales & Lu, "Deep Mutual Learning" (CVPR 2018), Eq. 4-5.
"""

from __future__ import annotations

from sokd_tf.losses.kd import cross_entropy, kl_divergence

DML_TERMS = ("peer/ce", "peer/ml_from_student", "student/ce", "student/ml_from_peer")


def dml_loss_terms(peer_logits, student_logits, labels, temperature=1.0,
                   temperature_squared=False):
    """Per-example DML terms for two networks trained from scratch, unweighted.

    DML's second network is called `peer` (it usually has the teacher's architecture).

    Args:
      peer_logits: `[batch, num_classes]`.
      student_logits: `[batch, num_classes]`.
      labels: integer `[batch]`.
      temperature: T of the KL terms (1 in DML).
      temperature_squared: scale the KL terms by T^2 (off in DML).

    Returns:
      Dict with exactly the keys of `DML_TERMS`, each `[batch]` float32.
    """
    scale = temperature**2 if temperature_squared else 1.0
    return {
        "peer/ce": cross_entropy(labels, peer_logits),
        "peer/ml_from_student": scale * kl_divergence(student_logits, peer_logits, temperature),
        "student/ce": cross_entropy(labels, student_logits),
        "student/ml_from_peer": scale * kl_divergence(peer_logits, student_logits, temperature),
    }
