"""Training and evaluation under any strategy, and the one resumable-fit call of the stages.

`resumable_fit` is what `sokd_tf.stages.fit` calls: it picks the directory this process
writes (the run's own on the chief, a temporary one elsewhere), the epoch to resume at,
adds the backup callback, dispatches to `Model.fit` or the custom loop below, and
cleans up.

The custom loop: a small `fit` for `MultiWorkerMirroredStrategy`, where Keras 3.15
`Model.fit` fails.

`Model.fit` under a multi-worker `MultiWorkerMirroredStrategy` fails twice inside
Keras' TensorFlow trainer (docs/SCALING.md has the traces and the root cause):
`_maybe_symbolic_build` passes the whole `(images, labels)` tuple of per-replica
batches to `strategy.reduce`, which accepts one value, and `reduce_per_replica`
reduces every scalar log with `strategy.reduce("MEAN", v, axis=0)` ("Invalid reduction
dimension 0 for input with 0 dimensions"). Neither path can be avoided from a model's
public seams, so this loop drives the model's very own `train_step` and `test_step`
through `strategy.run`, with Keras' `CallbackList`, so that callbacks (`CSVLogger`,
`TensorBoard`, `ModelCheckpoint`, learning-rate schedulers, `BackupAndRestore`-style
resume), metrics and the returned `History` behave as under `fit`.

Metrics: Keras metric variables are `ON_READ`-synchronised with SUM aggregation, so a
`Mean` tracker read in cross-replica context is the global mean over every replica's
examples, which is what the epoch logs report. Per-step logs are the replicas' mean.

The step function is a plain `tf.function` (no XLA): `jit_compile` applies to `Model.fit`
only (on CPU it is slower anyway, see docs/SCALING.md).

Every worker runs this loop in lockstep (same steps, same collective reads); only the
chief's files are kept (see `sokd_tf.runtime.cluster.worker_dir`).

Reference: https://www.tensorflow.org/tutorials/distribute/multi_worker_with_ctl
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import keras
import tensorflow as tf

from sokd_tf.data.records import data_errors
from sokd_tf.runtime import backup, cluster


def uses_custom_loop(strategy: tf.distribute.Strategy) -> bool:
    """True where Keras 3.15 `Model.fit` fails and `custom_fit` must run instead.

    Only a multi-worker `MultiWorkerMirroredStrategy` (docs/SCALING.md has the
    root cause); `fit` runs under the default, mirrored and TPU strategies.
    """
    return cluster.is_multi_worker(strategy)



def distribute_dataset(
    strategy: tf.distribute.Strategy, dataset: tf.data.Dataset
) -> tf.data.Dataset | tf.distribute.DistributedDataset:
    """Splits a dataset of GLOBAL batches across the strategy's replicas.

    Sharding is by data (`AutoShardPolicy.DATA`): every worker runs the same
    deterministic pipeline and keeps its own slice of each global batch, so the
    replicas of one step together see exactly the global batch one device would see
    (file-based sharding would give each worker different images per step).

    Args:
      strategy: the strategy in force.
      dataset: batched `(images [batch, H, W, C], labels [batch])` with the global
        batch size.

    Returns:
      A distributed dataset (the default strategy returns the dataset itself).
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    return strategy.experimental_distribute_dataset(dataset.with_options(options))



def _make_step_function(model: keras.Model, strategy: tf.distribute.Strategy, step_fn):
    """tf.function running `step_fn` on every replica; returns the replicas' mean logs."""

    def one_step(batch):
        per_replica_logs = strategy.run(step_fn, args=(batch,))
        return tf.nest.map_structure(
            lambda value: strategy.reduce("MEAN", value, axis=None), per_replica_logs
        )

    return tf.function(one_step, reduce_retracing=True)


def _make_metrics_function(model: keras.Model, strategy: tf.distribute.Strategy):
    """tf.function reading every metric in cross-replica context (a collective read)."""

    def read_metrics():
        return model.get_metrics_result()

    compiled = tf.function(read_metrics)

    def metrics_result() -> dict[str, Any]:
        with strategy.scope():
            return compiled()

    return metrics_result


def _metrics_or_logs(metrics_result: dict[str, Any], logs: dict[str, Any]) -> dict[str, Any]:
    """As `fit`: whole-epoch metric results when they cover the step's logs."""
    if logs and set(logs) <= set(metrics_result):
        return dict(metrics_result)
    return dict(logs)


