"""Loss math: pure functions of tensors, per-example `[batch]` outputs, named terms.

Argument order is always target first, learner second; targets are gradient-stopped
inside each function.
"""

from sokd_tf.losses.dml import DML_TERMS, dml_loss_terms
from sokd_tf.losses.kd import (
    KD_TERMS,
    cross_entropy,
    kd_loss_terms,
    kl_divergence,
    softened_kl,
    weighted_total,
)
from sokd_tf.losses.sokd import SOKD_TERMS, sokd_loss_terms

__all__ = [
    "DML_TERMS",
    "KD_TERMS",
    "SOKD_TERMS",
    "cross_entropy",
    "dml_loss_terms",
    "kd_loss_terms",
    "kl_divergence",
    "softened_kl",
    "sokd_loss_terms",
    "weighted_total",
]
