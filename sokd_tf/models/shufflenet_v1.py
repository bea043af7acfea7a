"""ShuffleNet V1 for CIFAR, as the KD benchmark uses it (`shufflenetv1`).

RepDistiller's `ShuffleV1`: stem 1x1 conv to 24 channels -> BN -> ReLU (no stride, no
pool); three groups of 4, 8, 4 bottleneck units with 240, 480, 960 channels and 3
convolution groups; global average pool -> dense. A unit is grouped 1x1 conv -> BN ->
ReLU -> channel shuffle -> 3x3 depthwise -> BN -> grouped 1x1 conv -> BN, then ReLU of
the sum with the input (stride 1) or of the concatenation with a 3x3 average pool of the
input (stride 2, the first unit of each group). The first 1x1 conv reading the
24-channel stem is not grouped. Convolutions and the dense layer keep PyTorch's default
initialisation, as the original. At 32x32 input the global average pool equals the
original's 4x4 pool.

Stage layers: `stem`, `group1`..`group3` (each group's last ReLU), `features`,
`logits`. The SOKD peer is a copy of group 3 + the classifier, fed by `group2`.

Reference: Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural Network
for Mobile Devices" (CVPR 2018); Tian et al., "Contrastive Representation Distillation"
(ICLR 2020), whose RepDistiller code defines this KD benchmark model.
"""

from __future__ import annotations

import keras

from sokd_tf.errors import ConfigError
from sokd_tf.models.layers import (
    batch_norm,
    channel_shuffle,
    conv2d,
    default_bias_initializer,
    dense_initializer,
    depthwise_conv2d,
    depthwise_default_initializer,
    grouped_conv2d,
    logits_layer,
)

STEM_CHANNELS = 24
WIDTHS = (240, 480, 960)
BLOCKS = (4, 8, 4)
GROUPS = 3


def bottleneck(x, filters: int, stride: int, groups: int, name: str, *,
               synchronized_bn: bool, output_name: str | None = None):
    """ShuffleNet unit.

    Args:
      x: `[batch, H, W, C_in]`.
      filters: output channels of the residual branch (for stride 2 the unit outputs
        `filters + C_in` channels: the branch concatenated with the pooled input).
      stride: 1 (sum with the input) or 2 (concatenation with a 3x3 average pool).
      groups: groups of the 1x1 convolutions (the first is ungrouped on the stem).
      name: prefix of the unit's layer names.
      synchronized_bn: synchronized BatchNormalization across replicas.
      output_name: name of the final ReLU (a stage name for a group's last unit).

    Returns:
      `[batch, H / stride, W / stride, filters (+ C_in for stride 2)]`.
    """
    channels = x.shape[-1]
    hidden = filters // 4
    first_groups = 1 if channels == STEM_CHANNELS else groups
    out = grouped_conv2d(x, hidden, 1, first_groups, f"{name}_conv1",
                         kernel_initializer=dense_initializer())
    out = batch_norm(f"{name}_bn1", synchronized_bn)(out)
    out = keras.layers.ReLU(name=f"{name}_relu1")(out)
    if first_groups > 1:
        out = channel_shuffle(out, first_groups, f"{name}_shuffle")
    out = depthwise_conv2d(out, 3, f"{name}_conv2", stride=stride, padding=1,
                           depthwise_initializer=depthwise_default_initializer())
    out = batch_norm(f"{name}_bn2", synchronized_bn)(out)
    out = grouped_conv2d(out, filters, 1, groups, f"{name}_conv3",
                         kernel_initializer=dense_initializer())
    out = batch_norm(f"{name}_bn3", synchronized_bn)(out)
    if stride == 2:
        # PyTorch's AvgPool2d(3, 2, padding=1) counts the zero padding in each mean.
        shortcut = keras.layers.ZeroPadding2D(1, name=f"{name}_shortcut_pad")(x)
        shortcut = keras.layers.AveragePooling2D(3, 2, name=f"{name}_shortcut")(shortcut)
        out = keras.layers.Concatenate(name=f"{name}_concat")([out, shortcut])
    else:
        out = keras.layers.Add(name=f"{name}_add")([out, x])
    return keras.layers.ReLU(name=output_name or f"{name}_relu")(out)


def shufflenet_v1(
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    synchronized_bn: bool = False,
    name: str | None = None,
) -> keras.Model:
    """Builds the CIFAR ShuffleNet V1 (3 groups, 240/480/960 channels).

    Args:
      input_shape: (H, W, C) of the normalised float32 images.
      num_classes: output logits.
      synchronized_bn: use `BatchNormalization(synchronized=True)` (multi-replica).
      name: model name; default `shufflenetv1`.

    Returns:
      A built functional `keras.Model` from `[batch, H, W, C]` to float32 logits
      `[batch, num_classes]` with the stage layers `stem`, `group1`..`group3`,
      `features` and `logits`.
    """
    if num_classes < 2:
        raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
    images = keras.Input(shape=tuple(input_shape), name="images")
    x = conv2d(images, STEM_CHANNELS, 1, "stem_conv", kernel_initializer=dense_initializer())
    x = batch_norm("stem_bn", synchronized_bn)(x)
    x = keras.layers.ReLU(name="stem")(x)
    for group, (width, blocks) in enumerate(zip(WIDTHS, BLOCKS, strict=True), start=1):
        for block in range(1, blocks + 1):
            first = block == 1
            x = bottleneck(
                x,
                width - x.shape[-1] if first else width,
                2 if first else 1,
                GROUPS,
                f"group{group}_block{block}",
                synchronized_bn=synchronized_bn,
                output_name=f"group{group}" if block == blocks else None,
            )
    x = keras.layers.GlobalAveragePooling2D(name="features")(x)
    logits = logits_layer(x, num_classes, bias_initializer=default_bias_initializer(WIDTHS[-1]))
    return keras.Model(images, logits, name=name or "shufflenetv1")
