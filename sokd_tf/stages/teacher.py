"""Teacher stage: vanilla training of the teacher architecture, and loading a teacher file.

Reads and writes only the workdir (`teacher/`); resumes from its last completed epoch
when rerun and is skipped once `teacher/results.json` exists.

Reference: docs/METHOD.md, "Optimisation" (the teacher is trained on the same schedule).
"""

from __future__ import annotations

import dataclasses
import os

import keras
import tensorflow as tf

from sokd_tf import distillers, models
from sokd_tf.config import RunConfig
from sokd_tf.data import ImageDataset
from sokd_tf.errors import UserError
from sokd_tf.models import precision
from sokd_tf.runtime import cluster
from sokd_tf.runtime import strategy as strategy_lib
from sokd_tf.stages import fit
from sokd_tf.stages import workdir as workdir_lib
from sokd_tf.stages.evaluate import load_model


def load_teacher(path: str, info) -> keras.Model:
    """Loads a teacher `.keras` file in the global dtype policy; checks it fits the data.

    Raises:
      UserError: missing/unreadable file, or class count / input shape differ from the data.
    """
    if not os.path.exists(path):
        raise UserError(
            f"teacher checkpoint {path!r} does not exist; train one with `sokd-tf train-teacher` "
            f"or pass --teacher_checkpoint"
        )
    # The file records the policy the teacher was trained in; compute in this run's
    # (a float32 teacher in a mixed_bfloat16 distillation runs, and seeds its peer, in
    # bfloat16).
    teacher = precision.with_dtype_policy(load_model(path))
    input_shape = tuple(teacher.input_shape[1:])
    num_classes = teacher.output_shape[-1]
    if input_shape != tuple(info.image_shape) or num_classes != info.num_classes:
        raise UserError(
            f"teacher checkpoint {path!r} takes {input_shape} images and predicts {num_classes} "
            f"classes, but the data has {tuple(info.image_shape)} images and {info.num_classes} classes"
        )
    return teacher


def build_model(spec: str, info, *, synchronized_bn: bool, model_name: str) -> keras.Model:
    """A fresh model of architecture `spec` for the data described by `info`."""
    return models.build(
        spec, info.image_shape, info.num_classes, synchronized_bn=synchronized_bn, model_name=model_name
    )


def train_teacher(config: RunConfig, workdir: str, dataset: ImageDataset, *,
                  strategy: tf.distribute.Strategy | None = None) -> dict:
    """Vanilla CE training of the teacher; writes `teacher/teacher.keras` (last epoch).

    Under multi-worker training every worker calls this; the chief writes the files and
    every worker returns only once they are written (the next stage reads the teacher).
    Every worker returns the same results record.
    """
    paths = workdir_lib.Workdir(workdir)
    if os.path.exists(paths.teacher.results):
        return workdir_lib.read_json(paths.teacher.results)
    strategy = fit.setup_runtime(config, strategy)
    info = dataset.info
    with strategy.scope():
        teacher = build_model(
            config.model.teacher, info, model_name="teacher",
            synchronized_bn=strategy_lib.use_synchronized_bn(config.model.synchronized_bn, strategy),
        )
        trainer = distillers.VanillaTrainer(teacher, role="teacher")
        steps = fit.steps_per_epoch(config, dataset)
        teacher_schedule = dataclasses.replace(
            config.train,
            lr_decay_epochs=config.train.teacher_lr_decay_epochs or config.train.lr_decay_epochs,
        )
        trainer.compile(
            optimizer=distillers.make_optimizer(
                teacher_schedule, steps, base_learning_rate=config.train.teacher_learning_rate
            ),
            jit_compile=config.train.jit_compile,
        )
    rows, best = fit.fit_stage(
        trainer,
        stage="teacher",
        config=config,
        dataset=dataset,
        strategy=strategy,
        stage_dir=paths.teacher_dir,
        epochs=config.train.teacher_epochs,
        best_models={"teacher": {"teacher": teacher}},
        test_data=dataset.eval_batches("test", config.data.eval_batch_size),
    )
    results = fit.stage_results(rows, best, ["teacher"], config.data.validation_size)
    results["checkpoint"] = paths.teacher_checkpoint
    results["params"] = {"teacher": teacher.count_params()}
    if cluster.is_chief(strategy):
        workdir_lib.save_model(teacher, paths.teacher_checkpoint)
        workdir_lib.write_json(paths.teacher.results, results)
    cluster.barrier(strategy)  # every worker waits until the chief has written the teacher
    return results
