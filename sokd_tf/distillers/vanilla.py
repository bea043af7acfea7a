"""Plain cross-entropy training of one network (a teacher, or the vanilla student).

Reference: docs/METHOD.md, "Baselines" (vanilla) and "Optimisation" (teacher training).
"""

from __future__ import annotations

import keras

from sokd_tf import losses
from sokd_tf.distillers import base
from sokd_tf.errors import ConfigError

ROLES = ("teacher", "peer", "student")


@keras.saving.register_keras_serializable(package="sokd_tf")
class VanillaTrainer(base.Distiller):
    """Trains `network` with cross-entropy only.

    Args:
      network: model images -> logits.
      role: "student" (vanilla baseline) or "teacher" (teacher training); names the
        metrics (`{role}/ce`, `{role}/top1`, `{role}/top5`) and picks the role's
        learning-rate scale of a `PyTorchSGD`. The network is also reachable as
        `trainer.<role>`.
      **kwargs: `keras.Model` arguments.
    """

    def __init__(self, network: keras.Model, role: str = "student", **kwargs):
        super().__init__(**kwargs)
        if role not in ROLES:
            raise ConfigError(f"role must be one of {list(ROLES)}, got {role!r}")
        self.network = network
        self.role = role
        self._setup(
            term_names=(f"{role}/ce",),
            weights={f"{role}/ce": 1.0},
            trained_roles=(role,),
            num_classes=network.output.shape[-1],
        )

    @property
    def role_models(self):
        return {self.role: self.network}

    @property
    def student(self):
        return self._network_as("student")

    @property
    def teacher(self):
        return self._network_as("teacher")

    @property
    def peer(self):
        return self._network_as("peer")

    def _network_as(self, role):
        if role != self.role:
            raise AttributeError(f"this VanillaTrainer trains a {self.role}, not a {role}")
        return self.network

    def call(self, images, training=False):
        return self.network(images, training=training)

    def forward(self, images, labels, training):
        logits = self.network(images, training=training)
        return {f"{self.role}/ce": losses.cross_entropy(labels, logits)}, {self.role: logits}

    def get_config(self):
        return {"name": self.name, "network": base.serialize(self.network), "role": self.role}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["network"] = base.deserialize(config["network"])
        return cls(**config)
