"""The SOKD peer (knowledge bridge module) and the models built around it.

The peer is a structural copy of everything after the teacher's penultimate stage (for
WRN: the last group + final BN/ReLU/pool/dense), fed by that stage's raw output. The
teacher stem .. penultimate stage followed by the peer is the "reconstructed teacher".

Reference: docs/METHOD.md, "Roles" (arXiv 2111.11747, Sec. 3).
"""

from __future__ import annotations

import keras

from sokd_tf.errors import ConfigError
from sokd_tf.models import penultimate_stage, stage_names

PEER_INITS = ("fresh", "copy")


def _stage_output(teacher: keras.Model, stage: str | None):
    stage = stage or penultimate_stage(teacher)
    if stage not in stage_names(teacher) or stage == "logits":
        raise ConfigError(
            f"cannot branch a peer from {stage!r} of model {teacher.name!r}; "
            f"choose one of {stage_names(teacher)[:-1]}"
        )
    return stage, teacher.get_layer(stage).output


def build_peer(
    teacher: keras.Model,
    init: str = "fresh",
    name: str = "peer",
    *,
    from_stage: str | None = None,
) -> keras.Model:
    """Builds the peer: a copy of the teacher's layers after `from_stage`.

    Args:
      teacher: functional model with named stages (see `sokd_tf.models`).
      init: "fresh" (official: the same initialisers as a new network) or "copy" (start
        from the teacher's trained weights, BatchNorm statistics included).
      name: model name.
      from_stage: stage the peer branches from; default the penultimate stage.

    Returns:
      A built functional model from the stage output `[batch, h, w, c]` (input layer
      `teacher_{stage}`) to float32 logits `[batch, num_classes]`. Its layers have the
      teacher's layer names, so `stage_names(peer)` works. All layers are trainable.

    Raises:
      ConfigError: unknown `init` or `from_stage`.
    """
    if init not in PEER_INITS:
        raise ConfigError(f"peer init must be one of {list(PEER_INITS)}, got {init!r}")
    stage, features = _stage_output(teacher, from_stage)
    tail = keras.Model(features, teacher.output)
    peer_input = keras.Input(shape=features.shape[1:], name=f"teacher_{stage}")
    clone = keras.models.clone_model(tail, input_tensors=peer_input)
    peer = keras.Model(clone.inputs[0], clone.outputs[0], name=name)
    # A frozen teacher's trainable=False must not leak into the copy (clone_model copies
    # each layer's config, flag included).
    for layer in peer.layers:
        layer.trainable = True
    peer.trainable = True
    if init == "copy":
        for layer in tail.layers[1:]:
            peer.get_layer(layer.name).set_weights(layer.get_weights())
    return peer


def build_teacher_trunk(teacher: keras.Model, *, from_stage: str | None = None) -> keras.Model:
    """Images -> [stage features, teacher logits], sharing the teacher's layers.

    One forward pass of this model gives both the peer's input and the teacher's logits,
    so the teacher trunk is never computed twice.

    Args:
      teacher: functional model with named stages.
      from_stage: stage the peer branches from; default the penultimate stage.

    Returns:
      A functional model images `[batch, H, W, C]` -> `[features [batch, h, w, c],
      logits [batch, num_classes]]`.
    """
    _, features = _stage_output(teacher, from_stage)
    return keras.Model(teacher.inputs[0], [features, teacher.output], name="teacher_trunk")


def build_reconstructed_teacher(
    teacher: keras.Model,
    peer: keras.Model,
    name: str = "reconstructed_teacher",
    *,
    from_stage: str | None = None,
) -> keras.Model:
    """Teacher stem .. `from_stage`, then the peer: images -> peer logits.

    The model shares layers with `teacher` and `peer` (it evaluates their current state)
    and saves as a standalone `.keras` file.

    Args:
      teacher: the teacher the peer branches from.
      peer: model built by `build_peer(teacher, from_stage=from_stage)`.
      name: model name.
      from_stage: stage the peer branches from; default the penultimate stage.

    Returns:
      A functional model images `[batch, H, W, C]` -> float32 logits `[batch, classes]`.

    Raises:
      ConfigError: the peer's input does not fit the teacher's stage output.
    """
    stage, features = _stage_output(teacher, from_stage)
    if tuple(peer.inputs[0].shape[1:]) != tuple(features.shape[1:]):
        raise ConfigError(
            f"peer {peer.name!r} takes {tuple(peer.inputs[0].shape[1:])} but teacher stage "
            f"{stage!r} gives {tuple(features.shape[1:])}"
        )
    return keras.Model(teacher.inputs[0], peer(features), name=name)