class _Runner:
    """Holds the compiled step functions of one model under one strategy."""

    def __init__(self, model: keras.Model, strategy: tf.distribute.Strategy):
        if model.optimizer is None:
            raise ValueError("custom_fit needs a compiled model (model.compile first)")
        self.model = model
        self.strategy = strategy
        self.train_function = _make_step_function(model, strategy, model.train_step)
        self.test_function = _make_step_function(model, strategy, model.test_step)
        self.metrics_result = _make_metrics_function(model, strategy)

    def reset_metrics(self) -> None:
        with self.strategy.scope():
            self.model.reset_metrics()

    def evaluate(self, dataset, steps, callback_list) -> dict[str, Any]:
        self.reset_metrics()
        callback_list.on_test_begin()
        logs: dict[str, Any] = {}
        distributed = distribute_dataset(self.strategy, dataset)
        for step, batch in enumerate(distributed):
            if steps is not None and step >= steps:
                break
            callback_list.on_test_batch_begin(step)
            logs = self.test_function(batch)
            callback_list.on_test_batch_end(step, logs)
        logs = _metrics_or_logs(self.metrics_result(), logs)
        callback_list.on_test_end(logs)
        return logs


def custom_fit(
    model: keras.Model,
    dataset: tf.data.Dataset,
    *,
    strategy: tf.distribute.Strategy,
    epochs: int = 1,
    steps_per_epoch: int,
    validation_data: tf.data.Dataset | None = None,
    validation_steps: int | None = None,
    callbacks: list[keras.callbacks.Callback] | None = None,
    initial_epoch: int = 0,
    verbose: int | str = 0,
) -> keras.callbacks.History:
    """Trains `model` epoch by epoch with its own `train_step`, like `Model.fit`.

    Args:
      model: compiled `keras.Model` (a distiller) built inside `strategy.scope()`.
      dataset: `tf.data.Dataset` of GLOBAL batches `(images [batch, H, W, C],
        labels [batch])`, endless (e.g. `ImageDataset.train_batches`); every worker
        must build the same one.
      strategy: the strategy the model was built under (any; meant for multi-worker).
      epochs: index of the last epoch + 1, as `fit`.
      steps_per_epoch: training steps per epoch (required: the dataset is endless).
      validation_data: finite dataset of global batches evaluated with `test_step`
        after every epoch; its metrics are logged with a `val_` prefix.
      validation_steps: cap on validation steps (None = the whole dataset).
      callbacks: Keras callbacks, called exactly where `fit` calls them.
      initial_epoch: epoch to start from (a resume callback that sets the model's
        resume epoch in `on_train_begin`, as Keras' `BackupAndRestore` does, wins).
      verbose: 0 = silent, 1/"auto" = progress bar, 2 = one line per epoch.

    Returns:
      The `keras.callbacks.History` (also `model.history`).
    """
    if steps_per_epoch is None or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be a positive int, got {steps_per_epoch!r}")
    verbose = 1 if verbose == "auto" else verbose
    runner = _Runner(model, strategy)
    callback_list = keras.callbacks.CallbackList(
        callbacks,
        add_history=True,
        add_progbar=verbose != 0,
        verbose=verbose,
        epochs=epochs,
        steps=steps_per_epoch,
        model=model,
    )
    iterator = iter(distribute_dataset(strategy, dataset))
    model.stop_training = False
    callback_list.on_train_begin()
    # Keras' BackupAndRestore hands the resume epoch to `fit` through this attribute;
    # honouring it keeps resume callbacks working unchanged here.
    initial_epoch = getattr(model, "_initial_epoch", None) or initial_epoch
    epoch_logs: dict[str, Any] = {}
    for epoch in range(initial_epoch, epochs):
        runner.reset_metrics()
        callback_list.on_epoch_begin(epoch)
        logs: dict[str, Any] = {}
        for step in range(steps_per_epoch):
            callback_list.on_train_batch_begin(step)
            logs = runner.train_function(next(iterator))
            callback_list.on_train_batch_end(step, logs)
            if model.stop_training:
                break
        epoch_logs = _metrics_or_logs(runner.metrics_result(), logs)
        if validation_data is not None:
            val_logs = runner.evaluate(validation_data, validation_steps, callback_list)
            epoch_logs.update({f"val_{name}": value for name, value in val_logs.items()})
        callback_list.on_epoch_end(epoch, epoch_logs)
        if model.stop_training:
            break
    with strategy.scope():
        model.optimizer.finalize_variable_values(model.trainable_weights)
    callback_list.on_train_end(logs=epoch_logs)
    return model.history


