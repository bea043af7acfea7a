"""Loss math: pure functions of tensors, per-example `[batch]` outputs, named terms.

Argument order is always target first, learner second; targets are gradient-stopped
inside each function.
"""

from sokd_tf.losses.dml import DML_TERMS, dml_loss_terms
from sokd_tf.losses.feature import (
    FEATURE_KINDS,
    FEATURE_LOSSES,
    KD_FEATURE_TERMS,
    SOKD_FEATURE_TERMS,
    attention_loss,
    attention_map,
    feature_term_name,
    hint_loss,
    paired_feature_loss,
    parse_feature_term,
    resize_features,
)
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
    "FEATURE_KINDS",
    "FEATURE_LOSSES",
    "KD_FEATURE_TERMS",
    "KD_TERMS",
    "SOKD_FEATURE_TERMS",
    "SOKD_TERMS",
    "attention_loss",
    "attention_map",
    "cross_entropy",
    "dml_loss_terms",
    "feature_term_name",
    "hint_loss",
    "kd_loss_terms",
    "kl_divergence",
    "paired_feature_loss",
    "parse_feature_term",
    "resize_features",
    "softened_kl",
    "sokd_loss_terms",
    "weighted_total",
]
