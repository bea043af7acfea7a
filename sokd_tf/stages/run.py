"""The end-to-end job: teacher -> distillation -> evaluation -> export -> report.

Every stage is also callable alone (`stages.teacher`, `stages.distill`, `stages.evaluate`,
`stages.export`, `stages.report`); they communicate only through the workdir.
"""

from __future__ import annotations

import os
import resource
import shutil
import time
from collections.abc import Sequence

from sokd_tf.config import HISTORY_KEY, RESUMABLE_FIELDS, RESUME_NEUTRAL_FIELDS, RunConfig
from sokd_tf.data import load_dataset
from sokd_tf.errors import ConfigError, DivergedError
from sokd_tf.runtime import backup, cluster
from sokd_tf.runtime import strategy as strategy_lib
from sokd_tf.stages import distill, divergence, report, teacher
from sokd_tf.stages import workdir as workdir_lib
from sokd_tf.stages.evaluate import evaluate_workdir
from sokd_tf.stages.export import export_stage


def prepare_workdir(config: RunConfig, workdir: str, *, overwrite: bool = False,
                    resume_changed: Sequence[str] = ()) -> workdir_lib.Workdir:
    """Writes `config.json`, refusing a changed config on an existing workdir.

    A run is continued (every stage resumes from its last completed epoch) only with
    the config it was started with, except for the fields named in `resume_changed`,
    which must be among `config.RESUMABLE_FIELDS` (learning rates, precision): the way
    to continue a diverged run from its last good epoch with a lower learning rate.
    Each such change is appended to `config.json`'s `history` with the epoch every
    stage resumes at and the divergence it follows, if any.

    Args:
      config: the run's config.
      workdir: the run's directory.
      overwrite: delete an existing run first.
      resume_changed: dotted fields allowed to differ from the existing run's config.

    Raises:
      ConfigError: the workdir holds a run made with a different config (in a field not
        named in `resume_changed`) and `overwrite` is False; `resume_changed` names a
        field that cannot change on resume, or there is no run to continue.
    """
    unsafe = [name for name in resume_changed if name not in RESUMABLE_FIELDS]
    if unsafe:
        raise ConfigError(
            f"--resume_changed may name only {list(RESUMABLE_FIELDS)}, got {unsafe}: any other "
            f"change makes the checkpoint describe a different run (use a new --workdir)"
        )
    paths = workdir_lib.Workdir(workdir)
    existing = workdir_lib.read_json(paths.config)
    history = []
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
        history = list(existing.get(HISTORY_KEY, []))
        changes = _differences(previous.to_dict(), config.to_dict())
        refused = [name for name in changes if name not in resume_changed]
        if refused:
            described = "; ".join(f"{name}: {old!r} -> {new!r}" for name, (old, new) in changes.items())
            hint = ""
            if all(name in RESUMABLE_FIELDS for name in refused):
                hint = f", or continue this run with the change: --resume_changed={','.join(refused)}"
            raise ConfigError(
                f"workdir {workdir!r} holds a run with a different config ({described}); "
                f"rerun with the same flags to resume, use a new --workdir, or pass --overwrite "
                f"to delete that run{hint}"
            )
        if changes:
            history.append(_resume_entry(paths, changes))
    elif resume_changed:
        raise ConfigError(
            f"--resume_changed continues an existing run, but {paths.config} does not exist"
        )
    record = config.to_dict()
    if history:
        record[HISTORY_KEY] = history
    workdir_lib.write_json(paths.config, record)
    return paths


def _differences(old: dict, new: dict) -> dict[str, tuple]:
    """Dotted field -> (old value, new value) for every field that differs.

    `config.RESUME_NEUTRAL_FIELDS` (how the data is held) are not differences.
    """
    changes = {}
    for section in new:
        for field, value in new[section].items():
            before = old.get(section, {}).get(field)
            if before != value and f"{section}.{field}" not in RESUME_NEUTRAL_FIELDS:
                changes[f"{section}.{field}"] = (before, value)
    return changes


def _resume_entry(paths: workdir_lib.Workdir, changes: dict) -> dict:
    """config.json's history entry of one continuation with changed fields."""
    stages = {}
    for name, files in (("teacher", paths.teacher), ("distill", paths.distill)):
        if os.path.exists(files.results):
            continue  # finished: the change does not reach it
        state = {"resumes_at_epoch": backup.read_backup_epoch(files.backup)}
        record = divergence.read_record(files.root)
        if record is not None:
            state["after_divergence"] = {
                key: record[key] for key in ("epoch", "step", "phase", "term", "value")
            }
        stages[name] = state
    return {
        "changed": {name: {"from": old, "to": new} for name, (old, new) in changes.items()},
        "stages": stages,
    }


def run(config: RunConfig, workdir: str, *, overwrite: bool = False,
        resume_changed: Sequence[str] = ()) -> dict:
    """Runs every stage; resumes where a previous identical run stopped.

    `resume_changed` as in `prepare_workdir` (continue with a lower learning rate or
    another precision). Under `multi_worker` every worker runs this with the same config
    and a workdir on a shared filesystem: all workers train, the chief alone writes,
    evaluates and exports.

    Raises:
      DivergedError: a training stage diverged; evaluation and export do not run, and
        the chief rewrites `report.md` to say where the run stopped.
    """
    started = time.monotonic()
    resumed = os.path.exists(workdir_lib.Workdir(workdir).config) and not overwrite
    trains_teacher = teacher.trains_teacher(config, workdir)
    if not trains_teacher:
        distill.check_teacher(config, workdir)  # a given teacher file must exist
    dataset = load_dataset(config.data, seed=config.train.seed)
    paths = prepare_workdir(config, workdir, overwrite=overwrite, resume_changed=resume_changed)
    # One strategy for every stage: a multi-worker or TPU strategy is set up once per process.
    strategy = strategy_lib.make_strategy(config.train.strategy)
    outcome = {}
    try:
        if trains_teacher:
            outcome["teacher"] = teacher.train_teacher(config, workdir, dataset, strategy=strategy)
        outcome["distill"] = distill.distill(config, workdir, dataset, strategy=strategy)
    except DivergedError:
        if cluster.is_chief(strategy):
            report.write_report(workdir)
        raise
    if not cluster.is_chief(strategy):
        return outcome  # evaluation, export and the report are the chief's
    outcome["evaluation"] = evaluate_workdir(config, workdir, dataset)
    if not os.path.exists(paths.export_report):
        outcome["export"] = export_stage(config, workdir, dataset)
    outcome["resources"] = resources(started, resumed)
    workdir_lib.write_json(paths.run_record, outcome["resources"])
    report.write_report(workdir)
    return outcome


def resources(started: float, resumed: bool) -> dict:
    """Wall time since `started` (time.monotonic) and this process's peak resident memory.

    `resumed`: the invocation continued an existing workdir, so the wall time covers only
    the stages it ran. Peak memory is the kernel's high-water mark of resident memory
    (`getrusage`, Linux reports KiB).
    """
    return {
        "wall_seconds": round(time.monotonic() - started, 1),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "resumed": resumed,
    }
