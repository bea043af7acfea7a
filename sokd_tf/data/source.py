"""What every data source hands to the pipeline: validated raw splits.

A split is held either in memory (uint8 numpy arrays, the default and the fast path) or
as a factory of a streamed `tf.data.Dataset` of single examples (file sources with
`cache=False`, for data that does not fit in memory). Sources validate their input fully
before returning, so the pipeline never meets a malformed example.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from sokd_tf.errors import DataError


@dataclasses.dataclass(frozen=True)
class SourceSplit:
    """One split of raw examples.

    Attributes:
      size: number of examples.
      images: uint8 `[size, height, width, channels]` when held in memory, else None.
      labels: int32 `[size]` (always in memory: they are small and needed for the
        hold-out and checks).
      stream: when `images` is None, a function returning a `tf.data.Dataset` of
        `(uint8 image [height, width, channels], int32 label)` in the split's fixed order.
    """

    size: int
    labels: np.ndarray
    images: np.ndarray | None = None
    stream: Callable[[], tf.data.Dataset] | None = None

    @property
    def in_memory(self) -> bool:
        return self.images is not None


@dataclasses.dataclass(frozen=True)
class SourceData:
    """Validated raw data of one dataset, as produced by a source module.

    Attributes:
      name: dataset label.
      class_names: one name per class; `len(class_names)` is the class count.
      image_shape: (height, width, channels).
      splits: "train" and "test" (more are ignored).
      mean, std: per-channel statistics of the training split on [0, 1] pixels when the
        source knows them (a converter's metadata file), else None.
    """

    name: str
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]
    splits: dict[str, SourceSplit]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


def check_labels(labels: np.ndarray, num_classes: int, where: Callable[[int], str]) -> None:
    """Raises DataError naming the first label outside [0, num_classes).

    Args:
      labels: integer labels `[n]`.
      num_classes: class count.
      where: maps an example position to a description ("record 7 of file x").
    """
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        position = int(bad[0])
        raise DataError(
            f"{where(position)}: label {int(labels[position])} is outside [0, {num_classes}) "
            f"({bad.size} bad label(s) in total)"
        )


def check_split_sizes(name: str, splits: dict[str, SourceSplit]) -> None:
    """Raises DataError when a split is empty."""
    for split, data in splits.items():
        if data.size == 0:
            raise DataError(f"dataset {name!r}: split {split!r} is empty (expected >= 1 image)")
