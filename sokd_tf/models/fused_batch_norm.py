"""BatchNormalization computed by TensorFlow's fused kernel: same maths, fewer passes.

Keras 3's `BatchNormalization` computes batch moments and the normalisation as separate
ops (`moments`, then `batch_normalization`), and differentiates through all of them;
under a 16-bit policy it also casts every activation to float32 and back. TensorFlow's
`FusedBatchNormV3` (oneDNN on x86 CPUs, cuDNN on GPUs) does the forward pass in one
kernel and the backward pass in one kernel, reading bfloat16/float16 activations
directly with float32 statistics. Pre-activation WRNs have two BN layers per block, so
this is the largest single speed lever of the training step on CPU (see
benchmarks/RESULTS.md and docs/SCALING.md).

The layer is a drop-in subclass: same arguments, weights, config and checkpoints as
`keras.layers.BatchNormalization`, same outputs and gradients within float rounding,
same moving-statistics update (Keras' convention: the biased batch variance). It falls
back to the stock computation where the fused kernel does not apply: synchronized
(cross-replica) BN, masks, renormalisation, inputs that are not 4-D with channels last,
or a backend other than TensorFlow.

`BATCH_NORM_LAYERS` maps `ModelConfig.batch_norm` ("fused" or "stock") to the class the
model builders build, and `with_batch_norm` switches a built or loaded model between
them (weights unchanged).

Reference: Ioffe & Szegedy, "Batch Normalization" (ICML 2015); TensorFlow
`tf.compat.v1.nn.fused_batch_norm`.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from sokd_tf.errors import ConfigError


@keras.saving.register_keras_serializable(package="sokd_tf")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` through TensorFlow's fused kernel.

    Input `[batch, H, W, C]` (channels last), output the same shape in the layer's
    compute dtype; gamma, beta and the moving statistics stay float32.
    """

    # The built-in layer this one stands in for: what exporters that rebuild a model
    # from built-in layers (the QAT rebuild in tf_keras) use in its place.
    stock_class = keras.layers.BatchNormalization

    def _can_fuse(self, inputs, mask) -> bool:
        return (
            keras.backend.backend() == "tensorflow"
            and not self.synchronized
            and not self.renorm
            and mask is None
            and len(inputs.shape) == 4
            and self.axis in (-1, 3)
            and self.scale
            and self.center
        )

    def call(self, inputs, training=None, mask=None):
        if not self._can_fuse(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        if inputs.dtype not in (tf.float16, tf.bfloat16, tf.float32):
            inputs = tf.cast(inputs, tf.float32)
        gamma = tf.convert_to_tensor(self.gamma.value)
        beta = tf.convert_to_tensor(self.beta.value)
        if training and self.trainable:
            outputs, mean, corrected_variance = tf.compat.v1.nn.fused_batch_norm(
                inputs, gamma, beta, epsilon=self.epsilon, data_format="NHWC",
                is_training=True,
            )
            # The kernel returns the Bessel-corrected variance; Keras' moving update
            # uses the biased one (which is also what normalised the batch).
            count = tf.cast(tf.size(inputs) // tf.shape(inputs)[-1], tf.float32)
            variance = corrected_variance * (count - 1.0) / tf.maximum(count, 1.0)
            self.moving_mean.assign(
                self.moving_mean * self.momentum + mean * (1.0 - self.momentum)
            )
            self.moving_variance.assign(
                self.moving_variance * self.momentum + variance * (1.0 - self.momentum)
            )
        else:
            outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
                inputs, gamma, beta,
                mean=tf.convert_to_tensor(self.moving_mean.value),
                variance=tf.convert_to_tensor(self.moving_variance.value),
                epsilon=self.epsilon, data_format="NHWC", is_training=False,
            )
        return tf.cast(outputs, self.compute_dtype)


# `ModelConfig.batch_norm` (resolved: "auto" is decided in sokd_tf/runtime/cpu.py) -> layer.
BATCH_NORM_LAYERS = {
    "fused": FusedBatchNormalization,
    "stock": keras.layers.BatchNormalization,
}


def batch_norm_layer(kind: str) -> type[keras.layers.BatchNormalization]:
    """The BatchNormalization class of a resolved `ModelConfig.batch_norm`.

    Raises:
      ConfigError: "auto" (resolve it with `sokd_tf.runtime.cpu.resolve_batch_norm`
        first) or an unknown name.
    """
    if kind not in BATCH_NORM_LAYERS:
        raise ConfigError(
            f"model.batch_norm must be one of {list(BATCH_NORM_LAYERS)} when a model is "
            f"built (resolve 'auto' with sokd_tf.runtime.cpu.resolve_batch_norm), got {kind!r}"
        )
    return BATCH_NORM_LAYERS[kind]


def _class_identity(layer_class) -> dict:
    serialized = keras.saving.serialize_keras_object(layer_class())
    return {key: serialized[key] for key in ("module", "class_name", "registered_name")}


def _swap_batch_norm(model_config: dict, identities: list[dict], target: dict) -> int:
    swapped = 0
    for layer in model_config["layers"]:
        if "layers" in layer["config"]:  # a nested functional model
            swapped += _swap_batch_norm(layer["config"], identities, target)
        identity = {key: layer.get(key) for key in target}
        if identity in identities and identity != target:
            layer.update(target)
            swapped += 1
    return swapped


def with_batch_norm(model: keras.Model, kind: str) -> keras.Model:
    """`model` with every BatchNormalization layer of `BATCH_NORM_LAYERS` of class `kind`.

    Both classes have the same arguments, weights and maths, so a model trained with one
    runs, trains and saves with the other: a teacher file loaded for a distillation
    follows the run's `model.batch_norm`. Other BatchNormalization subclasses are kept.

    Args:
      model: a functional Keras model.
      kind: "fused" or "stock".

    Returns:
      `model` itself when no layer changes class, else a new functional model with the
      same name, architecture, dtype policies and weights.

    Raises:
      ConfigError: an unknown `kind`, or a model that cannot be rebuilt from its config.
    """
    target = _class_identity(batch_norm_layer(kind))
    identities = [_class_identity(layer_class) for layer_class in BATCH_NORM_LAYERS.values()]
    serialized = keras.saving.serialize_keras_object(model)
    if not _swap_batch_norm(serialized["config"], identities, target):
        return model
    try:
        rebuilt = keras.saving.deserialize_keras_object(serialized)
        rebuilt.set_weights(model.get_weights())
    except Exception as err:  # Keras raises many types for a config it cannot rebuild.
        raise ConfigError(
            f"cannot rebuild model {model.name!r} with {kind} BatchNormalization (it is "
            f"rebuilt from its config): {type(err).__name__}: {err}"
        ) from err
    return rebuilt
