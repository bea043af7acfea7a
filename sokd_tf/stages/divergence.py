"""Stopping a diverged training stage cleanly, and saying what to change.

Every distiller's step records, for each named loss term and each role's gradient norm,
whether it stayed finite (`sokd_tf.distillers.finite_checks`). `DivergenceCheck` reads
that record after every training batch, after validation and at the end of the epoch,
and at the first non-finite value raises `DivergedError` with one line naming the stage,
epoch, step, the offending term and the likely fix, after writing
`<stage>/diverged.json`. The fit harness places it before every callback that writes an
epoch's files (best models, history, backup), so nothing from the diverged epoch is kept:
the last good epoch's backup and files stay as they were, and the stage writes neither
`*_last` models nor `results.json`.

Under `mixed_float16` the gradient norms are not checked (the loss-scale optimizer skips
steps whose scaled gradients overflow and lowers the scale, which is not divergence);
the unscaled loss terms are.

Reference: docs/SCALING.md, "Divergence check".
"""

from __future__ import annotations

import math
import os

import keras
import numpy as np
import tensorflow as tf

from sokd_tf.config import TrainConfig
from sokd_tf.errors import DivergedError
from sokd_tf.runtime import cluster
from sokd_tf.stages import workdir as workdir_lib

_RATE_FIELDS = {
    "teacher": "teacher_learning_rate",
    "peer": "peer_learning_rate",
    "student": "student_learning_rate",
}


def likely_fix(train: TrainConfig, roles, term: str, *,
               precision: str | None = None) -> tuple[str, list[str]]:
    """The likely fix of a divergence in `term`, and the fields a continuation changes.

    Args:
      train: the stage's training config.
      roles: the roles the stage trains (the rates to lower when `term` names none).
      term: the offending check, e.g. `student/ce` or `peer/gradient_norm`.
      precision: the dtype policy the stage trained in (what `train.precision="auto"`
        resolved to); None = `train.precision`.

    Returns:
      (one clause for the error line, dotted config fields it suggests changing).
    """
    role = term.split("/", 1)[0]
    fields = [_RATE_FIELDS[role]] if role in _RATE_FIELDS else [_RATE_FIELDS[r] for r in roles]
    rates = " and ".join(f"--{field} (now {getattr(train, field):g})" for field in fields)
    fix = f"the learning rate is likely too high: lower {rates}"
    changed = [f"train.{field}" for field in fields]
    precision = precision or train.precision
    if precision == "mixed_float16":
        fix += ", or train in --precision=mixed_bfloat16 or float32 (float16 overflows above 65504)"
        changed.append("train.precision")
    elif precision == "mixed_bfloat16":
        fix += ", or train in --precision=float32"
        changed.append("train.precision")
    return fix, changed


def read_record(stage_dir: str) -> dict | None:
    """The stage's divergence record, or None when it did not stop on one."""
    return workdir_lib.read_json(workdir_lib.StageFiles(stage_dir).diverged)


def clear_record(stage_dir: str) -> None:
    """Removes a stale record when the stage trains again (a continuation)."""
    path = workdir_lib.StageFiles(stage_dir).diverged
    if os.path.exists(path):
        os.remove(path)


def _spell(value: float) -> str:
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


class DivergenceCheck(keras.callbacks.Callback):
    """Raises `DivergedError` at the first non-finite loss term or gradient norm.

    Reads the trainer's `finite_checks` after every training batch (the step that went
    wrong), when validation ends (non-finite validation terms must not pick a best
    epoch) and when the epoch ends (the test-split evaluation); place it after the
    test-split evaluation and before every callback that writes the epoch's files.

    Args:
      stage: the stage's name ("teacher", "distill"), for the message and record.
      directory: where this process writes the stage's files (`diverged.json` goes there).
      strategy: the strategy the trainer was built under (the read is a cross-replica
        sum, collective under multi-worker: every worker reads at the same points).
      fix: `term -> (clause, fields)`, as `likely_fix` with the stage's config bound.
    """

    def __init__(self, stage: str, directory: str, strategy: tf.distribute.Strategy, fix):
        super().__init__()
        self.stage = stage
        self.files = workdir_lib.StageFiles(directory)
        self.strategy = strategy
        self.fix = fix
        self.epoch = 0
        self.step = 0
        self._read = None

    def on_train_begin(self, logs=None):
        checks = getattr(self.model, "finite_checks", None)
        if checks is None:
            raise TypeError(f"DivergenceCheck needs a sokd_tf distiller, got {type(self.model).__name__}")
        with self.strategy.scope():
            checks.reset_state()  # an evaluation outside `fit` may have left a record
        # Across workers the read is a collective, compiled as the custom loop reads its
        # metrics; in one process an eager read is cheaper (~3x).
        self._read = tf.function(checks.result) if cluster.is_multi_worker(self.strategy) else checks.result

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.step = 0

    def on_train_batch_end(self, batch, logs=None):
        self.step = batch + 1
        self._check("training")

    def on_test_end(self, logs=None):
        self._check("validation")

    def on_epoch_end(self, epoch, logs=None):
        self._check("test-split evaluation")

    def _check(self, phase: str) -> None:
        with self.strategy.scope():
            values = keras.ops.convert_to_numpy(self._read())
        if not np.any(values):  # exactly zero while every check stayed finite
            return
        names = self.model.finite_checks.names
        bad = {name: _spell(float(value)) for name, value in zip(names, values, strict=True) if value != 0}
        term = next(iter(bad))
        fix, fields = self.fix(term)
        epoch = self.epoch + 1
        where = f"step {self.step}" if phase == "training" else f"{phase} after step {self.step}"
        restart = f"the end of epoch {self.epoch}" if self.epoch else "the start"
        message = (
            f"{self.stage} diverged at epoch {epoch}, {where}: {term} is {bad[term]}; {fix}; "
            f"then continue from {restart} by rerunning with the new value and "
            f"--resume_changed={fields[0]} (nothing from epoch {epoch} was kept)"
        )
        record = {
            "stage": self.stage,
            "epoch": epoch,
            "step": self.step,
            "phase": phase,
            "term": term,
            "value": bad[term],
            "non_finite": bad,
            "last_good_epoch": self.epoch,
            "fields_to_change": fields,
            "message": message,
        }
        workdir_lib.write_json(self.files.diverged, record)
        raise DivergedError(message, record)
