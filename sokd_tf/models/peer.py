"""The SOKD peer (knowledge bridge module) and the models built around it, for any
functional teacher.

The peer is a structural copy of the teacher's sub-graph from a cut tensor to the logits,
fed by that tensor: by default the output of the teacher's penultimate stage (for WRN:
`group2`, so the peer is the last group + final BN/ReLU/pool/dense). Any layer whose
output separates the teacher's graph can be named instead (`from_layer`, the CLI's
`--peer_from`); see `sokd_tf.models.stages` for how stages and valid cuts are found. The
teacher up to the cut followed by the peer is the "reconstructed teacher".

`from_stage=` is the older name of `from_layer=` and means the same.

Reference: docs/METHOD.md, "Roles"; arXiv 2111.11747, Sec. 3.
"""

from __future__ import annotations

import math

import keras

from sokd_tf.errors import ConfigError
from sokd_tf.models import stages

PEER_INITS = ("fresh", "copy")


def _layer_name(from_layer: str | None, from_stage: str | None) -> str | None:
    if from_layer is not None and from_stage is not None and from_layer != from_stage:
        raise ConfigError(f"from_layer={from_layer!r} and from_stage={from_stage!r} disagree; "
                          "from_stage is the old name of from_layer: pass one")
    return from_layer if from_layer is not None else from_stage


def peer_cut(teacher: keras.Model, from_layer: str | None = None, *,
             from_stage: str | None = None) -> str:
    """Name of the teacher layer the peer branches from (validated; default penultimate).

    Raises:
      ConfigError: see `stages.cut_tensor`.
    """
    _, name, _ = stages.cut_tensor(teacher, _layer_name(from_layer, from_stage), "teacher")
    return name


def _clone_layer(operation):
    """Fresh copy of a layer from its config; stateless operations are reused as they are."""
    if isinstance(operation, keras.layers.Layer):
        return operation.__class__.from_config(operation.get_config())
    return operation


def build_peer(
    teacher: keras.Model,
    init: str = "fresh",
    name: str = "peer",
    *,
    from_layer: str | None = None,
    from_stage: str | None = None,
) -> keras.Model:
    """Builds the peer: a copy of the teacher's sub-graph from the cut tensor to the logits.

    Residual branches that start at the cut tensor are part of the copy; a branch that
    starts before it makes the cut invalid (ConfigError).

    Args:
      teacher: functional or Sequential model, images -> logits.
      init: "fresh" (official: the same initialisers as a new network) or "copy" (start
        from the teacher's trained weights, BatchNorm statistics included).
      name: model name.
      from_layer: teacher layer whose output feeds the peer; default the penultimate
        stage output (`stages.penultimate_stage_output`).
      from_stage: old name of `from_layer`.

    Returns:
      A built functional model from the cut tensor `[batch, h, w, c]` (input layer
      `teacher_{layer}`) to logits `[batch, num_classes]`. Its layers are fresh
      copies with the teacher's layer names (so `stage_names(peer)` works for WRN); all
      are trainable, whatever the teacher's flags. No variable is shared with the
      teacher.

    Raises:
      ConfigError: unknown `init`, subclassed teacher, unknown layer, or a cut that a
        skip connection crosses (the message names the crossing layers and suggests
        valid cut points).
    """
    if init not in PEER_INITS:
        raise ConfigError(f"peer init must be one of {list(PEER_INITS)}, got {init!r}")
    graph, layer, features = stages.cut_tensor(
        teacher, _layer_name(from_layer, from_stage), "teacher")
    tail = keras.Model(features, graph.outputs[0], name=f"{graph.name}_tail")
    peer_input = keras.Input(shape=tuple(features.shape[1:]), dtype=features.dtype,
                             name=f"teacher_{layer}")
    clone = keras.models.clone_model(tail, input_tensors=peer_input, clone_function=_clone_layer)
    peer = keras.Model(clone.inputs[0], clone.outputs[0], name=name)
    # A frozen teacher's trainable=False must not leak into the copy (from_config copies
    # each layer's flag).
    for peer_layer in peer.layers:
        peer_layer.trainable = True
    peer.trainable = True
    if init == "copy":
        for teacher_layer in tail.layers:
            if teacher_layer.weights and not isinstance(teacher_layer, keras.layers.InputLayer):
                peer.get_layer(teacher_layer.name).set_weights(teacher_layer.get_weights())
    return peer


