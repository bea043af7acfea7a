"""Sizes, accuracies and latencies of every LiteRT variant of a student, side by side.

    python -m benchmarks.export                                  # the quickstart's student
    python -m benchmarks.export --workdir=workdir/my_run         # any run's validation-best student
    python -m benchmarks.export --student=s.keras --data_dir=/usr/share/datasets/fashion-mnist
    python -m benchmarks.export --train_steps=600                # no student: train WRN-16-1 quickly

Runs the real export (`sokd_tf.export.export_student`) into `--out_dir` (a temporary
directory by default) on the full test split and prints each variant's size, test
top-1, agreement with the Keras student and median single-image latency (1 thread),
with ratios vs fp32 and the goals of issue #5: full-integer int8 >= 3.5x smaller,
<= 0.5 pt top-1 drop (QAT <= 0.3 pt), latency <= 1/1.5 of fp32's. Latency with the
XNNPACK delegate on and off and on several threads: `benchmarks/litert_latency.py`
(`--tflite_dir=OUT_DIR/export/tflite`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time

import keras
import numpy as np

from sokd_tf import export
from sokd_tf.config import TFLITE_VARIANTS, ExportConfig, RunConfig, resolve
from sokd_tf.data import load_dataset
from sokd_tf.models import BUILDERS
from sokd_tf.stages.workdir import Workdir, read_json


def _config(workdir: str, data_dir: str | None) -> RunConfig:
    saved = read_json(Workdir(workdir).config)
    config = RunConfig.from_dict(saved) if saved else resolve("quickstart")
    if data_dir:
        config = dataclasses.replace(
            config, data=dataclasses.replace(config.data, data_dir=data_dir))
    return config


def _train_quickly(dataset, steps: int, seed: int) -> keras.Model:
    info = dataset.info
    keras.utils.set_random_seed(seed)
    student = BUILDERS["wrn_16_1"](info.image_shape, info.num_classes, name="student")
    student.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    batches = dataset.train_batches(64, seed=seed, augment=False)
    student.fit(batches, steps_per_epoch=steps, epochs=1, verbose=0)
    return student


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="workdir/quickstart",
                        help="run whose config.json and distill/student_best.keras are used")
    parser.add_argument("--student", help="student .keras file (overrides the workdir's)")
    parser.add_argument("--data_dir", help="dataset directory (overrides the run's config)")
    parser.add_argument("--train_steps", type=int, default=600,
                        help="steps of the quick WRN-16-1 trained when no student exists")
    parser.add_argument("--variants", default=",".join(TFLITE_VARIANTS))
    parser.add_argument("--test_size", type=int, default=None, help="default: whole test split")
    parser.add_argument("--train_size", type=int, default=None,
                        help="training images for calibration and QAT (default: all)")
    parser.add_argument("--latency_runs", type=int, default=200)
    parser.add_argument("--representative_size", type=int, default=500)
    parser.add_argument("--qat_epochs", type=int, default=1)
    parser.add_argument("--qat_max_steps", type=int, default=None)
    parser.add_argument("--qat_learning_rate", type=float, default=1e-3)
    parser.add_argument("--out_dir", help="where the export goes (default: a temporary dir)")
    args = parser.parse_args(argv)

    config = _config(args.workdir, args.data_dir)
    dataset = load_dataset(config.data, seed=config.train.seed)
    student_path = args.student or Workdir(args.workdir).distilled("student", "best")
    if os.path.exists(student_path):
        student = export.load_student(student_path)
        origin = student_path
    else:
        start = time.perf_counter()
        student = _train_quickly(dataset, args.train_steps, config.train.seed)
        origin = (f"no student at {student_path}: WRN-16-1 trained here for "
                  f"{args.train_steps} steps of 64 ({time.perf_counter() - start:.0f} s)")
    train_images, _ = dataset.raw_images("train", limit=args.train_size)
    test_images, test_labels = dataset.raw_images("test", limit=args.test_size)
    export_config = ExportConfig(
        version=None,
        tflite_variants=tuple(v for v in args.variants.split(",") if v),
        representative_size=args.representative_size,
        qat_epochs=args.qat_epochs,
        qat_max_steps=args.qat_max_steps,
        qat_learning_rate=args.qat_learning_rate,
        latency_runs=args.latency_runs,
    )
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="sokd-export-bench-")
    start = time.perf_counter()
    report = export.export_student(
        student, dataset.info, os.path.join(out_dir, "export"), export_config,
        train_images_uint8=train_images, test_images_uint8=test_images,
        test_labels=test_labels,
    )
    seconds = time.perf_counter() - start

    print(f"student: {origin}")
    print(f"test images: {len(test_labels)}, training images for calibration/QAT: "
          f"{len(train_images)}; export took {seconds:.0f} s; artifacts in {out_dir}")
    if "qat" in report:
        print(f"QAT fine-tune: {json.dumps(report['qat'])}")
    print()
    print(export.format_table(report))
    print()
    for variant, checks in export.goals(report).items():
        marks = ", ".join(f"{name}: {'yes' if ok else 'NO'}" for name, ok in checks.items())
        print(f"{variant}: {marks}")
    sizes = {v: r["size_bytes"] for v, r in report["tflite"].items()}
    print(f"\nsizes (bytes): {json.dumps(sizes)}")
    print(f"keras top-1: {report['keras']['top1']:.4f}; "
          f"max |logit error| SavedModel: "
          f"{np.max([s['max_abs_logit_error'] for s in report['saved_model']['verification'].values()]):.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
