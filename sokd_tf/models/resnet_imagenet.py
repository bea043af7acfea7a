"""ImageNet ResNet-18 and ResNet-34 (basic blocks), as torchvision defines them.

The teacher/student pair of the paper's ImageNet experiment; keras.applications has
no ResNet-18/34. Stem 7x7 conv stride 2 -> BN -> ReLU -> 3x3 max pool stride 2; four
groups of post-activation basic blocks with 64, 128, 256, 512 channels and strides
1, 2, 2, 2 (projection shortcut 1x1 conv -> BN where the stride or width changes);
global average pool -> dense. Works from 32x32 input up (the last groups then run at
1x1, as torchvision's would).

Stage layers: `stem` (after the max pool: the tensor group 1 reads), `group1`..`group4`
(each group's last ReLU), `features`, `logits`. The SOKD peer is a copy of group 4 +
the classifier, fed by `group3`.

Reference: He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), Table
1; torchvision `models/resnet.py`; Liu, Liu & Huang, "Semi-Online Knowledge
Distillation" (BMVC 2021, arXiv 2111.11747), ImageNet experiment.
"""

from __future__ import annotations

import keras

from sokd_tf.errors import ConfigError
from sokd_tf.models import resnet_cifar
from sokd_tf.models.layers import batch_norm, conv2d, default_bias_initializer, logits_layer

# Basic blocks per group for each depth (torchvision's resnet18, resnet34).
CONFIGS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
WIDTHS = (64, 128, 256, 512)


def resnet_imagenet(
    depth: int,
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    synchronized_bn: bool = False,
    name: str | None = None,
) -> keras.Model:
    """Builds torchvision's ResNet-`depth` (18 or 34).

    Args:
      depth: one of `CONFIGS` (18, 34).
      input_shape: (H, W, C) of the normalised float32 images.
      num_classes: output logits (1000 for ImageNet).
      synchronized_bn: use `BatchNormalization(synchronized=True)` (multi-replica).
      name: model name; default `resnet{depth}`.

    Returns:
      A built functional `keras.Model` from `[batch, H, W, C]` to float32 logits
      `[batch, num_classes]` with the stage layers `stem`, `group1`..`group4`,
      `features` and `logits`.
    """
    if depth not in CONFIGS:
        raise ConfigError(f"ImageNet ResNet depth must be one of {sorted(CONFIGS)}, got {depth}")
    if num_classes < 2:
        raise ConfigError(f"num_classes must be >= 2, got {num_classes}")

    images = keras.Input(shape=tuple(input_shape), name="images")
    x = conv2d(images, WIDTHS[0], 7, "stem_conv", stride=2, padding=3)
    x = batch_norm("stem_bn", synchronized_bn)(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    # Zero padding equals PyTorch's -inf padding here: the input is a ReLU output (>= 0).
    x = keras.layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
    x = keras.layers.MaxPooling2D(3, 2, name="stem")(x)
    strides = (1, 2, 2, 2)
    for group, (filters, stride, blocks) in enumerate(
        zip(WIDTHS, strides, CONFIGS[depth], strict=True), start=1
    ):
        for block in range(1, blocks + 1):
            x = resnet_cifar.basic_block(
                x,
                filters,
                stride if block == 1 else 1,
                f"group{group}_block{block}",
                synchronized_bn=synchronized_bn,
                output_name=f"group{group}" if block == blocks else None,
            )
    x = keras.layers.GlobalAveragePooling2D(name="features")(x)
    logits = logits_layer(x, num_classes, bias_initializer=default_bias_initializer(WIDTHS[-1]))
    return keras.Model(images, logits, name=name or f"resnet{depth}")


def make_builder(depth: int):
    """A `BUILDERS` entry for torchvision's ResNet-`depth`."""

    def build(input_shape, num_classes, *, synchronized_bn=False, name=None):
        return resnet_imagenet(
            depth, input_shape, num_classes, synchronized_bn=synchronized_bn, name=name
        )

    build.__name__ = f"resnet{depth}"
    build.__doc__ = f"torchvision ResNet-{depth}; see `resnet_imagenet`."
    return build
