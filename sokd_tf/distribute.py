"""Distribution strategies, precision policies and multi-worker file handling.

The training code calls these helpers; nothing here reads flags or environment
variables itself. `tf.distribute.MultiWorkerMirroredStrategy` reads `TF_CONFIG` on its
own (that is TensorFlow's documented contract), and `TPUClusterResolver` finds the TPU
from its argument or the Cloud TPU environment.

How a global batch is split: `data.batch_size` is the GLOBAL batch. Every distiller
divides each per-example sum by the step's actual global batch size (all-reduced across
replicas), and the optimizer SUM-reduces gradients across replicas, so N replicas apply
exactly the update one device would apply to the same global batch: keep the learning
rate when the global batch is kept. If you grow the global batch with the replica count
(per-replica batch fixed), scale the learning rate linearly with it (Goyal et al., 2017)
yourself; nothing here changes it silently.

Multi-worker: Keras 3.15 `Model.fit` cannot run under `MultiWorkerMirroredStrategy`
(see docs/SCALING.md for the root cause); `fit_model` routes that case to
`sokd_tf.custom_loop.fit`, which drives the model's own `train_step`/`test_step`.

Reference: https://www.tensorflow.org/tutorials/distribute/multi_worker_with_keras
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import keras
import tensorflow as tf

from sokd_tf.config import PRECISIONS, STRATEGIES
from sokd_tf.errors import ConfigError


def make_strategy(
    name: str,
    *,
    devices: list[str] | None = None,
    tpu: str | None = None,
) -> tf.distribute.Strategy:
    """Creates the `tf.distribute.Strategy` named by `TrainConfig.strategy`.

    Args:
      name: "default" (no distribution: the default strategy), "mirrored" (all local
        GPUs, or `devices`), "multi_worker" (`MultiWorkerMirroredStrategy`; the cluster
        comes from `TF_CONFIG`, read by TensorFlow; without it the strategy is one local
        worker) or "tpu" (wired, NOT tested in this project: no TPU was available).
      devices: device names for "mirrored", e.g. two logical CPUs
        `["/cpu:0", "/cpu:1"]`. None = TensorFlow's choice (all GPUs, else one CPU).
      tpu: TPU name or address for "tpu" (None = the Cloud TPU environment's own).

    Returns:
      The strategy. Create models, optimizers and metrics inside `strategy.scope()`.

    Raises:
      ConfigError: unknown name, or `devices` given for a strategy other than mirrored.
    """
    if name not in STRATEGIES:
        raise ConfigError(f"train.strategy must be one of {list(STRATEGIES)}, got {name!r}")
    if devices is not None and name != "mirrored":
        raise ConfigError(f"devices= applies to the 'mirrored' strategy only, not {name!r}")
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices=devices)
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def set_precision(precision: str) -> keras.DTypePolicy:
    """Sets Keras' global dtype policy; call it before building any model.

    "mixed_float16" / "mixed_bfloat16" compute layers in 16 bits with float32
    variables. The distillers cast logits to float32 before every loss and softmax;
    Keras' `compile` wraps the optimizer in a `LossScaleOptimizer` under
    "mixed_float16" (bfloat16 has float32's exponent range and needs no loss scaling).

    Args:
      precision: one of `sokd_tf.config.PRECISIONS`.

    Returns:
      The policy now in force.

    Raises:
      ConfigError: unknown precision.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"train.precision must be one of {list(PRECISIONS)}, got {precision!r}")
    keras.config.set_dtype_policy(precision)
    return keras.config.dtype_policy()


def num_replicas(strategy: tf.distribute.Strategy) -> int:
    """Replicas that share one global batch (all workers, all devices)."""
    return strategy.num_replicas_in_sync


def use_synchronized_bn(setting: bool | None, strategy: tf.distribute.Strategy) -> bool:
    """Resolves `ModelConfig.synchronized_bn` (None = on exactly when replicas > 1).

    With more than one replica, plain BatchNormalization normalises each replica's
    shard with its own statistics, so N replicas no longer compute what one device
    computes on the global batch; synchronized BN all-reduces the statistics.
    """
    if setting is None:
        return num_replicas(strategy) > 1
    return bool(setting)


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    """True for a `MultiWorkerMirroredStrategy` whose cluster has more than one task."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    resolver = strategy.cluster_resolver
    cluster = resolver.cluster_spec().as_dict() if resolver is not None else {}
    return sum(len(tasks) for tasks in cluster.values()) > 1


def uses_custom_loop(strategy: tf.distribute.Strategy) -> bool:
    """True where Keras 3.15 `Model.fit` fails and `custom_loop.fit` must run instead.

    Only a multi-worker `MultiWorkerMirroredStrategy` (docs/SCALING.md has the
    root cause); `fit` runs under the default, mirrored and TPU strategies.
    """
    return is_multi_worker(strategy)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run's real files (checkpoints, logs, exports).

    The chief is the "chief" task, or worker 0 when the cluster has no "chief" task;
    every single-process strategy is its own chief.

    Reference: TensorFlow tutorial "Multi-worker training with Keras", model saving.
    """
    if not is_multi_worker(strategy):
        return True
    resolver = strategy.cluster_resolver
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type is None or task_type == "chief":
        return True
    cluster = resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and "chief" not in cluster


def barrier(strategy: tf.distribute.Strategy) -> None:
    """Returns once every worker has reached it (an all-reduce); a no-op in one process.

    Used where the chief writes a file the other workers read next (the teacher).
    """
    if not is_multi_worker(strategy):
        return
    ones = strategy.run(lambda: tf.constant(1.0))
    strategy.reduce(tf.distribute.ReduceOp.SUM, ones, axis=None)


def worker_checkpoint_dir(base: str, strategy: tf.distribute.Strategy) -> str:
    """The directory this process writes `base`'s files to.

    Under MultiWorkerMirroredStrategy every worker must take part in saving (the
    variables are read collectively), but only the chief's files are kept: the chief
    writes to `base`, every other worker to a fresh temporary directory that
    `remove_worker_checkpoint_dir` deletes afterwards.

    Args:
      base: the run's real directory (created if missing, on the chief).
      strategy: the strategy in force.

    Returns:
      `base` on the chief; a new temporary directory elsewhere.
    """
    if is_chief(strategy):
        os.makedirs(base, exist_ok=True)
        return base
    task_id = strategy.cluster_resolver.task_id
    return tempfile.mkdtemp(prefix=f"sokd_worker{task_id}_")


def remove_worker_checkpoint_dir(path: str, base: str) -> None:
    """Deletes a non-chief worker's temporary directory; leaves `base` alone."""
    if os.path.abspath(path) != os.path.abspath(base) and os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)


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


