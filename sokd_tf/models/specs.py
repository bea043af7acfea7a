"""Model specs: one string names a teacher or student, wherever models are chosen.

Three kinds of spec (`spec_kind`), the same strings as flags, in config files and in a
TFX `custom_config`:

- a zoo name, a key of `sokd_tf.models.BUILDERS` (`wrn_40_2`, ...): built fresh;
- `keras.applications.NAME` (`keras.applications.MobileNetV2`, `...ResNet50V2`,
  `...EfficientNetB0`, `...MobileNetV3Small`, ...): built fresh with `weights=None`, the
  run's input shape and class count, `include_top=True` and `classifier_activation=None`
  (logits out). Built-in input preprocessing is switched off where the application has
  the option (`include_preprocessing=False`: MobileNetV3, EfficientNetV2, ConvNeXt), since
  the pipeline feeds normalised images; EfficientNet (V1) always rescales by 1/255 and
  applies its identity `Normalization` layer, a fixed linear map of the input;
- a path to a `.keras` file: any model a user saved (for a teacher, the trained teacher;
  for a student, a starting point). Loaded with `keras.saving.load_model` in safe mode: a
  file with a `Lambda` layer or another serialized Python function is refused unless the
  caller passes `trust_custom_code=True`; custom layer classes come only from modules the
  caller names in `custom_modules` (imported explicitly, never guessed from the file).

Every built or loaded model is then checked (`check_model`): one image input of the
data's shape, logits `[batch, num_classes]` (a softmax/sigmoid output is refused), and,
where the caller needs the graph (SOKD's teacher, whose peer is cut from it), a
functional or Sequential model rather than a subclassed one.

Reference: docs/DESIGN.md, "Models"; keras.io "Keras Applications" and "Saving &
serialization" (safe_mode).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import os
import re
import zipfile
from collections.abc import Iterable, Sequence

import keras
import numpy as np

from sokd_tf import models
from sokd_tf.errors import ConfigError
from sokd_tf.models import (
    fused_batch_norm,
    stages,
)

SPEC_KINDS = ("zoo", "keras_applications", "keras_file")
APPLICATIONS_PREFIX = "keras.applications."
KERAS_FILE_SUFFIX = ".keras"
ROLES = ("teacher", "student")
# Keras switches that add preprocessing inside an application; the pipeline normalises.
_PREPROCESSING_ARGUMENTS = ("include_preprocessing",)
_PROBABILITY_ACTIVATIONS = ("softmax", "sigmoid", "hard_sigmoid")
# Layers that change neither values nor classes: the activation check looks through them.
_TRANSPARENT_LAYERS = (
    keras.layers.Reshape, keras.layers.Flatten, keras.layers.Dropout, keras.layers.Identity,
)


def applications_names() -> list[str]:
    """The model builders of `keras.applications` (`MobileNetV2`, `ResNet50V2`, ...)."""
    return sorted(
        name for name in dir(keras.applications)
        if name[:1].isupper() and callable(getattr(keras.applications, name))
    )


def spec_kind(spec: str) -> str:
    """Classifies a model spec without building or reading anything.

    Args:
      spec: a zoo name, `keras.applications.NAME` or a path ending in `.keras`.

    Returns:
      One of `SPEC_KINDS`: "zoo", "keras_applications" or "keras_file".

    Raises:
      ConfigError: a string of none of the three kinds (the message lists them), or an
        unknown `keras.applications` name.
    """
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"a model spec must be a non-empty string, got {spec!r}")
    if spec.endswith(KERAS_FILE_SUFFIX):
        return "keras_file"
    if spec.startswith(APPLICATIONS_PREFIX):
        name = spec[len(APPLICATIONS_PREFIX):]
        if name not in applications_names():
            raise ConfigError(
                f"unknown keras.applications model {name!r} in {spec!r}; choose one of "
                f"{applications_names()}"
            )
        return "keras_applications"
    if spec in models.BUILDERS:
        return "zoo"
    if spec.startswith("wrn_"):
        models.builder(spec)  # any valid wrn_{depth}_{width}; a bad one says the valid form
        return "zoo"
    hint = " (a legacy .h5 file: re-save it as .keras)" if spec.endswith(".h5") else ""
    raise ConfigError(
        f"unknown model spec {spec!r}{hint}: give a zoo name (one of {sorted(models.BUILDERS)}), "
        f"keras.applications.NAME (e.g. keras.applications.MobileNetV2) or a path to a "
        f".keras file"
    )


def build_model(
    spec: str,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    role: str,
    synchronized_bn: bool = False,
    name: str | None = None,
    require_graph: bool = False,
    trust_custom_code: bool = False,
    custom_modules: Iterable[str] = (),
    batch_norm: str | None = None,
) -> keras.Model:
    """Builds (zoo, keras.applications) or loads (.keras) the model `spec` names, checked.

    Args:
      spec: zoo name, `keras.applications.NAME` or path to a `.keras` file.
      input_shape: `(H, W, C)` of the images the model will be fed (the dataset info's
        `image_shape`, after `data.image_size` / `data.channels`).
      num_classes: classes of the dataset.
      role: "teacher" or "student"; messages name the model by role and spec
        ("teacher 'runs/t.keras' takes images ..."). DML's peer is built from the
        teacher's spec: pass "teacher".
      synchronized_bn: use synchronized BatchNormalization across replicas (zoo models
        are built so; keras.applications models and loaded files are rebuilt with every
        BatchNormalization layer synchronized, weights kept).
      name: model name; None = the builder's / file's own name (a subclassed model from
        a file keeps its own).
      require_graph: the caller needs the layer graph (the teacher of SOKD, whose peer
        is cut from it): a subclassed model is refused.
      trust_custom_code: `.keras` only: load with `safe_mode=False`, so `Lambda` layers
        and serialized Python functions in the file run. Off by default; only for files
        you trust.
      custom_modules: `.keras` only: names of Python modules that define the file's
        custom layers; each is imported, and its Layer/Model classes (registered or not)
        are made available to the loader.
      batch_norm: "fused" or "stock" BatchNormalization for zoo models and loaded files
        (same weights and maths); None = the builder's default / the file's own.
        keras.applications models keep Keras' layer.

    Returns:
      A built `keras.Model`, normalised float images `[batch, H, W, C]` -> logits
      `[batch, num_classes]`.

    Raises:
      ConfigError: unknown spec, missing or unloadable file, a file with code (and no
        opt-in), input shape or class count that does not match the data (naming the
        `--image_size` / `--channels` flags that fix it), a probability output, a
        subclassed model where `require_graph` or `synchronized_bn` needs its graph.
    """
    if role not in ROLES:
        raise ConfigError(f"role must be one of {list(ROLES)}, got {role!r}")
    what = f"{role} {spec!r}"
    kind = spec_kind(spec)
    input_shape = tuple(int(d) for d in input_shape)
    if kind == "zoo":
        model = models.build(spec, input_shape, num_classes, synchronized_bn=synchronized_bn,
                             model_name=name, **({"batch_norm": batch_norm} if batch_norm else {}))
    elif kind == "keras_applications":
        model = _build_application(spec[len(APPLICATIONS_PREFIX):], input_shape, num_classes,
                                   name=name, what=what)
    else:
        model = load_keras_file(spec, what=what, trust_custom_code=trust_custom_code,
                                custom_modules=custom_modules)
        if name is not None and name != model.name and is_graph_model(model):
            # A functional view under the new name, sharing the loaded layers.
            model = keras.Model(*_graph_ends(model, what), name=name)
        if batch_norm is not None and is_graph_model(model):
            model = fused_batch_norm.with_batch_norm(model, batch_norm)
    check_model(model, input_shape, num_classes, what=what, require_graph=require_graph)
    if synchronized_bn and kind != "zoo":
        model = with_synchronized_batch_norm(model, what=what)
    return model


def _build_application(app: str, input_shape, num_classes: int, *, name: str | None,
                       what: str) -> keras.Model:
    """`keras.applications.<app>` with random weights and a logits head."""
    builder = getattr(keras.applications, app)
    arguments = {
        "weights": None,
        "include_top": True,
        "input_shape": tuple(input_shape),
        "classes": num_classes,
        "classifier_activation": None,
    }
    parameters = inspect.signature(builder).parameters
    for argument in _PREPROCESSING_ARGUMENTS:
        if argument in parameters:
            arguments[argument] = False
    if name is not None:
        arguments["name"] = name
    try:
        return builder(**arguments)
    except (ValueError, TypeError) as err:
        message = str(err)
        minimum = re.search(r"at least (\d+)x(\d+)", message)
        if minimum:
            size = max(int(minimum.group(1)), int(minimum.group(2)))
            raise ConfigError(
                f"{what} needs images of at least {size}x{size}, the data gives "
                f"{input_shape[0]}x{input_shape[1]}: pass --image_size={size} (or larger; "
                f"data.image_size) to resize them in the input pipeline"
            ) from err
        raise ConfigError(f"{what} cannot be built for images {tuple(input_shape)} and "
                          f"{num_classes} classes: {message}") from err


def custom_objects_from_modules(custom_modules: Iterable[str]) -> dict[str, type]:
    """Imports each named module; returns its Keras classes by class name.

    Pass the result as `custom_objects=` to any later `keras.saving.load_model` of files
    holding those layers (checkpoints of a run whose models use them).

    Raises:
      ConfigError: a module that cannot be imported.
    """
    if isinstance(custom_modules, str):
        custom_modules = [custom_modules]
    found = {}
    bases = (keras.layers.Layer, keras.initializers.Initializer, keras.regularizers.Regularizer,
             keras.constraints.Constraint)
    for module_name in custom_modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ConfigError(f"custom module {module_name!r} cannot be imported: {err}") from err
        for value in vars(module).values():
            if (inspect.isclass(value) and issubclass(value, bases)
                    and value.__module__ == module.__name__):
                found[value.__name__] = value
    return found


def _archive_config(path: str) -> dict:
    """The model config a `.keras` archive stores (its `config.json`); nothing is loaded.

    Raises:
      OSError, zipfile.BadZipFile: not a readable zip archive.
      KeyError: no `config.json` in it.
      ValueError: `config.json` is not JSON.
    """
    with zipfile.ZipFile(path) as archive:
        return json.loads(archive.read("config.json"))


def _serialized_objects(config) -> Iterable[tuple[dict, str | None]]:
    """Every serialized object (a dict with a `class_name`) in a Keras config, with the
    name of the innermost layer it belongs to (None outside any named layer)."""

    def walk(value, layer_name):
        if isinstance(value, dict):
            if "class_name" in value:
                inner = value.get("config")
                if isinstance(inner, dict) and isinstance(inner.get("name"), str):
                    layer_name = inner["name"]
                yield value, layer_name
            for item in value.values():
                yield from walk(item, layer_name)
        elif isinstance(value, list):
            for item in value:
                yield from walk(item, layer_name)

    yield from walk(config, None)


def _code_in_file(config) -> list[str]:
    """Names of the layers whose serialized config carries Python code (Lambda, lambdas)."""
    culprits = [layer_name or "?" for entry, layer_name in _serialized_objects(config)
                if entry["class_name"] in ("Lambda", "__lambda__")]
    return list(dict.fromkeys(culprits))


def _custom_classes_in_file(config) -> list[tuple[str, str]]:
    """`(class_name, module)` of every non-Keras, non-sokd_tf class the file refers to."""
    found = [(entry["class_name"], entry["module"]) for entry, _ in _serialized_objects(config)
             if isinstance(entry.get("module"), str)
             and not entry["module"].startswith(("keras", "sokd_tf", "builtins"))]
    return list(dict.fromkeys(found))


# Layer classes that train slower in bfloat16 than in float32 on CPUs with native
# bfloat16 (oneDNN's depthwise convolutions; benchmarks/RESULTS.md, "resnet32x4 ->
# resnet8x4 and vgg13 -> mobilenetv2"): precision "auto" keeps such runs in float32.
BF16_SLOW_ON_CPU = ("DepthwiseConv2D", "SeparableConv2D")
_PROBE_SHAPE = (32, 32, 3)


def bf16_slow_layers(spec: str) -> tuple[str, ...]:
    """The `BF16_SLOW_ON_CPU` layer classes in the model `spec` names, sorted.

    A `.keras` file's stored config is read, nothing is loaded; a zoo or
    keras.applications spec is built once at 32x32x3 with 10 classes (layer types do not
    depend on the shape). A spec that cannot be read or built gives () here: building
    it for real raises the clear error.
    """
    try:
        kind = spec_kind(spec)
        if kind == "keras_file":
            found = {entry["class_name"] for entry, _ in _serialized_objects(_archive_config(spec))}
        else:
            found = _built_layer_classes(spec, kind)
    except (ConfigError, OSError, KeyError, ValueError, zipfile.BadZipFile):
        return ()
    return tuple(sorted(found & set(BF16_SLOW_ON_CPU)))


def bf16_slow_models(*, student: str | None, teacher: str | None) -> dict[str, tuple[str, ...]]:
    """`bf16_slow_layers` of a run's student and teacher, keyed "student 'spec'" etc.

    One decision for every stage of a run: the teacher (trained, or the source of SOKD's
    peer and DML's second network) and the student are both looked at. Models without
    such layers are left out.
    """
    found = {}
    for role, spec in (("student", student), ("teacher", teacher)):
        layers = bf16_slow_layers(spec) if spec else ()
        if layers:
            found[f"{role} {spec!r}"] = layers
    return found


@functools.cache
def _built_layer_classes(spec: str, kind: str) -> frozenset[str]:
    """Layer class names of a zoo / keras.applications model, built once per process."""
    if kind == "zoo":
        model = models.build(spec, _PROBE_SHAPE, 10)
    else:
        model = _build_application(spec[len(APPLICATIONS_PREFIX):], _PROBE_SHAPE, 10,
                                   name=None, what=repr(spec))
    return frozenset(type(layer).__name__ for layer in model._flatten_layers())


def load_keras_file(
    path: str,
    *,
    what: str | None = None,
    trust_custom_code: bool = False,
    custom_modules: Iterable[str] = (),
) -> keras.Model:
    """Loads a `.keras` model file safely (see the module doc).

    Args:
      path: the `.keras` file.
      what: how error messages name the model; default the path.
      trust_custom_code: load with `safe_mode=False` (runs code stored in the file).
      custom_modules: modules defining the file's custom classes, imported explicitly.

    Returns:
      The model, uncompiled.

    Raises:
      ConfigError: missing file, not a `.keras` archive, code in the file without
        `trust_custom_code` (naming the layers), an unknown custom class (naming it and
        its module), any other load failure (with Keras' message).
    """
    what = what or repr(path)
    if not os.path.isfile(path):
        raise ConfigError(f"{what}: no such file {path!r}")
    try:
        config = _archive_config(path)
    except (zipfile.BadZipFile, KeyError, ValueError) as err:
        raise ConfigError(f"{what}: {path!r} is not a Keras .keras archive ({err})") from err
    code = _code_in_file(config)
    if code and not trust_custom_code:
        raise ConfigError(
            f"{what} contains Python code that loading would run, in layer(s) {code} "
            "(Lambda layers or serialized functions); refused in Keras' safe mode. If you "
            "trust this file, opt in with trust_custom_code=True (--trust_custom_code); "
            "better, replace those layers by registered custom layers"
        )
    custom_objects = custom_objects_from_modules(custom_modules)
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=not trust_custom_code,
                                        custom_objects=custom_objects)
    except Exception as err:  # Keras raises TypeError/ValueError/... for a bad config
        message = str(err)
        missing = [(c, m) for c, m in _custom_classes_in_file(config)
                   if c not in custom_objects and f"'{c}'" in message]
        if "Could not locate" in message or missing:
            classes = missing or _custom_classes_in_file(config)
            raise ConfigError(
                f"{what} uses custom class(es) {[c for c, _ in classes]} (saved from module(s) "
                f"{sorted({m for _, m in classes})}); name the module(s) that define them with "
                f"custom_modules=(...) (--custom_modules); sokd_tf imports nothing by itself"
            ) from err
        raise ConfigError(f"{what}: cannot load {path!r}: {type(err).__name__}: "
                          f"{message[:600]}") from err
    if not isinstance(model, keras.Model):
        raise ConfigError(f"{what}: {path!r} holds a {type(model).__name__}, not a keras.Model")
    return model


def _graph_ends(model: keras.Model, what: str):
    graph = stages.graph_model(model, what)
    return graph.inputs, graph.outputs


def is_graph_model(model: keras.Model) -> bool:
    """Functional or Sequential (has a layer graph), as opposed to a subclassed model."""
    try:
        stages.graph_model(model)
    except ConfigError:
        return False
    return True


def _shape_fix(expected: tuple, given: tuple) -> str:
    """The data flags that turn images of shape `given` into `expected`, or why none can."""
    fixes = []
    (height, width, channels), (data_height, data_width, data_channels) = expected, given
    if (height, width) != (data_height, data_width) and None not in (height, width):
        if height == width:
            fixes.append(f"--image_size={height}")
        else:
            return (f"the model takes non-square {height}x{width} images; --image_size only "
                    "resizes to squares")
    if channels is not None and channels != data_channels:
        if channels == 3 and data_channels == 1:
            fixes.append("--channels=3")
        else:
            return (f"the model takes {channels}-channel images, the data has {data_channels}; "
                    "--channels converts only grayscale to 3 channels")
    return f"pass {' '.join(fixes)} (data.image_size / data.channels)" if fixes else ""


def check_model(model: keras.Model, input_shape: Sequence[int], num_classes: int, *,
                what: str = "model", require_graph: bool = False) -> None:
    """Checks `model` fits the data and outputs logits.

    Args:
      model: the model.
      input_shape: `(H, W, C)` of the images it will be fed.
      num_classes: classes of the dataset.
      what: how messages name it, e.g. "teacher 'my_teacher.keras'".
      require_graph: refuse a subclassed model.

    Raises:
      ConfigError: one per problem, naming the model: a subclassed model where a graph is
        required; several inputs or outputs; an input shape the data does not have (with
        the flags that fix it); a class count other than `num_classes`; softmax or
        sigmoid as the last activation.
    """
    input_shape = tuple(int(d) for d in input_shape)
    if require_graph or is_graph_model(model):
        graph = stages.graph_model(model, what)
        expected = tuple(graph.inputs[0].shape[1:])
        if len(expected) != 3 or any(e is not None and e != g
                                     for e, g in zip(expected, input_shape, strict=True)):
            fix = _shape_fix(expected, input_shape) if len(expected) == 3 else ""
            raise ConfigError(
                f"{what} takes images of shape {expected} but the data gives {input_shape}"
                + (f": {fix}" if fix else "")
            )
        output_shape = tuple(graph.outputs[0].shape[1:])
        activation = _probability_activation(stages.ModelGraph(graph, what))
    else:
        images = np.random.default_rng(0).normal(size=(2, *input_shape)).astype(np.float32)
        try:
            outputs = np.asarray(model(images, training=False), np.float64)
        except Exception as err:  # a subclassed model's call may raise anything
            raise ConfigError(f"{what} cannot run on images of shape {input_shape}: "
                              f"{type(err).__name__}: {err}") from err
        output_shape = tuple(outputs.shape[1:])
        # No graph to inspect: a softmax shows as rows of non-negative values summing to 1.
        activation = None
        if (outputs.ndim == 2 and np.all(outputs >= 0)
                and np.allclose(outputs.sum(axis=-1), 1.0, atol=1e-4)):
            activation = ("softmax", "its output rows are probability vectors")
    if output_shape != (num_classes,):
        raise ConfigError(
            f"{what} outputs shape {output_shape} but the data has {num_classes} classes "
            f"(expected logits [batch, {num_classes}])"
        )
    if activation:
        kind, where = activation
        raise ConfigError(
            f"{what} ends in a {kind} ({where}): distillation needs logits. Give a model whose "
            f"last layer has no activation (e.g. Dense(classes) without activation=, or "
            f"keras.Model(model.input, <the pre-activation layer>.output) for a trained file)"
        )


def _probability_activation(graph: stages.ModelGraph) -> tuple[str, str] | None:
    """`(activation, where)` when the model's output is a softmax/sigmoid, else None."""
    node = graph.producer(graph.output)
    while node is not None:
        operation = node.operation
        kind = _operation_activation(operation)
        if kind:
            return kind, f"layer {operation.name!r}"
        if isinstance(operation, keras.Model) and is_graph_model(operation):
            inner = stages.ModelGraph(operation)
            found = _probability_activation(inner)
            return (found[0], f"inside {operation.name!r}, {found[1]}") if found else None
        see_through = isinstance(operation, _TRANSPARENT_LAYERS) or (
            isinstance(operation, keras.layers.Activation) and kind is None)
        if not see_through or len(node.input_tensors) != 1:
            return None
        node = graph.producer(node.input_tensors[0])
    return None


def _operation_activation(operation) -> str | None:
    if isinstance(operation, keras.layers.Softmax):
        return "softmax"
    activation = getattr(operation, "activation", None)
    activation_name = getattr(activation, "__name__", None)
    if activation_name in _PROBABILITY_ACTIVATIONS:
        return activation_name
    if not isinstance(operation, keras.layers.Layer):
        # keras.ops.softmax / sigmoid applied to a symbolic tensor.
        name = type(operation).__name__.lower()
        for candidate in _PROBABILITY_ACTIVATIONS:
            if name == candidate.replace("_", ""):
                return candidate
    return None


def with_synchronized_batch_norm(model: keras.Model, *, what: str = "model") -> keras.Model:
    """A copy of a functional/Sequential `model` with every BatchNormalization synchronized.

    Weights (BN statistics included) are copied; the copy has the same layer names.

    Raises:
      ConfigError: a subclassed model (its layers cannot be rebuilt from a graph).
    """
    graph = stages.graph_model(model, what)

    def clone(operation):
        if not isinstance(operation, keras.layers.Layer):
            return operation
        config = operation.get_config()
        if isinstance(operation, keras.layers.BatchNormalization):
            config["synchronized"] = True
        return operation.__class__.from_config(config)

    copy = keras.models.clone_model(graph, clone_function=clone, recursive=True)
    copy.set_weights(graph.get_weights())
    return copy
