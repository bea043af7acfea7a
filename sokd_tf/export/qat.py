"""Quantization-aware fine-tuning of a distilled Keras 3 student (variant `qat_int8`).

tensorflow-model-optimization (tfmot 0.8) rejects Keras 3 models, and Keras 3's own
`quantize("int8")` covers Dense/EinsumDense/Embedding only and does not convert to
LiteRT. The maintained route that works is tfmot on tf_keras (Keras 2):

  1. `rebuild_in_tf_keras`: walk the Keras 3 functional graph and rebuild every
     built-in layer in tf_keras from its config, then copy the distilled weights. The
     rebuild is checked to reproduce the Keras 3 logits before anything else happens,
     so the QAT student starts from the distilled student, never from fresh weights.
  2. Annotate every layer except BatchNormalization (tfmot's default 8-bit scheme
     cannot quantize a BatchNormalization that does not follow a convolution, as in
     pre-activation ResNets) and `quantize_apply`.
  3. Fine-tune briefly with the float student as the target (soft labels: the QAT
     student learns to match the distilled student's predictions; no labels needed),
     BatchNormalization frozen in inference mode. A non-finite loss stops it at once
     (`DivergedError`, nothing exported).
  4. Convert with the same raw-pixel, builtin-ops-only settings as `int8`.

The rebuild is generic (any functional model of built-in Keras layers, nested
functional models included) instead of a second hand-written architecture, so it cannot
drift from the model builders. Two Keras 3 constructs of keras.applications models have
no tf_keras layer and are restated: the `hard_silu` (`hard_swish`) activation of
MobileNetV3 becomes an `Activation` running the same formula, `x * relu6(x + 3) / 6`;
arithmetic between a tensor and a constant in the functional graph (`x + 3.0`,
`x * (1 / 6)`, keras.ops nodes) becomes a `Rescaling(scale, offset)` layer. tfmot's
default scheme knows neither (nor the `Multiply` of squeeze-excite blocks), so these get
an output quantizer only (8-bit, asymmetric, like tfmot's own activations); the rebuild
check covers them like every other layer.

Reference: tfmot "Quantization aware training comprehensive guide" (annotate, apply).
"""

from __future__ import annotations

import functools
import inspect
import os

import keras
import numpy as np

from sokd_tf.data.info import DatasetInfo
from sokd_tf.errors import DivergedError, ExportError
from sokd_tf.export.preprocess import check_images, normalize_numpy

# Keras 3 config keys with no tf_keras counterpart that are harmless at their defaults.
_IGNORED_AT_DEFAULT = {"lora_rank": None, "lora_alpha": None, "quantization_config": None}
_BASE_LAYER_KEYS = {"name", "trainable", "dtype"}
_LEGACY_KERAS = "TF_USE_LEGACY_KERAS"
# The fine-tune's one loss: cross-entropy to the float student's softened predictions.
QAT_TERM = "student/qat_ce"


def hard_silu(x):
    """Keras 3's `hard_silu` (a.k.a. `hard_swish`), which tf_keras lacks.

    Args:
      x: any float tensor.

    Returns:
      `x * relu6(x + 3) / 6`, same shape: e.g. -3 -> 0, 1 -> 0.6667, 3 -> 3.

    Reference: Howard et al., "Searching for MobileNetV3", ICCV 2019, eq. (2).
    """
    import tensorflow as tf

    return x * (tf.nn.relu6(x + 3.0) / 6.0)


# Keras 3 activation names -> the function the tf_keras twin runs instead.
_RESTATED_ACTIVATIONS = {"hard_silu": hard_silu, "hard_swish": hard_silu}
# keras.ops arithmetic with one constant operand -> Rescaling(scale, offset) of the tensor;
# the boolean says whether the tensor is the first operand.
_CONSTANT_ARITHMETIC = {
    ("Add", True): lambda c: (1.0, c), ("Add", False): lambda c: (1.0, c),
    ("Multiply", True): lambda c: (c, 0.0), ("Multiply", False): lambda c: (c, 0.0),
    ("Subtract", True): lambda c: (1.0, -c), ("Subtract", False): lambda c: (-1.0, c),
    ("Divide", True): lambda c: (1.0 / c, 0.0), ("TrueDivide", True): lambda c: (1.0 / c, 0.0),
}


def _tf_keras():
    # Imported lazily: tf_keras and tfmot are only needed for the QAT variant.
    import tf_keras

    return tf_keras


