"""Trainers (`keras.Model` subclasses with `train_step`/`test_step`), one per method.

`call()` of each returns the student's logits (the trained network's for
`VanillaTrainer`). Compile with `make_optimizer(train_config, steps_per_epoch)`.
"""

from sokd_tf.distillers.base import Distiller, global_batch_size, prepare_teacher
from sokd_tf.distillers.dml import MutualLearner
from sokd_tf.distillers.features import FeatureTerms, default_feature_layers, pair_stages
from sokd_tf.distillers.kd import KnowledgeDistiller
from sokd_tf.distillers.optimization import (
    EpochStepDecay,
    PyTorchSGD,
    apply_role_gradients,
    make_optimizer,
)
from sokd_tf.distillers.semi_online import SemiOnlineDistiller
from sokd_tf.distillers.vanilla import VanillaTrainer

# Method name (`train.method`) -> trainer class. `needs_teacher` lives on the class.
METHODS = {
    "vanilla": VanillaTrainer,
    "kd": KnowledgeDistiller,
    "fitnet": KnowledgeDistiller,  # KD's trainer with CE + hint (config.METHOD_RECIPES)
    "at": KnowledgeDistiller,  # KD's trainer with CE + attention transfer
    "dml": MutualLearner,
    "sokd": SemiOnlineDistiller,
}

__all__ = [
    "METHODS",
    "Distiller",
    "EpochStepDecay",
    "FeatureTerms",
    "KnowledgeDistiller",
    "MutualLearner",
    "PyTorchSGD",
    "SemiOnlineDistiller",
    "VanillaTrainer",
    "apply_role_gradients",
    "default_feature_layers",
    "global_batch_size",
    "make_optimizer",
    "pair_stages",
    "prepare_teacher",
]