def build_teacher_trunk(teacher: keras.Model, *, from_layer: str | None = None,
                        from_stage: str | None = None) -> keras.Model:
    """Images -> [cut features, teacher logits], sharing the teacher's layers.

    One forward pass of this model gives both the peer's input and the teacher's logits,
    so the teacher trunk is never computed twice.

    Args:
      teacher: functional or Sequential model.
      from_layer: layer the peer branches from; default the penultimate stage output.
      from_stage: old name of `from_layer`.

    Returns:
      A functional model images `[batch, H, W, C]` -> `[features [batch, h, w, c],
      logits [batch, num_classes]]`.
    """
    graph, _, features = stages.cut_tensor(
        teacher, _layer_name(from_layer, from_stage), "teacher")
    return keras.Model(graph.inputs[0], [features, graph.outputs[0]], name="teacher_trunk")


def build_reconstructed_teacher(
    teacher: keras.Model,
    peer: keras.Model,
    name: str = "reconstructed_teacher",
    *,
    from_layer: str | None = None,
    from_stage: str | None = None,
) -> keras.Model:
    """Teacher up to the cut, then the peer: images -> peer logits.

    The model shares layers with `teacher` and `peer` (it evaluates their current state)
    and saves as a standalone `.keras` file.

    Args:
      teacher: the teacher the peer branches from.
      peer: model built by `build_peer(teacher, from_layer=from_layer)`.
      name: model name.
      from_layer: layer the peer branches from; default the penultimate stage output.
      from_stage: old name of `from_layer`.

    Returns:
      A functional model images `[batch, H, W, C]` -> logits `[batch, classes]`.

    Raises:
      ConfigError: the peer's input does not fit the teacher's cut tensor.
    """
    graph, layer, features = stages.cut_tensor(
        teacher, _layer_name(from_layer, from_stage), "teacher")
    if tuple(peer.inputs[0].shape[1:]) != tuple(features.shape[1:]):
        raise ConfigError(
            f"peer {peer.name!r} takes {tuple(peer.inputs[0].shape[1:])} but teacher layer "
            f"{layer!r} gives {tuple(features.shape[1:])}; build the peer with "
            f"build_peer(teacher, from_layer={layer!r})"
        )
    return keras.Model(graph.inputs[0], peer(features), name=name)


def describe_peer(teacher: keras.Model, peer: keras.Model, *,
                  from_layer: str | None = None) -> dict:
    """Where the peer was cut and how big it is, for printing and the run report.

    Parameter counts are `count_params()` (every weight, BatchNorm statistics included)
    on both sides, so the share does not depend on which teacher variables are frozen.

    Args:
      teacher: the teacher.
      peer: its peer.
      from_layer: the cut layer the peer was built from; default the penultimate stage.

    Returns:
      `{"cut_layer", "cut_shape" ([h, w, c]), "peer_params", "peer_trainable_params",
      "teacher_params", "peer_share"}`; `peer_share` = peer_params / teacher_params.
    """
    _, layer, features = stages.cut_tensor(teacher, from_layer, "teacher")
    peer_params = int(peer.count_params())
    teacher_params = int(teacher.count_params())
    return {
        "cut_layer": layer,
        "cut_shape": [int(d) if d is not None else None for d in features.shape[1:]],
        "peer_params": peer_params,
        "peer_trainable_params": sum(math.prod(v.shape) for v in peer.trainable_weights),
        "teacher_params": teacher_params,
        "peer_share": peer_params / teacher_params if teacher_params else 0.0,
    }


def format_peer_description(description: dict) -> str:
    """One line for logs, e.g. "peer cut at 'group2' (16x16x32): 132,298 parameters, ..."."""
    shape = "x".join(str(d) for d in description["cut_shape"])
    return (f"peer cut at {description['cut_layer']!r} ({shape}): "
            f"{description['peer_params']:,} parameters, "
            f"{100 * description['peer_share']:.1f}% of the teacher's "
            f"{description['teacher_params']:,}")