def _tfmot():
    # Importing tfmot sets TF_USE_LEGACY_KERAS=1 (its way of choosing tf_keras) and
    # resolves `tf.keras` to tf_keras in this process; sokd_tf uses `import keras`
    # only, so that is harmless here, but the variable must not leak into
    # subprocesses or later imports.
    previous = os.environ.get(_LEGACY_KERAS)
    import tensorflow_model_optimization as tfmot

    if previous is None:
        os.environ.pop(_LEGACY_KERAS, None)
    else:
        os.environ[_LEGACY_KERAS] = previous
    return tfmot


def _tf_keras_layer(layer: keras.layers.Layer):
    """A fresh tf_keras layer with the same class and config as a Keras 3 layer."""
    tf_keras = _tf_keras()
    # sokd_tf's drop-in layers (FusedBatchNormalization) name the built-in they replace.
    keras_class = getattr(type(layer), "stock_class", type(layer))
    layer_class = getattr(tf_keras.layers, keras_class.__name__, None)
    if layer_class is None or keras_class.__module__.split(".")[0] != "keras":
        raise ExportError(
            f"QAT rebuild: layer {layer.name!r} of class {type(layer).__name__} has no "
            "tf_keras counterpart; only built-in Keras layers can be rebuilt"
        )
    accepted = set(_BASE_LAYER_KEYS)
    for klass in layer_class.__mro__:  # arguments passed on through **kwargs count too
        if klass is tf_keras.layers.Layer:
            break
        if "__init__" in vars(klass):
            accepted |= set(inspect.signature(klass.__init__).parameters)
    config = {}
    for key, value in layer.get_config().items():
        if key == "dtype":
            continue  # tf_keras default float32; Keras 3 writes a policy dict here
        if key not in accepted:
            if key in _IGNORED_AT_DEFAULT and value == _IGNORED_AT_DEFAULT[key]:
                continue
            raise ExportError(
                f"QAT rebuild: layer {layer.name!r} ({type(layer).__name__}) sets "
                f"{key}={value!r}, which tf_keras does not support"
            )
        if isinstance(value, dict) and "class_name" in value:
            # Initializers, regularizers and constraints: the weights are copied and the
            # fine-tune is short, so the layer defaults serve.
            continue
        config[key] = value
    if keras_class is keras.layers.Activation and config.get("activation") in _RESTATED_ACTIVATIONS:
        config["activation"] = _RESTATED_ACTIVATIONS[config["activation"]]
    try:
        return layer_class.from_config(config)
    except Exception as err:
        raise ExportError(
            f"QAT rebuild: tf_keras could not build layer {layer.name!r} "
            f"({type(layer).__name__}) from its config: {err}"
        ) from err


def _rebuild(model: keras.Model, inputs, pairs: list):
    """Runs `model`'s graph on tf_keras tensors with every layer rebuilt in tf_keras."""
    if not hasattr(model, "_run_through_graph"):
        raise ExportError(
            f"QAT rebuild needs a functional Keras model; {model.name!r} is a "
            f"{type(model).__name__}"
        )
    tf_keras = _tf_keras()
    rebuilt = {}

    def operation_fn(operation):
        if id(operation) in rebuilt:
            return rebuilt[id(operation)]
        if isinstance(operation, keras.Model):

            def nested(*args, **kwargs):
                inner_inputs = [tf_keras.Input(tensor.shape[1:]) for tensor in args]
                inner = tf_keras.Model(
                    inner_inputs,
                    _rebuild(operation, inner_inputs, pairs),
                    name=operation.name,
                )
                return inner(*args, **kwargs)

            rebuilt[id(operation)] = nested
        elif isinstance(operation, keras.layers.Layer):
            rebuilt[id(operation)] = _tf_keras_layer(operation)
            pairs.append((operation, rebuilt[id(operation)]))
        else:
            # Not cached: each call builds its own layer (an op object may run twice).
            return _constant_arithmetic(operation)
        return rebuilt[id(operation)]

    # `_run_through_graph` is how Keras itself runs a functional graph node by node.
    return model._run_through_graph(inputs, operation_fn=operation_fn)