def custom_evaluate(
    model: keras.Model,
    dataset: tf.data.Dataset,
    *,
    strategy: tf.distribute.Strategy,
    steps: int | None = None,
    callbacks: list[keras.callbacks.Callback] | None = None,
) -> dict[str, float]:
    """Runs `test_step` over a finite dataset of global batches, like `evaluate`.

    Returns:
      `{metric name: value}` over every replica's examples (as `return_dict=True`).
    """
    runner = _Runner(model, strategy)
    callback_list = keras.callbacks.CallbackList(callbacks, model=model)
    logs = runner.evaluate(dataset, steps, callback_list)
    return {name: float(value) for name, value in logs.items()}


def fit_model(model: keras.Model, dataset, *, strategy: tf.distribute.Strategy, **kwargs):
    """Trains `model` like `model.fit(dataset, **kwargs)` under any strategy.

    Dispatches to `model.fit` except where it cannot run (multi-worker), where
    `custom_fit` drives the same `train_step`/`test_step`.

    Args:
      model: a compiled model built inside `strategy.scope()`.
      dataset: `tf.data.Dataset` of global batches (endless, with `steps_per_epoch`).
      strategy: the strategy the model was built under.
      **kwargs: `epochs`, `steps_per_epoch`, `validation_data`, `validation_steps`,
        `callbacks`, `initial_epoch`, `verbose`, as `Model.fit`.

    Returns:
      The `keras.callbacks.History`.

    Raises:
      DataError: a streamed image failed the input pipeline's checks (file and record
        named).
    """
    if uses_custom_loop(strategy):
        with data_errors():
            return custom_fit(model, dataset, strategy=strategy, **kwargs)
    with data_errors(), strategy.scope():
        # `dataset` is a tf.data pipeline that orders its own epochs (sokd_tf.data); Keras'
        # `shuffle` cannot apply to it, and its default `shuffle=True` only warns so.
        return model.fit(dataset, shuffle=False, **kwargs)



def evaluate_model(
    model: keras.Model, dataset, *, strategy: tf.distribute.Strategy, steps: int | None = None
) -> dict[str, float]:
    """`model.evaluate(dataset, return_dict=True)` under any strategy.

    Under multi-worker (where Keras' `evaluate` fails like `fit`) it runs
    `custom_evaluate`; every worker must call it, in the same order.

    Returns:
      `{metric name: value}` over all replicas' examples.
    """
    if uses_custom_loop(strategy):
        with data_errors():
            return custom_evaluate(model, dataset, strategy=strategy, steps=steps)
    with data_errors(), strategy.scope():
        results = model.evaluate(dataset, steps=steps, verbose=0, return_dict=True)
    return {name: float(value) for name, value in results.items()}


@dataclasses.dataclass
class ResumableFit:
    """One stage's training session under a strategy (see `resumable_fit`).

    Attributes:
      write_dir: where this process writes the stage's files: the stage directory on
        the chief, a temporary directory on other workers (removed when the session ends).
      first_epoch: the epoch training resumes at (0 without a backup); build the
        training data from it, so a resumed run sees the batches an uninterrupted one would.
    """

    write_dir: str
    first_epoch: int
    backup_dir: str
    strategy: tf.distribute.Strategy

    def fit(self, model: keras.Model, dataset, *, callbacks=(), **kwargs):
        """`fit_model` with the backup callback added last.

        Last, so an epoch counts as done only once every other callback has written
        its files.
        """
        callbacks = [
            *callbacks,
            backup.BackupAndRestore(self.backup_dir, self.strategy, delete_checkpoint=False),
        ]
        return fit_model(model, dataset, strategy=self.strategy, callbacks=callbacks, **kwargs)


@contextlib.contextmanager
def resumable_fit(
    stage_dir: str, backup_dir: str, strategy: tf.distribute.Strategy
) -> Iterator[ResumableFit]:
    """The runtime's one call for a resumable, multi-worker-safe training stage.

    Args:
      stage_dir: the stage's real directory (created on the chief).
      backup_dir: where the chief keeps the resume backup (all workers restore from it).
      strategy: the strategy the model is built under.

    Yields:
      A `ResumableFit`: its `write_dir` for the stage's callbacks, `first_epoch` for the
      data pipeline, and `fit(...)`.
    """
    write_dir = cluster.worker_dir(stage_dir, strategy)
    try:
        yield ResumableFit(write_dir, backup.read_backup_epoch(backup_dir), backup_dir, strategy)
    finally:
        cluster.remove_worker_dir(write_dir, stage_dir)
