"""Stage discovery and peer cuts from the graph alone: WRN, a hand-written ResNet with
arbitrary layer names, keras.applications models; every refused cut with its message."""

import keras
import numpy as np
import pytest

from sokd_tf import models
from sokd_tf.errors import ConfigError
from sokd_tf.models import peer as peer_lib
from sokd_tf.models import stages


def trainable_count(model):
    return int(sum(np.prod(v.shape) for v in model.trainable_weights))


def images(shape, n=2, seed=0):
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


# --- WRN: the automatic cut is today's `group2` -------------------------------------------


@pytest.mark.parametrize("name, shape", [("wrn_10_1", (28, 28, 1)), ("wrn_16_1", (32, 32, 3)),
                                         ("wrn_40_2", (32, 32, 3))])
def test_wrn_stage_outputs_are_the_groups(name, shape):
    model = models.BUILDERS[name](shape, 10)
    assert stages.stage_outputs(model) == ["group1", "group2", "group3"]
    assert stages.penultimate_stage_output(model) == "group2"
    assert models.penultimate_stage(model) == "group2"


def test_wrn_10_1_cut_points_by_hand():
    # WRN-10-1, one block per group. group1's block keeps 16 channels, so its shortcut is
    # the identity of `stem`: nothing inside it separates the graph. group2/group3 change
    # the width: the 1x1 shortcut convolution reads the pre-activated input (relu1), so
    # bn1 and relu1 are cuts but the padded conv path is bypassed by the shortcut.
    model = models.BUILDERS["wrn_10_1"]((28, 28, 1), 10)
    assert stages.cut_points(model) == [
        "stem", "group1",
        "group2_block1_bn1", "group2_block1_relu1", "group2",
        "group3_block1_bn1", "group3_block1_relu1", "group3",
        "final_bn", "final_relu", "features",
    ]


def test_peer_from_the_automatic_cut_equals_todays_group2_peer():
    keras.utils.set_random_seed(0)
    teacher = models.BUILDERS["wrn_16_1"]((32, 32, 3), 10, name="teacher")
    automatic = peer_lib.build_peer(teacher)
    named = peer_lib.build_peer(teacher, from_layer="group2")
    # Today's peer: every teacher layer after group2, same classes and configs.
    after = [layer for layer in teacher.layers[teacher.layers.index(teacher.get_layer("group2")) + 1:]]

    def structure(layers):
        return [(type(layer).__name__, layer.name, layer.get_config()) for layer in layers]

    expected = structure(after)
    assert structure(automatic.layers[1:]) == expected == structure(named.layers[1:])
    assert automatic.inputs[0].name == "teacher_group2"
    assert tuple(automatic.inputs[0].shape[1:]) == (16, 16, 32)
    assert trainable_count(automatic) == trainable_count(named) == 132_298
    description = peer_lib.describe_peer(teacher, automatic)
    assert description["cut_layer"] == "group2" and description["cut_shape"] == [16, 16, 32]
    assert description["peer_trainable_params"] == 132_298
    assert description["peer_share"] == pytest.approx(
        automatic.count_params() / teacher.count_params())
    assert "'group2' (16x16x32)" in peer_lib.format_peer_description(description)


def test_wrn_cut_inside_a_block_names_the_shortcut_and_suggests_cuts():
    teacher = models.BUILDERS["wrn_10_1"]((28, 28, 1), 10)
    with pytest.raises(ConfigError) as error:
        peer_lib.build_peer(teacher, from_layer="group2_block1_conv1")
    message = str(error.value)
    # The Add 'group2' also reads the 1x1 shortcut, computed before the cut.
    assert "'group2' reads 'group2_block1_shortcut'" in message
    assert "group2_block1_relu1" in message and "'group2'" in message
    with pytest.raises(ConfigError, match="no layer 'conv99'.*valid cut points"):
        peer_lib.build_teacher_trunk(teacher, from_layer="conv99")
    with pytest.raises(ConfigError, match="at its output 'logits'"):
        peer_lib.build_peer(teacher, from_layer="logits")
    with pytest.raises(ConfigError, match="disagree"):
        peer_lib.build_peer(teacher, from_layer="group1", from_stage="group2")


