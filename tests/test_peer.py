"""Peer (knowledge bridge module), teacher trunk and reconstructed teacher."""

import keras
import numpy as np
import pytest

from sokd_tf import models
from sokd_tf.errors import ConfigError
from sokd_tf.models import peer as peer_lib


def trainable_count(model):
    return int(sum(np.prod(v.shape) for v in model.trainable_weights))


@pytest.mark.parametrize(
    "name, classes, expected",
    [
        ("wrn_40_2", 100, 1_720_036),
        ("wrn_40_1", 100, 434_084),
        ("wrn_16_1", 10, 132_298),
        ("wrn_16_2", 10, 526_730),
    ],
)
def test_peer_param_counts_match_reference(name, classes, expected):
    teacher = models.BUILDERS[name]((32, 32, 3), classes)
    peer = peer_lib.build_peer(teacher)
    assert trainable_count(peer) == expected


def test_peer_shapes_and_stages_wrn_40_2():
    teacher = models.BUILDERS["wrn_40_2"]((32, 32, 3), 100)
    peer = peer_lib.build_peer(teacher)
    assert tuple(peer.inputs[0].shape[1:]) == (16, 16, 64)
    assert peer.inputs[0].name == "teacher_group2"
    assert models.stage_names(peer) == ["group3", "features", "logits"]
    assert tuple(peer.get_layer("group3").output.shape[1:]) == (8, 8, 128)
    assert tuple(peer.output.shape[1:]) == (100,)


@pytest.fixture(scope="module")
def teacher():
    keras.utils.set_random_seed(3)
    model = models.BUILDERS["wrn_16_1"]((16, 16, 3), 10, name="teacher")
    # Give BN statistics non-default values so that "copy" has something to copy.
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(np.full(layer.moving_mean.shape, 0.25, np.float32))
            layer.gamma.assign(np.full(layer.gamma.shape, 1.5, np.float32))
    return model


def images(n=4, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 16, 16, 3)).astype(np.float32)


def test_fresh_peer_is_new_and_copy_peer_equals_teacher_tail(teacher):
    fresh = peer_lib.build_peer(teacher, init="fresh")
    copy = peer_lib.build_peer(teacher, init="copy", name="copy")
    for name in ("group3_block1_conv1", "logits", "final_bn"):
        teacher_weights = teacher.get_layer(name).get_weights()
        copied = copy.get_layer(name).get_weights()
        new = fresh.get_layer(name).get_weights()
        for t, c in zip(teacher_weights, copied, strict=True):
            np.testing.assert_array_equal(t, c)
        # Kernels / gamma: random or set above in the teacher, initial values in the peer.
        assert not np.array_equal(teacher_weights[0], new[0])
    # No variable is shared with the teacher.
    teacher_ids = {id(v) for v in teacher.weights}
    assert not any(id(v) in teacher_ids for v in fresh.weights + copy.weights)
    # The copy reproduces the teacher exactly when fed its penultimate features.
    trunk = peer_lib.build_teacher_trunk(teacher)
    features, teacher_logits = trunk(images(), training=False)
    np.testing.assert_allclose(copy(features, training=False), teacher_logits, atol=1e-5)
    np.testing.assert_allclose(teacher_logits, teacher(images(), training=False), atol=1e-6)


def test_trunk_shares_teacher_layers(teacher):
    trunk = peer_lib.build_teacher_trunk(teacher)
    assert {id(v) for v in trunk.weights} == {id(v) for v in teacher.weights}
    features, _ = trunk(images())
    assert features.shape == (4, 8, 8, 32)


def test_peer_is_trainable_even_from_a_frozen_teacher(teacher):
    teacher.trainable = False
    try:
        peer = peer_lib.build_peer(teacher)
    finally:
        teacher.trainable = True
    assert peer.trainable and trainable_count(peer) == 132_298


def test_reconstructed_teacher_runs_trunk_then_peer(teacher):
    peer = peer_lib.build_peer(teacher)
    reconstructed = peer_lib.build_reconstructed_teacher(teacher, peer)
    features, _ = peer_lib.build_teacher_trunk(teacher)(images(), training=False)
    np.testing.assert_allclose(
        reconstructed(images(), training=False), peer(features, training=False), atol=1e-5
    )
    assert reconstructed.name == "reconstructed_teacher"


def test_peer_from_another_stage(teacher):
    peer = peer_lib.build_peer(teacher, from_stage="group1")
    assert models.stage_names(peer) == ["group2", "group3", "features", "logits"]
    reconstructed = peer_lib.build_reconstructed_teacher(teacher, peer, from_stage="group1")
    assert reconstructed(images()).shape == (4, 10)
    with pytest.raises(ConfigError, match="takes"):
        peer_lib.build_reconstructed_teacher(teacher, peer)


def test_bad_arguments(teacher):
    with pytest.raises(ConfigError, match="init"):
        peer_lib.build_peer(teacher, init="random")
    with pytest.raises(ConfigError, match="group7"):
        peer_lib.build_peer(teacher, from_stage="group7")
