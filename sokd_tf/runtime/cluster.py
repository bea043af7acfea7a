"""Chief and workers of a multi-worker run: who writes, barriers, per-worker directories.

Under `MultiWorkerMirroredStrategy` every worker must take part in collective work
(saving reads variables collectively), but only the chief's files are kept: the chief
writes to the run's directories, every other worker to temporary directories (under the
system temp dir) that are removed afterwards.

Reference: TensorFlow tutorial "Multi-worker training with Keras", model saving.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import tensorflow as tf


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    """True for a `MultiWorkerMirroredStrategy` whose cluster has more than one task."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    resolver = strategy.cluster_resolver
    cluster = resolver.cluster_spec().as_dict() if resolver is not None else {}
    return sum(len(tasks) for tasks in cluster.values()) > 1


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


def worker_dir(base: str, strategy: tf.distribute.Strategy) -> str:
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


def remove_worker_dir(path: str, base: str) -> None:
    """Deletes a non-chief worker's temporary directory; leaves `base` alone."""
    if os.path.abspath(path) != os.path.abspath(base) and os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)