# --- A small post-activation ResNet with arbitrary names ---------------------------------


def conv_bn_relu(x, filters, stride, name):
    x = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                            name=f"{name}_c")(x)
    x = keras.layers.BatchNormalization(name=f"{name}_n")(x)
    return keras.layers.ReLU(name=f"{name}_a")(x)


def residual(x, filters, stride, name):
    y = conv_bn_relu(x, filters, stride, f"{name}_p")
    y = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_q")(y)
    y = keras.layers.BatchNormalization(name=f"{name}_qn")(y)
    if stride != 1 or x.shape[-1] != filters:
        x = keras.layers.Conv2D(filters, 1, strides=stride, use_bias=False, name=f"{name}_skip")(x)
    added = keras.layers.Add(name=f"{name}_sum")([x, y])
    return keras.layers.ReLU(name=f"{name}_out")(added)


def small_resnet(shape=(16, 16, 3), classes=10):
    inputs = keras.Input(shape, name="pixels")
    x = conv_bn_relu(inputs, 8, 1, "entry")                    # 16x16
    x = residual(x, 8, 1, "alpha")                             # 16x16
    x = residual(x, 16, 2, "beta")                             # 8x8 (projection skip)
    x = residual(x, 16, 1, "gamma")                            # 8x8
    x = residual(x, 32, 2, "delta")                            # 4x4
    x = keras.layers.GlobalAveragePooling2D(name="squash")(x)
    return keras.Model(inputs, keras.layers.Dense(classes, name="scores")(x), name="tiny")


def test_small_resnet_stages_and_cuts_by_hand():
    model = small_resnet()
    # Tensors every path passes through: the stem's three layers, and each block's
    # post-activation output (and the Add before it); nothing inside a block, whose
    # skip connection bypasses it.
    assert stages.cut_points(model) == [
        "entry_c", "entry_n", "entry_a", "alpha_sum", "alpha_out", "beta_sum", "beta_out",
        "gamma_sum", "gamma_out", "delta_sum", "delta_out", "squash",
    ]
    # One stage per resolution, ending after the last block's ReLU at that resolution.
    assert stages.stage_outputs(model) == ["alpha_out", "gamma_out", "delta_out"]
    assert stages.penultimate_stage_output(model) == "gamma_out"


def test_small_resnet_peer_copies_the_tail_and_refuses_crossed_cuts():
    keras.utils.set_random_seed(1)
    teacher = small_resnet()
    peer = peer_lib.build_peer(teacher, init="copy")
    assert [layer.name for layer in peer.layers] == [
        "teacher_gamma_out", "delta_p_c", "delta_p_n", "delta_p_a", "delta_q", "delta_skip",
        "delta_qn", "delta_sum", "delta_out", "squash", "scores",
    ]
    features, logits = peer_lib.build_teacher_trunk(teacher)(images((16, 16, 3)))
    np.testing.assert_allclose(peer(features), logits, atol=1e-6)
    reconstructed = peer_lib.build_reconstructed_teacher(teacher, peer)
    np.testing.assert_allclose(reconstructed(images((16, 16, 3))), teacher(images((16, 16, 3))),
                               atol=1e-6)
    # The projection skip of 'delta' starts at 'gamma_out': a cut inside the main path
    # is crossed by it.
    with pytest.raises(ConfigError, match="'delta_sum' reads 'delta_skip'") as error:
        peer_lib.build_peer(teacher, from_layer="delta_p_a")
    assert "gamma_out" in str(error.value) and "delta_sum" in str(error.value)
    # Inside the identity block 'gamma': the Add reads 'beta_out' directly.
    with pytest.raises(ConfigError, match="'gamma_sum' reads 'beta_out'"):
        peer_lib.build_peer(teacher, from_layer="gamma_qn")


