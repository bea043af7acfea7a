"""Sharded TFRecord files of tf.Example: reading and writing.

Data-dir conventions (either):
  data_dir/train-*.tfrecord   training shards (also accepted: train.tfrecord)
  data_dir/test-*.tfrecord    test shards (also accepted: test.tfrecord)
or TFX ExampleGen's layout (what `pipelines/make_tfrecords_beam.py` writes):
  data_dir/Split-train/*      training shards, e.g. data_tfrecord-00000-of-00004.gz
  data_dir/Split-test/* or data_dir/Split-eval/*   the test split (ExampleGen's default
                              second split is "eval"; "test" wins when both exist)
and, in both layouts:
  data_dir/dataset_info.json  optional metadata written by `write_dataset_info` /
                              `pipelines/make_tfrecords.py`: name, num_classes,
                              class_names, image_shape, image_key, label_key, mean, std
  data_dir/classes.txt        optional, one class name per line (used when there is
                              no dataset_info.json)

Files ending in `.gz` are GZIP-compressed TFRecords (ExampleGen's format), others
uncompressed. Shards are read in sorted name order, records in file order. Each tf.Example carries
the encoded image (PNG/JPEG/BMP/GIF bytes) under `image_key` (default `image/encoded`)
and the int64 class under `label_key` (default `image/class/label`), the common
image-classification convention (TF Model Garden, TF Serving examples). The class count
is, in order of preference: dataset_info.json, classes.txt, largest label + 1.

The writer shards contiguously (shard i holds a contiguous range of examples), so
reading the shards back in order gives the examples in their original order.
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from sokd_tf.data.decode import check_images, decode_image
from sokd_tf.data.records import RecordSplit, data_errors
from sokd_tf.data.source import SourceData, SourceSplit, check_labels, check_split_sizes
from sokd_tf.errors import DataError

IMAGE_KEY = "image/encoded"
LABEL_KEY = "image/class/label"
INFO_FILE = "dataset_info.json"
CLASSES_FILE = "classes.txt"
IMAGE_FORMATS = ("png", "jpeg")
SPLITS = ("train", "test")
# TFX ExampleGen's output layout: one `Split-<name>/` directory per split, holding
# `data_tfrecord-XXXXX-of-YYYYY.gz` GZIP TFRecord shards.
EXAMPLEGEN_SPLIT_DIR = "Split-{}"
EXAMPLEGEN_FILE_PREFIX = "data_tfrecord"
# Our split -> the ExampleGen split names that hold it, in order of preference.
EXAMPLEGEN_SPLIT_NAMES = {"train": ("train",), "test": ("test", "eval")}
GZIP_SUFFIX = ".gz"


def is_examplegen_layout(data_dir: str) -> bool:
    """True when `data_dir` holds ExampleGen-style `Split-*/` directories."""
    return bool(tf.io.gfile.glob(os.path.join(data_dir, EXAMPLEGEN_SPLIT_DIR.format("*"))))


def split_files(data_dir: str, split: str) -> list[str]:
    """Sorted shard paths of `split`.

    `{split}-*.tfrecord` / `{split}.tfrecord`, or in ExampleGen's layout every file of
    the first existing `Split-<name>/` of `EXAMPLEGEN_SPLIT_NAMES[split]`.
    """
    if is_examplegen_layout(data_dir):
        for name in EXAMPLEGEN_SPLIT_NAMES.get(split, (split,)):
            split_dir = os.path.join(data_dir, EXAMPLEGEN_SPLIT_DIR.format(name))
            if tf.io.gfile.isdir(split_dir):
                return sorted(tf.io.gfile.glob(os.path.join(split_dir, "*")))
        return []
    files = tf.io.gfile.glob(os.path.join(data_dir, f"{split}-*.tfrecord"))
    single = os.path.join(data_dir, f"{split}.tfrecord")
    if tf.io.gfile.exists(single):
        files.append(single)
    return sorted(files)


def compression_type(files: Sequence[str]) -> str:
    """"GZIP" when every file ends in `.gz`, "" when none does.

    Raises:
      DataError: a mix of compressed and uncompressed files.
    """
    compressed = {path.endswith(GZIP_SUFFIX) for path in files}
    if len(compressed) > 1:
        raise DataError(f"{sorted(files)} mix GZIP (.gz) and uncompressed TFRecord files; "
                        f"expected one kind per split")
    return "GZIP" if compressed == {True} else ""


def _read_metadata(data_dir: str) -> dict:
    path = os.path.join(data_dir, INFO_FILE)
    if tf.io.gfile.exists(path):
        try:
            with tf.io.gfile.GFile(path) as handle:
                metadata = json.load(handle)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: not valid JSON ({error})") from error
        if not isinstance(metadata, dict):
            raise DataError(f"{path}: expected a JSON object, got {type(metadata).__name__}")
        return metadata
    path = os.path.join(data_dir, CLASSES_FILE)
    if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path) as handle:
            names = [line.strip() for line in handle if line.strip()]
        if not names:
            raise DataError(f"{path}: no class names (expected one name per line)")
        return {"class_names": names}
    return {}


def read_metadata(data_dir: str) -> dict:
    """`data_dir`'s dataset_info.json (or classes.txt) as a dict; {} when it has neither."""
    return _read_metadata(data_dir)