def _constant_arithmetic(operation):
    """A callable rebuilding a keras.ops `tensor (+ - * /) constant` node as `Rescaling`."""
    tf_keras = _tf_keras()
    kind = type(operation).__name__
    name = getattr(operation, "name", operation)

    def refuse():
        raise ExportError(
            f"QAT rebuild: operation {name!r} ({kind}) is not a Keras layer (a keras.ops "
            "call in the functional graph) and not arithmetic between a tensor and a "
            "constant; wrap it in a layer to export a QAT variant"
        )

    def apply(*args, **kwargs):
        if kwargs or len(args) != 2:
            refuse()
        constants = [isinstance(arg, (int, float, np.number)) for arg in args]
        if constants.count(True) != 1:
            refuse()
        tensor_first = constants[1]
        rule = _CONSTANT_ARITHMETIC.get((kind, tensor_first))
        if rule is None:
            refuse()
        tensor, constant = args if tensor_first else args[::-1]
        scale, offset = rule(float(constant))
        return tf_keras.layers.Rescaling(scale, offset)(tensor)

    return apply


def rebuild_in_tf_keras(student: keras.Model, *, check_images_normalized: np.ndarray | None = None):
    """Rebuilds a Keras 3 functional student in tf_keras with the same weights.

    Args:
      student: functional Keras 3 model of built-in layers.
      check_images_normalized: optional `[n, H, W, C]` normalised images; when given,
        the rebuilt model must reproduce the Keras 3 logits on them.

    Returns:
      A tf_keras functional model.

    Raises:
      ExportError: unsupported layer/operation, weight mismatch, or logits that differ.
    """
    tf_keras = _tf_keras()
    inputs = [tf_keras.Input(tuple(tensor.shape[1:]), name=None) for tensor in student.inputs]
    pairs = []
    outputs = _rebuild(student, inputs, pairs)
    rebuilt = tf_keras.Model(inputs if len(inputs) > 1 else inputs[0], outputs, name=student.name)
    for source, target in pairs:
        weights = source.get_weights()
        if [w.shape for w in weights] != [tuple(w.shape) for w in target.weights]:
            raise ExportError(
                f"QAT rebuild: layer {source.name!r} has weights "
                f"{[w.shape for w in weights]} but its tf_keras twin "
                f"{[tuple(w.shape) for w in target.weights]}"
            )
        target.set_weights(weights)
    if check_images_normalized is not None:
        expected = np.asarray(student(check_images_normalized, training=False))
        actual = rebuilt(check_images_normalized, training=False).numpy()
        error = float(np.max(np.abs(expected - actual)))
        if error > 1e-4 * max(1.0, float(np.max(np.abs(expected)))):
            raise ExportError(
                f"QAT rebuild: the tf_keras twin of {student.name!r} differs from it by "
                f"{error:.3g} in logits; refusing to quantize a different model"
            )
    return rebuilt


@functools.cache
def _output_quantize_config_class():
    """tfmot's QuantizeConfig base exists only once tfmot is imported, hence a factory."""
    quantize = _tfmot().quantization.keras

    class OutputQuantizeConfig(quantize.QuantizeConfig):
        """Quantizes a layer's output only (8-bit, per tensor, asymmetric), no weights."""

        def get_weights_and_quantizers(self, layer):
            return []

        def get_activations_and_quantizers(self, layer):
            return []

        def set_quantize_weights(self, layer, quantize_weights):
            pass

        def set_quantize_activations(self, layer, quantize_activations):
            pass

        def get_output_quantizers(self, layer):
            return [quantize.quantizers.MovingAverageQuantizer(
                num_bits=8, per_axis=False, symmetric=False, narrow_range=False)]

        def get_config(self):
            return {}

    return OutputQuantizeConfig


def quantization_aware_model(rebuilt):
    """tfmot QAT model of a tf_keras model: every layer but BatchNormalization annotated."""
    tf_keras = _tf_keras()
    quantize = _tfmot().quantization.keras
    OutputQuantizeConfig = _output_quantize_config_class()  # noqa: N806 (a class)

    def annotate(layer):
        if isinstance(layer, (tf_keras.layers.BatchNormalization, tf_keras.layers.InputLayer)):
            return layer
        # Weightless layers tfmot's default scheme lacks (MobileNetV3's squeeze-excite
        # product, the restated constants and hard_silu): quantize their outputs.
        output_only = isinstance(layer, (tf_keras.layers.Rescaling, tf_keras.layers.Multiply)) or (
            isinstance(layer, tf_keras.layers.Activation) and layer.activation is hard_silu)
        if output_only:
            return quantize.quantize_annotate_layer(layer, quantize_config=OutputQuantizeConfig())
        return quantize.quantize_annotate_layer(layer)

    try:
        annotated = tf_keras.models.clone_model(rebuilt, clone_function=annotate)
        with quantize.quantize_scope({"hard_silu": hard_silu,
                                      "OutputQuantizeConfig": OutputQuantizeConfig}):
            qat_model = quantize.quantize_apply(annotated)
    except Exception as err:
        raise ExportError(f"QAT: tfmot could not quantize {rebuilt.name!r}: {err}") from err
    for layer in qat_model.layers:
        inner = getattr(layer, "layer", layer)
        if isinstance(inner, tf_keras.layers.BatchNormalization):
            layer.trainable = False  # inference-mode BN: keep the distilled statistics
    return qat_model


