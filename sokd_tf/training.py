"""Training stages: the teacher's vanilla training and the distillation stage.

Each stage reads its inputs from and writes its outputs to the run's workdir (see
`sokd_tf.artifacts`), resumes from its last completed epoch when rerun, and is skipped
when its `results.json` already exists.

Reference: SOKD spec, "Optimisation (official recipe, CIFAR-100)".
"""

from __future__ import annotations

import dataclasses
import os

import keras
import tensorflow as tf

from sokd_tf import artifacts, callbacks, distillers, distribute, models
from sokd_tf.config import RunConfig
from sokd_tf.data import ImageDataset
from sokd_tf.errors import UserError
from sokd_tf.evaluation import evaluate_model, load_model
from sokd_tf.models import peer as peer_lib
from sokd_tf.models import precision


def setup_runtime(config: RunConfig, strategy: tf.distribute.Strategy | None = None):
    """Seeds, precision policy and strategy for a stage; returns the strategy.

    `strategy` is one the caller already made: a process creates its strategy once
    (a multi-worker or TPU strategy cannot be set up twice), `workflow.run` passes it to
    every stage. None = make `config.train.strategy`'s.
    """
    keras.utils.set_random_seed(config.train.seed)
    if config.data.deterministic:
        tf.config.experimental.enable_op_determinism()
    distribute.set_precision(config.train.precision)
    return strategy if strategy is not None else distribute.make_strategy(config.train.strategy)


