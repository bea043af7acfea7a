"""A small `fit` for `MultiWorkerMirroredStrategy`, where Keras 3.15 `Model.fit` fails.

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
chief's files are kept (see `sokd_tf.distribute.worker_checkpoint_dir`).

Reference: https://www.tensorflow.org/tutorials/distribute/multi_worker_with_ctl
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from sokd_tf import distribute


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
            raise ValueError("custom_loop.fit needs a compiled model (model.compile first)")
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
        distributed = distribute.distribute_dataset(self.strategy, dataset)
        for step, batch in enumerate(distributed):
            if steps is not None and step >= steps:
                break
            callback_list.on_test_batch_begin(step)
            logs = self.test_function(batch)
            callback_list.on_test_batch_end(step, logs)
        logs = _metrics_or_logs(self.metrics_result(), logs)
        callback_list.on_test_end(logs)
        return logs


def fit(
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
    iterator = iter(distribute.distribute_dataset(strategy, dataset))
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


def evaluate(
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
