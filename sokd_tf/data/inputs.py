"""Raw pixels -> model input: the one definition training, evaluation and export share.

Optional bilinear resize to `DataConfig.image_size`, the normalisation
`(pixels / 255 - mean) / std`, optional grayscale -> 3-channel repeat for
`DataConfig.channels`. The input pipeline (`sokd_tf/data/pipeline.py`) applies it per
batch; the exporters (`sokd_tf/export/preprocess.py`) fold it into the served graphs.

Reference: docs/METHOD.md, "Data".
"""

from __future__ import annotations

import tensorflow as tf

from sokd_tf.data.info import DatasetInfo
from sokd_tf.errors import ConfigError


def normalize(pixels: tf.Tensor, mean, std) -> tf.Tensor:
    """`(pixels / 255 - mean) / std` per channel, as float32.

    Args:
      pixels: uint8 or float `[..., channels]` raw pixel values in [0, 255].
      mean, std: per-channel statistics of [0, 1] pixels, length `channels`.

    Returns:
      float32 tensor of the same shape.
    """
    pixels = tf.cast(pixels, tf.float32)
    mean = tf.constant(mean, tf.float32)
    std = tf.constant(std, tf.float32)
    return (pixels / 255.0 - mean) / std


def model_inputs(pixels: tf.Tensor, info: DatasetInfo) -> tf.Tensor:
    """Raw pixels -> what the models see: resize, normalise, repeat grayscale.

    Steps: bilinear resize (no antialiasing, so LiteRT's builtin RESIZE_BILINEAR runs
    it) from `info.raw_image_shape` to `info.image_shape`'s height and width when they
    differ; `(pixels / 255 - mean) / std` with the raw channels' statistics; a
    1-channel image repeated to `info.image_shape`'s 3 channels when asked. Without a
    resize or channel change this is exactly `normalize`.

    Args:
      pixels: `[batch, H, W, C]` raw pixels in [0, 255] (uint8 or float),
        `(H, W, C) = info.raw_image_shape`.
      info: the dataset facts.

    Returns:
      float32 `[batch, h, w, c]`, `(h, w, c) = info.image_shape`.
    """
    height, width, channels = info.image_shape
    pixels = tf.cast(pixels, tf.float32)
    if tuple(info.raw_image_shape[:2]) != (height, width):
        pixels = tf.image.resize(pixels, (height, width), method="bilinear", antialias=False)
    normalized = normalize(pixels, info.mean, info.std)
    if info.raw_image_shape[-1] != channels:
        normalized = tf.concat([normalized] * channels, axis=-1)
    return normalized


def model_image_shape(raw_image_shape, image_size: int | None, channels: int | None,
                      name: str = "the dataset") -> tuple[int, int, int]:
    """The model-side `(H, W, C)` for raw images and the DataConfig's resize/channels.

    Raises:
      ConfigError: a channel conversion other than grayscale -> 3 channels.
    """
    height, width, raw_channels = (int(d) for d in raw_image_shape)
    if image_size is not None:
        height = width = int(image_size)
    if channels is None or channels == raw_channels:
        return height, width, raw_channels
    if raw_channels == 1 and channels == 3:
        return height, width, 3
    raise ConfigError(
        f"data.channels={channels} cannot be applied to {name!r}, whose images have "
        f"{raw_channels} channel(s): only grayscale -> 3 channels (--channels=3 on 1-channel "
        f"data) is converted"
    )
