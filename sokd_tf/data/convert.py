"""Converting any source into sharded TFRecords of tf.Example (+ dataset_info.json).

The output directory is readable by the "tfrecord" source and is the tf.Example data of
the TF Serving / TFX paths: `out_dir/train-XXXXX-of-YYYYY.tfrecord`,
`out_dir/test-XXXXX-of-YYYYY.tfrecord`, `out_dir/dataset_info.json`.
"""

from __future__ import annotations

import dataclasses

from sokd_tf import config as config_lib
from sokd_tf.data import tfrecord
from sokd_tf.data.pipeline import load_dataset


def convert_to_tfrecords(
    data_config: config_lib.DataConfig,
    out_dir: str,
    *,
    num_shards: int = 8,
    image_format: str = "png",
    image_key: str = tfrecord.IMAGE_KEY,
    label_key: str = tfrecord.LABEL_KEY,
) -> dict[str, list[str]]:
    """Writes the train and test splits of `data_config`'s dataset as TFRecords.

    The whole train split is written (no validation hold-out: the reader holds one out
    at load time). The test split gets shards in proportion to its size (at least one).
    The normalisation statistics of the source's "dataset" mode go into the metadata,
    so the TFRecord copy normalises exactly as the original.

    Args:
      data_config: the source to read.
      out_dir: output directory (created).
      num_shards: shards of the train split.
      image_format: "png" (lossless, default) or "jpeg".
      image_key, label_key: tf.Example feature keys.

    Returns:
      {"train": [paths], "test": [paths], "dataset_info": [path]}.
    """
    dataset = load_dataset(dataclasses.replace(
        data_config, validation_size=0, normalization="dataset"))
    info = dataset.info
    written = {}
    for split in ("train", "test"):
        shards = num_shards if split == "train" else max(
            1, round(num_shards * info.split_sizes["test"] / info.split_sizes["train"]))
        written[split] = tfrecord.write_tfrecords(
            dataset.raw_examples(split), out_dir, split, shards, image_format=image_format,
            image_key=image_key, label_key=label_key)
    written["dataset_info"] = [tfrecord.write_dataset_info(
        out_dir, name=info.name, class_names=info.class_names, image_shape=info.raw_image_shape,
        split_sizes=info.split_sizes, mean=info.mean, std=info.std,
        image_key=image_key, label_key=label_key)]
    return written
