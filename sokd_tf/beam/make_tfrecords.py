"""Any data source -> GZIP tf.Example TFRecords in TFX ExampleGen's layout, on Beam.

    out_dir/Split-train/data_tfrecord-00000-of-00008.gz ...   the source's train split
    out_dir/Split-eval/data_tfrecord-00000-of-00002.gz ...    the source's test split
    out_dir/dataset_info.json                                 class names, shape, statistics

This is what TFX's ExampleGen writes (GZIP TFRecords named `data_tfrecord-SSSSS-of-NNNNN.gz`
under `Split-<name>/`, "train" and "eval" by default), so the directory can be handed to a
TFX Trainer (via ImportExampleGen, or directly as the examples artifact's URI) and read
back by `--source=tfrecord --data_dir=out_dir` (`sokd_tf.data.tfrecord`).

Sharding is deterministic: shard i of a split holds the contiguous examples
[size * i // n, size * (i + 1) // n) in the source's order, whatever the runner, the worker
count or retries. Each shard is one Beam element written by one worker to a temporary
file and renamed into place, so a retried shard replaces, never duplicates. The
examples are those of the in-process converter (`sokd_tf.data.convert_to_tfrecords`):
`image/encoded` PNG (or JPEG) bytes and the int64 `image/class/label`.

Reference: docs/BATCH.md, "make_tfrecords on Beam".
"""

from __future__ import annotations

import dataclasses
import os
import uuid

import apache_beam as beam
import tensorflow as tf

from sokd_tf import config as config_lib
from sokd_tf.beam.options import counter_values, pipeline_options
from sokd_tf.data import tfrecord
from sokd_tf.data.pipeline import ImageDataset, load_dataset
from sokd_tf.errors import DataError

NAMESPACE = "sokd_tf.make_tfrecords"
# Our split -> ExampleGen split name (ExampleGen's default output splits are train/eval).
OUTPUT_SPLITS = {"train": "train", "test": "eval"}
_TEMP_DIR = ".tmp-make_tfrecords"


@dataclasses.dataclass(frozen=True)
class ShardTask:
    """One output file: examples [start, stop) of `split`, shard `index` of `num_shards`."""

    split: str
    index: int
    num_shards: int
    start: int
    stop: int


def shard_path(out_dir: str, split: str, index: int, num_shards: int) -> str:
    """`out_dir/Split-<examplegen name>/data_tfrecord-XXXXX-of-YYYYY.gz` of our `split`."""
    name = OUTPUT_SPLITS[split]
    return os.path.join(
        out_dir, tfrecord.EXAMPLEGEN_SPLIT_DIR.format(name),
        f"{tfrecord.EXAMPLEGEN_FILE_PREFIX}-{index:05d}-of-{num_shards:05d}{tfrecord.GZIP_SUFFIX}")


def _load_source(data_config: config_lib.DataConfig) -> ImageDataset:
    # The whole train split (no hold-out; readers hold one out at load time) and the
    # "dataset" statistics, so the copy normalises exactly as the source.
    return load_dataset(dataclasses.replace(
        data_config, validation_size=0, normalization="dataset"))


def plan_shards(split_sizes: dict[str, int], num_shards: int) -> list[ShardTask]:
    """The shard tasks: `num_shards` for train, the test split in proportion (>= 1)."""
    if num_shards < 1:
        raise DataError(f"num_shards must be >= 1, got {num_shards}")
    tasks = []
    for split in OUTPUT_SPLITS:
        size = split_sizes[split]
        shards = num_shards if split == "train" else max(
            1, round(num_shards * size / split_sizes["train"]))
        shards = max(1, min(shards, size))
        bounds = tfrecord.shard_bounds(size, shards)
        tasks.extend(ShardTask(split, i, shards, bounds[i], bounds[i + 1]) for i in range(shards))
    return tasks


