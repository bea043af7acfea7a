"""Any image-classification dataset of TensorFlow Datasets (tfds), by name.

Data-dir convention: `data_dir` is a tfds data directory (`data_dir/<name>/<version>/`,
as written by `tfds.builder(name, data_dir=...).download_and_prepare()`); None = tfds'
own default (`~/tensorflow_datasets`). Splits "train" and "test" are read; image and
label features come from the dataset's `supervised_keys` (else "image"/"label"); the
class count, class names and image shape come from its `DatasetInfo`.

Offline behaviour: a prepared dataset is read with no network access. When it is not
prepared, a download is attempted only if `download` allows it and a 3-second TCP probe
of the tfds storage host succeeds; otherwise a DataError says how to prepare the data.
This keeps offline failures fast (tfds' own downloader retries for minutes) and clear.
"""

from __future__ import annotations

import socket

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from sokd_tf.data.decode import decode_image
from sokd_tf.data.records import RecordSplit
from sokd_tf.data.source import SourceData, SourceSplit, check_labels, check_split_sizes
from sokd_tf.errors import DataError

SPLITS = ("train", "test")
PROBE_HOST = ("storage.googleapis.com", 443)


def _online(timeout_s: float = 3.0) -> bool:
    try:
        socket.create_connection(PROBE_HOST, timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _builder(name: str, data_dir: str | None):
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise DataError(f"tfds has no dataset named {name!r} (see "
                        f"https://www.tensorflow.org/datasets/catalog)") from error


def _prepare_hint(name: str, data_dir: str | None) -> str:
    target = f"data_dir={data_dir!r}" if data_dir else "data_dir=None"
    return (f"prepare it once on a machine with network access: python -c \"import "
            f"tensorflow_datasets as tfds; tfds.builder({name!r}, {target})"
            f".download_and_prepare()\" and copy the directory here, or convert it to "
            f"TFRecords with pipelines/make_tfrecords.py and use --source=tfrecord")


def _read(builder, split: str, keys: tuple[str, str]) -> tf.data.Dataset:
    """`(encoded image bytes, label)` in the split's fixed order (tfds decodes nothing)."""
    dataset = builder.as_dataset(split=split, shuffle_files=False,
                                 decoders={keys[0]: tfds.decode.SkipDecoding()})
    return dataset.map(lambda example: (example[keys[0]], example[keys[1]]),
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def load(
    name: str,
    data_dir: str | None = None,
    *,
    download: bool | None = None,
) -> SourceData:
    """Reads the train and test splits of tfds dataset `name`.

    Args:
      name: tfds name ("cifar10", "cifar100", "fashion_mnist", ...).
      data_dir: tfds data directory; None = tfds' default.
      download: True = download when not prepared, False = never, None = only when the
        tfds storage host answers a quick probe.

    Raises:
      DataError: unknown name, not an image-classification dataset, not prepared and
        cannot be downloaded, labels outside [0, num_classes), empty split.
    """
    builder = _builder(name, data_dir)
    info = builder.info
    keys = tuple(info.supervised_keys or ("image", "label"))
    features = info.features
    if len(keys) != 2 or keys[0] not in features or keys[1] not in features:
        raise DataError(f"tfds dataset {name!r} has supervised keys {keys}; expected an "
                        f"image-classification dataset with (image, label) features")
    image_feature, label_feature = features[keys[0]], features[keys[1]]
    if not isinstance(image_feature, tfds.features.Image) or not isinstance(
            label_feature, tfds.features.ClassLabel):
        raise DataError(f"tfds dataset {name!r}: features {keys} are "
                        f"{type(image_feature).__name__}/{type(label_feature).__name__}, "
                        f"expected Image/ClassLabel")
    image_shape = tuple(image_feature.shape)
    if None in image_shape:
        raise DataError(f"tfds dataset {name!r}: images have variable shape {image_shape}; "
                        f"expected a fixed (height, width, channels)")
    num_classes = label_feature.num_classes

    try:
        datasets = {split: _read(builder, split, keys) for split in SPLITS}
    except AssertionError as error:  # tfds' "could not find data in ..." when unprepared.
        if download is False or (download is None and not _online()):
            raise DataError(f"tfds dataset {name!r} is not prepared in "
                            f"{builder.data_dir} and cannot be downloaded (offline or "
                            f"download disabled); {_prepare_hint(name, data_dir)}") from error
        builder.download_and_prepare()
        datasets = {split: _read(builder, split, keys) for split in SPLITS}
    except (KeyError, ValueError) as error:
        raise DataError(f"tfds dataset {name!r} lacks the splits {list(SPLITS)} "
                        f"({error})") from error

    splits = {}
    for split, dataset in datasets.items():
        labels = np.fromiter(dataset.map(lambda _, label: label).as_numpy_iterator(),
                             dtype=np.int64).astype(np.int32)
        where = f"tfds {name!r} split {split!r}"
        check_labels(labels, num_classes, lambda i, where=where: f"{where}, record {i}")
        records = RecordSplit(
            names=(where,), counts=(len(labels),),
            image_shape=tuple(int(d) for d in image_shape),
            shape_from=f"the DatasetInfo of tfds {name!r}", decode=decode_image,
            read=lambda shard, dataset=dataset: dataset.map(lambda image, _: image),
            record_bytes=_record_bytes(info, split, len(labels), image_shape))
        splits[split] = SourceSplit(size=len(labels), labels=labels, records=records)
    check_split_sizes(name, splits)
    return SourceData(name=name, class_names=tuple(label_feature.names),
                      image_shape=tuple(int(d) for d in image_shape), splits=splits)


def _record_bytes(info, split: str, count: int, image_shape) -> int:
    """Mean stored bytes per example from the DatasetInfo, else the decoded size."""
    try:
        stored = int(info.splits[split].num_bytes)
    except (KeyError, ValueError, TypeError):
        stored = 0
    return stored // count if stored and count else int(np.prod(image_shape))
