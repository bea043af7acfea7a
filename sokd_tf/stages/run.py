"""The end-to-end job: teacher -> distillation -> evaluation -> export -> report.

Every stage is also callable alone (`stages.teacher`, `stages.distill`, `stages.evaluate`,
`stages.export`, `stages.report`); they communicate only through the workdir.
"""

from __future__ import annotations

import os
import shutil

from sokd_tf.config import RunConfig
from sokd_tf.data import load_dataset
from sokd_tf.errors import ConfigError
from sokd_tf.runtime import cluster
from sokd_tf.runtime import strategy as strategy_lib
from sokd_tf.stages import distill, report, teacher
from sokd_tf.stages import workdir as workdir_lib
from sokd_tf.stages.evaluate import evaluate_workdir
from sokd_tf.stages.export import export_stage


def prepare_workdir(config: RunConfig, workdir: str, *, overwrite: bool = False) -> workdir_lib.Workdir:
    """Writes `config.json`, refusing a changed config on an existing workdir.

    Raises:
      ConfigError: the workdir holds a run made with a different config and `overwrite`
        is False.
    """
    paths = workdir_lib.Workdir(workdir)
    existing = workdir_lib.read_json(paths.config)
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
    workdir_lib.write_json(paths.config, config.to_dict())
    return paths


def _differences(old: dict, new: dict) -> list[str]:
    changes = []
    for section in new:
        for field, value in new[section].items():
            before = old.get(section, {}).get(field)
            if before != value:
                changes.append(f"{section}.{field}: {before!r} -> {value!r}")
    return changes


def run(config: RunConfig, workdir: str, *, overwrite: bool = False) -> dict:
    """Runs every stage; resumes where a previous identical run stopped.

    Under `multi_worker` every worker runs this with the same config and a workdir on a
    shared filesystem: all workers train, the chief alone writes, evaluates and exports.
    """
    trains_teacher = teacher.trains_teacher(config, workdir)
    if not trains_teacher:
        distill.check_teacher(config, workdir)  # a given teacher file must exist
    dataset = load_dataset(config.data, seed=config.train.seed)
    paths = prepare_workdir(config, workdir, overwrite=overwrite)
    # One strategy for every stage: a multi-worker or TPU strategy is set up once per process.
    strategy = strategy_lib.make_strategy(config.train.strategy)
    outcome = {}
    if trains_teacher:
        outcome["teacher"] = teacher.train_teacher(config, workdir, dataset, strategy=strategy)
    outcome["distill"] = distill.distill(config, workdir, dataset, strategy=strategy)
    if not cluster.is_chief(strategy):
        return outcome  # evaluation, export and the report are the chief's
    outcome["evaluation"] = evaluate_workdir(config, workdir, dataset)
    if not os.path.exists(paths.export_report):
        outcome["export"] = export_stage(config, workdir, dataset)
    report.write_report(workdir)
    return outcome
