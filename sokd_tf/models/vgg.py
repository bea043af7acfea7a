"""VGG with BatchNorm for CIFAR, as the KD benchmark uses it: vgg8 .. vgg19.

Five blocks of 3x3 conv (with bias) -> BN -> ReLU; 2x2 max pools after blocks 0, 1 and
2; block 4 is followed by a global average pool and one dense layer (no VGG fully
connected stack). Block 3 is followed by a max pool only from 64x64 input up (the
original applies it at 64x64 only), so at 32x32 blocks 3 and 4 both run at 4x4.

Stage layers: `stem` (block 0's last ReLU), `group1`..`group4` (blocks 1-4: the last
ReLU, or, where block 3 is pooled, that pool: the tensor block 4 reads), `features`,
`logits`. The SOKD peer is a copy of block 4 + the classifier, fed by `group3`.

Reference: Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
Recognition" (ICLR 2015); Tian et al., "Contrastive Representation Distillation" (ICLR
2020), whose RepDistiller code defines these KD benchmark models (`vgg*_bn`).
"""

from __future__ import annotations

import keras

from sokd_tf.errors import ConfigError
from sokd_tf.models.layers import batch_norm, conv2d, logits_layer

# Output channels of each convolution, per block (RepDistiller's configurations S, A, B,
# D, E).
CONFIGS = {
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: (
        (64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512),
        (512, 512, 512, 512),
    ),
}
POOL_BLOCK3_FROM = 64  # input height from which block 3 is max-pooled


def vgg_block(x, widths: tuple[int, ...], name: str, *, synchronized_bn: bool,
              output_name: str | None = None):
    """Convolutions of one block, each conv3x3 (bias) -> BN -> ReLU.

    Args:
      x: `[batch, H, W, C_in]`.
      widths: output channels of each convolution.
      name: prefix of the block's layer names.
      synchronized_bn: synchronized BatchNormalization across replicas.
      output_name: name of the last ReLU.

    Returns:
      `[batch, H, W, widths[-1]]`.
    """
    for index, filters in enumerate(widths, start=1):
        x = conv2d(x, filters, 3, f"{name}_conv{index}", padding=1, use_bias=True)
        x = batch_norm(f"{name}_bn{index}", synchronized_bn)(x)
        last = index == len(widths)
        x = keras.layers.ReLU(name=output_name if last and output_name else f"{name}_relu{index}")(x)
    return x


def vgg(
    depth: int,
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    synchronized_bn: bool = False,
    name: str | None = None,
) -> keras.Model:
    """Builds VGG-`depth` with BatchNorm (CIFAR variant).

    Args:
      depth: one of `CONFIGS` (8, 11, 13, 16, 19).
      input_shape: (H, W, C) of the normalised float32 images; H, W >= 8 (16 from 64 up).
      num_classes: output logits.
      synchronized_bn: use `BatchNormalization(synchronized=True)` (multi-replica).
      name: model name; default `vgg{depth}`.

    Returns:
      A built functional `keras.Model` from `[batch, H, W, C]` to float32 logits
      `[batch, num_classes]` with the stage layers `stem`, `group1`..`group4`,
      `features` and `logits`.
    """
    if depth not in CONFIGS:
        raise ConfigError(f"VGG depth must be one of {sorted(CONFIGS)}, got {depth}")
    if num_classes < 2:
        raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
    blocks = CONFIGS[depth]
    pool_block3 = input_shape[0] >= POOL_BLOCK3_FROM

    images = keras.Input(shape=tuple(input_shape), name="images")
    x = vgg_block(images, blocks[0], "block0", synchronized_bn=synchronized_bn,
                  output_name="stem")
    for index in (1, 2, 3):
        x = keras.layers.MaxPooling2D(2, name=f"pool{index - 1}")(x)
        stage = f"group{index}"
        pooled = index == 3 and pool_block3
        x = vgg_block(x, blocks[index], f"block{index}", synchronized_bn=synchronized_bn,
                      output_name=None if pooled else stage)
    if pool_block3:
        x = keras.layers.MaxPooling2D(2, name="group3")(x)
    x = vgg_block(x, blocks[4], "block4", synchronized_bn=synchronized_bn, output_name="group4")
    x = keras.layers.GlobalAveragePooling2D(name="features")(x)
    logits = logits_layer(
        x, num_classes, kernel_initializer=keras.initializers.RandomNormal(stddev=0.01)
    )
    return keras.Model(images, logits, name=name or f"vgg{depth}")


def make_builder(depth: int):
    """A `BUILDERS` entry for VGG-`depth` with BatchNorm."""

    def build(input_shape, num_classes, *, synchronized_bn=False, name=None):
        return vgg(depth, input_shape, num_classes, synchronized_bn=synchronized_bn, name=name)

    build.__name__ = f"vgg{depth}"
    build.__doc__ = f"VGG-{depth} with BatchNorm; see `vgg`."
    return build
