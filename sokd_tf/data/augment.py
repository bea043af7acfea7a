"""Training augmentation on whole batches, driven by stateless random ops.

The augmentation of a batch depends only on the seed it is given (the pipeline derives
it from (seed, epoch, batch index)). Two kinds (`DataConfig.augmentation`):

* `pad_crop_flip`: reflect-pad -> random crop -> random flip (the CIFAR recipe), one
  vectorised gather per image axis. Padding is never materialised: a crop window that
  reaches into the padding reads the reflected pixel directly, which is exactly what
  `tf.pad(mode="REFLECT")` followed by a crop produces.
* `random_resized_crop`: Inception/ImageNet-style random-resized crop -> random flip,
  one batched `tf.image.crop_and_resize`.

Reference: docs/METHOD.md, "Data" (the official CIFAR augmentation: reflect-pad 4, crop,
flip).
"""

from __future__ import annotations

import math

import tensorflow as tf


def _reflect(index: tf.Tensor, size: int) -> tf.Tensor:
    """Maps indices in [-size + 1, 2 * size - 2] onto [0, size) by edge reflection."""
    index = tf.abs(index)
    return tf.where(index > size - 1, 2 * (size - 1) - index, index)


def pad_crop_flip(
    images: tf.Tensor, seed: tf.Tensor, *, pad: int, flip: bool
) -> tf.Tensor:
    """Randomly crops the reflect-padded images back to their size and flips them.

    Each image gets its own crop offset in [0, 2 * pad] per axis (relative to the padded
    image) and, when `flip`, a horizontal flip with probability 1/2. Works on any dtype
    (the pipeline augments uint8 pixels, before normalisation).

    Args:
      images: `[batch, height, width, channels]`, static height and width.
      seed: int32/int64 `[2]` stateless seed.
      pad: reflect padding on each side; 0 = no crop. Must be < height and < width.
      flip: whether to flip horizontally at random.

    Returns:
      `[batch, height, width, channels]`, same dtype as `images`.
    """
    if pad == 0 and not flip:
        return images
    height, width = images.shape[1], images.shape[2]
    if pad >= height or pad >= width:
        raise ValueError(f"pad={pad} must be smaller than the image size {height}x{width}")
    batch = tf.shape(images)[0]
    offsets = tf.random.stateless_uniform(
        [batch, 2], seed=seed, minval=0, maxval=2 * pad + 1, dtype=tf.int32
    )
    rows = offsets[:, :1] - pad + tf.range(height)[None, :]  # [batch, height]
    columns = tf.range(width)[None, :]
    if flip:
        flip_seed = tf.random.experimental.stateless_fold_in(seed, 1)
        flipped = tf.random.stateless_uniform([batch, 1], seed=flip_seed) < 0.5
        columns = tf.where(flipped, width - 1 - columns, columns)  # [batch, width]
    columns = offsets[:, 1:] - pad + columns
    rows = _reflect(rows, height)
    columns = _reflect(columns, width)
    images = tf.gather(images, rows, axis=1, batch_dims=1)
    return tf.gather(images, columns, axis=2, batch_dims=1)


def random_resized_crop_flip(
    images: tf.Tensor, seed: tf.Tensor, *, flip: bool,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tf.Tensor:
    """Inception-style random-resized crop back to the images' size, then a random flip.

    Each image gets a box covering a fraction `U(scale)` of its area with aspect ratio
    `exp(U(log ratio))` (relative to the image's own), clipped to the image and placed
    uniformly; the box is resized bilinearly to the image's height and width. A flip
    mirrors the box (`tf.image.crop_and_resize` with x1 > x2), so flipping costs nothing.
    Unlike Inception's 10 rejection-sampling attempts, an oversized box is clipped.

    Args:
      images: `[batch, height, width, channels]` in [0, 255], static height and width.
      seed: int32/int64 `[2]` stateless seed.
      flip: whether to flip horizontally at random.
      scale: range of the box's area fraction.
      ratio: range of the box's width/height ratio (relative to the image's).

    Returns:
      float32 `[batch, height, width, channels]`.
    """
    height, width = images.shape[1], images.shape[2]
    batch = tf.shape(images)[0]
    draws = tf.random.stateless_uniform([batch, 4], seed=seed)
    area = float(scale[0]) + float(scale[1] - scale[0]) * draws[:, 0]
    low, high = math.log(ratio[0]), math.log(ratio[1])
    log_ratio = low + (high - low) * draws[:, 1]
    box_width = tf.minimum(tf.sqrt(area * tf.exp(log_ratio)), 1.0)
    box_height = tf.minimum(tf.sqrt(area / tf.exp(log_ratio)), 1.0)
    top = (1.0 - box_height) * draws[:, 2]
    left = (1.0 - box_width) * draws[:, 3]
    x1, x2 = left, left + box_width
    if flip:
        flip_seed = tf.random.experimental.stateless_fold_in(seed, 1)
        flipped = tf.random.stateless_uniform([batch], seed=flip_seed) < 0.5
        x1, x2 = tf.where(flipped, x2, x1), tf.where(flipped, x1, x2)
    # Normalised corners: 0 and 1 are the first and last pixel centres, so the box
    # [0, 0, 1, 1] gives back the image itself.
    boxes = tf.stack([top, x1, top + box_height, x2], axis=1)
    return tf.image.crop_and_resize(tf.cast(images, tf.float32), boxes,
                                    tf.range(batch), (height, width), method="bilinear")
