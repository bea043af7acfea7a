"""What every data source hands to the pipeline: checked raw splits.

A split's images are held in memory (uint8 numpy arrays: the IDX source, and file
sources once the pipeline caches them) and/or described by a `RecordSplit` (file
sources: where each example lives, decoded and checked inside `tf.data` when streamed;
see `records.py`). Labels are always in memory: sources read them in one cheap pass and
check them before returning, together with everything else that needs no decoding
(missing files, empty splits, the first image's shape).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from sokd_tf.data.records import RecordSplit, full_permutation
from sokd_tf.errors import DataError


@dataclasses.dataclass(frozen=True)
class SourceSplit:
    """One split of raw examples.

    Attributes:
      size: number of examples.
      labels: int32 `[size]`, in the split's file order.
      images: uint8 `[size, height, width, channels]` when held in memory, else None.
      records: the files holding the examples (file sources), else None. When set, it
        also fixes the training order, in memory or not (`RecordSplit.epoch_indices`).
    """

    size: int
    labels: np.ndarray
    images: np.ndarray | None = None
    records: RecordSplit | None = None

    def __post_init__(self):
        if self.images is None and self.records is None:
            raise ValueError("a SourceSplit needs images or records")

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    def epoch_indices(self, epoch_seed: tf.Tensor, window_mb: float) -> tf.data.Dataset:
        """Example indices of the epoch seeded by `epoch_seed` (int64 `[2]`, (seed, e)).

        A full permutation in memory; a file split's own order otherwise (`records.py`).
        """
        if self.records is not None:
            return self.records.epoch_indices(epoch_seed, window_mb)
        return tf.data.Dataset.from_tensor_slices(full_permutation(self.size, epoch_seed))

    def subset(self, mask: np.ndarray) -> SourceSplit:
        """The examples selected by bool `mask` `[size]`, in their relative order."""
        return SourceSplit(
            size=int(mask.sum()), labels=self.labels[mask],
            images=None if self.images is None else self.images[mask],
            records=None if self.records is None else self.records.subset(mask))

    def cached(self) -> SourceSplit:
        """This split with its images decoded into memory (checked; DataError if bad)."""
        if self.in_memory:
            return self
        return dataclasses.replace(self, images=self.records.load_images())


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
