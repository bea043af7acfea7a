"""Building blocks shared by the model families, with PyTorch's conventions.

The CIFAR KD model zoo is defined by PyTorch code (RepDistiller, torchvision); these
helpers reproduce its layers exactly in Keras, channels last:

- Convolutions take PyTorch's explicit `padding`. Where Keras "same" samples the same
  grid (stride 1, odd kernel, padding (k - 1) / 2) it is used; otherwise the input is
  zero-padded explicitly and convolved "valid", because Keras "same" at stride 2 pads
  bottom/right only and would shift every output pixel (and break imported weights).
- BatchNorm with PyTorch's epsilon and momentum, gamma/beta trainable, moving
  statistics not, through `FusedBatchNormalization` (or Keras' synchronized BN).
- Initialisers named after the PyTorch calls they reproduce.
- Channel shuffle and channel slices from built-in layers only (Reshape, Permute,
  Cropping3D), so every zoo model is a graph of built-in Keras layers: it saves and loads
  without custom code and goes through the tf_keras rebuild of the QAT export.

Reference: PyTorch `torch.nn.Conv2d`, `torch.nn.BatchNorm2d`, `torch.nn.init`.
"""

from __future__ import annotations

import math

import keras

from sokd_tf.models.fused_batch_norm import batch_norm_layer

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9  # PyTorch momentum 0.1 in Keras' convention.


def conv_initializer() -> keras.initializers.Initializer:
    """He-normal with fan_out, untruncated (PyTorch `kaiming_normal_(mode="fan_out")`).

    Also RepDistiller's `normal_(0, sqrt(2 / (k * k * out_channels)))` for full convs.
    """
    return keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal")


def depthwise_conv_initializer() -> keras.initializers.Initializer:
    """`conv_initializer` for a `DepthwiseConv2D` kernel.

    Keras stores a depthwise kernel as `[k, k, channels, 1]`, so its "fan_in" is PyTorch's
    fan_out of the same convolution (`[channels, 1, k, k]`) and vice versa.
    """
    return keras.initializers.VarianceScaling(2.0, "fan_in", "untruncated_normal")


def dense_initializer() -> keras.initializers.Initializer:
    """PyTorch's default weight init of `nn.Linear` and `nn.Conv2d`: uniform(+-1/sqrt(fan_in)).

    (`kaiming_uniform_(a=sqrt(5))`; grouped convolutions included, since Keras' grouped
    kernel `[k, k, in / groups, out]` has PyTorch's fan_in.)
    """
    return keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform")


def depthwise_default_initializer() -> keras.initializers.Initializer:
    """`dense_initializer` for a `DepthwiseConv2D` kernel (fan modes swapped, see above)."""
    return keras.initializers.VarianceScaling(1.0 / 3.0, "fan_out", "uniform")


def default_bias_initializer(fan_in: int) -> keras.initializers.Initializer:
    """PyTorch's default bias init of `nn.Linear`/`nn.Conv2d`: uniform(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return keras.initializers.RandomUniform(-bound, bound)


def batch_norm(name: str, synchronized_bn: bool, kind: str = "fused") -> keras.layers.Layer:
    """A BatchNormalization layer of implementation `kind` ("fused" or "stock").

    "fused" is `FusedBatchNormalization`, Keras' maths through TensorFlow's fused kernel
    (a drop-in subclass: same weights, config and outputs; synchronized BN takes Keras'
    own path); "stock" is `keras.layers.BatchNormalization`. See
    sokd_tf/models/fused_batch_norm.py.
    """
    return batch_norm_layer(kind)(
        epsilon=BN_EPSILON, momentum=BN_MOMENTUM, synchronized=synchronized_bn, name=name
    )


def _keras_padding(x, kernel_size: int, stride: int, padding: int, name: str):
    """(input, Keras padding) equal to PyTorch's symmetric zero `padding`."""
    if padding == 0:
        return x, "valid"
    if stride == 1 and 2 * padding == kernel_size - 1:
        return x, "same"
    return keras.layers.ZeroPadding2D(padding, name=f"{name}_pad")(x), "valid"


def conv2d(x, filters: int, kernel_size: int, name: str, *, stride: int = 1,
           padding: int = 0, groups: int = 1, use_bias: bool = False,
           kernel_initializer=None, bias_initializer="zeros"):
    """`torch.nn.Conv2d(in, filters, kernel_size, stride, padding, groups=groups, bias=...)`.

    Args:
      x: `[batch, H, W, C_in]`.
      filters: output channels.
      kernel_size: square kernel size k.
      name: layer name (the padding layer, if any, is `{name}_pad`).
      stride: stride.
      padding: PyTorch's symmetric zero padding.
      groups: grouped convolution (C_in and filters divisible by it).
      use_bias: add a bias (PyTorch's `bias=True`).
      kernel_initializer: default `conv_initializer()`.
      bias_initializer: initialiser of the bias.

    Returns:
      `[batch, (H + 2p - k) // s + 1, (W + 2p - k) // s + 1, filters]`.
    """
    x, keras_padding = _keras_padding(x, kernel_size, stride, padding, name)
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=stride,
        padding=keras_padding,
        groups=groups,
        use_bias=use_bias,
        kernel_initializer=kernel_initializer or conv_initializer(),
        bias_initializer=bias_initializer,
        name=name,
    )(x)


