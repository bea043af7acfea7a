"""Re-typing a trained model to another dtype policy, weights unchanged.

A `.keras` file records each layer's dtype policy, so a teacher trained in float32 and
loaded for a `mixed_bfloat16` distillation would keep computing in float32 (and so would
the peer cloned from it), and a student trained in `mixed_bfloat16` would be exported
with bfloat16 layers. `with_dtype_policy` rebuilds the model from its config with every
layer's policy replaced, then copies the weights (variables stay float32 under every
Keras policy, so nothing is rounded).

The model's output layers keep float32: the project's convention that logits, softmaxes
and losses are float32 under mixed precision (docs/SCALING.md).
"""

from __future__ import annotations

import keras

from sokd_tf.errors import ConfigError


def _retype_layers(model_config: dict, policy_config: dict, keep: set[str]) -> None:
    for layer in model_config["layers"]:
        config = layer["config"]
        if "layers" in config:  # a nested functional model
            _retype_layers(config, policy_config, set())
        dtype = config.get("dtype")
        is_policy = isinstance(dtype, dict) and dtype.get("class_name") == "DTypePolicy"
        if is_policy and config["name"] not in keep:
            config["dtype"] = policy_config


def with_dtype_policy(model: keras.Model, policy: str | None = None) -> keras.Model:
    """`model` computing in `policy` (default: Keras' global policy), outputs in float32.

    Args:
      model: a functional Keras model.
      policy: a Keras dtype policy name ("float32", "mixed_bfloat16", ...); None = the
        global policy (`keras.config.dtype_policy()`).

    Returns:
      `model` itself when every non-output layer already uses `policy`, else a new
      functional model with the same name, architecture and weights.

    Raises:
      ConfigError: the model cannot be rebuilt from its config (e.g. a Lambda layer or
        an unregistered custom layer).
    """
    policy = keras.DTypePolicy(policy or keras.config.dtype_policy().name)
    outputs = {tensor._keras_history.operation.name for tensor in model.outputs}
    current = {
        layer.dtype_policy.name for layer in model._flatten_layers(include_self=False)
        if not isinstance(layer, keras.layers.InputLayer) and layer.name not in outputs
    }
    if current <= {policy.name}:
        return model
    try:
        serialized = keras.saving.serialize_keras_object(model)
        _retype_layers(serialized["config"], keras.saving.serialize_keras_object(policy), outputs)
        retyped = keras.saving.deserialize_keras_object(serialized)
        retyped.set_weights(model.get_weights())
    except Exception as err:  # Keras raises many types for a config it cannot rebuild.
        raise ConfigError(
            f"cannot re-type model {model.name!r} to the {policy.name} policy (it is rebuilt "
            f"from its config, which needs serializable, registered layers): "
            f"{type(err).__name__}: {err}"
        ) from err
    return retyped
