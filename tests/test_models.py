"""Wide-ResNet builders: parameter counts against the PyTorch originals, stages, init."""

import keras
import numpy as np
import pytest

from sokd_tf import models
from sokd_tf.errors import ConfigError

# Trainable parameters of the PyTorch WRNs (3-channel input); reference model zoo.
PYTORCH_PARAMS = {
    "wrn_16_1": {100: 180_916, 10: 175_066},
    "wrn_16_2": {100: 703_284, 10: 691_674},
    "wrn_40_1": {100: 569_780, 10: 563_930},
    "wrn_40_2": {100: 2_255_156, 10: 2_243_546},
    "wrn_28_10": {100: 36_536_884, 10: 36_479_194},
}
ONE_CHANNEL_STEM_SAVING = 288  # stem conv 3x3x(3-1)x16


def trainable_count(model):
    return int(sum(np.prod(v.shape) for v in model.trainable_weights))


@pytest.mark.parametrize("name", sorted(PYTORCH_PARAMS))
def test_param_counts_match_pytorch(name):
    for num_classes, expected in PYTORCH_PARAMS[name].items():
        model = models.BUILDERS[name]((32, 32, 3), num_classes)
        assert trainable_count(model) == expected, (name, num_classes)
        if name != "wrn_28_10":
            gray = models.BUILDERS[name]((28, 28, 1), num_classes)
            assert trainable_count(gray) == expected - ONE_CHANNEL_STEM_SAVING
        keras.backend.clear_session()


def test_builders_keys():
    assert set(models.BUILDERS) == {
        "wrn_10_1", "wrn_10_2", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "wrn_28_10",
        "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
        "resnet8x4", "resnet32x4", "vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "mobilenetv2",
        "shufflenetv1", "shufflenetv2", "resnet18", "resnet34",
    }


def test_wrn_10_1_parameter_count_by_hand():
    # 1-channel input, 10 classes; one block per group (the quickstart student).
    stem = 9 * 1 * 16
    group1 = 2 * 16 + 9 * 16 * 16 + 2 * 16 + 9 * 16 * 16
    group2 = 2 * 16 + 9 * 16 * 32 + 2 * 32 + 9 * 32 * 32 + 16 * 32
    group3 = 2 * 32 + 9 * 32 * 64 + 2 * 64 + 9 * 64 * 64 + 32 * 64
    head = 2 * 64 + 64 * 10 + 10
    model = models.BUILDERS["wrn_10_1"]((28, 28, 1), 10)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert trainable == stem + group1 + group2 + group3 + head == 77_562


def stage_shapes(model):
    return {
        name: tuple(model.get_layer(name).output.shape[1:]) for name in models.stage_names(model)
    }


def test_stage_shapes_cifar_wrn_40_2():
    model = models.BUILDERS["wrn_40_2"]((32, 32, 3), 100)
    assert models.stage_names(model) == [
        "stem", "group1", "group2", "group3", "features", "logits",
    ]
    assert models.penultimate_stage(model) == "group2"
    assert stage_shapes(model) == {
        "stem": (32, 32, 16),
        "group1": (32, 32, 32),
        "group2": (16, 16, 64),
        "group3": (8, 8, 128),
        "features": (128,),
        "logits": (100,),
    }


def test_stage_shapes_fashion_mnist_wrn_16_1():
    model = models.BUILDERS["wrn_16_1"]((28, 28, 1), 10)
    assert stage_shapes(model) == {
        "stem": (28, 28, 16),
        "group1": (28, 28, 16),
        "group2": (14, 14, 32),
        "group3": (7, 7, 64),
        "features": (64,),
        "logits": (10,),
    }
    logits = model(np.zeros((2, 28, 28, 1), np.float32))
    assert logits.shape == (2, 10)


