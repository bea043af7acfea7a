"""MobileNetV2 at half width for CIFAR: the KD benchmark's `mobilenetv2` student.

RepDistiller's `mobile_half` (expansion 6, width multiplier 0.5): stem conv3x3 stride 2
-> BN -> ReLU with 16 channels; seven block groups of inverted residuals (1x1 expand
-> BN -> ReLU -> 3x3 depthwise -> BN -> ReLU -> 1x1 project -> BN, + identity where
stride 1 and width unchanged; the first group keeps a 1x1 "expansion" at ratio 1);
1x1 conv to 1280 -> BN -> ReLU; global average pool -> dense. ReLU, not ReLU6, as the
original. At 32x32 input the global average pool equals the original's 2x2 pool.

Stage layers (RepDistiller's feature taps): `stem`, `group1` (end of block group 1),
`group2` (group 2), `group3` (group 4), `group4` (group 6), `features`, `logits`. The
SOKD peer is a copy of block groups 5-6 + the 1x1 conv + the classifier, fed by
`group3`.

Reference: Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks"
(CVPR 2018); Tian et al., "Contrastive Representation Distillation" (ICLR 2020), whose
RepDistiller code defines this KD benchmark model.
"""

from __future__ import annotations

import keras

from sokd_tf.errors import ConfigError
from sokd_tf.models.layers import batch_norm, conv2d, depthwise_conv2d, logits_layer

EXPANSION = 6
WIDTH_MULTIPLIER = 0.5
# (expansion ratio, base channels, blocks, stride of the first block) per block group;
# `None` is `EXPANSION`.
BLOCK_GROUPS = (
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
)
STEM_CHANNELS = 32
LAST_CHANNELS = 1280
# Block group whose output is each stage (RepDistiller's feature taps f1..f4).
STAGE_OF_BLOCK_GROUP = {1: "group1", 2: "group2", 4: "group3", 6: "group4"}


def inverted_residual(x, filters: int, stride: int, expansion: int, name: str, *,
                      synchronized_bn: bool, output_name: str | None = None):
    """Inverted residual block with linear bottleneck.

    Args:
      x: `[batch, H, W, C_in]`.
      filters: output channels.
      stride: stride of the depthwise convolution (1 or 2).
      expansion: hidden channels = `C_in * expansion`.
      name: prefix of the block's layer names.
      synchronized_bn: synchronized BatchNormalization across replicas.
      output_name: name of the block's last layer (a stage name).

    Returns:
      `[batch, H / stride, W / stride, filters]`.
    """
    channels = x.shape[-1]
    hidden = channels * expansion
    out = conv2d(x, hidden, 1, f"{name}_expand")
    out = batch_norm(f"{name}_expand_bn", synchronized_bn)(out)
    out = keras.layers.ReLU(name=f"{name}_expand_relu")(out)
    out = depthwise_conv2d(out, 3, f"{name}_depthwise", stride=stride, padding=1)
    out = batch_norm(f"{name}_depthwise_bn", synchronized_bn)(out)
    out = keras.layers.ReLU(name=f"{name}_depthwise_relu")(out)
    out = conv2d(out, filters, 1, f"{name}_project")
    if stride == 1 and channels == filters:
        out = batch_norm(f"{name}_project_bn", synchronized_bn)(out)
        return keras.layers.Add(name=output_name or f"{name}_add")([x, out])
    return batch_norm(output_name or f"{name}_project_bn", synchronized_bn)(out)


def mobilenet_v2(
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    synchronized_bn: bool = False,
    name: str | None = None,
) -> keras.Model:
    """Builds the half-width CIFAR MobileNetV2 (`mobilenetv2`, RepDistiller's `mobile_half`).

    Args:
      input_shape: (H, W, C) of the normalised float32 images.
      num_classes: output logits.
      synchronized_bn: use `BatchNormalization(synchronized=True)` (multi-replica).
      name: model name; default `mobilenetv2`.

    Returns:
      A built functional `keras.Model` from `[batch, H, W, C]` to float32 logits
      `[batch, num_classes]` with the stage layers `stem`, `group1`..`group4`,
      `features` and `logits`.
    """
    if num_classes < 2:
        raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
    images = keras.Input(shape=tuple(input_shape), name="images")
    x = conv2d(images, int(STEM_CHANNELS * WIDTH_MULTIPLIER), 3, "stem_conv", stride=2,
               padding=1)
    x = batch_norm("stem_bn", synchronized_bn)(x)
    x = keras.layers.ReLU(name="stem")(x)
    for group, (expansion, channels, blocks, stride) in enumerate(BLOCK_GROUPS):
        for block in range(1, blocks + 1):
            last = block == blocks
            x = inverted_residual(
                x,
                int(channels * WIDTH_MULTIPLIER),
                stride if block == 1 else 1,
                expansion or EXPANSION,
                f"blocks{group}_{block}",
                synchronized_bn=synchronized_bn,
                output_name=STAGE_OF_BLOCK_GROUP.get(group) if last else None,
            )
    x = conv2d(x, LAST_CHANNELS, 1, "head_conv")
    x = batch_norm("head_bn", synchronized_bn)(x)
    x = keras.layers.ReLU(name="head_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="features")(x)
    logits = logits_layer(
        x, num_classes, kernel_initializer=keras.initializers.RandomNormal(stddev=0.01)
    )
    return keras.Model(images, logits, name=name or "mobilenetv2")
