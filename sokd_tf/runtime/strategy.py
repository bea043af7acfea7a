"""Strategies, precision policies and synchronized BatchNorm: tf.distribute without the job.

Nothing here reads flags or environment variables itself.
`tf.distribute.MultiWorkerMirroredStrategy` reads `TF_CONFIG` on its own (that is
TensorFlow's documented contract), and `TPUClusterResolver` finds the TPU from its
argument or the Cloud TPU environment.

How a global batch is split: `data.batch_size` is the GLOBAL batch. Every distiller
divides each per-example sum by the step's actual global batch size (all-reduced across
replicas), and the optimizer SUM-reduces gradients across replicas, so N replicas apply
exactly the update one device would apply to the same global batch: keep the learning
rate when the global batch is kept. If you grow the global batch with the replica count
(per-replica batch fixed), scale the learning rate linearly with it (Goyal et al., 2017)
yourself; nothing here changes it silently.

Reference: https://www.tensorflow.org/tutorials/distribute/multi_worker_with_keras;
docs/SCALING.md.
"""

from __future__ import annotations

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
      precision: one of `sokd_tf.config.PRECISIONS` other than "auto" (resolve that with
        `sokd_tf.runtime.cpu.resolve_precision` first, as `stages.fit.setup_runtime` does).

    Returns:
      The policy now in force.

    Raises:
      ConfigError: unknown precision, or "auto".
    """
    if precision == "auto":
        raise ConfigError(
            "train.precision 'auto' must be resolved before it is set "
            "(sokd_tf.runtime.cpu.resolve_precision)"
        )
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