class WriteShard(beam.DoFn):
    """Writes one `ShardTask` as a GZIP TFRecord file; yields `(split, path, count)`."""

    def __init__(self, data_config: config_lib.DataConfig, out_dir: str, *, image_format: str,
                 image_key: str, label_key: str):
        self._data_config = data_config
        self._out_dir = out_dir
        self._image_format = image_format
        self._image_key = image_key
        self._label_key = label_key
        self._read = beam.metrics.Metrics.counter(NAMESPACE, "examples_read")
        self._written = beam.metrics.Metrics.counter(NAMESPACE, "examples_written")
        self._shards = beam.metrics.Metrics.counter(NAMESPACE, "shards_written")
        self._dataset = None

    def setup(self):
        self._dataset = _load_source(self._data_config)

    def process(self, task: ShardTask):
        examples = (self._dataset.raw_examples(task.split)
                    .skip(task.start).take(task.stop - task.start))
        final = shard_path(self._out_dir, task.split, task.index, task.num_shards)
        temporary = os.path.join(self._out_dir, _TEMP_DIR, f"{uuid.uuid4().hex}.gz")
        count = 0
        with tf.io.TFRecordWriter(temporary, options="GZIP") as writer:
            for record in tfrecord.serialized_examples(
                    examples, image_format=self._image_format, image_key=self._image_key,
                    label_key=self._label_key):
                writer.write(record)
                count += 1
        self._read.inc(count)
        if count != task.stop - task.start:
            raise DataError(f"{final}: the source gave {count} examples for "
                            f"[{task.start}, {task.stop}) of split {task.split!r}")
        tf.io.gfile.makedirs(os.path.dirname(final))
        tf.io.gfile.rename(temporary, final, overwrite=True)
        self._written.inc(count)
        self._shards.inc()
        yield task.split, final, count


def run(
    data_config: config_lib.DataConfig,
    out_dir: str,
    *,
    num_shards: int = 8,
    image_format: str = "png",
    image_key: str = tfrecord.IMAGE_KEY,
    label_key: str = tfrecord.LABEL_KEY,
    beam_args: tuple[str, ...] | list[str] = (),
) -> dict:
    """Runs the conversion pipeline; returns the written files and the job's counters.

    Args:
      data_config: the source to read (every worker reads it, so on a distributed runner
        its `data_dir` must be reachable from the workers, e.g. a gs:// path).
      out_dir: output directory; must not hold ExampleGen splits or a dataset_info.json
        already (artifacts are immutable: choose a new directory).
      num_shards: shards of the train split (the test split gets them in proportion).
      image_format: "png" (lossless) or "jpeg" (quality 95).
      image_key, label_key: tf.Example feature keys.
      beam_args: Beam pipeline options (`--runner=DataflowRunner`, `--project=...`); the
        in-process FnApiRunner when no runner is named.

    Returns:
      {"train": [paths], "eval": [paths], "dataset_info": [path],
       "counters": {"examples_read": n, "examples_written": n, "shards_written": k}}.

    Raises:
      DataError: an existing output, a bad source, or a bad option.
    """
    if image_format not in tfrecord.IMAGE_FORMATS:
        raise DataError(f"image_format must be one of {list(tfrecord.IMAGE_FORMATS)}, "
                        f"got {image_format!r}")
    if tf.io.gfile.exists(out_dir) and (
            tfrecord.is_examplegen_layout(out_dir)
            or tf.io.gfile.exists(os.path.join(out_dir, tfrecord.INFO_FILE))):
        raise DataError(f"{out_dir} already holds a converted dataset; choose a new --out_dir "
                        f"(shards are never overwritten)")
    dataset = _load_source(data_config)
    info = dataset.info
    tasks = plan_shards(info.split_sizes, num_shards)
    tf.io.gfile.makedirs(os.path.join(out_dir, _TEMP_DIR))
    pipeline = beam.Pipeline(options=pipeline_options(beam_args))
    _ = (pipeline
         | "Shards" >> beam.Create(tasks)
         | "Distribute" >> beam.Reshuffle()
         | "Write" >> beam.ParDo(WriteShard(
             data_config, out_dir, image_format=image_format, image_key=image_key,
             label_key=label_key)))
    result = pipeline.run()
    result.wait_until_finish()
    tf.io.gfile.rmtree(os.path.join(out_dir, _TEMP_DIR))
    written = {
        OUTPUT_SPLITS[split]: [shard_path(out_dir, split, t.index, t.num_shards)
                               for t in tasks if t.split == split]
        for split in OUTPUT_SPLITS
    }
    # Written last: its presence marks a complete conversion.
    written["dataset_info"] = [tfrecord.write_dataset_info(
        out_dir, name=info.name, class_names=info.class_names, image_shape=info.image_shape,
        split_sizes={split: info.split_sizes[split] for split in OUTPUT_SPLITS},
        mean=info.mean, std=info.std, image_key=image_key, label_key=label_key)]
    written["counters"] = counter_values(result, NAMESPACE)
    return written
