"""Decoding and checking encoded images (PNG/JPEG/BMP/GIF bytes) shared by file sources.

One parallel `tf.data` pass decodes every image of a split and records its shape; a
record that does not decode, or whose shape differs from the others (or from the
expected shape), becomes a DataError naming that record. A second, dense pass keeps the
pixels when the split is cached in memory.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf

from sokd_tf.errors import DataError

_CHUNK = 4096


def decode_image(encoded: tf.Tensor, channels: int = 0) -> tf.Tensor:
    """Decodes PNG/JPEG/BMP/GIF bytes to uint8 `[height, width, channels]`."""
    return tf.io.decode_image(encoded, channels=channels, dtype=tf.uint8,
                              expand_animations=False)


def _decode_error(encoded: tf.data.Dataset, position: int) -> str:
    raw = next(iter(encoded.skip(position).take(1)))
    try:
        decode_image(raw)
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as error:
        return error.message.splitlines()[0]
    return "decoding failed"


def check_images(
    encoded: tf.data.Dataset,
    size: int,
    describe: Callable[[int], str],
    expected_shape: tuple[int, int, int] | None = None,
    expected_from: str = "the dataset metadata",
    *,
    keep_pixels: bool = False,
) -> tuple[tuple[int, int, int], np.ndarray | None]:
    """Decodes every image once, checks that all share one shape, optionally keeps them.

    Args:
      encoded: `tf.data.Dataset` of scalar string tensors (encoded images), fixed order.
      size: number of elements of `encoded`.
      describe: maps a position to a description of the record ("file x, record 3").
      expected_shape: (height, width, channels) every image must have; None = the shape
        of the first image.
      expected_from: where `expected_shape` comes from, for the error message.
      keep_pixels: also return the decoded images.

    Returns:
      The common (height, width, channels) and, when `keep_pixels`, the uint8 images
      `[size, height, width, channels]` (else None).

    Raises:
      DataError: naming the first undecodable or mismatched image.
    """
    # Shapes first, pixels in a second dense pass: cheaper than one ragged pass.
    shapes = (
        encoded.enumerate()
        .map(lambda position, raw: (position, tf.shape(decode_image(raw))),
             num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .ignore_errors()
        .batch(_CHUNK)
    )
    positions, sizes = [], []
    for chunk_positions, chunk_shapes in shapes.as_numpy_iterator():
        positions.append(chunk_positions)
        sizes.append(chunk_shapes)
    positions = np.concatenate(positions) if positions else np.zeros([0], np.int64)
    sizes = np.concatenate(sizes) if sizes else np.zeros([0, 3], np.int32)
    if len(positions) < size:
        missing = np.setdiff1d(np.arange(size), positions)
        position = int(missing[0])
        raise DataError(
            f"{describe(position)}: undecodable image ({_decode_error(encoded, position)}); "
            f"expected PNG, JPEG, BMP or GIF bytes ({len(missing)} undecodable in total)"
        )
    reference = np.asarray(expected_shape if expected_shape is not None else sizes[0])
    wrong = np.flatnonzero(np.any(sizes != reference[None, :], axis=1))
    if wrong.size:
        position = int(positions[wrong[0]])
        source = expected_from if expected_shape is not None else describe(0)
        raise DataError(
            f"{describe(position)}: image of shape {tuple(int(d) for d in sizes[wrong[0]])} "
            f"(height, width, channels), expected {tuple(int(d) for d in reference)} as in "
            f"{source}; all images of a dataset must share one size and channel count "
            f"({wrong.size} mismatched in total)"
        )
    shape = tuple(int(d) for d in reference)
    if not keep_pixels:
        return shape, None
    chunks = list(decode_dataset(encoded, shape).batch(_CHUNK).as_numpy_iterator())
    return shape, np.concatenate(chunks)


def decode_dataset(encoded: tf.data.Dataset, image_shape: tuple[int, int, int]) -> tf.data.Dataset:
    """Maps encoded images to uint8 `[height, width, channels]` of a known shape."""
    return encoded.map(
        lambda raw: tf.ensure_shape(decode_image(raw, image_shape[-1]), image_shape),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