def load_teacher(path: str, info) -> keras.Model:
    """Loads a teacher `.keras` file in the global dtype policy; checks it fits the data.

    Raises:
      UserError: missing/unreadable file, or class count / input shape differ from the data.
    """
    if not os.path.exists(path):
        raise UserError(
            f"teacher checkpoint {path!r} does not exist; train one with pipelines.train_teacher "
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


def _evaluate_here(model: keras.Model, data, strategy) -> dict:
    """Top-1/top-5 of a plain model computed by this process alone (no collective ops).

    A model built in a multi-worker strategy's scope would run collectives in
    `predict`, which hang or abort once workers diverge (only the chief writes results),
    so it is evaluated through a copy with ordinary variables.
    """
    if distribute.is_multi_worker(strategy):
        local = keras.models.clone_model(model)  # outside any strategy scope
        local.set_weights(model.get_weights())
        model = local
    return evaluate_model(model, data)


def _build(name: str, info, synchronized_bn: bool, model_name: str) -> keras.Model:
    return models.build(
        name, info.image_shape, info.num_classes, synchronized_bn=synchronized_bn, model_name=model_name
    )


def _fit(trainer, *, config, dataset, strategy, stage_dir, epochs, best_models, test_data):
    """Runs `fit` with resume, logging and best-epoch checkpoints; returns the history rows.

    `best_models` maps each role to the models saved on that role's best epoch (chosen
    on `val_{role}/top1`).

    Under multi-worker training every worker runs this; only the chief's files land in
    `stage_dir` (the others write to temporary directories, removed at the end).
    """
    backup_dir = os.path.join(stage_dir, "checkpoints", "backup")
    write_dir = distribute.worker_checkpoint_dir(stage_dir, strategy)
    steps = _steps(config, dataset)
    # The data pipeline must start at the resumed epoch, so read it before `fit` does.
    first_epoch = distribute.read_backup_epoch(backup_dir)
    train_data = dataset.train_batches(
        config.data.batch_size,
        seed=config.train.seed,
        first_epoch=first_epoch,
        steps_per_epoch=steps,
        drop_remainder=config.data.drop_remainder,
    )
    validation_split = "validation" if config.data.validation_size > 0 else "test"
    validation_data = dataset.eval_batches(validation_split, config.data.eval_batch_size)
    def evaluate(model, data):
        return distribute.evaluate_model(model, data, strategy=strategy)
    roles = list(best_models)
    monitor = {role: f"val_{role}/top1" for role in roles}
    history = callbacks.MetricHistory(write_dir, initial_epoch=first_epoch)
    fit_callbacks = [
        callbacks.LearningRateLogger(),
        callbacks.TestSplitEvaluation(test_data, evaluate),
        callbacks.BestCheckpoints(write_dir, monitor, best_models, initial_epoch=first_epoch),
        history,
        callbacks.EpochSummary(roles, epochs),
        keras.callbacks.TensorBoard(os.path.join(write_dir, "logs")),
        # Last, so an epoch counts as done only once everything above is written.
        distribute.BackupAndRestore(backup_dir, strategy, delete_checkpoint=False),
    ]
    distribute.fit_model(
        trainer,
        train_data,
        strategy=strategy,
        epochs=epochs,
        steps_per_epoch=steps,
        validation_data=validation_data,
        callbacks=fit_callbacks,
        verbose=2 if os.environ.get("CI") else 1,
    )
    best = artifacts.read_json(os.path.join(write_dir, "checkpoints", "best.json"), {})
    distribute.remove_worker_checkpoint_dir(write_dir, stage_dir)
    return history.rows, best


def _results(rows, best, roles, validation_size):
    last = rows[-1] if rows else {}
    selection = "validation" if validation_size > 0 else "best on test, as the paper reports"
    out = {"epochs_completed": len(rows), "best_epoch_selected_on": selection, "roles": {}}
    for role in roles:
        record = best.get(role, {})
        out["roles"][role] = {
            "last_test_top1": last.get(f"test_{role}/top1"),
            "last_test_top5": last.get(f"test_{role}/top5"),
            "best_epoch": record.get("epoch"),
            "best_selection_top1": record.get("value"),
            "best_test_top1": record.get("test_top1"),
        }
    return out


def train_teacher(config: RunConfig, workdir: str, dataset: ImageDataset, *,
                  strategy: tf.distribute.Strategy | None = None) -> dict:
    """Vanilla CE training of the teacher; writes `teacher/teacher.keras` (last epoch).

    Under multi-worker training every worker calls this; the chief writes the files and
    every worker returns only once they are written (the next stage reads the teacher).
    Other workers return `{}`.
    """
    paths = artifacts.Workdir(workdir)
    results_path = os.path.join(paths.teacher_dir, "results.json")
    if os.path.exists(results_path):
        return artifacts.read_json(results_path)
    strategy = setup_runtime(config, strategy)
    info = dataset.info
    with strategy.scope():
        teacher = _build(config.model.teacher, info, distribute.use_synchronized_bn(config.model.synchronized_bn, strategy), "teacher")
        trainer = distillers.VanillaTrainer(teacher, role="teacher")
        steps = _steps(config, dataset)
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
    test_data = dataset.eval_batches("test", config.data.eval_batch_size)
    rows, best = _fit(
        trainer,
        config=config,
        dataset=dataset,
        strategy=strategy,
        stage_dir=paths.teacher_dir,
        epochs=config.train.teacher_epochs,
        best_models={"teacher": {"teacher": teacher}},
        test_data=test_data,
    )
    results = {}
    if distribute.is_chief(strategy):
        artifacts.save_model(teacher, paths.teacher_checkpoint)
        results = _results(rows, best, ["teacher"], config.data.validation_size)
        results["checkpoint"] = paths.teacher_checkpoint
        results["params"] = {"teacher": teacher.count_params()}
        artifacts.write_json(results_path, results)
    distribute.barrier(strategy)  # every worker waits until the chief has written the teacher
    return results


def _steps(config: RunConfig, dataset: ImageDataset) -> int:
    steps = dataset.steps_per_epoch(config.data.batch_size, drop_remainder=config.data.drop_remainder)
    if config.train.steps_per_epoch is not None:
        steps = min(steps, config.train.steps_per_epoch)
    return steps


def build_distiller(config: RunConfig, info, teacher, synchronized_bn: bool):
    """The method's trainer, its roles and the models to save per role."""
    method = config.train.method
    student = _build(config.model.student, info, synchronized_bn, "student")
    loss = config.loss
    if method == "vanilla":
        return distillers.VanillaTrainer(student, role="student"), {"student": {"student": student}}
    if method == "kd":
        trainer = distillers.KnowledgeDistiller(
            teacher, student, temperature=loss.temperature, weights=loss.kd_weights(),
            teacher_bn_mode=config.train.teacher_bn_mode,
        )
        return trainer, {"student": {"student": student}}
    if method == "dml":
        peer = _build(config.model.teacher, info, synchronized_bn, "peer")
        trainer = distillers.MutualLearner(
            peer, student, temperature=loss.dml_temperature,
            temperature_squared=loss.dml_temperature_squared,
        )
        return trainer, {"student": {"student": student}, "peer": {"peer": peer}}
    peer = peer_lib.build_peer(teacher, init=config.model.peer_init)
    trainer = distillers.SemiOnlineDistiller(
        teacher, peer, student, temperature=loss.temperature, weights=loss.sokd_weights(),
        teacher_bn_mode=config.train.teacher_bn_mode,
    )
    reconstructed = peer_lib.build_reconstructed_teacher(teacher, peer)
    return trainer, {
        "student": {"student": student},
        "peer": {"peer": peer, "reconstructed_teacher": reconstructed},
    }


def distill(config: RunConfig, workdir: str, dataset: ImageDataset, *,
            strategy: tf.distribute.Strategy | None = None) -> dict:
    """Trains the student with `config.train.method`; writes `distill/` artifacts.

    The teacher is `config.model.teacher_checkpoint`, by default the workdir's own `teacher/teacher.keras`; the file is
    only read, never overwritten, even when the teacher's BatchNorm statistics move
    during distillation (`teacher_bn_mode="official"`). `strategy` as in `setup_runtime`;
    under multi-worker training workers other than the chief return `{}`.
    """
    paths = artifacts.Workdir(workdir)
    results_path = os.path.join(paths.distill_dir, "results.json")
    if os.path.exists(results_path):
        return artifacts.read_json(results_path)
    method = config.train.method
    info = dataset.info
    teacher_path = config.model.teacher_checkpoint or paths.teacher_checkpoint
    strategy = setup_runtime(config, strategy)
    test_data = dataset.eval_batches("test", config.data.eval_batch_size)
    with strategy.scope():
        teacher = load_teacher(teacher_path, info) if method in ("kd", "sokd") else None
        trainer, best_models = build_distiller(
            config, info, teacher, distribute.use_synchronized_bn(config.model.synchronized_bn, strategy)
        )
        trainer.compile(
            optimizer=distillers.make_optimizer(config.train, _steps(config, dataset)),
            jit_compile=config.train.jit_compile,
        )
    teacher_before = _evaluate_here(teacher, test_data, strategy) if teacher is not None else None
    roles = list(best_models)
    rows, best = _fit(
        trainer,
        config=config,
        dataset=dataset,
        strategy=strategy,
        stage_dir=paths.distill_dir,
        epochs=config.train.epochs,
        best_models=best_models,
        test_data=test_data,
    )
    teacher_after = None
    if teacher is not None and config.train.teacher_bn_mode == "official":
        teacher_after = _evaluate_here(teacher, test_data, strategy)
    if not distribute.is_chief(strategy):
        return {}
    for role_models in best_models.values():
        for stem, model in role_models.items():
            artifacts.save_model(model, paths.distilled(stem, "last"))
    results = _results(rows, best, roles, config.data.validation_size)
    results["method"] = method
    results["params"] = {
        stem: model.count_params() for role_models in best_models.values()
        for stem, model in role_models.items()
    }
    if teacher is not None:
        results["teacher"] = {"checkpoint": teacher_path, "before_distillation": teacher_before}
        results["params"]["teacher"] = teacher.count_params()
        if teacher_after is not None:
            results["teacher"]["after_distillation_bn_statistics_moved"] = teacher_after
    artifacts.write_json(results_path, results)
    return results
