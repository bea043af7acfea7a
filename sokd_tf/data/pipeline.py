"""The one input pipeline: `load_dataset(DataConfig) -> ImageDataset`.

Every training, evaluation and export path reads images through `ImageDataset`:
`train_batches` (endless, seeded, augmented), `eval_batches` (finite, fixed order),
`raw_images` (uint8 pixels for export calibration) and `model_inputs` (the single
definition of raw pixels -> model input, `sokd_tf/data/inputs.py`; exporters fold the
same function into their graphs, so served models take the raw images).

Determinism: the order and augmentation of training epoch e depend only on (seed, e):
the permutation and every augmentation draw are stateless random ops seeded from
(seed, e) (and the batch index), so a run resumed at epoch e sees exactly the batches an
uninterrupted run sees in epoch e. Each epoch is batched on its own, so it ends with its
own partial batch and `steps_per_epoch` is exact. The IDX source's in-memory splits and
image folders are permuted by index, a full shuffle. TFRecord and tfds splits, which can
only be read front to back, are permuted the same way when their encoded records fit
`DataConfig.shuffle_window_mb`; larger ones get a seeded shard order, a deterministic
interleave over shards and a seeded permutation within windows of that size
(`records.py`), a shuffle only as good as the window: store such files in shuffled order
(the converters keep the source's order).

Cached or streamed (file sources): `DataConfig.cache` "auto" keeps the decoded images in
memory when all splits together fit `cache_budget_mb`, else streams them: read, decoded,
checked and augmented inside `tf.data` every epoch, nothing decoded up front. The choice
is logged with the estimate and the budget. Both paths follow the same order of example
indices and the same augmentation seeds, so they give identical batches; a streamed image
that does not decode, or has another shape, fails the iteration with a DataError naming
its file and record (`records.data_errors`).

Validation hold-out: `validation_size` images are drawn from the source's train split
by a permutation seeded with `seed`; both parts keep their original relative order.

Normalisation statistics ("dataset" mode): known constants for fashion_mnist, cifar10
and cifar100 (tfds or IDX sources), else the converter's `dataset_info.json`, else
computed from the source's full train split (before the hold-out, so the statistics are
a property of the dataset, not of the seed).

Progress: `load_dataset` logs one line per step (source read and validated, statistics,
hold-out) through Python logging at INFO, logger `sokd_tf.data.pipeline`.

Reference: docs/METHOD.md, "Data" and "Protocol".
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import tensorflow as tf

from sokd_tf import config as config_lib
from sokd_tf.data import fashion_mnist, image_folder, tfds_source, tfrecord
from sokd_tf.data.augment import pad_crop_flip, random_resized_crop_flip
from sokd_tf.data.info import DatasetInfo
from sokd_tf.data.inputs import model_image_shape, model_inputs, normalize
from sokd_tf.data.records import data_errors
from sokd_tf.data.source import SourceData, SourceSplit
from sokd_tf.errors import ConfigError, DataError

DEFAULT_SEED = 8888
EVAL_SPLITS = ("train", "validation", "test")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
KNOWN_STATISTICS = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_MAX_EPOCHS = 2**62
logger = logging.getLogger(__name__)


class ImageDataset:
    """A validated dataset plus the pipelines that feed training, evaluation and export.

    Build it with `load_dataset`. Attributes: `info` (DatasetInfo).
    """

    def __init__(
        self,
        info: DatasetInfo,
        splits: dict[str, SourceSplit],
        *,
        pad: int = 4,
        flip: bool = True,
        deterministic: bool = True,
        drop_remainder: bool = False,
        shuffle_window_mb: float = config_lib.DataConfig.shuffle_window_mb,
        augmentation: str = config_lib.DataConfig.augmentation,
    ):
        height, width = info.image_shape[:2]
        if augmentation == "pad_crop_flip" and pad >= min(height, width):
            raise ConfigError(f"data.pad={pad} must be smaller than the image size "
                              f"{height}x{width}")
        self.info = info
        self._splits = splits
        self._pad = pad
        self._flip = flip
        self._deterministic = deterministic
        self._drop_remainder = drop_remainder
        self._shuffle_window_mb = shuffle_window_mb
        self._augmentation = augmentation
        self._tensors: dict[str, tuple[tf.Tensor, tf.Tensor]] = {}

    def is_cached(self, split: str) -> bool:
        """True when `split`'s decoded images are held in memory (else streamed)."""
        return self._split(split).in_memory

    def normalize(self, pixels: tf.Tensor) -> tf.Tensor:
        """Normalises raw pixels (uint8 or float in [0, 255]) with this dataset's mean/std."""
        return normalize(pixels, self.info.mean, self.info.std)

    def model_inputs(self, pixels: tf.Tensor) -> tf.Tensor:
        """Raw pixels `[b, H, W, C]` -> model inputs `[b, *info.image_shape]`; see
        `model_inputs`."""
        return model_inputs(pixels, self.info)

    def steps_per_epoch(self, batch_size: int, drop_remainder: bool | None = None) -> int:
        """Training batches per epoch: ceil(n / batch), or floor when dropping the remainder."""
        drop = self._drop_remainder if drop_remainder is None else drop_remainder
        size = self._splits["train"].size
        steps = size // batch_size if drop else math.ceil(size / batch_size)
        if steps == 0:
            raise DataError(f"train split of {size} images gives no full batch of "
                            f"{batch_size} with drop_remainder=True")
        return steps

    def _split(self, split: str) -> SourceSplit:
        if split not in EVAL_SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {list(EVAL_SPLITS)}")
        if split not in self._splits:
            raise DataError(f"dataset {self.info.name!r} has no {split!r} split "
                            f"(data.validation_size=0 holds none out)")
        return self._splits[split]

    def _in_memory(self, split: str) -> tuple[tf.Tensor, tf.Tensor]:
        if split not in self._tensors:
            data = self._splits[split]
            self._tensors[split] = (tf.constant(data.images), tf.constant(data.labels))
        return self._tensors[split]

    def _options(self, dataset: tf.data.Dataset) -> tf.data.Dataset:
        options = tf.data.Options()
        options.deterministic = self._deterministic
        return dataset.with_options(options)

    def train_batches(
        self,
        batch_size: int,
        *,
        seed: int,
        first_epoch: int = 0,
        augment: bool = True,
        drop_remainder: bool | None = None,
        steps_per_epoch: int | None = None,
    ) -> tf.data.Dataset:
        """Endless training batches, epoch after epoch from `first_epoch`.

        Args:
          batch_size: images per batch.
          seed: seed of the order and the augmentation.
          first_epoch: epoch of the first batch (resuming); epoch e is the same whatever
            epoch the pipeline started at.
          augment: apply the training augmentation (`DataConfig.augmentation`: reflect-pad
            `pad` -> random crop -> random horizontal flip, or random-resized crop ->
            flip), on the raw images before any resize.
          drop_remainder: drop each epoch's last partial batch; None = the DataConfig's.
          steps_per_epoch: keep only the first this many batches of every epoch (short
            runs, `TrainConfig.steps_per_epoch`), at most one full pass so data epochs
            stay aligned with Keras epochs; None = whole epochs. Epoch e still depends
            only on (seed, e).

        Returns:
          `tf.data.Dataset` of `(images float32 [b, *info.image_shape] model inputs,
          labels int32 [b])`.
        """
        drop = self._drop_remainder if drop_remainder is None else drop_remainder
        full_steps = self.steps_per_epoch(batch_size, drop)
        if steps_per_epoch is not None and not 1 <= steps_per_epoch <= full_steps:
            # A larger cap would let a Keras epoch run into the next data epoch.
            raise DataError(f"steps_per_epoch={steps_per_epoch} must be in [1, {full_steps}] "
                            f"(batches in one pass over the train split)")
        train = self._splits["train"]
        base_seed = tf.constant(seed, tf.int64)
        window = self._shuffle_window_mb

        if train.in_memory:
            images, labels = self._in_memory("train")

            def epoch_batches(epoch):
                epoch_seed = tf.stack([base_seed, epoch])
                return _with_seeds(
                    train.epoch_indices(epoch_seed, window).batch(batch_size, drop), epoch_seed)

            def assemble(batch_seed, indices):
                return batch_seed, tf.gather(images, indices), tf.gather(labels, indices)
        else:
            labels = tf.constant(train.labels)

            def epoch_batches(epoch):
                epoch_seed = tf.stack([base_seed, epoch])
                examples = train.records.epoch_images(epoch_seed, window)
                return _with_seeds(examples.batch(batch_size, drop), epoch_seed)

            def assemble(batch_seed, batch):
                indices, batch_images = batch
                return batch_seed, batch_images, tf.gather(labels, indices)

        def finish(batch_seed, *batch):
            batch_seed, batch_images, batch_labels = assemble(batch_seed, *batch)
            if augment and self._augmentation == "random_resized_crop":
                batch_images = random_resized_crop_flip(batch_images, batch_seed,
                                                        flip=self._flip)
            elif augment:
                batch_images = pad_crop_flip(batch_images, batch_seed,
                                             pad=self._pad, flip=self._flip)
            return self.model_inputs(batch_images), tf.cast(batch_labels, tf.int32)

        def capped_epoch_batches(epoch):
            batches = epoch_batches(epoch)
            return batches if steps_per_epoch is None else batches.take(steps_per_epoch)

        dataset = (
            tf.data.Dataset.range(first_epoch, _MAX_EPOCHS)
            .flat_map(capped_epoch_batches)
            .map(finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=self._deterministic)
            .prefetch(tf.data.AUTOTUNE)
        )
        return self._options(dataset)

    def eval_batches(self, split: str, batch_size: int) -> tf.data.Dataset:
        """Finite batches of `split` ("train", "validation", "test") in fixed order.

        Returns:
          `tf.data.Dataset` of `(images float32 [b, *info.image_shape] model inputs,
          labels int32 [b])`, not augmented, last partial batch kept.
        """
        data = self._split(split)
        if data.in_memory:
            images, labels = self._in_memory(split)
            dataset = tf.data.Dataset.range(data.size).batch(batch_size).map(
                lambda indices: (self.model_inputs(tf.gather(images, indices)),
                                 tf.gather(labels, indices)),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        else:
            labels = tf.constant(data.labels)
            dataset = data.records.fixed_images().batch(batch_size).map(
                lambda indices, batch_images: (self.model_inputs(batch_images),
                                               tf.gather(labels, indices)),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        dataset = dataset.prefetch(tf.data.AUTOTUNE)
        return self._options(dataset)

    def raw_examples(self, split: str) -> tf.data.Dataset:
        """Single raw examples `(uint8 [H, W, C], int32 label)` of `split` in fixed order."""
        data = self._split(split)
        if data.in_memory:
            images, labels = self._in_memory(split)
            return tf.data.Dataset.from_tensor_slices((images, labels))
        labels = tf.constant(data.labels)
        return data.records.fixed_images().map(lambda index, image: (image, labels[index]))

    def raw_images(self, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Raw pixels of `split` in fixed order (export calibration and verification).

        Returns:
          uint8 images `[n, H, W, C]` and int32 labels `[n]`, n = min(limit, split size).
        """
        data = self._split(split)
        count = data.size if limit is None else min(limit, data.size)
        if data.in_memory:
            return data.images[:count], data.labels[:count]
        with data_errors():
            chunks = [images for _, images in
                      data.records.fixed_images().take(count).batch(4096).as_numpy_iterator()]
        return np.concatenate(chunks).astype(np.uint8), data.labels[:count]


def _with_seeds(batches: tf.data.Dataset, epoch_seed: tf.Tensor) -> tf.data.Dataset:
    """Pairs each batch of an epoch with its augmentation seed, from (seed, epoch, index)."""
    augment_seed = tf.random.experimental.stateless_fold_in(epoch_seed, 1)
    return batches.enumerate().map(
        lambda index, batch: (tf.random.experimental.stateless_fold_in(augment_seed, index),
                              batch))


def _hold_out(split: SourceSplit, validation_size: int, seed: int
              ) -> tuple[SourceSplit, SourceSplit]:
    """Splits `split` into (train, validation) with a permutation seeded by `seed`."""
    if validation_size >= split.size:
        raise DataError(f"data.validation_size={validation_size} leaves no training images "
                        f"(the train split holds {split.size}); expected < {split.size}")
    chosen = np.random.default_rng(seed).permutation(split.size)[:validation_size]
    is_validation = np.zeros(split.size, bool)
    is_validation[chosen] = True
    return split.subset(~is_validation), split.subset(is_validation)


def _statistics(split: SourceSplit, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of [0, 1] pixels over every pixel of `split` (exact)."""
    histograms = np.zeros((channels, 256), np.int64)
    if split.in_memory:
        chunks = (split.images[i:i + 4096] for i in range(0, split.size, 4096))
    else:
        chunks = (images for _, images in
                  split.records.fixed_images().batch(4096).as_numpy_iterator())
    with data_errors():
        for chunk in chunks:
            for channel in range(channels):
                histograms[channel] += np.bincount(chunk[..., channel].ravel(), minlength=256)
    values = np.arange(256) / 255.0
    counts = histograms.sum(axis=1)
    mean = histograms @ values / counts
    variance = (histograms * np.square(values[None, :] - mean[:, None])).sum(axis=1) / counts
    std = np.sqrt(variance)
    std = np.where(std > 0, std, 1.0)  # A constant channel is left unscaled.
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _load_source(data_config: config_lib.DataConfig) -> SourceData:
    source, data_dir = data_config.source, data_config.data_dir
    if source == "fashion_mnist":
        return fashion_mnist.load(data_dir or config_lib.FASHION_MNIST_DIR)
    if source == "tfds":
        return tfds_source.load(data_config.name, data_dir)
    if data_dir is None:
        raise ConfigError(f"data.data_dir is required for data.source={source!r}")
    if source == "tfrecord":
        return tfrecord.load(data_dir, name=data_config.name)
    return image_folder.load(data_dir, name=data_config.name)


def _cache_splits(source: SourceData, data_config: config_lib.DataConfig
                  ) -> dict[str, SourceSplit]:
    """The source's splits, decoded into memory when `data_config.cache` asks for it.

    Logs one line: the choice, the decoded size of all file-backed splits and the budget.
    """
    streamable = {split: data for split, data in source.splits.items() if not data.in_memory}
    if not streamable:
        return dict(source.splits)
    needed = sum(data.records.decoded_bytes() for data in streamable.values())
    budget = data_config.cache_budget_mb * 2**20
    mode = data_config.cache
    cache = mode == "always" or (mode == "auto" and needed <= budget)
    if mode == "auto":
        why = (f"{needed / 2**20:,.1f} MiB of decoded images {'fit' if cache else 'exceed'} "
               f"the {data_config.cache_budget_mb:,g} MiB budget (data.cache_budget_mb)")
    else:
        why = f"data.cache={mode!r} ({needed / 2**20:,.1f} MiB of decoded images)"
    logger.info("[data] %s: %s %s", source.name,
                "caching decoded images in memory:" if cache else
                "streaming (decode, check, augment inside tf.data every epoch):", why)
    if not cache:
        return dict(source.splits)
    return {split: data.cached() for split, data in source.splits.items()}


def load_dataset(data_config: config_lib.DataConfig, seed: int = DEFAULT_SEED) -> ImageDataset:
    """Loads, validates and wraps the dataset described by `data_config`.

    Args:
      data_config: source, directory, normalisation, augmentation and feeding options.
      seed: seed of the validation hold-out (the training order is seeded separately,
        by `train_batches(seed=...)`).

    Returns:
      ImageDataset with splits "train", "test" and, when `validation_size > 0`,
      "validation".

    Raises:
      DataError: missing or malformed data (the message names the file/record/value).
      ConfigError: settings that do not fit the data (e.g. "cifar10" normalisation on
        a dataset without 3 channels, `channels` other than grayscale -> 3).
    """
    logger.info("[data] reading %s (source %s) from %s", data_config.name, data_config.source,
                data_config.data_dir or "the source's default location")
    return dataset_from_source(_load_source(data_config), data_config, seed)


def dataset_from_source(source: SourceData, data_config: config_lib.DataConfig,
                        seed: int = DEFAULT_SEED) -> ImageDataset:
    """`load_dataset` for raw splits read elsewhere (e.g. a TFX Trainer's examples).

    Applies `data_config`'s normalisation, validation hold-out and feeding options to
    `source` exactly as `load_dataset` does; `data_config.source` only selects the
    known statistics of the "fashion_mnist" and "tfds" sources.
    """
    image_shape = model_image_shape(source.image_shape, data_config.image_size,
                                    data_config.channels, source.name)
    channels = source.image_shape[-1]
    logger.info(
        "[data] %s: %s images of %s, %d classes, labels checked", source.name,
        ", ".join(f"{split} {data.size}" for split, data in source.splits.items()),
        "x".join(map(str, source.image_shape)), len(source.class_names),
    )
    source = dataclasses.replace(source, splits=_cache_splits(source, data_config))
    if data_config.normalization == "none":
        mean, std = (0.0,) * channels, (1.0,) * channels
    elif data_config.normalization == "cifar10":
        if channels != 3:
            raise ConfigError(f"data.normalization='cifar10' needs 3-channel images; "
                              f"{source.name!r} has {channels} channel(s)")
        mean, std = CIFAR10_MEAN, CIFAR10_STD
    elif (data_config.source in ("fashion_mnist", "tfds") and source.name in KNOWN_STATISTICS
          and len(KNOWN_STATISTICS[source.name][0]) == channels):
        mean, std = KNOWN_STATISTICS[source.name]
    elif source.mean is not None and len(source.mean) == channels:
        mean, std = source.mean, source.std
    else:
        logger.info("[data] computing normalisation statistics over %d training images",
                    source.splits["train"].size)
        mean, std = _statistics(source.splits["train"], channels)

    splits = {"train": source.splits["train"]}
    if data_config.validation_size > 0:
        splits["train"], splits["validation"] = _hold_out(
            source.splits["train"], data_config.validation_size, seed)
        logger.info("[data] held out %d validation images (seed %d): %d left to train on",
                    splits["validation"].size, seed, splits["train"].size)
    splits["test"] = source.splits["test"]
    info = DatasetInfo(
        name=source.name,
        num_classes=len(source.class_names),
        image_shape=image_shape,
        class_names=tuple(source.class_names),
        split_sizes={split: data.size for split, data in splits.items()},
        mean=tuple(mean),
        std=tuple(std),
        raw_image_shape=tuple(int(d) for d in source.image_shape),
    )
    return ImageDataset(
        info,
        splits,
        pad=data_config.pad,
        flip=data_config.flip,
        deterministic=data_config.deterministic,
        drop_remainder=data_config.drop_remainder,
        shuffle_window_mb=data_config.shuffle_window_mb,
        augmentation=data_config.augmentation,
    )
