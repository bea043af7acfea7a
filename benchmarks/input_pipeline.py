"""Is the input pipeline fast enough? Images/s of `train_batches` vs the SOKD step.

    python -m benchmarks.input_pipeline            # full table (~2-4 min on 2 CPU cores)
    python -m benchmarks.input_pipeline --steps=10 --input_batches=100   # quicker

Rows:
  * real Fashion-MNIST (quickstart preset: IDX files in memory, training augmentation),
  * a synthetic in-memory 32x32x3 set (CIFAR-sized, 50,000 images),
  * the same Fashion-MNIST images streamed from PNG TFRecords (`cache="never"`: decoded
    every epoch), the slow path for data that does not fit in memory.
Each input rate is printed beside the images/s of one SOKD training step
(`SemiOnlineDistiller`, quickstart models wrn_16_2 teacher -> wrn_16_1 student, batch 128)
at the same image shape, measured in the same process, and their ratio (goal >= 5x). The
step is timed on a constant batch (pure compute) and, for Fashion-MNIST, also fed by the
pipeline through `fit` (what training sees). The machine may be shared: numbers are the
median of `--repeats` timings.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

from sokd_tf import config as config_lib
from sokd_tf import distillers, models
from sokd_tf.data import DatasetInfo, ImageDataset, load_dataset, write_tfrecords
from sokd_tf.data.source import SourceSplit
from sokd_tf.models import peer as peer_lib

flags.DEFINE_integer("batch_size", 128, "Training batch size.")
flags.DEFINE_integer("input_batches", 300, "Batches timed per input measurement.")
flags.DEFINE_integer("steps", 10, "SOKD steps timed per step measurement.")
flags.DEFINE_integer("repeats", 3, "Timings per measurement (median reported).")
flags.DEFINE_integer("stream_images", 20000, "Fashion-MNIST images in the TFRecord row.")
FLAGS = flags.FLAGS
SEED = 8888


def _median_rate(measure, repeats: int) -> float:
    return statistics.median(measure() for _ in range(repeats))


def input_rate(dataset: ImageDataset) -> float:
    """Images/s delivered by `train_batches` with training augmentation."""
    batches = dataset.train_batches(FLAGS.batch_size, seed=SEED)
    iterator = iter(batches)
    for _ in range(10):
        next(iterator)

    def measure():
        start, count = time.perf_counter(), 0
        for _ in range(FLAGS.input_batches):
            count += int(next(iterator)[1].shape[0])
        return count / (time.perf_counter() - start)

    return _median_rate(measure, FLAGS.repeats)


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


def step_rate(trainer, batches: tf.data.Dataset) -> float:
    """Images/s of `fit` over `batches` (first call traces the step; not timed)."""
    trainer.fit(batches, steps_per_epoch=3, epochs=1, verbose=0, shuffle=False)

    def measure():
        start = time.perf_counter()
        trainer.fit(batches, steps_per_epoch=FLAGS.steps, epochs=1, verbose=0, shuffle=False)
        return FLAGS.steps * FLAGS.batch_size / (time.perf_counter() - start)

    return _median_rate(measure, FLAGS.repeats)


def constant_batches(image_shape, num_classes) -> tf.data.Dataset:
    rng = np.random.default_rng(0)
    images = rng.normal(size=(FLAGS.batch_size, *image_shape)).astype(np.float32)
    labels = (np.arange(FLAGS.batch_size) % num_classes).astype(np.int32)
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

    fashion_rate = input_rate(fashion)
    synthetic = synthetic_dataset()
    synthetic_rate = input_rate(synthetic)

    trainer = sokd_trainer(fashion_shape, fashion_classes)
    fashion_step = step_rate(trainer, constant_batches(fashion_shape, fashion_classes))
    fed_step = step_rate(trainer, fashion.train_batches(FLAGS.batch_size, seed=SEED))
    cifar_trainer = sokd_trainer(synthetic.info.image_shape, synthetic.info.num_classes)
    cifar_step = step_rate(cifar_trainer, constant_batches(synthetic.info.image_shape,
                                                           synthetic.info.num_classes))

    rows = [
        ("fashion_mnist 28x28x1, in memory", fashion_rate, fashion_step),
        ("synthetic 32x32x3, in memory", synthetic_rate, cifar_step),
        ("fashion_mnist 28x28x1, TFRecord stream", stream_rate, fashion_step),
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
    goal = min(rate / step for _, rate, step in rows[:2])
    print(f"goal input >= 5x step (in-memory rows): {'met' if goal >= 5 else 'NOT met'} "
          f"(lowest ratio {goal:.0f}x)")


if __name__ == "__main__":
    app.run(main)
