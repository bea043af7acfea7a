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

from sokd_tf import distillers
from sokd_tf.config import ModelConfig, RunConfig
from sokd_tf.data import ImageDataset
from sokd_tf.errors import UserError
from sokd_tf.models import precision, specs
from sokd_tf.runtime import cluster
from sokd_tf.runtime import strategy as strategy_lib
from sokd_tf.stages import fit
from sokd_tf.stages import workdir as workdir_lib


def load_teacher(path: str, info, model_config: ModelConfig | None = None, *,
                 require_graph: bool = False, synchronized_bn: bool = False,
                 batch_norm: str | None = None) -> keras.Model:
    """Loads a trained teacher `.keras` file in the global dtype policy, checked for the data.

    Args:
      path: the teacher file.
      info: the dataset's `DatasetInfo` (input shape after image_size/channels, classes).
      model_config: the run's model config (its `.keras` loading opt-ins apply).
      require_graph: the method cuts a peer from the teacher's graph (SOKD).
      synchronized_bn: rebuild its BatchNormalization layers synchronized (replicas > 1).
      batch_norm: "fused" or "stock": the run's resolved `model.batch_norm`; None keeps
        the file's (same weights and maths either way).

    Raises:
      UserError: missing/unloadable file, or one that does not fit the data (input shape,
        class count, probability outputs), naming the fix.
    """
    if not os.path.exists(path):
        raise UserError(
            f"teacher checkpoint {path!r} does not exist; train one with `sokd-tf train-teacher` "
            f"or pass --teacher_checkpoint"
        )
    model_config = model_config or ModelConfig()
    teacher = specs.build_model(
        path, info.image_shape, info.num_classes, role="teacher", require_graph=require_graph,
        synchronized_bn=synchronized_bn, trust_custom_code=model_config.trust_custom_code,
        custom_modules=model_config.custom_modules, batch_norm=batch_norm,
    )
    # The file records the policy the teacher was trained in; compute in this run's
    # (a float32 teacher in a mixed_bfloat16 distillation runs, and seeds its peer, in
    # bfloat16).
    return precision.with_dtype_policy(teacher)


def teacher_path(config: RunConfig, workdir: str) -> str | None:
    """The teacher file the method distills from; None for methods without a teacher.

    `model.teacher_checkpoint` if given, else `model.teacher` when it is a `.keras` file
    (a trained teacher of the user's), else the workdir's own `teacher/teacher.keras`.
    """
    if not distillers.METHODS[config.train.method].needs_teacher:
        return None
    if config.model.teacher_checkpoint:
        return config.model.teacher_checkpoint
    if specs.spec_kind(config.model.teacher) == "keras_file":
        return config.model.teacher
    return workdir_lib.Workdir(workdir).teacher_checkpoint


def trains_teacher(config: RunConfig, workdir: str) -> bool:
    """Whether a run must train its teacher first (the method needs one and none is given)."""
    path = teacher_path(config, workdir)
    return path is not None and path == workdir_lib.Workdir(workdir).teacher_checkpoint


def build_model(spec: str, info, model_config: ModelConfig, *, role: str, synchronized_bn: bool,
                model_name: str, batch_norm: str | None = None) -> keras.Model:
    """The model `spec` names (zoo, keras.applications or a `.keras` file) for this data."""
    return specs.build_model(
        spec, info.image_shape, info.num_classes, role=role, synchronized_bn=synchronized_bn,
        name=model_name, trust_custom_code=model_config.trust_custom_code,
        custom_modules=model_config.custom_modules, batch_norm=batch_norm,
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
    strategy, choices = fit.setup_runtime(config, strategy)
    info = dataset.info
    with strategy.scope():
        teacher = build_model(
            config.model.teacher, info, config.model, role="teacher", model_name="teacher",
            synchronized_bn=strategy_lib.use_synchronized_bn(config.model.synchronized_bn, strategy),
            batch_norm=choices.batch_norm,
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
    results.update(choices.record())
    if cluster.is_chief(strategy):
        workdir_lib.save_model(teacher, paths.teacher_checkpoint)
        workdir_lib.write_json(paths.teacher.results, results)
    cluster.barrier(strategy)  # every worker waits until the chief has written the teacher
    return results
