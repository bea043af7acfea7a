"""Image folders: one sub-directory per class.

Data-dir convention (the layout `keras.utils.image_dataset_from_directory` reads):
  data_dir/train/<class name>/*.png   (also .jpg, .jpeg, .bmp, .gif)
  data_dir/test/<class name>/*.png
Class names are the sorted sub-directory names of `train/`; label = index in that list.
`test/` may lack a class but may not add one. Files are listed with `tf.io.gfile` (so any
filesystem TF supports works) in sorted order and decoded with `tf.io.decode_image` at
their own size: unlike `image_dataset_from_directory`, nothing is resized, and images
of differing size or channel count are reported instead of silently reshaped. Up front
only the listing and the first image of each split are read; the pipeline reads, decodes
and checks every other file (`records.RecordSplit`, one example per file).
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from sokd_tf.data.decode import check_images, decode_image
from sokd_tf.data.records import RecordSplit
from sokd_tf.data.source import SourceData, SourceSplit, check_split_sizes
from sokd_tf.errors import DataError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
SPLITS = ("train", "test")


def _class_dirs(split_dir: str) -> list[str]:
    if not tf.io.gfile.isdir(split_dir):
        raise DataError(f"image-folder split directory {split_dir} does not exist; expected "
                        f"{split_dir}/<class name>/<image files>")
    names = sorted(
        entry.rstrip("/") for entry in tf.io.gfile.listdir(split_dir)
        if tf.io.gfile.isdir(os.path.join(split_dir, entry))
    )
    if not names:
        raise DataError(f"{split_dir} has no class sub-directories; expected "
                        f"{split_dir}/<class name>/<image files>")
    return names


def _list_files(split_dir: str, class_names: list[str], known: list[str]):
    paths, labels = [], []
    for name in class_names:
        if name not in known:
            raise DataError(f"{os.path.join(split_dir, name)}: class {name!r} is not among the "
                            f"training classes {known}")
        files = sorted(
            path for path in tf.io.gfile.glob(os.path.join(split_dir, name, "*"))
            if path.lower().endswith(EXTENSIONS)
        )
        paths.extend(files)
        labels.extend([known.index(name)] * len(files))
    return paths, np.asarray(labels, np.int32)


def load(data_dir: str, *, name: str = "image_folder") -> SourceData:
    """Reads and validates the train and test splits of an image-folder dataset.

    Args:
      data_dir: root laid out as in the module docstring.
      name: dataset label.

    Raises:
      DataError: missing directories, no class sub-directories, empty splits,
        a first image that does not decode or has another size or channel count.
    """
    if not tf.io.gfile.isdir(data_dir):
        raise DataError(f"image-folder directory {data_dir} does not exist")
    class_names = _class_dirs(os.path.join(data_dir, "train"))
    image_shape = None
    splits = {}
    for split in SPLITS:
        split_dir = os.path.join(data_dir, split)
        paths, labels = _list_files(split_dir, _class_dirs(split_dir), class_names)
        if not paths:
            raise DataError(f"split {split!r} is empty: no {'/'.join(EXTENSIONS)} files under "
                            f"{split_dir}/<class name>/ (expected >= 1 image)")
        first = tf.data.Dataset.from_tensors(paths[0]).map(tf.io.read_file)
        image_shape, _ = check_images(first, 1, lambda i, p=paths: p[i], image_shape,
                                      expected_from="the train split")
        shape_from = f"the first image ({paths[0]})" if split == "train" else "the train split"
        splits[split] = SourceSplit(size=len(paths), labels=labels, records=RecordSplit(
            names=tuple(paths), counts=(1,) * len(paths), image_shape=image_shape,
            shape_from=shape_from, decode=decode_image, fetch=_fetcher(paths)))
    check_split_sizes(name, splits)
    return SourceData(name=name, class_names=tuple(class_names), image_shape=image_shape,
                      splits=splits)


def _fetcher(paths):
    def fetch(index):
        return tf.io.read_file(tf.gather(tf.constant(paths), index))
    return fetch
