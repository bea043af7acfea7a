"""A TFX Trainer's examples (ExampleGen GZIP shards, optionally Transformed) as raw splits.

Reads `train_files` / `eval_files` through TFX's `data_accessor` when given (tfx-bsl's
TFXIO, what TFX's own Trainer modules use), else directly with `tf.data` (GZIP by the
`.gz` suffix, as ExampleGen writes). A TF Transform graph is applied to raw examples,
or skipped when the examples are Transform's own `transformed_examples`. The model's
inputs are two features of the (transformed) examples: the image (encoded bytes, or
pixels `[H, W]` / `[H, W, C]` in [0, 255]) and the integer label.

Reference: docs/BATCH.md, "TFX Trainer module".
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping

import numpy as np
import tensorflow as tf

from sokd_tf.data import decode, tfrecord
from sokd_tf.data.source import SourceData, SourceSplit, check_labels, check_split_sizes
from sokd_tf.errors import DataError

READ_BATCH = 256


def expand(patterns: list[str]) -> list[str]:
    """Sorted files of TFX file patterns (`.../Split-train/*`).

    Raises:
      DataError: a pattern matches no file.
    """
    files = []
    for pattern in patterns:
        matched = sorted(p for p in tf.io.gfile.glob(pattern) if not tf.io.gfile.isdir(p))
        if not matched:
            raise DataError(f"TFX file pattern {pattern!r} matches no files")
        files.extend(matched)
    return files


def examplegen_metadata(patterns: list[str]) -> dict:
    """dataset_info.json beside the `Split-*` directory of the first pattern, else {}.

    `pipelines/make_tfrecords_beam.py` writes one there (class names, statistics).
    """
    root = os.path.dirname(os.path.dirname(patterns[0]))
    return tfrecord.read_metadata(root) if root else {}


def default_feature_spec(image_key: str, label_key: str) -> dict:
    return {image_key: tf.io.FixedLenFeature([], tf.string),
            label_key: tf.io.FixedLenFeature([], tf.int64)}


def lenient_feature_spec(feature_spec: Mapping) -> dict:
    """`feature_spec` with a default value on every FixedLenFeature.

    Serving clients send the image only; the Transform graph's other raw inputs (a raw
    label, say) are then filled with zeros / empty strings instead of failing the parse.
    """
    out = {}
    for key, spec in feature_spec.items():
        if isinstance(spec, tf.io.FixedLenFeature) and spec.default_value is None:
            fill = "" if spec.dtype == tf.string else 0
            shape = [int(d) for d in spec.shape]
            spec = tf.io.FixedLenFeature(spec.shape, spec.dtype,
                                         default_value=np.full(shape, fill).tolist()
                                         if shape else fill)
        out[key] = spec
    return out


def _dense(values) -> tf.Tensor:
    if isinstance(values, tf.SparseTensor):
        fill = "" if values.dtype == tf.string else 0
        return tf.sparse.to_dense(values, default_value=tf.constant(fill, values.dtype))
    if isinstance(values, tf.RaggedTensor):
        return values.to_tensor()
    return values


def _column(features: Mapping, key: str, what: str, where: str) -> np.ndarray:
    if key not in features:
        raise DataError(f"{where}: no feature {key!r} ({what}); features: {sorted(features)}")
    return _dense(features[key]).numpy()


def read_split(
    patterns: list[str],
    *,
    where: str,
    image_key: str,
    label_key: str,
    feature_spec: Mapping,
    schema=None,
    data_accessor=None,
    transform: Callable | None = None,
    limit: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Images (encoded bytes `[n]` or pixels `[n, ...]`) and labels `[n]` of one split.

    Args:
      patterns: TFX file patterns of the split.
      where: the split's description for errors ("train split (pattern)").
      image_key, label_key: features of the model's input and label.
      feature_spec: how to parse the records (without `data_accessor`).
      schema: the TFMD schema handed to `data_accessor.tf_dataset_factory`.
      data_accessor: TFX's DataAccessor, or None to read with tf.data.
      transform: applied to each parsed batch (a Transform layer), or None.
      limit: keep only the first this many examples (TFX's eval_steps * batch).
    """
    if data_accessor is not None:
        from tfx_bsl.public.tfxio import TensorFlowDatasetOptions

        dataset = data_accessor.tf_dataset_factory(
            list(patterns), TensorFlowDatasetOptions(batch_size=READ_BATCH, num_epochs=1,
                                                     shuffle=False), schema)
    else:
        files = expand(patterns)
        dataset = (tf.data.TFRecordDataset(files,
                                           compression_type=tfrecord.compression_type(files))
                   .batch(READ_BATCH)
                   .map(lambda serialized: tf.io.parse_example(serialized, feature_spec)))
    if limit is not None:
        dataset = dataset.take(math.ceil(limit / READ_BATCH))
    if transform is not None:
        dataset = dataset.map(transform)
    images, labels = [], []
    try:
        for batch in dataset:
            images.append(_column(batch, image_key, "the image", where))
            labels.append(_column(batch, label_key, "the label", where))
    except tf.errors.OpError as error:
        raise DataError(f"{where}: unreadable examples "
                        f"({error.message.strip().splitlines()[0]})") from None
    if not images:
        raise DataError(f"{where}: no examples")
    images, labels = np.concatenate(images), np.concatenate(labels)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, _labels(labels, label_key, where)