def fit_model(model: keras.Model, dataset, *, strategy: tf.distribute.Strategy, **kwargs):
    """Trains `model` like `model.fit(dataset, **kwargs)` under any strategy.

    Dispatches to `model.fit` except where it cannot run (multi-worker), where
    `sokd_tf.custom_loop.fit` drives the same `train_step`/`test_step`.

    Args:
      model: a compiled model built inside `strategy.scope()`.
      dataset: `tf.data.Dataset` of global batches (endless, with `steps_per_epoch`).
      strategy: the strategy the model was built under.
      **kwargs: `epochs`, `steps_per_epoch`, `validation_data`, `validation_steps`,
        `callbacks`, `initial_epoch`, `verbose`, as `Model.fit`.

    Returns:
      The `keras.callbacks.History`.
    """
    if uses_custom_loop(strategy):
        from sokd_tf import custom_loop

        return custom_loop.fit(model, dataset, strategy=strategy, **kwargs)
    with strategy.scope():
        return model.fit(dataset, **kwargs)


_WEIGHTS_FILE = "latest.weights.h5"
_METADATA_FILE = "training_metadata.json"


def read_backup_epoch(backup_dir: str) -> int:
    """The epoch a run resumes at from `backup_dir` (0 when there is no backup).

    Call it before building the training dataset, so that the data pipeline starts at
    the resumed epoch (`ImageDataset.train_batches(first_epoch=...)`).
    """
    path = os.path.join(backup_dir, _METADATA_FILE)
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return int(json.load(f)["epoch"])