def _diverged(where: str, value: float, learning_rate: float, term: str = QAT_TERM):
    raise DivergedError(
        f"export diverged in the QAT fine-tune at {where}: {term} is {value}; the learning "
        f"rate is likely too high: lower --qat_learning_rate (now {learning_rate:g}); "
        "nothing was exported"
    )


def quantization_aware_finetune(
    student: keras.Model,
    info: DatasetInfo,
    train_images_uint8: np.ndarray,
    *,
    epochs: int,
    learning_rate: float,
    batch_size: int = 128,
    max_steps: int | None = None,
    seed: int = 0,
):
    """Short QAT fine-tune of the distilled student towards its own predictions.

    Args:
      student: distilled Keras 3 student (normalised images -> logits).
      info: dataset facts (normalisation).
      train_images_uint8: `[n, H, W, C]` raw training images.
      epochs: passes over the images (0 = quantize without training).
      learning_rate: SGD rate (momentum 0.9).
      batch_size: images per step.
      max_steps: optional cap on the total number of steps.
      seed: order of the images.

    Returns:
      `(qat_model, summary)`: the tf_keras QAT model (normalised images -> logits) and a
      dict with `rebuild_max_abs_logit_error`, `steps`, `final_loss`.

    Raises:
      ExportError: empty or wrong-shape images, or a student that cannot be rebuilt.
      DivergedError: the fine-tune's loss (`student/qat_ce`, checked after every batch)
        or its final weights went non-finite.
    """
    import tensorflow as tf

    tf_keras = _tf_keras()
    images = check_images(train_images_uint8, info, "QAT training images")
    check = normalize_numpy(images[:64], info)
    rebuilt = rebuild_in_tf_keras(student, check_images_normalized=check)
    rebuild_error = float(np.max(np.abs(
        np.asarray(student(check, training=False)) - rebuilt(check, training=False).numpy()
    )))
    qat_model = quantization_aware_model(rebuilt)

    steps_per_epoch = int(np.ceil(len(images) / batch_size))
    total_steps = epochs * steps_per_epoch
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    final_loss = None
    if total_steps > 0:
        rng = np.random.default_rng(seed)
        order = np.concatenate([rng.permutation(len(images)) for _ in range(epochs)])
        batches = np.array_split(order[: total_steps * batch_size], total_steps)

        class Batches(tf_keras.utils.Sequence):
            def __len__(self):
                return len(batches)

            def __getitem__(self, index):
                chosen = normalize_numpy(images[np.sort(batches[index])], info)
                target_logits = student(chosen, training=False)
                return chosen, tf.nn.softmax(tf.cast(target_logits, tf.float32)).numpy()

        qat_model.compile(
            optimizer=tf_keras.optimizers.SGD(learning_rate, momentum=0.9),
            loss=tf_keras.losses.CategoricalCrossentropy(from_logits=True),
        )

        class StopOnDivergence(tf_keras.callbacks.Callback):
            """The divergence check of the fine-tune: its running loss after every batch."""

            def on_train_batch_end(self, batch, logs=None):
                loss = (logs or {}).get("loss")
                if loss is not None and not np.isfinite(loss):
                    _diverged(f"step {batch + 1} of {total_steps}", loss, learning_rate)

        history = qat_model.fit(
            Batches(), epochs=1, shuffle=False, verbose=0, callbacks=[StopOnDivergence()]
        )
        final_loss = float(history.history["loss"][-1])
        for weight in qat_model.weights:  # a non-finite last step leaves a finite loss
            if not np.all(np.isfinite(weight.numpy())):
                _diverged(f"its last step ({total_steps})", float("nan"), learning_rate,
                          term=f"weights of {weight.name}")
    summary = {
        "rebuild_max_abs_logit_error": rebuild_error,
        "steps": int(total_steps),
        "batch_size": int(batch_size),
        "learning_rate": float(learning_rate),
        "final_loss": final_loss,
    }
    return qat_model, summary