def grouped_conv2d(x, filters: int, kernel_size: int, groups: int, name: str, *,
                   kernel_initializer=None):
    """`torch.nn.Conv2d(C, filters, kernel_size, groups=groups, bias=False)`, stride 1, no padding.

    Built as `groups` convolutions on channel slices, concatenated, rather than
    `Conv2D(groups=...)`: Keras runs grouped convolutions through a separately
    XLA-compiled kernel (TensorFlow has no grouped CPU kernel), which on CPU made a
    ShuffleNet V1 training step about 6x slower and its first step minutes long.
    Same parameters and outputs; group g's kernel is PyTorch's `weight[g * filters /
    groups : (g + 1) * filters / groups]`.

    Args:
      x: `[batch, H, W, C]`, C divisible by `groups`.
      filters: output channels, divisible by `groups`.
      kernel_size: square kernel size k ("valid").
      groups: number of groups.
      name: name of the output layer; group g's convolution is `{name}_g{g}`.
      kernel_initializer: default `conv_initializer()`; its fan_in is the group's.

    Returns:
      `[batch, H - k + 1, W - k + 1, filters]`.
    """
    if groups == 1:
        return conv2d(x, filters, kernel_size, name, kernel_initializer=kernel_initializer)
    channels = x.shape[-1]
    width, out_width = channels // groups, filters // groups
    parts = [
        conv2d(
            channel_slice(x, g * width, (g + 1) * width, f"{name}_in{g}"),
            out_width,
            kernel_size,
            f"{name}_g{g}",
            kernel_initializer=kernel_initializer,
        )
        for g in range(groups)
    ]
    return keras.layers.Concatenate(name=name)(parts)


def conv3x3(x, filters: int, stride: int, name: str):
    """3x3 convolution, no bias, padding 1 exactly as PyTorch, He-normal (fan_out)."""
    return conv2d(x, filters, 3, name, stride=stride, padding=1)


def depthwise_conv2d(x, kernel_size: int, name: str, *, stride: int = 1, padding: int = 0,
                     depthwise_initializer=None):
    """`torch.nn.Conv2d(C, C, kernel_size, stride, padding, groups=C, bias=False)`.

    Args:
      x: `[batch, H, W, C]`.
      kernel_size: square kernel size k.
      name: layer name.
      stride: stride.
      padding: PyTorch's symmetric zero padding.
      depthwise_initializer: default `depthwise_conv_initializer()`.

    Returns:
      `[batch, (H + 2p - k) // s + 1, (W + 2p - k) // s + 1, C]`.
    """
    x, keras_padding = _keras_padding(x, kernel_size, stride, padding, name)
    return keras.layers.DepthwiseConv2D(
        kernel_size,
        strides=stride,
        padding=keras_padding,
        use_bias=False,
        depthwise_initializer=depthwise_initializer or depthwise_conv_initializer(),
        name=name,
    )(x)


def channel_shuffle(x, groups: int, name: str, *, output_name: str | None = None):
    """ShuffleNet's channel shuffle, channels last.

    Channel `g * (C / groups) + j` moves to `j * groups + g` (PyTorch's
    `view(N, g, C / g, H, W).permute(0, 2, 1, 3, 4)`).

    Args:
      x: `[batch, H, W, C]` with static H, W, C; C divisible by `groups`.
      groups: number of groups g.
      name: prefix of the three layer names.
      output_name: name of the last layer (a stage name); default `{name}_merge`.

    Returns:
      `[batch, H, W, C]`.
    """
    height, width, channels = x.shape[1:]
    x = keras.layers.Reshape((height, width, groups, channels // groups), name=f"{name}_split")(x)
    x = keras.layers.Permute((1, 2, 4, 3), name=f"{name}_transpose")(x)
    return keras.layers.Reshape((height, width, channels), name=output_name or f"{name}_merge")(x)


def channel_slice(x, start: int, stop: int, name: str):
    """`x[..., start:stop]` as built-in layers: Reshape -> Cropping3D -> Reshape.

    Args:
      x: `[batch, H, W, C]` with static H, W, C.
      start: first channel kept.
      stop: one past the last channel kept.
      name: prefix of the three layer names.

    Returns:
      `[batch, H, W, stop - start]`.
    """
    height, width, channels = x.shape[1:]
    x = keras.layers.Reshape((height, width, channels, 1), name=f"{name}_expand")(x)
    x = keras.layers.Cropping3D(((0, 0), (0, 0), (start, channels - stop)), name=f"{name}_crop")(x)
    return keras.layers.Reshape((height, width, stop - start), name=name)(x)


def logits_layer(x, num_classes: int, *, kernel_initializer=None, bias_initializer="zeros"):
    """The model's last layer: dense -> float32 logits `[batch, num_classes]`, named `logits`.

    float32 under any mixed-precision policy, so the losses see float32 logits.
    """
    return keras.layers.Dense(
        num_classes,
        kernel_initializer=kernel_initializer or dense_initializer(),
        bias_initializer=bias_initializer,
        dtype="float32",
        name="logits",
    )(x)