class BackupAndRestore(keras.callbacks.Callback):
    """`keras.callbacks.BackupAndRestore` with TensorFlow's multi-worker file rules.

    At the end of every epoch all workers save (weights, optimizer state and the next
    epoch; the metadata file is replaced atomically after the weights, so a run killed
    at any moment resumes from a consistent pair) but only the chief's copy lands in
    `backup_dir`; the others write to
    temporary directories removed at once. At the start of training every worker
    restores from the chief's `backup_dir` (a filesystem all workers share, as TF's
    multi-worker tutorial assumes), so all replicas resume from identical state. Works
    under every strategy, with `Model.fit` and with `custom_loop.fit`; Keras' own
    callback has no chief/worker logic.

    Args:
      backup_dir: the run's backup directory.
      strategy: the strategy the model was built under.
      delete_checkpoint: remove the backup when training ends normally (as Keras).
    """

    def __init__(
        self,
        backup_dir: str,
        strategy: tf.distribute.Strategy,
        *,
        delete_checkpoint: bool = True,
    ):
        super().__init__()
        self.backup_dir = backup_dir
        self.strategy = strategy
        self.delete_checkpoint = delete_checkpoint

    def on_train_begin(self, logs=None):
        metadata_path = os.path.join(self.backup_dir, _METADATA_FILE)
        if not os.path.exists(metadata_path):
            return
        with open(metadata_path) as f:
            metadata = json.load(f)
        weights = os.path.join(self.backup_dir, metadata.get("weights", _WEIGHTS_FILE))
        if not os.path.exists(weights):
            return
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            with self.strategy.scope():
                optimizer.build(self.model.trainable_variables)
        self.model.load_weights(weights)
        # The attribute through which Keras' own BackupAndRestore hands `fit` the
        # epoch to resume at; `custom_loop.fit` reads it too.
        self.model._initial_epoch = int(metadata["epoch"])

    def on_epoch_end(self, epoch, logs=None):
        write_dir = worker_checkpoint_dir(self.backup_dir, self.strategy)
        try:
            # Weights first under a per-epoch name, then the metadata naming them (the
            # atomic commit point), then older weights: a kill at any moment leaves a
            # consistent (weights, epoch) pair.
            weights_name = f"epoch_{epoch + 1}.weights.h5"
            staging = os.path.join(write_dir, "staging.weights.h5")
            self.model.save_weights(staging, overwrite=True)
            os.replace(staging, os.path.join(write_dir, weights_name))
            staging_metadata = os.path.join(write_dir, _METADATA_FILE + ".staging")
            with open(staging_metadata, "w") as f:
                json.dump({"epoch": epoch + 1, "weights": weights_name}, f)
            os.replace(staging_metadata, os.path.join(write_dir, _METADATA_FILE))
            for name in os.listdir(write_dir):
                if name.endswith(".weights.h5") and name != weights_name:
                    os.remove(os.path.join(write_dir, name))
        finally:
            remove_worker_checkpoint_dir(write_dir, self.backup_dir)

    def on_train_end(self, logs=None):
        if self.delete_checkpoint and is_chief(self.strategy):
            shutil.rmtree(self.backup_dir, ignore_errors=True)


def evaluate_model(
    model: keras.Model, dataset, *, strategy: tf.distribute.Strategy, steps: int | None = None
) -> dict[str, float]:
    """`model.evaluate(dataset, return_dict=True)` under any strategy.

    Under multi-worker (where Keras' `evaluate` fails like `fit`) it runs
    `custom_loop.evaluate`; every worker must call it, in the same order.

    Returns:
      `{metric name: value}` over all replicas' examples.
    """
    if uses_custom_loop(strategy):
        from sokd_tf import custom_loop

        return custom_loop.evaluate(model, dataset, strategy=strategy, steps=steps)
    with strategy.scope():
        results = model.evaluate(dataset, steps=steps, verbose=0, return_dict=True)
    return {name: float(value) for name, value in results.items()}
