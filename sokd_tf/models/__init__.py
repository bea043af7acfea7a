"""Model families and the stage conventions the peer builder relies on.

`BUILDERS[name](input_shape, num_classes, *, synchronized_bn=False, batch_norm="fused",
name=None)` returns a
built functional `keras.Model` from normalised float32 images `[batch, H, W, C]` to float32
logits `[batch, num_classes]`. Stage outputs are layers named `stem`, `group1` ..
`groupN` (raw group outputs, before any final BN), `features` (pooled vector) and `logits`
(`stage_names`); the peer's cut is found from the graph by `sokd_tf.models.stages`, for
any functional model. Model specs (zoo name | keras.applications.NAME | .keras file):
`sokd_tf.models.specs`.
`batch_norm` is "fused" or "stock" (`fused_batch_norm.BATCH_NORM_LAYERS`).
"""

from __future__ import annotations

import re

import keras

from sokd_tf.errors import ConfigError
from sokd_tf.models import stages, wide_resnet

BUILDERS = {
    # WRN-10-k (one block per group) is not in the paper; it is the quickstart's student,
    # small enough to distill on 2 CPU cores in minutes.
    "wrn_10_1": wide_resnet.make_builder(10, 1),
    "wrn_10_2": wide_resnet.make_builder(10, 2),
    "wrn_16_1": wide_resnet.make_builder(16, 1),
    "wrn_16_2": wide_resnet.make_builder(16, 2),
    "wrn_40_1": wide_resnet.make_builder(40, 1),
    "wrn_40_2": wide_resnet.make_builder(40, 2),
    "wrn_28_10": wide_resnet.make_builder(28, 10),
}

_STAGE_PATTERN = re.compile(r"^(stem|group\d+|features|logits)$")


def stage_names(model: keras.Model) -> list[str]:
    """Names of the model's stage layers in forward order, e.g. `["stem", "group1", ...]`."""
    return [layer.name for layer in model.layers if _STAGE_PATTERN.match(layer.name)]


def penultimate_stage(model: keras.Model) -> str:
    """The layer a SOKD peer branches from by default: the penultimate stage's output.

    Found from the graph (`stages.penultimate_stage_output`), `group2` for WRN.

    Raises:
      ConfigError: a subclassed model, or fewer than two spatial stages.
    """
    return stages.penultimate_stage_output(model)


def build(name: str, input_shape, num_classes: int, *, synchronized_bn: bool = False,
          batch_norm: str = "fused", model_name: str | None = None) -> keras.Model:
    """`BUILDERS[name](...)` with a clear error for an unknown architecture name."""
    if name not in BUILDERS:
        raise ConfigError(f"unknown model {name!r}; choose one of {sorted(BUILDERS)}")
    return BUILDERS[name](
        tuple(input_shape), num_classes, synchronized_bn=synchronized_bn,
        batch_norm=batch_norm, name=model_name,
    )
