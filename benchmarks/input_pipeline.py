"""Is the input pipeline fast enough? Images/s of `train_batches` vs the SOKD step.

    python -m benchmarks.input_pipeline            # full table (~2-4 min on 2 CPU cores)
    python -m benchmarks.input_pipeline --steps=10 --input_batches=100   # quicker
    python -m benchmarks.input_pipeline --stream_images=200 --stream_images_32=256 \
        --stream_images_224=96 --input_batches=3 --steps=1 --repeats=1   # smoke run

Rows:
  * real Fashion-MNIST (quickstart preset: IDX files in memory, training augmentation),
  * a synthetic in-memory 32x32x3 set (CIFAR-sized, 50,000 images),
  * the same Fashion-MNIST images streamed from PNG TFRecords (`cache="never"`: decoded
    every epoch), the slow path for data that does not fit in memory,
  * streamed from GZIP TFRecord shards in ExampleGen's layout (`Split-train/*.gz`):
    32x32x3 PNGs (pad-crop-flip, beside the 32x32 step) and 224x224x3 JPEGs
    (random-resized crop + flip, beside the step of the same models at 224x224x3 with
    `--batch_size_224`),
and the resident memory (VmRSS, not the process's peak) during one streamed epoch over
the 224x224 shards with a cache budget a quarter of their decoded size (so
`cache="auto"` streams): after a third of the epoch and after all of it. Flat (ratio
~1.0) means memory does not grow with the data read.
Each input rate is printed beside the images/s of one SOKD training step
(`SemiOnlineDistiller`, the quickstart preset's wrn_16_1 teacher -> wrn_10_1 student, batch 128)
at the same image shape, measured in the same process, and their ratio (goal >= 5x). The
step is timed on a constant batch (pure compute) and, for Fashion-MNIST, also fed by the
pipeline through `fit` (what training sees). The machine may be shared: numbers are the
median of `--repeats` timings.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

from sokd_tf import config as config_lib
from sokd_tf import distillers, models
from sokd_tf.data import (
    DatasetInfo,
    ImageDataset,
    load_dataset,
    tfrecord,
    write_dataset_info,
    write_tfrecords,
)
from sokd_tf.data.source import SourceSplit
from sokd_tf.models import peer as peer_lib

flags.DEFINE_integer("batch_size", 128, "Training batch size.")
flags.DEFINE_integer("input_batches", 300, "Batches timed per input measurement.")
flags.DEFINE_integer("steps", 10, "SOKD steps timed per step measurement.")
flags.DEFINE_integer("repeats", 3, "Timings per measurement (median reported).")
flags.DEFINE_integer("stream_images", 20000, "Fashion-MNIST images in the TFRecord row.")
flags.DEFINE_integer("stream_images_32", 20000, "32x32x3 images in the GZIP-shard row.")
flags.DEFINE_integer("stream_images_224", 3000, "224x224x3 images in the GZIP-shard row.")
flags.DEFINE_integer("stream_shards", 8, "GZIP shards per streamed split.")
flags.DEFINE_integer("batch_size_224", 32, "Batch of the 224x224 SOKD step and input rows.")
FLAGS = flags.FLAGS
SEED = 8888


def _median_rate(measure, repeats: int) -> float:
    return statistics.median(measure() for _ in range(repeats))


def input_rate(dataset: ImageDataset, batch_size: int | None = None) -> float:
    """Images/s delivered by `train_batches` with training augmentation."""
    batches = dataset.train_batches(batch_size or FLAGS.batch_size, seed=SEED)
    iterator = iter(batches)
    for _ in range(10):
        next(iterator)

    def measure():
        start, count = time.perf_counter(), 0
        for _ in range(FLAGS.input_batches):
            count += int(next(iterator)[1].shape[0])
        return count / (time.perf_counter() - start)

    return _median_rate(measure, FLAGS.repeats)


def examplegen_shards(directory: str, shape, count: int, image_format: str,
                      num_classes: int = 100) -> str:
    """Random images as GZIP tf.Example shards in ExampleGen's layout; returns the root."""
    rng = np.random.default_rng(0)
    encode = tf.io.encode_png if image_format == "png" else tf.io.encode_jpeg
    for split, size in (("train", count), ("eval", max(1, count // 10))):
        split_dir = os.path.join(directory, f"Split-{split}")
        os.makedirs(split_dir)
        bounds = tfrecord.shard_bounds(size, FLAGS.stream_shards)
        for shard in range(FLAGS.stream_shards):
            path = os.path.join(split_dir, f"data_tfrecord-{shard:05d}-of-"
                                           f"{FLAGS.stream_shards:05d}.gz")
            with tf.io.TFRecordWriter(path, options="GZIP") as writer:
                for _ in range(bounds[shard], bounds[shard + 1]):
                    image = rng.integers(0, 256, shape, dtype=np.uint8)
                    writer.write(tfrecord.make_example(
                        encode(image).numpy(), int(rng.integers(num_classes))
                    ).SerializeToString())
    write_dataset_info(directory, name=f"synthetic{shape[0]}",
                       class_names=[str(i) for i in range(num_classes)], image_shape=shape,
                       mean=(0.5,) * shape[-1], std=(0.25,) * shape[-1])
    return directory


def streamed_shards(directory: str, **overrides) -> ImageDataset:
    values = dict(source="tfrecord", data_dir=directory, normalization="dataset",
                  validation_size=0, cache="never")
    values.update(overrides)
    return load_dataset(config_lib.DataConfig(**values))


def current_rss_mib() -> float:
    """Resident memory now (VmRSS), not the high-water mark: a cache filling up shows."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024  # kB
    return float("nan")


def flat_memory(dataset: ImageDataset, batch_size: int) -> tuple[float, float]:
    """Resident memory (MiB) after a third of a streamed epoch and after all of it.

    Current RSS, not the process's peak: the peak was set earlier in this process
    (the other rows), so it could not show a stream that keeps what it decoded.
    """
    steps = dataset.steps_per_epoch(batch_size)
    iterator = iter(dataset.train_batches(batch_size, seed=SEED))
    for _ in range(max(1, steps // 3)):
        next(iterator)
    third = current_rss_mib()
    for _ in range(steps - max(1, steps // 3)):
        next(iterator)
    return third, current_rss_mib()


def sokd_trainer(image_shape, num_classes) -> distillers.SemiOnlineDistiller:
    quickstart = config_lib.resolve("quickstart")
    keras.utils.set_random_seed(SEED)
    teacher = models.BUILDERS[quickstart.model.teacher](image_shape, num_classes)
    student = models.BUILDERS[quickstart.model.student](image_shape, num_classes)
    trainer = distillers.SemiOnlineDistiller(
        teacher, peer_lib.build_peer(teacher), student,
        temperature=quickstart.loss.temperature)
    trainer.compile(optimizer=distillers.make_optimizer(quickstart.train, steps_per_epoch=100))
    return trainer


def step_rate(trainer, batches: tf.data.Dataset, batch_size: int | None = None) -> float:
    """Images/s of `fit` over `batches` (first call traces the step; not timed)."""
    trainer.fit(batches, steps_per_epoch=3, epochs=1, verbose=0, shuffle=False)

    def measure():
        start = time.perf_counter()
        trainer.fit(batches, steps_per_epoch=FLAGS.steps, epochs=1, verbose=0, shuffle=False)
        return FLAGS.steps * (batch_size or FLAGS.batch_size) / (time.perf_counter() - start)

    return _median_rate(measure, FLAGS.repeats)


def constant_batches(image_shape, num_classes, batch_size: int | None = None) -> tf.data.Dataset:
    batch_size = batch_size or FLAGS.batch_size
    rng = np.random.default_rng(0)
    images = rng.normal(size=(batch_size, *image_shape)).astype(np.float32)
    labels = (np.arange(batch_size) % num_classes).astype(np.int32)
    return tf.data.Dataset.from_tensors((images, labels)).repeat()


def synthetic_dataset(size=50000, shape=(32, 32, 3), num_classes=100) -> ImageDataset:
    rng = np.random.default_rng(0)
    split = SourceSplit(size=size, images=rng.integers(0, 256, (size, *shape), dtype=np.uint8),
                        labels=rng.integers(0, num_classes, size).astype(np.int32))
    info = DatasetInfo(name="synthetic", num_classes=num_classes, image_shape=shape,
                       class_names=tuple(map(str, range(num_classes))),
                       split_sizes={"train": size, "test": size},
                       mean=(0.5,) * shape[-1], std=(0.25,) * shape[-1])
    return ImageDataset(info, {"train": split, "test": split})


def main(argv):
    del argv
    rows = []
    quickstart = config_lib.resolve("quickstart")
    start = time.perf_counter()
    fashion = load_dataset(quickstart.data, seed=SEED)
    load_s = time.perf_counter() - start
    fashion_shape, fashion_classes = fashion.info.image_shape, fashion.info.num_classes

    with tempfile.TemporaryDirectory() as directory:
        count = min(FLAGS.stream_images, fashion.info.split_sizes["train"])
        write_tfrecords(fashion.raw_images("train", count), directory, "train", 4)
        write_tfrecords(fashion.raw_images("test", 1000), directory, "test", 1)
        streamed = load_dataset(config_lib.DataConfig(
            source="tfrecord", data_dir=directory, normalization="dataset", validation_size=0,
            cache="never"))
        stream_rate = input_rate(streamed)

    with tempfile.TemporaryDirectory() as directory:
        shards_32 = streamed_shards(examplegen_shards(
            directory, (32, 32, 3), FLAGS.stream_images_32, "png"))
        shards_32_rate = input_rate(shards_32)
    with tempfile.TemporaryDirectory() as directory:
        examplegen_shards(directory, (224, 224, 3), FLAGS.stream_images_224, "jpeg")
        shards_224 = streamed_shards(directory, augmentation="random_resized_crop")
        shards_224_rate = input_rate(shards_224, FLAGS.batch_size_224)
        images_224 = FLAGS.stream_images_224 + max(1, FLAGS.stream_images_224 // 10)
        decoded_mib = images_224 * 224 * 224 * 3 / 2**20
        budget_mib = decoded_mib / 4
        past_budget = streamed_shards(directory, cache="auto", cache_budget_mb=budget_mib,
                                      augmentation="random_resized_crop")
        assert not past_budget.is_cached("train")
        rss_third, rss_all = flat_memory(past_budget, FLAGS.batch_size_224)

    fashion_rate = input_rate(fashion)
    synthetic = synthetic_dataset()
    synthetic_rate = input_rate(synthetic)

    trainer = sokd_trainer(fashion_shape, fashion_classes)
    fashion_step = step_rate(trainer, constant_batches(fashion_shape, fashion_classes))
    fed_step = step_rate(trainer, fashion.train_batches(FLAGS.batch_size, seed=SEED))
    cifar_trainer = sokd_trainer(synthetic.info.image_shape, synthetic.info.num_classes)
    cifar_step = step_rate(cifar_trainer, constant_batches(synthetic.info.image_shape,
                                                           synthetic.info.num_classes))

    step_224 = step_rate(
        sokd_trainer((224, 224, 3), 100),
        constant_batches((224, 224, 3), 100, FLAGS.batch_size_224), FLAGS.batch_size_224)

    rows = [
        ("fashion_mnist 28x28x1, in memory", fashion_rate, fashion_step),
        ("synthetic 32x32x3, in memory", synthetic_rate, cifar_step),
        ("fashion_mnist 28x28x1, TFRecord stream", stream_rate, fashion_step),
        ("32x32x3 PNG, GZIP shards stream", shards_32_rate, cifar_step),
        (f"224x224x3 JPEG, GZIP stream, RRC, b{FLAGS.batch_size_224}", shards_224_rate,
         step_224),
    ]
    print(f"\nInput pipeline vs SOKD step ({quickstart.model.teacher} -> "
          f"{quickstart.model.student}, batch {FLAGS.batch_size}, "
          f"{tf.config.threading.get_inter_op_parallelism_threads() or 'auto'} inter-op "
          f"threads, median of {FLAGS.repeats})")
    print(f"Fashion-MNIST load + validation hold-out: {load_s:.1f} s")
    header = f"| {'data':40s} | {'input img/s':>12s} | {'SOKD step img/s':>15s} | {'ratio':>7s} |"
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for name, rate, step in rows:
        print(f"| {name:40s} | {rate:12,.0f} | {step:15,.0f} | {rate / step:6.0f}x |")
    print(f"SOKD fit fed by train_batches (Fashion-MNIST): {fed_step:,.0f} img/s "
          f"({fed_step / fashion_step:.2f} of the constant-batch step)")
    print(f"Resident memory (VmRSS) streaming {FLAGS.stream_images_224} 224x224 images "
          f"({decoded_mib:,.0f} MiB decoded, budget {budget_mib:,.0f} MiB): "
          f"{rss_third:,.0f} MiB after 1/3 of the epoch, {rss_all:,.0f} MiB after all "
          f"(ratio {rss_all / rss_third:.2f})")
    goal = min(rate / step for _, rate, step in rows[:2])
    print(f"goal input >= 5x step (in-memory rows): {'met' if goal >= 5 else 'NOT met'} "
          f"(lowest ratio {goal:.0f}x)")


if __name__ == "__main__":
    app.run(main)