def test_block_structure_matches_official_wrn():
    model = models.BUILDERS["wrn_16_2"]((32, 32, 3), 10)
    names = {layer.name for layer in model.layers}
    # 16 -> 32 channels in group 1: projection shortcut at stride 1; 16_1 would be identity.
    assert "group1_block1_shortcut" in names
    assert "group2_block1_shortcut" in names and "group2_block2_shortcut" not in names
    # Stride-2 3x3 convs pad explicitly (PyTorch padding=1), stride-1 ones use "same".
    conv = model.get_layer("group2_block1_conv1")
    assert conv.strides == (2, 2) and conv.padding == "valid"
    assert model.get_layer("group2_block1_conv1_pad").padding == ((1, 1), (1, 1))
    assert model.get_layer("group2_block1_conv2").padding == "same"
    assert model.get_layer("group2_block1_shortcut").strides == (2, 2)
    narrow = models.BUILDERS["wrn_16_1"]((32, 32, 3), 10)
    assert "group1_block1_shortcut" not in {layer.name for layer in narrow.layers}
    bn = model.get_layer("final_bn")
    assert bn.epsilon == pytest.approx(1e-5) and bn.momentum == pytest.approx(0.9)
    assert not any(isinstance(layer, keras.layers.Dropout) for layer in model.layers)


def test_stride_two_conv_uses_pytorch_padding():
    """Output pixel (0, 0) of a padded stride-2 conv sees input rows/cols -1..1."""
    model = models.BUILDERS["wrn_16_1"]((16, 16, 3), 10)
    pad = model.get_layer("group2_block1_conv1_pad")
    conv = model.get_layer("group2_block1_conv1")
    x = np.random.default_rng(0).normal(size=(1, 8, 8, 16)).astype(np.float32)
    y = np.asarray(conv(pad(x)))
    kernel = np.asarray(conv.kernel)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    for i, j in [(0, 0), (3, 3), (1, 2)]:
        window = padded[0, 2 * i:2 * i + 3, 2 * j:2 * j + 3, :]
        expected = np.einsum("hwc,hwco->o", window, kernel)
        np.testing.assert_allclose(y[0, i, j], expected, rtol=1e-4, atol=1e-5)


def test_initialisation_like_pytorch():
    keras.utils.set_random_seed(1)
    model = models.BUILDERS["wrn_16_2"]((32, 32, 3), 100)
    kernel = np.asarray(model.get_layer("group3_block1_conv2").kernel)  # 3x3x128x128
    assert kernel.std() == pytest.approx(np.sqrt(2.0 / (9 * 128)), rel=0.05)
    dense = model.get_layer("logits")
    bound = 1.0 / np.sqrt(128)
    weights = np.asarray(dense.kernel)
    assert np.abs(weights).max() <= bound and np.abs(weights).max() > 0.9 * bound
    np.testing.assert_array_equal(np.asarray(dense.bias), 0.0)
    assert not model.get_layer("stem").use_bias


def test_logits_float32_under_mixed_precision():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = models.BUILDERS["wrn_16_1"]((16, 16, 3), 10)
        logits = model(np.zeros((2, 16, 16, 3), np.float32))
        assert model.get_layer("group2").compute_dtype == "float16"
    finally:
        keras.config.set_dtype_policy(previous)
    assert logits.dtype == "float32"


def test_builders_use_the_fused_batch_norm():
    from sokd_tf.models.fused_batch_norm import FusedBatchNormalization

    model = models.BUILDERS["wrn_16_1"]((16, 16, 3), 10)
    norms = [
        layer for layer in model._flatten_layers()
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert len(norms) == 2 * 6 + 1  # two per block, six blocks, the final BN
    assert all(isinstance(layer, FusedBatchNormalization) for layer in norms)


def test_synchronized_bn_option():
    model = models.BUILDERS["wrn_16_1"]((16, 16, 3), 10, synchronized_bn=True, name="sync")
    assert model.name == "sync"
    assert all(
        layer.synchronized
        for layer in model.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    )


def test_errors_name_the_culprit():
    with pytest.raises(ConfigError, match="wrn_99"):
        models.build("wrn_99", (32, 32, 3), 10)
    with pytest.raises(ConfigError, match="depth"):
        models.wide_resnet.wide_resnet(15, 1, (32, 32, 3), 10)
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ConfigError, match="0 spatial stage"):
        models.penultimate_stage(plain)
