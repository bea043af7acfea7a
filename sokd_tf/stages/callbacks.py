"""Keras callbacks of the training stages: test-split evaluation, best-epoch tracking per
role, a resume-safe metric history, and a one-line epoch summary.

Keras' own `CSVLogger(append=True)` writes an epoch twice when a run is killed between
the log line and the `BackupAndRestore` checkpoint and then resumed; `MetricHistory`
rewrites its files from the restored epoch on, so every epoch is recorded exactly once.
"""

from __future__ import annotations

import csv
import math
import sys

import keras

from sokd_tf.stages import workdir as workdir_lib


class LearningRateLogger(keras.callbacks.Callback):
    """Logs the learning rate the epoch trained with (the student's) as `learning_rate`."""

    def __init__(self):
        super().__init__()
        self.rate = None

    def on_epoch_begin(self, epoch, logs=None):
        self.rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self.rate is not None:
            logs["learning_rate"] = self.rate


class TestSplitEvaluation(keras.callbacks.Callback):
    """Evaluates the model on the test split after every epoch; logs `test_<metric>`.

    Args:
      test_data: finite dataset of `(images, labels)` batches.
      evaluate: `(model, data) -> {metric: value}`; default `model.evaluate` (the
        multi-worker custom loop passes its own).
    """

    def __init__(self, test_data, evaluate=None):
        super().__init__()
        self.test_data = test_data
        self.evaluate = evaluate or (
            lambda model, data: model.evaluate(data, verbose=0, return_dict=True)
        )

    def on_epoch_end(self, epoch, logs=None):
        results = self.evaluate(self.model, self.test_data)
        if logs is not None:
            for name, value in results.items():
                logs[f"test_{name}"] = float(value)


class BestCheckpoints(keras.callbacks.Callback):
    """Tracks the best epoch of each role separately and saves that role's models.

    For each role, `monitor[role]` (e.g. `val_student/top1`) picks the best epoch; on a
    new best, every model of `models[role]` is written atomically as
    `<directory>/<name>_best.keras`. The state (best value, epoch, the test top-1 of that
    epoch) lives in `<directory>/checkpoints/best.json` so it survives a resume.

    Args:
      directory: the stage directory the models go to.
      monitor: role -> log key to maximise.
      models: role -> {file stem: keras.Model} saved on that role's new best.
      initial_epoch: epochs already completed (restored from a backup).
    """

    def __init__(self, directory, monitor, models, initial_epoch=0):
        super().__init__()
        self.initial_epoch = initial_epoch
        self.files = workdir_lib.StageFiles(directory)
        self.monitor = dict(monitor)
        self.models = models
        self.state_path = self.files.best_state
        self.best = {}

    def on_train_begin(self, logs=None):
        self.best = workdir_lib.read_json(self.state_path, default={})
        # A run killed after a new best but before its backup redoes that epoch: forget
        # bests from epochs the restored state has not completed.
        self.best = {
            role: record for role, record in self.best.items()
            if record["epoch"] <= self.initial_epoch
        }

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        for role, key in self.monitor.items():
            if key not in logs:
                continue
            value = float(logs[key])
            if not math.isfinite(value):
                continue  # a NaN never beats anything; nor may it start the record
            record = self.best.get(role)
            if record is None or value > record["value"]:
                test_key = "test_" + key.removeprefix("val_")
                self.best[role] = {
                    "epoch": epoch + 1,
                    "value": value,
                    "monitor": key,
                    "test_top1": float(logs[test_key]) if test_key in logs else None,
                }
                for stem, model in self.models.get(role, {}).items():
                    workdir_lib.save_model(model, self.files.model(stem, "best"))
        workdir_lib.write_json(self.state_path, self.best)


class MetricHistory(keras.callbacks.Callback):
    """Writes every metric of every epoch to `history.csv` and `history.json`.

    On a resumed run, rows of epochs after the restored epoch are dropped first, so each
    epoch appears exactly once.

    Args:
      directory: where the files go.
      initial_epoch: epochs already completed (restored from a backup).
    """

    def __init__(self, directory, initial_epoch=0):
        super().__init__()
        self.initial_epoch = initial_epoch
        files = workdir_lib.StageFiles(directory)
        self.csv_path = files.history_csv
        self.json_path = files.history_json
        self.rows = []

    def on_train_begin(self, logs=None):
        rows = workdir_lib.read_json(self.json_path, default=[])
        self.rows = [row for row in rows if row["epoch"] <= self.initial_epoch]

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch + 1}
        row.update({key: float(value) for key, value in (logs or {}).items()})
        self.rows.append(row)
        workdir_lib.write_json(self.json_path, self.rows)
        keys = []
        for r in self.rows:
            keys.extend(k for k in r if k not in keys)
        def write_csv(tmp):
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=keys)
                writer.writeheader()
                writer.writerows(self.rows)

        workdir_lib.atomic_write(self.csv_path, write_csv)


class EpochSummary(keras.callbacks.Callback):
    """Prints one concise line per epoch with each role's accuracy and the learning rate."""

    def __init__(self, roles, total_epochs, stream=None):
        super().__init__()
        self.roles = roles
        self.total_epochs = total_epochs
        self.stream = stream or sys.stdout

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        parts = [f"epoch {epoch + 1}/{self.total_epochs}", f"loss {logs.get('loss', float('nan')):.4f}"]
        for role in self.roles:
            for prefix, label in (("", "train"), ("val_", "val"), ("test_", "test")):
                key = f"{prefix}{role}/top1"
                if key in logs:
                    parts.append(f"{role} {label} {100 * logs[key]:.2f}%")
        if "learning_rate" in logs:
            parts.append(f"lr {logs['learning_rate']:.4g}")
        print(" | ".join(parts), file=self.stream, flush=True)
