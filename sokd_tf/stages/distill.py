"""Distillation stage: the student trained with `train.method` (vanilla, KD, DML, SOKD).

Reads the teacher file (never overwrites it) and writes `distill/`; resumes from its last
completed epoch when rerun and is skipped once `distill/results.json` exists.

Reference: docs/METHOD.md, "Objective", "Teacher BatchNorm" and "Protocol".
"""

from __future__ import annotations

import os

import keras
import tensorflow as tf

from sokd_tf import distillers
from sokd_tf.config import RunConfig
from sokd_tf.data import ImageDataset
from sokd_tf.errors import UserError
from sokd_tf.models import peer as peer_lib
from sokd_tf.models import specs
from sokd_tf.runtime import cluster
from sokd_tf.runtime import strategy as strategy_lib
from sokd_tf.stages import fit
from sokd_tf.stages import workdir as workdir_lib
from sokd_tf.stages.evaluate import evaluate_model
from sokd_tf.stages.teacher import build_model, load_teacher, teacher_path


def check_teacher(config: RunConfig, workdir: str) -> None:
    """Refuses, before any work, a method that needs a teacher file that does not exist.

    Raises:
      UserError: naming the missing file and how to get one.
    """
    path = teacher_path(config, workdir)
    if path is not None and not os.path.exists(path):
        raise UserError(
            f"--method={config.train.method} needs a trained teacher: {path!r} does not exist "
            f"(run `sokd-tf train-teacher` first or pass --teacher_checkpoint)"
        )


def _evaluate_here(model: keras.Model, data, strategy) -> dict:
    """Top-1/top-5 of a plain model computed by this process alone (no collective ops).

    A model built in a multi-worker strategy's scope would run collectives in
    `predict`, which hang or abort once workers diverge (only the chief writes results),
    so it is evaluated through a copy with ordinary variables.
    """
    if cluster.is_multi_worker(strategy):
        local = keras.models.clone_model(model)  # outside any strategy scope
        local.set_weights(model.get_weights())
        model = local
    return evaluate_model(model, data)


def build_distiller(config: RunConfig, info, teacher, synchronized_bn: bool,
                    batch_norm: str = "fused"):
    """The method's trainer and the models to save per role (role -> {file stem: model}).

    `batch_norm` is the resolved `model.batch_norm` of the fresh models (SOKD's peer is a
    copy of the teacher's layers, so it follows the teacher's).
    """
    trainer_class = distillers.METHODS[config.train.method]
    student = build_model(config.model.student, info, config.model, role="student",
                          synchronized_bn=synchronized_bn, model_name="student",
                          batch_norm=batch_norm)
    loss = config.loss
    if trainer_class is distillers.VanillaTrainer:
        return distillers.VanillaTrainer(student, role="student"), {"student": {"student": student}}
    if trainer_class is distillers.KnowledgeDistiller:  # kd, fitnet, at
        trainer = distillers.KnowledgeDistiller(
            teacher, student, temperature=loss.temperature, weights=loss.kd_weights(),
            teacher_bn_mode=config.train.teacher_bn_mode,
            feature_weights=loss.kd_feature_weights(), feature_pairs=loss.feature_pairs,
        )
        return trainer, {"student": {"student": student}}
    if trainer_class is distillers.MutualLearner:
        peer = build_model(config.model.teacher, info, config.model, role="teacher",
                           synchronized_bn=synchronized_bn, model_name="peer",
                           batch_norm=batch_norm)
        if specs.spec_kind(config.model.teacher) == "keras_file":
            peer = keras.models.clone_model(peer)  # DML trains from scratch: fresh weights
        trainer = distillers.MutualLearner(
            peer, student, temperature=loss.dml_temperature,
            temperature_squared=loss.dml_temperature_squared,
        )
        return trainer, {"student": {"student": student}, "peer": {"peer": peer}}
    cut = peer_lib.peer_cut(teacher, config.model.peer_from)
    peer = peer_lib.build_peer(teacher, init=config.model.peer_init, from_layer=cut)
    trainer = distillers.SemiOnlineDistiller(
        teacher, peer, student, temperature=loss.temperature, weights=loss.sokd_weights(),
        teacher_bn_mode=config.train.teacher_bn_mode, from_stage=cut,
        feature_weights=loss.sokd_feature_weights(), feature_pairs=loss.feature_pairs,
    )
    reconstructed = peer_lib.build_reconstructed_teacher(teacher, peer, from_layer=cut)
    return trainer, {
        "student": {"student": student},
        "peer": {"peer": peer, "reconstructed_teacher": reconstructed},
    }


