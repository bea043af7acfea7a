"""The end-to-end job: teacher -> distillation -> evaluation -> export -> report.

Every stage is also callable alone; they communicate only through the workdir.
"""

from __future__ import annotations

import os
import shutil

from sokd_tf import artifacts, distribute, report, training
from sokd_tf.config import RunConfig
from sokd_tf.data import ImageDataset, load_dataset
from sokd_tf.errors import ConfigError, UserError
from sokd_tf.evaluation import evaluate_model, load_model


def prepare_workdir(config: RunConfig, workdir: str, *, overwrite: bool = False) -> artifacts.Workdir:
    """Writes `config.json`, refusing a changed config on an existing workdir.

    Raises:
      ConfigError: the workdir holds a run made with a different config and `overwrite`
        is False.
    """
    paths = artifacts.Workdir(workdir)
    existing = artifacts.read_json(paths.config)
    if existing is not None and overwrite:
        for path in paths.stage_paths():
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    elif existing is not None:
        try:
            previous = RunConfig.from_dict(existing)
        except (ConfigError, TypeError) as error:
            raise ConfigError(f"{paths.config} is not a valid config ({error}); pass --overwrite") from None
        if previous != config:
            changes = _differences(previous.to_dict(), config.to_dict())
            raise ConfigError(
                f"workdir {workdir!r} holds a run with a different config ({'; '.join(changes)}); "
                f"rerun with the same flags to resume, use a new --workdir, or pass --overwrite "
                f"to delete that run"
            )
    artifacts.write_json(paths.config, config.to_dict())
    return paths


def _differences(old: dict, new: dict) -> list[str]:
    changes = []
    for section in new:
        for field, value in new[section].items():
            before = old.get(section, {}).get(field)
            if before != value:
                changes.append(f"{section}.{field}: {before!r} -> {value!r}")
    return changes


def evaluate_workdir(config: RunConfig, workdir: str, dataset: ImageDataset) -> dict:
    """Test top-1/top-5 of every model the run saved; writes `evaluation.json`."""
    paths = artifacts.Workdir(workdir)
    test_data = dataset.eval_batches("test", config.data.eval_batch_size)
    candidates = {"teacher": config.model.teacher_checkpoint or paths.teacher_checkpoint}
    for stem in ("student", "reconstructed_teacher"):
        for which in ("best", "last"):
            candidates[f"{stem}_{which}"] = paths.distilled(stem, which)
    results = {}
    for name, path in candidates.items():
        if os.path.exists(path):
            model = load_model(path)
            results[name] = {"path": path, "params": model.count_params(), **evaluate_model(model, test_data)}
    artifacts.write_json(paths.evaluation, results)
    return results


def export_stage(config: RunConfig, workdir: str, dataset: ImageDataset, student_path=None) -> dict:
    """Exports the distilled student (validation-best by default) for TF Serving and LiteRT."""
    from sokd_tf import export

    paths = artifacts.Workdir(workdir)
    student_path = student_path or paths.distilled("student", "best")
    student = export.load_student(student_path)
    # The whole training split: the int8 calibration takes `representative_size` of it,
    # the QAT fine-tune up to `qat_max_steps` batches.
    train_images, _ = dataset.raw_images("train")
    test_images, test_labels = dataset.raw_images("test")
    return export.export_student(
        student,
        dataset.info,
        paths.export_dir,
        config.export,
        train_images_uint8=train_images,
        test_images_uint8=test_images,
        test_labels=test_labels,
    )


def run(config: RunConfig, workdir: str, *, overwrite: bool = False) -> dict:
    """Runs every stage; resumes where a previous identical run stopped.

    Under `multi_worker` every worker runs this with the same config and a workdir on a
    shared filesystem: all workers train, the chief alone writes, evaluates and exports.
    """
    checkpoint = config.model.teacher_checkpoint
    if config.train.method in ("kd", "sokd") and checkpoint and not os.path.exists(checkpoint):
        raise UserError(f"teacher checkpoint {checkpoint!r} does not exist")
    dataset = load_dataset(config.data, seed=config.train.seed)
    paths = prepare_workdir(config, workdir, overwrite=overwrite)
    # One strategy for every stage: a multi-worker or TPU strategy is set up once per process.
    strategy = distribute.make_strategy(config.train.strategy)
    outcome = {}
    if config.train.method in ("kd", "sokd") and not config.model.teacher_checkpoint:
        outcome["teacher"] = training.train_teacher(config, workdir, dataset, strategy=strategy)
    outcome["distill"] = training.distill(config, workdir, dataset, strategy=strategy)
    if not distribute.is_chief(strategy):
        return outcome  # evaluation, export and the report are the chief's
    outcome["evaluation"] = evaluate_workdir(config, workdir, dataset)
    if not os.path.exists(os.path.join(paths.export_dir, "report.json")):
        outcome["export"] = export_stage(config, workdir, dataset)
    report.write_report(workdir)
    return outcome
