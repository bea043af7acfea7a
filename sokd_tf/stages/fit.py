"""The resumable fit harness shared by the teacher and distillation stages.

The whole story of a training stage, in order:

1. `setup_runtime`: seeds, op determinism, the machine's "auto" choices (precision and
   BatchNorm implementation, printed once), the dtype policy and the strategy.
2. The stage builds its trainer (a distiller) inside `strategy.scope()` and compiles it.
3. `fit_stage`: asks the runtime where this process writes and which epoch it resumes
   at (`runtime.loop.resumable_fit`), builds the epoch-seeded training data from that
   epoch, and fits with the stage callbacks: learning-rate log, test-split evaluation,
   best checkpoint per role (chosen on the validation split, or on test in paper mode),
   the metric history, a one-line summary, TensorBoard, and the backup (added last by the
   runtime, so an epoch counts as done only once everything else is written). Before all
   that writes, the divergence check: at the first non-finite loss term or gradient norm
   the stage stops with `DivergedError` and keeps nothing of that epoch.
4. `stage_results`: the stage's `results.json` record from the history and best epochs.

Reference: docs/METHOD.md, "Optimisation" and "Protocol".
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys

import keras
import tensorflow as tf

from sokd_tf.config import RunConfig
from sokd_tf.data import ImageDataset
from sokd_tf.models import specs
from sokd_tf.runtime import cpu, loop
from sokd_tf.runtime import strategy as strategy_lib
from sokd_tf.stages import callbacks, divergence
from sokd_tf.stages import workdir as workdir_lib

PAPER_SELECTION = "best on test, as the paper reports"


@dataclasses.dataclass(frozen=True)
class RuntimeChoices:
    """What the run's "auto" settings became on this machine.

    Attributes:
      precision: the Keras dtype policy in force (`train.precision` resolved).
      batch_norm: "fused" or "stock" (`model.batch_norm` resolved).
      machine: the detected CPU features and GPUs.
    """

    precision: str
    batch_norm: str
    machine: cpu.MachineFeatures

    def record(self) -> dict:
        """The fields a stage adds to its `results.json`."""
        return {
            "precision_used": self.precision,
            "batch_norm_used": self.batch_norm,
            "machine": self.machine.to_dict(),
        }


@functools.cache
def print_once(line: str, *, warning: bool = False) -> None:
    """Prints `line` the first time it comes (stderr for warnings): a run's stages all
    resolve the same choices, and the console should say so once."""
    print(line, file=sys.stderr if warning else sys.stdout, flush=True)


def setup_runtime(
    config: RunConfig,
    strategy: tf.distribute.Strategy | None = None,
    *,
    machine: cpu.MachineFeatures | None = None,
) -> tuple[tf.distribute.Strategy, RuntimeChoices]:
    """Seeds, the "auto" choices, the precision policy and the strategy for a stage.

    Args:
      config: the run's config.
      strategy: one the caller already made: a process creates its strategy once (a
        multi-worker or TPU strategy cannot be set up twice), `stages.run.run` passes it
        to every stage. None = make `config.train.strategy`'s.
      machine: the machine's features; None = `cpu.detect()`.

    Returns:
      (strategy, the resolved `RuntimeChoices`). The precision line (`precision auto ->
      float32 (CPU: ..., no AVX512-BF16)`) or the warning for `mixed_bfloat16` without
      native bfloat16 is printed once per process.
    """
    keras.utils.set_random_seed(config.train.seed)
    if config.data.deterministic:
        tf.config.experimental.enable_op_determinism()
    machine = machine if machine is not None else cpu.detect()
    precision = cpu.resolve_precision(
        config.train.precision, machine, strategy=config.train.strategy,
        bf16_slow_models=functools.partial(specs.bf16_slow_models, student=config.model.student,
                                           teacher=config.model.teacher))
    if precision.message:
        print_once(precision.message, warning=precision.warning)
    strategy_lib.set_precision(precision.policy)
    choices = RuntimeChoices(
        precision=precision.policy,
        batch_norm=cpu.resolve_batch_norm(config.model.batch_norm, machine),
        machine=machine,
    )
    if strategy is None:
        strategy = strategy_lib.make_strategy(config.train.strategy)
    return strategy, choices


def steps_per_epoch(config: RunConfig, dataset: ImageDataset) -> int:
    """One pass over the training split, capped by `train.steps_per_epoch`."""
    steps = dataset.steps_per_epoch(config.data.batch_size, drop_remainder=config.data.drop_remainder)
    if config.train.steps_per_epoch is not None:
        steps = min(steps, config.train.steps_per_epoch)
    return steps


def fit_stage(trainer, *, stage, config, dataset, strategy, stage_dir, epochs, best_models,
              test_data):
    """Runs `fit` with resume, logging, best-epoch checkpoints and the divergence check.

    Args:
      trainer: a compiled distiller built in `strategy.scope()`.
      stage: the stage's name ("teacher", "distill"), for a divergence message.
      config: the run's config.
      dataset: the run's `ImageDataset`.
      strategy: the strategy the trainer was built under.
      stage_dir: the stage's directory in the workdir.
      epochs: total epochs of the stage.
      best_models: role -> {file stem: model} saved on that role's best epoch (chosen on
        `val_{role}/top1`).
      test_data: finite test-split batches, evaluated after every epoch.

    Returns:
      (history rows, best epoch record per role). Under multi-worker training every worker
      runs this; only the chief's files land in `stage_dir`.

    Raises:
      DivergedError: a loss term or gradient norm went non-finite (`stage_dir` then
        holds `diverged.json` and the last good epoch's files, untouched).
    """
    steps = steps_per_epoch(config, dataset)
    stage_files = workdir_lib.StageFiles(stage_dir)
    with loop.resumable_fit(stage_dir, stage_files.backup, strategy) as session:
        train_data = dataset.train_batches(
            config.data.batch_size,
            seed=config.train.seed,
            first_epoch=session.first_epoch,
            steps_per_epoch=steps,
            drop_remainder=config.data.drop_remainder,
        )
        validation_split = "validation" if config.data.validation_size > 0 else "test"
        validation_data = dataset.eval_batches(validation_split, config.data.eval_batch_size)

        def evaluate(model, data):
            return loop.evaluate_model(model, data, strategy=strategy)

        roles = list(best_models)
        monitor = {role: f"val_{role}/top1" for role in roles}
        history = callbacks.MetricHistory(session.write_dir, initial_epoch=session.first_epoch)
        divergence.clear_record(session.write_dir)
        session.fit(
            trainer,
            train_data,
            epochs=epochs,
            steps_per_epoch=steps,
            validation_data=validation_data,
            callbacks=[
                callbacks.LearningRateLogger(),
                callbacks.TestSplitEvaluation(test_data, evaluate),
                # Before every callback that writes the epoch's files.
                divergence.DivergenceCheck(
                    stage, session.write_dir, strategy,
                    functools.partial(divergence.likely_fix, config.train, roles,
                                      precision=keras.config.dtype_policy().name),
                ),
                callbacks.BestCheckpoints(
                    session.write_dir, monitor, best_models, initial_epoch=session.first_epoch
                ),
                history,
                callbacks.EpochSummary(roles, epochs),
                keras.callbacks.TensorBoard(workdir_lib.StageFiles(session.write_dir).logs),
            ],
            verbose=2 if os.environ.get("CI") else 1,
        )
        best = workdir_lib.read_json(workdir_lib.StageFiles(session.write_dir).best_state, {})
    return history.rows, best


def stage_results(rows, best, roles, validation_size) -> dict:
    """The `results.json` record of a training stage (top-1 as fractions)."""
    last = rows[-1] if rows else {}
    selection = "validation" if validation_size > 0 else PAPER_SELECTION
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
