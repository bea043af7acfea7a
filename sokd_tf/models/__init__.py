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
`builder(name)` / `build(name, ...)` also resolve any `wrn_{depth}_{width}` not listed.
"""

from __future__ import annotations

import re

import keras

from sokd_tf.errors import ConfigError
from sokd_tf.models import (
    fused_batch_norm,
    mobilenet_v2,
    resnet_cifar,
    resnet_imagenet,
    shufflenet_v1,
    shufflenet_v2,
    stages,
    vgg,
    wide_resnet,
)

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
    # The CIFAR KD benchmark zoo (RepDistiller's models; parameter counts equal theirs).
    "resnet8": resnet_cifar.make_builder(8),
    "resnet14": resnet_cifar.make_builder(14),
    "resnet20": resnet_cifar.make_builder(20),
    "resnet32": resnet_cifar.make_builder(32),
    "resnet44": resnet_cifar.make_builder(44),
    "resnet56": resnet_cifar.make_builder(56),
    "resnet110": resnet_cifar.make_builder(110),
    "resnet8x4": resnet_cifar.make_builder(8, resnet_cifar.WIDTHS_X4),
    "resnet32x4": resnet_cifar.make_builder(32, resnet_cifar.WIDTHS_X4),
    "vgg8": vgg.make_builder(8),
    "vgg11": vgg.make_builder(11),
    "vgg13": vgg.make_builder(13),
    "vgg16": vgg.make_builder(16),
    "vgg19": vgg.make_builder(19),
    "mobilenetv2": mobilenet_v2.mobilenet_v2,
    "shufflenetv1": shufflenet_v1.shufflenet_v1,
    "shufflenetv2": shufflenet_v2.shufflenet_v2,
    # The paper's ImageNet pair (torchvision's basic-block ResNets).
    "resnet18": resnet_imagenet.make_builder(18),
    "resnet34": resnet_imagenet.make_builder(34),
}
# Any other Wide-ResNet by name: wrn_{depth}_{width}, depth = 6n + 4, width >= 1.
_WRN_NAME = re.compile(r"^wrn_([1-9][0-9]*)_([1-9][0-9]*)$")
WRN_NAME_FORM = "wrn_{depth}_{width} (depth = 6n + 4 >= 10, width >= 1, e.g. wrn_22_4)"

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


def builder(name: str):
    """The builder of a zoo name: a `BUILDERS` key or any valid `wrn_{depth}_{width}`.

    Raises:
      ConfigError: unknown name, or a `wrn_` name whose depth or width is invalid; the
        message lists the valid forms.
    """
    if name in BUILDERS:
        return BUILDERS[name]
    match = _WRN_NAME.match(name)
    if match:
        depth, width = int(match.group(1)), int(match.group(2))
        if depth >= 10 and (depth - 4) % 6 == 0:
            return wide_resnet.make_builder(depth, width)
    if name.startswith("wrn_"):
        raise ConfigError(f"model {name!r} is not a valid Wide-ResNet name; use {WRN_NAME_FORM}")
    raise ConfigError(
        f"unknown model {name!r}; choose one of {sorted(BUILDERS)} or {WRN_NAME_FORM}"
    )


def build(name: str, input_shape, num_classes: int, *, synchronized_bn: bool = False,
          batch_norm: str = "fused", model_name: str | None = None) -> keras.Model:
    """`builder(name)(...)`: any zoo name, with a clear error for an unknown one.

    `batch_norm` ("fused" or "stock") picks the BatchNormalization implementation (same
    weights and maths; the builders make "fused", `fused_batch_norm.with_batch_norm`
    switches).
    """
    fused_batch_norm.batch_norm_layer(batch_norm)  # validates the name
    model = builder(name)(
        tuple(input_shape), num_classes, synchronized_bn=synchronized_bn, name=model_name
    )
    return model if batch_norm == "fused" else fused_batch_norm.with_batch_norm(model, batch_norm)
