"""Splits stored in files: one fixed order, seeded epoch orders, checks inside tf.data.

A `RecordSplit` describes where a file source's examples live, without their pixels:
either in sequential shards (TFRecord files, a tfds split: records read front to back)
or one example per file (an image folder: any file can be read at any time). It gives
the two orders the pipeline needs, as `tf.data` datasets of example indices (the
example's rank among the split's kept examples, in file order):

* the fixed order (evaluation, export calibration, caching): file order;
* the order of training epoch e, a function of (seed, e) alone:
  - one example per file: a full seeded permutation (the in-memory order);
  - sequential shards whose encoded records fit the shuffle window
    (`DataConfig.shuffle_window_mb`): the same full permutation, applied to the whole
    split read in file order as one window;
  - larger sequential shards: a seeded permutation of the shards, a deterministic
    interleave of `SHARD_CYCLE` shards at a time (one record from each in turn), then a
    seeded permutation inside each window of as many consecutive records as fit the
    window's memory (estimated from `record_bytes`).
  No record is ever read out of its file's order, so streaming costs no random access.

The same order drives the cached path (gathering from decoded images in memory) and the
streamed path (reading, decoding and checking the records inside `tf.data`), so both give
identical batches for the same seed and epoch.

Checks inside the pipeline: each streamed example carries its index. An image that
does not decode is dropped by `ignore_errors` and then missed by a comparison with the
expected index order; an image of another shape is flagged by its decoder. Either way a
`tf.debugging.Assert` fails with a message naming the file (and record) between
`ERROR_START` and `ERROR_END`; `data_errors()` turns that `tf.errors.OpError` into a
`DataError` with the same message wherever the dataset is iterated (Keras `fit`,
`evaluate`, numpy iteration).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from sokd_tf.errors import DataError

SHARD_CYCLE = 8
ERROR_START = "<<sokd_tf DataError>>"
ERROR_END = "<</sokd_tf DataError>>"
_ERROR = re.compile(re.escape(ERROR_START) + "(.*?)" + re.escape(ERROR_END), re.DOTALL)
UNDECODABLE = "undecodable image (decoding failed in the input pipeline); expected PNG, " \
              "JPEG, BMP or GIF bytes"


@contextlib.contextmanager
def data_errors():
    """Turns an input-pipeline check's `tf.errors.OpError` into a DataError (same text).

    Other errors pass through unchanged.
    """
    try:
        yield
    except tf.errors.OpError as error:
        match = _ERROR.search(error.message or "")
        if match is None:
            raise
        raise DataError(match.group(1)) from None


def full_permutation(size: int, epoch_seed: tf.Tensor) -> tf.Tensor:
    """The epoch's permutation of `size` example indices (int64 `[size]`), from (seed, e).

    The order of every in-memory split, and of file splits read as one window.
    """
    order = tf.random.experimental.stateless_shuffle(
        tf.range(size), seed=tf.random.experimental.stateless_fold_in(epoch_seed, 0))
    return tf.cast(order, tf.int64)


@dataclasses.dataclass(frozen=True)
class RecordSplit:
    """One split's examples in files.

    Attributes:
      names: one name per file (its path), in the split's file order.
      counts: records per file (all 1 for one example per file).
      image_shape: (height, width, channels) every image must have.
      shape_from: where `image_shape` comes from, for error messages.
      decode: encoded payload (scalar tensor) -> uint8 image `[h, w, c]` of whatever
        shape it has (raising in-graph when it does not decode).
      read: sequential shards: file index (int64 scalar tensor) -> `tf.data.Dataset` of
        the file's payloads in record order; None for one example per file.
      fetch: one example per file: file index (int64 scalar tensor) -> payload.
      record_bytes: estimated encoded bytes per record (sizes the shuffle window).
      keep: bool `[sum(counts)]`, the examples of the split (a validation hold-out keeps
        a subset); None = all.
    """

    names: tuple[str, ...]
    counts: tuple[int, ...]
    image_shape: tuple[int, int, int]
    shape_from: str
    decode: Callable[[tf.Tensor], tf.Tensor]
    read: Callable[[tf.Tensor], tf.data.Dataset] | None = None
    fetch: Callable[[tf.Tensor], tf.Tensor] | None = None
    record_bytes: int = 1
    keep: np.ndarray | None = None

    @property
    def sequential(self) -> bool:
        return self.read is not None

    @property
    def total(self) -> int:
        return int(sum(self.counts))

    @property
    def kept(self) -> np.ndarray:
        """Positions (over all records, file order) of the split's examples, int64."""
        if self.keep is None:
            return np.arange(self.total, dtype=np.int64)
        return np.flatnonzero(self.keep).astype(np.int64)

    @property
    def size(self) -> int:
        return self.total if self.keep is None else int(self.keep.sum())

    def describe(self, position: int) -> str:
        """The file (and record) of global position `position`."""
        if not self.sequential:
            return self.names[position]
        starts = np.cumsum((0, *self.counts))
        index = int(np.searchsorted(starts, position, side="right") - 1)
        return f"{self.names[index]}, record {position - int(starts[index])}"

    def window_records(self, window_mb: float) -> int:
        """Records in one shuffle window of `window_mb` MiB (>= 1)."""
        return max(1, int(window_mb * 2**20 // max(1, self.record_bytes)))

    def subset(self, mask: np.ndarray) -> RecordSplit:
        """The examples selected by bool `mask` over this split's examples (file order)."""
        keep = np.zeros(self.total, bool)
        keep[self.kept[mask]] = True
        return dataclasses.replace(self, keep=keep)

    # --- orders -------------------------------------------------------------------------

    def fixed_indices(self) -> tf.data.Dataset:
        """Example indices in file order: 0, 1, ..., size - 1."""
        return tf.data.Dataset.range(self.size)

    def epoch_indices(self, epoch_seed: tf.Tensor, window_mb: float) -> tf.data.Dataset:
        """Example indices in the order of the epoch seeded by `epoch_seed` (int64 `[2]`).

        Args:
          epoch_seed: int64 `[2]`, (seed, epoch).
          window_mb: the shuffle window's memory (sequential shards only).
        """
        if not self.sequential:
            return tf.data.Dataset.from_tensor_slices(full_permutation(self.size, epoch_seed))
        counts = tf.constant(self.counts, tf.int64)
        return self._sequential(
            lambda shard: tf.data.Dataset.range(counts[shard]).map(lambda record: (record, 0)),
            epoch_seed, window_mb).map(lambda index, _: index)

    def fixed_examples(self) -> tf.data.Dataset:
        """`(index, payload)` in file order."""
        if not self.sequential:
            return self._fetched(self.fixed_indices())
        return self._sequential(self._payloads, None, None)

    def epoch_examples(self, epoch_seed: tf.Tensor, window_mb: float) -> tf.data.Dataset:
        """`(index, payload)` in the order of `epoch_indices(epoch_seed, window_mb)`."""
        if not self.sequential:
            return self._fetched(self.epoch_indices(epoch_seed, window_mb))
        return self._sequential(self._payloads, epoch_seed, window_mb)

    def _payloads(self, shard: tf.Tensor) -> tf.data.Dataset:
        return self.read(shard).enumerate()

    def _fetched(self, indices: tf.data.Dataset) -> tf.data.Dataset:
        files = tf.constant(self.kept)
        return indices.map(lambda index: (index, self.fetch(files[index])),
                           num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def _sequential(self, shard_records, epoch_seed, window_mb) -> tf.data.Dataset:
        """Shards (permuted when `epoch_seed` is given), interleaved, kept, windowed.

        `shard_records(shard)` gives `(record index in the shard, payload)`; the result
        is `(example index, payload)`.
        """
        num_shards = len(self.counts)
        starts = tf.constant(np.cumsum((0, *self.counts))[:-1], tf.int64)
        keep = self.keep if self.keep is not None else np.ones(self.total, bool)
        kept_mask = tf.constant(keep)
        rank = tf.constant(np.cumsum(keep) - 1, tf.int64)  # position -> example index
        shards = tf.range(num_shards, dtype=tf.int64)
        window = None if epoch_seed is None else self.window_records(window_mb)
        one_window = window is not None and window >= self.size
        if epoch_seed is not None and not one_window:
            shards = tf.random.experimental.stateless_shuffle(
                shards, seed=tf.random.experimental.stateless_fold_in(epoch_seed, 2))

        def records(shard):
            return shard_records(shard).map(
                lambda record, payload: (starts[shard] + record, payload))

        examples = tf.data.Dataset.from_tensor_slices(shards).interleave(
            records,
            cycle_length=1 if epoch_seed is None or one_window else min(SHARD_CYCLE, num_shards),
            block_length=1, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        if self.keep is not None:
            examples = examples.filter(lambda position, payload: kept_mask[position])
        examples = examples.map(lambda position, payload: (rank[position], payload))
        if epoch_seed is None:
            return examples
        if one_window:  # File order permuted as an in-memory split is.
            return examples.batch(self.size).map(
                lambda *batch: tuple(tf.gather(part, full_permutation(self.size, epoch_seed))
                                     for part in batch)).unbatch()
        window_seed = tf.random.experimental.stateless_fold_in(epoch_seed, 3)

        def permuted(number, batch):
            order = tf.random.experimental.stateless_shuffle(
                tf.range(tf.shape(batch[0])[0]),
                seed=tf.random.experimental.stateless_fold_in(window_seed, number))
            return tuple(tf.gather(part, order) for part in batch)

        return (examples.batch(window).enumerate()
                .map(lambda number, batch: permuted(number, batch)).prefetch(1).unbatch())

    # --- decoding with checks -----------------------------------------------------------

    def checked(self, expected: tf.data.Dataset, examples: tf.data.Dataset) -> tf.data.Dataset:
        """Decodes `(index, payload)` examples and checks them against `expected` indices.

        Returns:
          `tf.data.Dataset` of `(index int64, uint8 image [*image_shape])`; iterating it
          fails (see `data_errors`) at the first undecodable or misshapen image.
        """
        shape = tf.constant(self.image_shape, tf.int32)
        image_shape = self.image_shape
        kept = tf.constant(self.kept)
        if self.sequential:
            names = tf.constant(self.names)
            file_of = tf.constant(np.repeat(np.arange(len(self.counts)), self.counts), tf.int64)
            starts = tf.constant(np.cumsum((0, *self.counts))[:-1], tf.int64)

            def where(index):
                position = kept[index]
                file = file_of[position]
                return tf.strings.join([names[file], ", record ",
                                        tf.strings.as_string(position - starts[file])])
        else:
            names = tf.constant(self.names)

            def where(index):
                return names[kept[index]]

        def decode(index, payload):
            image = self.decode(payload)
            got = tf.shape(image)
            ok = tf.reduce_all(tf.equal(got, shape))
            image = tf.cond(ok, lambda: tf.reshape(image, image_shape),
                            lambda: tf.zeros(image_shape, tf.uint8))
            return index, image, got

        decoded = examples.map(decode, num_parallel_calls=tf.data.AUTOTUNE,
                               deterministic=True).ignore_errors()
        # A decoded stream one element short at the end still meets an index to compare.
        end = tf.data.Dataset.from_tensors(
            (tf.constant(-1, tf.int64), tf.zeros(image_shape, tf.uint8), shape))
        expected_shape = "(" + ", ".join(map(str, image_shape)) + ")"

        def check(index, example):
            got_index, image, got = example
            present = tf.equal(index, got_index)
            ok = tf.logical_and(present, tf.reduce_all(tf.equal(got, shape)))

            def message():
                got_shape = tf.strings.join(
                    ["(", tf.strings.reduce_join(tf.strings.as_string(got), separator=", "), ")"])
                reason = tf.cond(present, lambda: tf.strings.join([
                    ": image of shape ", got_shape, " (height, width, channels), expected ",
                    expected_shape, " as in ", self.shape_from, "; all images of a dataset "
                    "must share one size and channel count"]),
                    lambda: tf.constant(": " + UNDECODABLE))
                return tf.strings.join([ERROR_START, where(index), reason, ERROR_END])

            assertion = tf.debugging.Assert(
                ok, [tf.cond(ok, lambda: tf.constant(""), message)])
            with tf.control_dependencies([assertion]):
                return tf.identity(index), tf.identity(image)

        return tf.data.Dataset.zip(expected, decoded.concatenate(end)).map(
            check, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def fixed_images(self) -> tf.data.Dataset:
        """Checked `(index, image)` in file order."""
        return self.checked(self.fixed_indices(), self.fixed_examples())

    def epoch_images(self, epoch_seed: tf.Tensor, window_mb: float) -> tf.data.Dataset:
        """Checked `(index, image)` in the order of epoch `epoch_seed`."""
        return self.checked(self.epoch_indices(epoch_seed, window_mb),
                            self.epoch_examples(epoch_seed, window_mb))

    def load_images(self, chunk: int = 4096) -> np.ndarray:
        """Every image decoded and checked, uint8 `[size, *image_shape]`, file order.

        Raises:
          DataError: naming the first undecodable or misshapen image.
        """
        with data_errors():
            chunks = [images for _, images in
                      self.fixed_images().batch(chunk).prefetch(1).as_numpy_iterator()]
        return np.concatenate(chunks) if chunks else np.zeros((0, *self.image_shape), np.uint8)

    def decoded_bytes(self) -> int:
        """Memory the decoded uint8 images take."""
        return self.size * int(np.prod(self.image_shape))
