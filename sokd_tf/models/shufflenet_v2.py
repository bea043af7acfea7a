"""ShuffleNet V2 (1x) for CIFAR, as the KD benchmark uses it (`shufflenetv2`).

RepDistiller's `ShuffleV2`: stem 1x1 conv to 24 channels -> BN -> ReLU (no stride, no
pool); three groups with 116, 232, 464 channels, each a down-sampling unit followed by
3, 7, 3 basic units; 1x1 conv to 1024 -> BN -> ReLU; global average pool -> dense.

- Basic unit: split the channels in halves; the second half goes through 1x1 conv ->
  BN -> ReLU -> 3x3 depthwise -> BN -> 1x1 conv -> BN -> ReLU; concatenate with the
  first half; channel shuffle (2 groups).
- Down-sampling unit: left 3x3 depthwise stride 2 -> BN -> 1x1 conv -> BN -> ReLU; right
  1x1 conv -> BN -> ReLU -> 3x3 depthwise stride 2 -> BN -> 1x1 conv -> BN -> ReLU;
  concatenate; channel shuffle.

Convolutions and the dense layer keep PyTorch's default initialisation, as the
original. At 32x32 input the global average pool equals the original's 4x4 pool.

Stage layers: `stem`, `group1`..`group3` (each group's last shuffle), `features`,
`logits`. The SOKD peer is a copy of group 3 + the 1x1 conv, its BN + the classifier,
fed by `group2`.

Reference: Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN
Architecture Design" (ECCV 2018); Tian et al., "Contrastive Representation
Distillation" (ICLR 2020), whose RepDistiller code defines this KD benchmark model.
"""

from __future__ import annotations

import keras

from sokd_tf.errors import ConfigError
from sokd_tf.models.layers import (
    batch_norm,
    channel_shuffle,
    channel_slice,
    conv2d,
    default_bias_initializer,
    dense_initializer,
    depthwise_conv2d,
    depthwise_default_initializer,
    logits_layer,
)

STEM_CHANNELS = 24
WIDTHS = (116, 232, 464)
BLOCKS = (3, 7, 3)
LAST_CHANNELS = 1024


def _conv_bn(x, filters: int, name: str, *, synchronized_bn: bool, relu: bool):
    """1x1 conv (no bias) -> BN (-> ReLU)."""
    x = conv2d(x, filters, 1, f"{name}_conv", kernel_initializer=dense_initializer())
    x = batch_norm(f"{name}_bn", synchronized_bn)(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x) if relu else x


def _depthwise_bn(x, stride: int, name: str, *, synchronized_bn: bool):
    """3x3 depthwise conv (padding 1, no bias) -> BN."""
    x = depthwise_conv2d(x, 3, f"{name}_conv", stride=stride, padding=1,
                         depthwise_initializer=depthwise_default_initializer())
    return batch_norm(f"{name}_bn", synchronized_bn)(x)


def basic_unit(x, name: str, *, synchronized_bn: bool, output_name: str | None = None):
    """Channel split, a 1x1-depthwise-1x1 branch on the second half, concat, shuffle.

    Args:
      x: `[batch, H, W, C]`, C even.
      name: prefix of the unit's layer names.
      synchronized_bn: synchronized BatchNormalization across replicas.
      output_name: name of the shuffle's last layer (a stage name).

    Returns:
      `[batch, H, W, C]`.
    """
    channels = x.shape[-1]
    half = channels // 2
    kept = channel_slice(x, 0, half, f"{name}_kept")
    branch = channel_slice(x, half, channels, f"{name}_branch")
    branch = _conv_bn(branch, channels - half, f"{name}_1", synchronized_bn=synchronized_bn,
                      relu=True)
    branch = _depthwise_bn(branch, 1, f"{name}_2", synchronized_bn=synchronized_bn)
    branch = _conv_bn(branch, channels - half, f"{name}_3", synchronized_bn=synchronized_bn,
                      relu=True)
    out = keras.layers.Concatenate(name=f"{name}_concat")([kept, branch])
    return channel_shuffle(out, 2, f"{name}_shuffle", output_name=output_name)


def down_unit(x, filters: int, name: str, *, synchronized_bn: bool):
    """Two stride-2 branches (C_in -> filters / 2 each), concatenated and shuffled.

    Args:
      x: `[batch, H, W, C_in]`.
      filters: output channels (even).
      name: prefix of the unit's layer names.
      synchronized_bn: synchronized BatchNormalization across replicas.

    Returns:
      `[batch, H / 2, W / 2, filters]`.
    """
    half = filters // 2
    left = _depthwise_bn(x, 2, f"{name}_left1", synchronized_bn=synchronized_bn)
    left = _conv_bn(left, half, f"{name}_left2", synchronized_bn=synchronized_bn, relu=True)
    right = _conv_bn(x, half, f"{name}_right1", synchronized_bn=synchronized_bn, relu=True)
    right = _depthwise_bn(right, 2, f"{name}_right2", synchronized_bn=synchronized_bn)
    right = _conv_bn(right, half, f"{name}_right3", synchronized_bn=synchronized_bn, relu=True)
    out = keras.layers.Concatenate(name=f"{name}_concat")([left, right])
    return channel_shuffle(out, 2, f"{name}_shuffle")


def shufflenet_v2(
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    synchronized_bn: bool = False,
    name: str | None = None,
) -> keras.Model:
    """Builds the CIFAR ShuffleNet V2 1x (116/232/464 channels, 1024-channel head).

    Args:
      input_shape: (H, W, C) of the normalised float32 images.
      num_classes: output logits.
      synchronized_bn: use `BatchNormalization(synchronized=True)` (multi-replica).
      name: model name; default `shufflenetv2`.

    Returns:
      A built functional `keras.Model` from `[batch, H, W, C]` to float32 logits
      `[batch, num_classes]` with the stage layers `stem`, `group1`..`group3`,
      `features` and `logits`.
    """
    if num_classes < 2:
        raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
    images = keras.Input(shape=tuple(input_shape), name="images")
    x = _conv_bn(images, STEM_CHANNELS, "stem", synchronized_bn=synchronized_bn, relu=False)
    x = keras.layers.ReLU(name="stem")(x)
    for group, (width, blocks) in enumerate(zip(WIDTHS, BLOCKS, strict=True), start=1):
        x = down_unit(x, width, f"group{group}_down", synchronized_bn=synchronized_bn)
        for block in range(1, blocks + 1):
            x = basic_unit(
                x,
                f"group{group}_block{block}",
                synchronized_bn=synchronized_bn,
                output_name=f"group{group}" if block == blocks else None,
            )
    x = _conv_bn(x, LAST_CHANNELS, "head", synchronized_bn=synchronized_bn, relu=True)
    x = keras.layers.GlobalAveragePooling2D(name="features")(x)
    logits = logits_layer(x, num_classes, bias_initializer=default_bias_initializer(LAST_CHANNELS))
    return keras.Model(images, logits, name=name or "shufflenetv2")
