"""CIFAR Wide-ResNets (WRN-d-k) as in the official SOKD / RepDistiller code.

Pre-activation basic blocks; stem conv3x3 with 16 filters; three groups of (d - 4) / 6
blocks with 16k, 32k, 64k channels and strides 1, 2, 2; final BN -> ReLU -> global
average pool -> dense. Global average pooling (instead of the original fixed 8x8 pool)
makes the same network work for any input size: 32x32 CIFAR gives exactly the original.

Stride-2 3x3 convolutions use explicit `ZeroPadding2D(1)` + "valid" so the sampling grid
equals PyTorch's `padding=1` (Keras "same" pads bottom/right only at stride 2), which
keeps PyTorch checkpoints importable.

Reference: Zagoruyko & Komodakis, "Wide Residual Networks" (BMVC 2016); docs/METHOD.md,
"Architectures"; RepDistiller `models/wrn.py`.
"""

from __future__ import annotations

import keras

from sokd_tf.errors import ConfigError
from sokd_tf.models.layers import batch_norm, conv3x3, conv_initializer, logits_layer


def basic_block(x, filters: int, stride: int, name: str, *, synchronized_bn: bool,
                batch_norm_kind: str = "fused", output_name: str | None = None):
    """Pre-activation basic block of the official WRN.

    When the channel count changes, the shortcut is a 1x1 stride-s convolution of the
    pre-activated input; otherwise it is the identity of the raw input.

    Args:
      x: `[batch, H, W, C_in]`.
      filters: output channels.
      stride: stride of the first convolution (and of the projection).
      name: prefix of the block's layer names.
      synchronized_bn: synchronized BatchNormalization across replicas.
      batch_norm_kind: "fused" or "stock" (see `batch_norm`).
      output_name: name of the final Add layer (a stage name for the last block).

    Returns:
      `[batch, H / stride, W / stride, filters]`.
    """
    equal_in_out = x.shape[-1] == filters
    activated = batch_norm(f"{name}_bn1", synchronized_bn, batch_norm_kind)(x)
    activated = keras.layers.ReLU(name=f"{name}_relu1")(activated)
    if equal_in_out:
        if stride != 1:
            raise ConfigError(f"{name}: identity shortcut needs stride 1, got {stride}")
        shortcut = x
    else:
        shortcut = keras.layers.Conv2D(
            filters,
            1,
            strides=stride,
            padding="valid",
            use_bias=False,
            kernel_initializer=conv_initializer(),
            name=f"{name}_shortcut",
        )(activated)
    out = conv3x3(activated, filters, stride, f"{name}_conv1")
    out = batch_norm(f"{name}_bn2", synchronized_bn, batch_norm_kind)(out)
    out = keras.layers.ReLU(name=f"{name}_relu2")(out)
    out = conv3x3(out, filters, 1, f"{name}_conv2")
    return keras.layers.Add(name=output_name or f"{name}_add")([shortcut, out])


def wide_resnet_head(x, num_classes: int, *, synchronized_bn: bool, batch_norm_kind: str = "fused"):
    """Final BN -> ReLU -> global average pool (`features`) -> dense (`logits`, float32)."""
    x = batch_norm("final_bn", synchronized_bn, batch_norm_kind)(x)
    x = keras.layers.ReLU(name="final_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="features")(x)
    return logits_layer(x, num_classes)


def wide_resnet(
    depth: int,
    widen_factor: int,
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    synchronized_bn: bool = False,
    batch_norm_kind: str = "fused",
    name: str | None = None,
) -> keras.Model:
    """Builds WRN-`depth`-`widen_factor`.

    Args:
      depth: total depth d; (d - 4) must be divisible by 6.
      widen_factor: width multiplier k.
      input_shape: (H, W, C) of the normalised float32 images.
      num_classes: output logits.
      synchronized_bn: use `BatchNormalization(synchronized=True)` (multi-replica).
      batch_norm_kind: "fused" (`FusedBatchNormalization`, the default) or "stock"
        (`keras.layers.BatchNormalization`); same weights and outputs either way.
      name: model name; default `wrn_{depth}_{widen_factor}`.

    Returns:
      A built functional `keras.Model` from `[batch, H, W, C]` to float32 logits
      `[batch, num_classes]`, with the stage layers `stem`, `group1`, `group2`,
      `group3` (raw group outputs), `features` and `logits`.
    """
    if depth < 10 or (depth - 4) % 6:
        raise ConfigError(f"WRN depth must be 6n + 4 with n >= 1, got {depth}")
    if widen_factor < 1:
        raise ConfigError(f"WRN widen factor must be >= 1, got {widen_factor}")
    if num_classes < 2:
        raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
    blocks_per_group = (depth - 4) // 6
    widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
    strides = (1, 2, 2)

    images = keras.Input(shape=tuple(input_shape), name="images")
    x = keras.layers.Conv2D(
        16, 3, padding="same", use_bias=False, kernel_initializer=conv_initializer(),
        name="stem",
    )(images)
    for group, (filters, stride) in enumerate(zip(widths, strides, strict=True), start=1):
        for block in range(1, blocks_per_group + 1):
            last = block == blocks_per_group
            x = basic_block(
                x,
                filters,
                stride if block == 1 else 1,
                f"group{group}_block{block}",
                synchronized_bn=synchronized_bn,
                batch_norm_kind=batch_norm_kind,
                output_name=f"group{group}" if last else None,
            )
    logits = wide_resnet_head(
        x, num_classes, synchronized_bn=synchronized_bn, batch_norm_kind=batch_norm_kind
    )
    return keras.Model(images, logits, name=name or f"wrn_{depth}_{widen_factor}")


def make_builder(depth: int, widen_factor: int):
    """A `BUILDERS` entry for WRN-`depth`-`widen_factor`."""

    def build(input_shape, num_classes, *, synchronized_bn=False, batch_norm="fused", name=None):
        return wide_resnet(
            depth, widen_factor, input_shape, num_classes,
            synchronized_bn=synchronized_bn, batch_norm_kind=batch_norm, name=name,
        )

    build.__name__ = f"wrn_{depth}_{widen_factor}"
    build.__doc__ = f"WRN-{depth}-{widen_factor}; see `wide_resnet`."
    return build