class _Records:
    """The records of one split, addressable by global position."""

    def __init__(self, files: list[str]):
        self.files = files
        self.compression = compression_type(files)
        self.starts = [0]
        for path in files:
            self.starts.append(self.starts[-1] + _count_tfrecords(path, self.compression))

    @property
    def size(self) -> int:
        return self.starts[-1]

    def describe(self, position: int) -> str:
        index = bisect.bisect_right(self.starts, position) - 1
        return f"{self.files[index]}, record {position - self.starts[index]}"

    def dataset(self) -> tf.data.Dataset:
        return tf.data.TFRecordDataset(self.files, compression_type=self.compression)

    def split(self, image_key: str, image_shape, shape_from: str) -> RecordSplit:
        """These records as a RecordSplit whose payload is the encoded image."""
        files, compression = self.files, self.compression
        spec = {image_key: tf.io.FixedLenFeature([], tf.string)}

        def read(shard):
            return tf.data.TFRecordDataset(tf.gather(tf.constant(files), shard),
                                           compression_type=compression).map(
                lambda raw: tf.io.parse_single_example(raw, spec)[image_key])

        return RecordSplit(
            names=tuple(files), counts=tuple(int(n) for n in np.diff(self.starts)),
            image_shape=tuple(int(d) for d in image_shape), shape_from=shape_from,
            decode=decode_image, read=read,
            record_bytes=sum(tf.io.gfile.stat(path).length for path in files) // max(1, self.size))

    def example(self, position: int) -> tf.train.Example:
        raw = next(iter(self.dataset().skip(position).take(1))).numpy()
        return tf.train.Example.FromString(raw)


def _count_tfrecords(path: str, compression: str = "") -> int:
    try:
        return int(tf.data.TFRecordDataset(path, compression_type=compression).batch(4096).reduce(
            np.int64(0), lambda n, batch: n + tf.size(batch, out_type=tf.int64)))
    except tf.errors.OpError as error:
        raise DataError(f"{path}: corrupt or truncated TFRecord file "
                        f"({error.message.splitlines()[0]})") from error


def _parse_labels(records: _Records, image_key: str, label_key: str) -> np.ndarray:
    """Checks every record for the two features; returns the labels `[n]` int32."""
    spec = {image_key: tf.io.VarLenFeature(tf.string), label_key: tf.io.VarLenFeature(tf.int64)}
    expected = (f"expected a tf.Example with a bytes feature {image_key!r} (one encoded image) "
                f"and an int64 feature {label_key!r} (one label)")

    def counts(serialized):
        features = tf.io.parse_example(serialized, spec)
        rows = tf.shape(serialized)[0]

        def per_row(sparse):
            return tf.math.bincount(tf.cast(sparse.indices[:, 0], tf.int32), minlength=rows,
                                    maxlength=rows, dtype=tf.int64)

        label = features[label_key]
        first = label.indices[:, 1] == 0
        labels = tf.tensor_scatter_nd_update(
            tf.fill([rows], np.int64(-1)), tf.boolean_mask(label.indices, first)[:, :1],
            tf.boolean_mask(label.values, first))
        return per_row(features[image_key]), per_row(label), labels

    try:
        chunks = list(records.dataset().batch(8192).map(
            counts, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        ).as_numpy_iterator())
    except tf.errors.InvalidArgumentError:
        # A record with a feature of the wrong type: find it record by record.
        parsed = (records.dataset().enumerate()
                  .map(lambda position, serialized: (
                      position, tf.io.parse_single_example(serialized, spec)[label_key].values))
                  .ignore_errors().map(lambda position, _: position).batch(8192))
        parsed_positions = np.concatenate(list(parsed.as_numpy_iterator()) or [[]])
        position = int(np.setdiff1d(np.arange(records.size), parsed_positions)[0])
        raw = next(iter(records.dataset().skip(position).take(1)))
        try:
            tf.io.parse_single_example(raw, spec)
            reason = "unparsable record"
        except tf.errors.InvalidArgumentError as error:
            reason = error.message.splitlines()[0]
        raise DataError(f"{records.describe(position)}: {reason}; {expected}") from None
    image_counts, label_counts, labels = (
        np.concatenate([chunk[column] for chunk in chunks]) if chunks
        else np.zeros([0], np.int64)
        for column in range(3)
    )
    bad = np.flatnonzero((image_counts != 1) | (label_counts != 1))
    if bad.size:
        position = int(bad[0])
        try:
            present = sorted(records.example(position).features.feature.keys())
        except Exception:  # noqa: BLE001 - only used to enrich the message.
            present = "?"
        raise DataError(f"{records.describe(position)}: has {int(image_counts[position])} "
                        f"value(s) under {image_key!r} and {int(label_counts[position])} under "
                        f"{label_key!r} (features present: {present}); {expected}")
    return labels.astype(np.int32)


def load(
    data_dir: str,
    *,
    name: str = "tfrecord",
    image_key: str | None = None,
    label_key: str | None = None,
) -> SourceData:
    """Reads and validates the train and test splits of a TFRecord dataset.

    Up front, without decoding the images: every file is counted (a corrupt or truncated
    file fails here), every record parsed for its two features (labels checked against
    the class count) and the first image of each split decoded (its shape checked).
    The images themselves are decoded by the pipeline, which checks each one and names
    the file and record of a bad one (`records.RecordSplit`).

    Args:
      data_dir: directory laid out as in the module docstring.
      name: dataset label when dataset_info.json does not name one.
      image_key, label_key: feature keys; None = dataset_info.json's, else the defaults.

    Raises:
      DataError: missing directory or shards, corrupt files, records without the
        expected features, a first image that does not decode or has another shape,
        labels outside [0, num_classes), empty splits.
    """
    if not tf.io.gfile.isdir(data_dir):
        raise DataError(f"TFRecord directory {data_dir} does not exist")
    metadata = _read_metadata(data_dir)
    image_key = image_key or metadata.get("image_key", IMAGE_KEY)
    label_key = label_key or metadata.get("label_key", LABEL_KEY)
    records, labels = {}, {}
    for split in SPLITS:
        files = split_files(data_dir, split)
        if not files:
            names = "/ or ".join(EXAMPLEGEN_SPLIT_DIR.format(name)
                                 for name in EXAMPLEGEN_SPLIT_NAMES[split])
            raise DataError(f"no TFRecord files for split {split!r} in {data_dir}: expected "
                            f"{split}-*.tfrecord (pipelines/make_tfrecords.py) or ExampleGen's "
                            f"{names}/ (pipelines/make_tfrecords_beam.py)")
        records[split] = _Records(files)
        if records[split].size == 0:
            raise DataError(f"split {split!r} is empty: {files} hold no records "
                            f"(expected >= 1 image)")
        labels[split] = _parse_labels(records[split], image_key, label_key)

    class_names = metadata.get("class_names")
    num_classes = metadata.get("num_classes", len(class_names) if class_names else None)
    if num_classes is None:
        num_classes = int(max(labels[s].max() for s in SPLITS)) + 1
    if class_names is None:
        class_names = [str(i) for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise DataError(f"{os.path.join(data_dir, INFO_FILE)}: {len(class_names)} class "
                        f"names for num_classes={num_classes}; expected one name per class")
    for split in SPLITS:
        check_labels(labels[split], num_classes, records[split].describe)

    expected_shape = metadata.get("image_shape")
    expected_shape = tuple(int(d) for d in expected_shape) if expected_shape else None
    expected_from = os.path.join(data_dir, INFO_FILE)
    splits = {}
    for split in SPLITS:
        first = _encoded_images(records[split], image_key).take(1)
        expected_shape, _ = check_images(first, 1, records[split].describe, expected_shape,
                                         expected_from)
        shape_from = expected_from if metadata.get("image_shape") or split != "train" \
            else f"the first image ({records[split].describe(0)})"
        expected_from = "the train split"
        splits[split] = SourceSplit(size=records[split].size, labels=labels[split],
                                    records=records[split].split(image_key, expected_shape,
                                                                 shape_from))
    check_split_sizes(name, splits)
    mean, std = metadata.get("mean"), metadata.get("std")
    return SourceData(
        name=metadata.get("name", name),
        class_names=tuple(str(c) for c in class_names),
        image_shape=expected_shape,
        splits=splits,
        mean=tuple(float(m) for m in mean) if mean else None,
        std=tuple(float(s) for s in std) if std else None,
    )


def _encoded_images(records: _Records, image_key: str) -> tf.data.Dataset:
    spec = {image_key: tf.io.FixedLenFeature([], tf.string)}
    return records.dataset().map(lambda raw: tf.io.parse_single_example(raw, spec)[image_key],
                                 num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _encode(image: tf.Tensor, image_format: str) -> tf.Tensor:
    if image_format == "png":
        return tf.io.encode_png(image)
    return tf.io.encode_jpeg(image, quality=95)


def make_example(encoded: bytes, label: int, *, image_key: str = IMAGE_KEY,
                 label_key: str = LABEL_KEY) -> tf.train.Example:
    """One tf.Example in the module's convention."""
    return tf.train.Example(features=tf.train.Features(feature={
        image_key: tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
        label_key: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
    }))


def shard_bounds(size: int, num_shards: int) -> list[int]:
    """Contiguous shard boundaries: shard i holds examples [bounds[i], bounds[i + 1])."""
    return [size * i // num_shards for i in range(num_shards + 1)]


def serialized_examples(
    dataset: tf.data.Dataset,
    *,
    image_format: str = "png",
    image_key: str = IMAGE_KEY,
    label_key: str = LABEL_KEY,
):
    """Yields one serialized tf.Example per `(uint8 image [H, W, C], label)` of `dataset`.

    Images are encoded as PNG (lossless) or JPEG (quality 95) in parallel, in order.
    """
    if image_format not in IMAGE_FORMATS:
        raise DataError(f"image_format must be one of {list(IMAGE_FORMATS)}, got {image_format!r}")
    encoded = dataset.map(
        lambda image, label: (_encode(tf.cast(image, tf.uint8), image_format),
                              tf.cast(label, tf.int64)),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True,
    ).batch(1024).prefetch(tf.data.AUTOTUNE)
    with data_errors():  # a bad image met while streaming: DataError naming its record
        for images, labels in encoded.as_numpy_iterator():
            for image, label in zip(images, labels, strict=True):
                yield make_example(image, label, image_key=image_key,
                                   label_key=label_key).SerializeToString()


def write_tfrecords(
    data: tf.data.Dataset | tuple[np.ndarray, np.ndarray],
    out_dir: str,
    split: str,
    num_shards: int = 1,
    *,
    image_format: str = "png",
    image_key: str = IMAGE_KEY,
    label_key: str = LABEL_KEY,
) -> list[str]:
    """Writes `(image, label)` examples as sharded TFRecords `{split}-XXXXX-of-YYYYY.tfrecord`.

    Args:
      data: uint8 images `[n, height, width, channels]` and integer labels `[n]`, or a
        `tf.data.Dataset` of single `(uint8 image [height, width, channels], label)`.
      out_dir: output directory (created).
      split: split name, the file prefix ("train", "test").
      num_shards: number of files; examples are split into contiguous ranges.
      image_format: "png" (lossless) or "jpeg" (quality 95).
      image_key, label_key: feature keys.

    Returns:
      The written paths, in order.
    """
    if image_format not in IMAGE_FORMATS:
        raise DataError(f"image_format must be one of {list(IMAGE_FORMATS)}, got {image_format!r}")
    if num_shards < 1:
        raise DataError(f"num_shards must be >= 1, got {num_shards}")
    if isinstance(data, tf.data.Dataset):
        dataset = data
        size = int(dataset.cardinality())
        if size < 0:
            size = int(dataset.reduce(np.int64(0), lambda n, _: n + 1))
    else:
        images, labels = data
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels; expected equal")
        dataset = tf.data.Dataset.from_tensor_slices((images, labels))
        size = len(labels)
    tf.io.gfile.makedirs(out_dir)
    num_shards = max(1, min(num_shards, size))
    bounds = shard_bounds(size, num_shards)
    paths = [os.path.join(out_dir, f"{split}-{i:05d}-of-{num_shards:05d}.tfrecord")
             for i in range(num_shards)]
    examples = serialized_examples(dataset, image_format=image_format, image_key=image_key,
                                   label_key=label_key)
    for shard, path in enumerate(paths):
        with tf.io.TFRecordWriter(path) as writer:
            for _ in range(bounds[shard + 1] - bounds[shard]):
                writer.write(next(examples))
    return paths


def write_dataset_info(
    out_dir: str,
    *,
    name: str,
    class_names: Sequence[str],
    image_shape: Sequence[int],
    split_sizes: dict[str, int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    image_key: str = IMAGE_KEY,
    label_key: str = LABEL_KEY,
) -> str:
    """Writes `dataset_info.json`, the metadata `load` prefers; returns its path."""
    metadata = {
        "name": name,
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "image_shape": [int(d) for d in image_shape],
        "image_key": image_key,
        "label_key": label_key,
    }
    if split_sizes is not None:
        metadata["split_sizes"] = dict(split_sizes)
    if mean is not None:
        metadata["mean"] = [float(m) for m in mean]
        metadata["std"] = [float(s) for s in std]
    tf.io.gfile.makedirs(out_dir)
    path = os.path.join(out_dir, INFO_FILE)
    with tf.io.gfile.GFile(path, "w") as handle:
        json.dump(metadata, handle, indent=2)
    return path
