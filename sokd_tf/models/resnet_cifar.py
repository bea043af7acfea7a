"""CIFAR ResNets of the KD benchmark: resnet8 .. resnet110, resnet8x4, resnet32x4.

He et al.'s CIFAR ResNet as RepDistiller defines it: stem conv3x3 -> BN -> ReLU; three
groups of (depth - 2) / 6 post-activation basic blocks with strides 1, 2, 2; global
average pool -> dense. Widths (stem, group1, group2, group3) are (16, 16, 32, 64), or
(32, 64, 128, 256) for the "x4" models. A block whose stride or width changes has a
projection shortcut (1x1 conv -> BN), the others the identity. At 32x32 input the
global average pool equals the original's 8x8 pool; other input sizes work too.

Stage layers: `stem` (the stem's ReLU), `group1`..`group3` (each group's last ReLU),
`features`, `logits`. The SOKD peer (`peer.build_peer`) is a copy of group3 + the head,
fed by group2's output.

Reference: He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), Sec.
4.2; Tian et al., "Contrastive Representation Distillation" (ICLR 2020), whose
RepDistiller code defines these KD benchmark models.
"""

from __future__ import annotations

import keras

from sokd_tf.errors import ConfigError
from sokd_tf.models.layers import (
    batch_norm,
    conv2d,
    conv3x3,
    default_bias_initializer,
    logits_layer,
)

WIDTHS = (16, 16, 32, 64)
WIDTHS_X4 = (32, 64, 128, 256)


def default_name(depth: int, widths: tuple[int, int, int, int]) -> str:
    """`resnet{depth}`, with `x{k}` appended when group3 is k times as wide as the base."""
    suffix = "" if tuple(widths) == WIDTHS else f"x{widths[3] // WIDTHS[3]}"
    return f"resnet{depth}{suffix}"


def basic_block(x, filters: int, stride: int, name: str, *, synchronized_bn: bool,
                output_name: str | None = None):
    """Post-activation basic block: conv-BN-ReLU-conv-BN, + shortcut, ReLU.

    Args:
      x: `[batch, H, W, C_in]`.
      filters: output channels.
      stride: stride of the first convolution (and of the projection).
      name: prefix of the block's layer names.
      synchronized_bn: synchronized BatchNormalization across replicas.
      output_name: name of the final ReLU (a stage name for a group's last block).

    Returns:
      `[batch, H / stride, W / stride, filters]`.
    """
    if stride != 1 or x.shape[-1] != filters:
        shortcut = conv2d(x, filters, 1, f"{name}_shortcut", stride=stride)
        shortcut = batch_norm(f"{name}_shortcut_bn", synchronized_bn)(shortcut)
    else:
        shortcut = x
    out = conv3x3(x, filters, stride, f"{name}_conv1")
    out = batch_norm(f"{name}_bn1", synchronized_bn)(out)
    out = keras.layers.ReLU(name=f"{name}_relu1")(out)
    out = conv3x3(out, filters, 1, f"{name}_conv2")
    out = batch_norm(f"{name}_bn2", synchronized_bn)(out)
    out = keras.layers.Add(name=f"{name}_add")([out, shortcut])
    return keras.layers.ReLU(name=output_name or f"{name}_relu2")(out)


def resnet_cifar(
    depth: int,
    widths: tuple[int, int, int, int],
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    synchronized_bn: bool = False,
    name: str | None = None,
) -> keras.Model:
    """Builds a CIFAR ResNet.

    Args:
      depth: total depth; depth - 2 must be divisible by 6 (8, 14, 20, 32, 44, 56, 110).
      widths: channels of the stem and of the three groups.
      input_shape: (H, W, C) of the normalised float32 images.
      num_classes: output logits.
      synchronized_bn: use `BatchNormalization(synchronized=True)` (multi-replica).
      name: model name; default `resnet{depth}` (`resnet{depth}x4` for `WIDTHS_X4`).

    Returns:
      A built functional `keras.Model` from `[batch, H, W, C]` to float32 logits
      `[batch, num_classes]` with the stage layers `stem`, `group1`..`group3`,
      `features` and `logits`.
    """
    if depth < 8 or (depth - 2) % 6:
        raise ConfigError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
    if num_classes < 2:
        raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
    blocks_per_group = (depth - 2) // 6

    images = keras.Input(shape=tuple(input_shape), name="images")
    x = conv2d(images, widths[0], 3, "stem_conv", padding=1)
    x = batch_norm("stem_bn", synchronized_bn)(x)
    x = keras.layers.ReLU(name="stem")(x)
    for group, (filters, stride) in enumerate(zip(widths[1:], (1, 2, 2), strict=True), start=1):
        for block in range(1, blocks_per_group + 1):
            x = basic_block(
                x,
                filters,
                stride if block == 1 else 1,
                f"group{group}_block{block}",
                synchronized_bn=synchronized_bn,
                output_name=f"group{group}" if block == blocks_per_group else None,
            )
    x = keras.layers.GlobalAveragePooling2D(name="features")(x)
    # RepDistiller keeps PyTorch's default nn.Linear init here (bias included).
    logits = logits_layer(x, num_classes, bias_initializer=default_bias_initializer(widths[3]))
    return keras.Model(images, logits, name=name or default_name(depth, widths))


def make_builder(depth: int, widths: tuple[int, int, int, int] = WIDTHS):
    """A `BUILDERS` entry for the CIFAR ResNet of `depth` and `widths`."""
    def build(input_shape, num_classes, *, synchronized_bn=False, name=None):
        return resnet_cifar(
            depth, widths, input_shape, num_classes,
            synchronized_bn=synchronized_bn, name=name,
        )

    build.__name__ = default_name(depth, widths)
    build.__doc__ = f"CIFAR {build.__name__}; see `resnet_cifar`."
    return build