def _labels(labels: np.ndarray, label_key: str, where: str) -> np.ndarray:
    labels = labels.reshape(len(labels), -1)
    if labels.shape[1] != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: feature {label_key!r} must be one integer class per "
                        f"example, got dtype {labels.dtype} and {labels.shape[1]} value(s)")
    return labels[:, 0].astype(np.int32)


def to_split(images: np.ndarray, labels: np.ndarray, where: str,
             expected_shape: tuple[int, int, int] | None, expected_from: str
             ) -> tuple[tuple[int, int, int], SourceSplit]:
    """Encoded images are decoded and checked (one shape); pixels are checked for [0, 255]."""
    if images.dtype == object or images.dtype.kind in "SU":
        encoded = images.reshape(len(images), -1)
        if encoded.shape[1] != 1:
            raise DataError(f"{where}: expected one encoded image per example, "
                            f"got {encoded.shape[1]}")
        shape, pixels = decode.check_images(
            tf.data.Dataset.from_tensor_slices(encoded[:, 0]), len(encoded),
            lambda position: f"{where}, example {position}", expected_shape, expected_from,
            keep_pixels=True)
    else:
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4:
            raise DataError(f"{where}: image pixels must be [H, W] or [H, W, C] per example, "
                            f"got shape {images.shape[1:]} (reshape them in the "
                            f"preprocessing_fn)")
        if images.size and (images.min() < 0 or images.max() > 255):
            raise DataError(f"{where}: image pixels must be raw values in [0, 255], got "
                            f"[{images.min()}, {images.max()}]; sokd_tf normalises itself")
        shape = tuple(int(d) for d in images.shape[1:])
        if expected_shape is not None and shape != tuple(expected_shape):
            raise DataError(f"{where}: images of shape {shape}, expected {expected_shape} as "
                            f"in {expected_from}")
        pixels = np.rint(images).astype(np.uint8)
    return shape, SourceSplit(size=len(labels), labels=labels, images=pixels)


def source_data(name: str, train, test, *, class_names=None, mean=None, std=None) -> SourceData:
    """SourceData from `(images, labels, where)` of both splits, validated."""
    shape, train_split = to_split(*train, None, "")
    _, test_split = to_split(*test, shape, "the train split")
    if class_names is None:
        num_classes = int(max(train_split.labels.max(), test_split.labels.max())) + 1
        class_names = [str(i) for i in range(num_classes)]
    for split, (_, _, where) in ((train_split, train), (test_split, test)):
        check_labels(split.labels, len(class_names), lambda p, w=where: f"{w}, example {p}")
    splits = {"train": train_split, "test": test_split}
    check_split_sizes(name, splits)
    return SourceData(name=name, class_names=tuple(str(c) for c in class_names),
                      image_shape=shape, splits=splits,
                      mean=tuple(mean) if mean else None, std=tuple(std) if std else None)