def distill(config: RunConfig, workdir: str, dataset: ImageDataset, *,
            strategy: tf.distribute.Strategy | None = None) -> dict:
    """Trains the student with `config.train.method`; writes `distill/` artifacts.

    The teacher is `config.model.teacher_checkpoint`, by default the workdir's own
    `teacher/teacher.keras`; the file is only read, never overwritten, even when the
    teacher's BatchNorm statistics move during distillation (`teacher_bn_mode="official"`).
    `strategy` as in `fit.setup_runtime`. Under multi-worker training every worker
    trains and returns the same results record; the chief alone writes files.
    """
    paths = workdir_lib.Workdir(workdir)
    if os.path.exists(paths.distill.results):
        return workdir_lib.read_json(paths.distill.results)
    check_teacher(config, workdir)
    info = dataset.info
    source = teacher_path(config, workdir)
    strategy, choices = fit.setup_runtime(config, strategy)
    test_data = dataset.eval_batches("test", config.data.eval_batch_size)
    synchronized_bn = strategy_lib.use_synchronized_bn(config.model.synchronized_bn, strategy)
    trainer_class = distillers.METHODS[config.train.method]
    with strategy.scope():
        teacher = None
        if source is not None:
            teacher = load_teacher(
                source, info, config.model, synchronized_bn=synchronized_bn,
                require_graph=trainer_class is distillers.SemiOnlineDistiller,
                batch_norm=choices.batch_norm,
            )
        trainer, best_models = build_distiller(
            config, info, teacher, synchronized_bn, choices.batch_norm
        )
        trainer.compile(
            optimizer=distillers.make_optimizer(config.train, fit.steps_per_epoch(config, dataset)),
            jit_compile=config.train.jit_compile,
        )
    peer_description = None
    if trainer_class is distillers.SemiOnlineDistiller:
        peer_description = peer_lib.describe_peer(teacher, trainer.peer, from_layer=trainer.from_stage)
        print(peer_lib.format_peer_description(peer_description), flush=True)
    teacher_before = _evaluate_here(teacher, test_data, strategy) if teacher is not None else None
    rows, best = fit.fit_stage(
        trainer,
        stage="distill",
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
    results = fit.stage_results(rows, best, list(best_models), config.data.validation_size)
    results["method"] = config.train.method
    if peer_description is not None:
        results["peer"] = peer_description
    # Every term the step optimises, with its weight (report.md lists them).
    results["loss_terms"] = {
        name: weight for name, weight in trainer.loss_weights_by_term.items() if weight
    }
    results["teacher_bn_mode"] = config.train.teacher_bn_mode if teacher is not None else None
    results.update(choices.record())
    results["params"] = {
        stem: model.count_params() for role_models in best_models.values()
        for stem, model in role_models.items()
    }
    if teacher is not None:
        results["teacher"] = {"checkpoint": source, "before_distillation": teacher_before}
        results["params"]["teacher"] = teacher.count_params()
        if teacher_after is not None:
            results["teacher"]["after_distillation_bn_statistics_moved"] = teacher_after
    if cluster.is_chief(strategy):
        for role_models in best_models.values():
            for stem, model in role_models.items():
                workdir_lib.save_model(model, paths.distilled(stem, "last"))
        workdir_lib.write_json(paths.distill.results, results)
    return results
