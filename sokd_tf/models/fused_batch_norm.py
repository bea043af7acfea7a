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

Reference: Ioffe & Szegedy, "Batch Normalization" (ICML 2015); TensorFlow
`tf.compat.v1.nn.fused_batch_norm`.
"""

from __future__ import annotations

import keras
import tensorflow as tf


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
