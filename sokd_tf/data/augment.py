"""Training augmentation on whole batches: reflect-pad -> random crop -> random flip.

Everything is one vectorised gather per image axis, driven by stateless random ops, so
the augmentation of a batch depends only on the seed it is given (the pipeline derives
it from (seed, epoch, batch index)). Padding is never materialised: a crop window that
reaches into the padding reads the reflected pixel directly, which is exactly what
`tf.pad(mode="REFLECT")` followed by a crop produces.

Reference: docs/METHOD.md, "Data" (the official CIFAR augmentation: reflect-pad 4, crop,
flip).
"""

from __future__ import annotations

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