def test_sequential_models_are_graphs_too():
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(4, 3, padding="same", name="one"),
        keras.layers.Conv2D(4, 3, strides=2, padding="same", name="two"),
        keras.layers.Conv2D(4, 3, strides=2, padding="same", name="three"),
        keras.layers.Flatten(name="flat"),
        keras.layers.Dense(3, name="out"),
    ])
    assert stages.stage_outputs(model) == ["one", "two", "three"]
    peer = peer_lib.build_peer(model)
    assert [layer.name for layer in peer.layers] == ["teacher_two", "three", "flat", "out"]


def test_subclassed_and_flat_models_are_refused_with_the_reason():
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__(name="custom")
            self.dense = keras.layers.Dense(3)

        def call(self, x):
            return self.dense(keras.ops.mean(x, axis=(1, 2)))

    model = Subclassed()
    model(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ConfigError, match="subclassed.*KD, DML and vanilla"):
        peer_lib.build_peer(model)
    flat = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="hidden"),
                             keras.layers.Dense(2, name="out")])
    with pytest.raises(ConfigError, match=r"0 spatial stage.*--peer_from.*'hidden'"):
        peer_lib.build_peer(flat)
    assert peer_lib.build_peer(flat, from_layer="hidden").output.shape == (None, 2)


# --- keras.applications --------------------------------------------------------------------


def test_mobilenet_v2_stages_by_hand():
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=10,
                                           classifier_activation=None)
    # Strides: Conv1 2 (-> 16), block_1 2 (-> 8), block_3 2 (-> 4), block_6 2 (-> 2),
    # block_13 2 (-> 1). Each stage ends at its last residual Add; the 16x16 stage has
    # no residual block, so it ends at its last cut point there, the next block's
    # expansion (before its stride-2 depthwise convolution).
    assert stages.stage_outputs(model) == [
        "block_1_expand_relu", "block_2_add", "block_5_add", "block_12_add", "block_15_add",
    ]
    with pytest.raises(ConfigError, match="'block_12_add' reads 'block_11_add'"):
        peer_lib.build_peer(model, from_layer="block_12_project_BN")


def test_resnet50_v2_stages_and_peer():
    keras.utils.set_random_seed(2)
    model = keras.applications.ResNet50V2(weights=None, input_shape=(32, 32, 3), classes=10,
                                          classifier_activation=None)
    # Keras' ResNetV2 strides in the *last* block of stacks 2-4, whose shortcut is a
    # stride-2 max-pool of the block input: each stage ends one block before its stack.
    assert stages.stage_outputs(model) == [
        "conv1_conv", "conv2_block2_out", "conv3_block3_out", "conv4_block5_out",
        "conv5_block3_out",
    ]
    with pytest.raises(ConfigError, match="'conv4_block6_out' reads 'max_pooling2d"):
        peer_lib.build_peer(model, from_layer="conv4_block6_preact_relu")
    peer = peer_lib.build_peer(model, init="copy")
    assert peer.inputs[0].name == "teacher_conv4_block5_out"
    assert tuple(peer.inputs[0].shape[1:]) == (2, 2, 1024)
    features, logits = peer_lib.build_teacher_trunk(model)(images((32, 32, 3)))
    np.testing.assert_allclose(peer(features), logits, atol=1e-5)


def test_named_stages_win_over_discovery_for_the_default_cut():
    """A model naming its stages group1..N is cut at group{N-1}, whatever discovery finds."""
    import keras

    from sokd_tf.models import stages

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="group1")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(6, 3, strides=2, padding="same", name="group2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    named = keras.Model(inputs, keras.layers.Dense(3)(x))
    assert stages.penultimate_stage_output(named) == "group1"
    renamed = keras.Model(inputs, named.output)  # same graph, names kept: still group1
    assert stages.penultimate_stage_output(renamed) == "group1"
