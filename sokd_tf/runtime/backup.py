"""Resume after a kill: `BackupAndRestore` with TensorFlow's multi-worker file rules."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import keras
import numpy as np
import tensorflow as tf

from sokd_tf.runtime import cluster

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


def restore_wrapped_optimizer(optimizer, weights_path: str) -> bool:
    """Restores the optimizer state across a loss-scale wrapper added or removed.

    Under `mixed_float16` Keras wraps the optimizer in a `LossScaleOptimizer`, whose
    variables are its own (loss scale, counters) followed by the inner optimizer's.
    `load_weights` skips an optimizer whose variable count differs from the file's,
    which would restart the iteration count (and with it the learning-rate schedule)
    and drop the momentum when a continuation changes the precision. The inner
    optimizer's state is the tail of the saved list either way, so it is copied from
    there; a loss scale starts afresh.

    Args:
      optimizer: the (possibly wrapped) optimizer of the model just loaded.
      weights_path: the `.weights.h5` file it was loaded from.

    Returns:
      True when the state was copied (the saved and current layouts differed).

    Raises:
      ValueError: the saved optimizer state does not fit this optimizer.
    """
    import h5py  # a Keras dependency; reads the file Keras wrote

    with h5py.File(weights_path, "r") as f:
        group = f.get("optimizer/vars")
        saved = [group[str(i)][()] for i in range(len(group))] if group is not None else []
    if not saved or len(saved) == len(optimizer.variables):
        return False
    inner = getattr(optimizer, "inner_optimizer", optimizer).variables
    tail = saved[len(saved) - len(inner):] if len(saved) >= len(inner) else None
    if tail is None or any(tuple(v.shape) != np.shape(t) for v, t in zip(inner, tail, strict=True)):
        raise ValueError(
            f"the backup {weights_path!r} holds {len(saved)} optimizer variables that do not "
            f"fit this optimizer's {len(optimizer.variables)}"
        )
    for variable, value in zip(inner, tail, strict=True):
        variable.assign(value)
    return True


class BackupAndRestore(keras.callbacks.Callback):
    """`keras.callbacks.BackupAndRestore` with TensorFlow's multi-worker file rules.

    At the end of every epoch all workers save (weights, optimizer state and the next
    epoch; the metadata file is replaced atomically after the weights, so a run killed
    at any moment resumes from a consistent pair) but only the chief's copy lands in
    `backup_dir`; the others write to
    temporary directories removed at once. At the start of training every worker
    restores from the chief's `backup_dir` (a filesystem all workers share, as TF's
    multi-worker tutorial assumes), so all replicas resume from identical state. Works
    under every strategy, with `Model.fit` and with `loop.custom_fit`; Keras' own
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
        with warnings.catch_warnings():
            # A continuation that changed the precision adds or drops the loss-scale
            # wrapper; Keras then skips the optimizer's state, restored just below.
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            self.model.load_weights(weights)
        if optimizer is not None:
            with self.strategy.scope():
                restore_wrapped_optimizer(optimizer, weights)
        # The attribute through which Keras' own BackupAndRestore hands `fit` the
        # epoch to resume at; `loop.custom_fit` reads it too.
        self.model._initial_epoch = int(metadata["epoch"])

    def on_epoch_end(self, epoch, logs=None):
        write_dir = cluster.worker_dir(self.backup_dir, self.strategy)
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
            cluster.remove_worker_dir(write_dir, self.backup_dir)

    def on_train_end(self, logs=None):
        if self.delete_checkpoint and cluster.is_chief(self.strategy):
            shutil.rmtree(self.backup_dir, ignore_errors=True)


