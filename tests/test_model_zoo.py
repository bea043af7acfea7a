"""The CIFAR KD model zoo against the PyTorch originals: counts, stages, peers, SOKD steps."""

import keras
import numpy as np
import pytest
from test_distillers import all_changed, compile_and_fit, same, snapshot

from sokd_tf import distillers, models
from sokd_tf.errors import ConfigError
from sokd_tf.models import layers
from sokd_tf.models import peer as peer_lib

# Measured from the PyTorch models (RepDistiller, 3x32x32 input): trainable parameters at
# 100 and 10 classes, the SOKD peer's at 100 classes, and the stage features (stem, each
# stage, pooled vector) converted from NCHW to NHWC.
REFERENCE = {
    "resnet8": (83_892, 78_042, 64_228, [(32, 32, 16), (32, 32, 16), (16, 16, 32), (8, 8, 64), (64,)]),
    "resnet14": (181_108, 175_258, 138_212, [(32, 32, 16), (32, 32, 16), (16, 16, 32), (8, 8, 64), (64,)]),
    "resnet20": (278_324, 272_474, 212_196, [(32, 32, 16), (32, 32, 16), (16, 16, 32), (8, 8, 64), (64,)]),
    "resnet32": (472_756, 466_906, 360_164, [(32, 32, 16), (32, 32, 16), (16, 16, 32), (8, 8, 64), (64,)]),
    "resnet44": (667_188, 661_338, 508_132, [(32, 32, 16), (32, 32, 16), (16, 16, 32), (8, 8, 64), (64,)]),
    "resnet56": (861_620, 855_770, 656_100, [(32, 32, 16), (32, 32, 16), (16, 16, 32), (8, 8, 64), (64,)]),
    "resnet110": (1_736_564, 1_730_714, 1_321_956, [(32, 32, 16), (32, 32, 16), (16, 16, 32), (8, 8, 64), (64,)]),
    "resnet8x4": (1_233_540, 1_210_410, 944_740, [(32, 32, 32), (32, 32, 64), (16, 16, 128), (8, 8, 256), (256,)]),
    "resnet32x4": (7_433_860, 7_410_730, 5_667_428, [(32, 32, 32), (32, 32, 64), (16, 16, 128), (8, 8, 256), (256,)]),
    "wrn_16_1": (180_916, 175_066, 138_148, [(32, 32, 16), (32, 32, 16), (16, 16, 32), (8, 8, 64), (64,)]),
    "wrn_16_2": (703_284, 691_674, 538_340, [(32, 32, 16), (32, 32, 32), (16, 16, 64), (8, 8, 128), (128,)]),
    "wrn_40_1": (569_780, 563_930, 434_084, [(32, 32, 16), (32, 32, 16), (16, 16, 32), (8, 8, 64), (64,)]),
    "wrn_40_2": (2_255_156, 2_243_546, 1_720_036, [(32, 32, 16), (32, 32, 32), (16, 16, 64), (8, 8, 128), (128,)]),
    "vgg8": (3_965_028, 3_918_858, 2_412_132, [(32, 32, 64), (16, 16, 128), (8, 8, 256), (4, 4, 512), (4, 4, 512), (512,)]),
    "vgg11": (9_277_284, 9_231_114, 4_772_964, [(32, 32, 64), (16, 16, 128), (8, 8, 256), (4, 4, 512), (4, 4, 512), (512,)]),
    "vgg13": (9_462_180, 9_416_010, 4_772_964, [(32, 32, 64), (16, 16, 128), (8, 8, 256), (4, 4, 512), (4, 4, 512), (512,)]),
    "vgg16": (14_774_436, 14_728_266, 7_133_796, [(32, 32, 64), (16, 16, 128), (8, 8, 256), (4, 4, 512), (4, 4, 512), (512,)]),
    "vgg19": (20_086_692, 20_040_522, 9_494_628, [(32, 32, 64), (16, 16, 128), (8, 8, 256), (4, 4, 512), (4, 4, 512), (512,)]),
    "mobilenetv2": (812_836, 697_546, 664_388, [(16, 16, 16), (16, 16, 12), (8, 8, 16), (4, 4, 48), (2, 2, 160), (1280,)]),
    "shufflenetv1": (949_258, 862_768, 612_940, [(32, 32, 24), (16, 16, 240), (8, 8, 480), (4, 4, 960), (960,)]),
    "shufflenetv2": (1_355_528, 1_263_278, 1_081_036, [(32, 32, 24), (16, 16, 116), (8, 8, 232), (4, 4, 464), (1024,)]),
}  # fmt: skip
# The stage the peer reads (the reference's "input to the peer": ResNet/WRN/ShuffleNet
# layer2, VGG block3, MobileNetV2 blocks[4]).
PEER_FROM = {"vgg": "group3", "mobilenetv2": "group3"}

# torchvision at 1000 classes (3x224x224; the count does not depend on the input size).
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672}
# torchvision's layer4 + fc by hand: the peer of the ImageNet ResNets.
_LAYER4_FIRST_BLOCK = 9 * 256 * 512 + 2 * 512 + 9 * 512 * 512 + 2 * 512 + 256 * 512 + 2 * 512
_LAYER4_BLOCK = 2 * (9 * 512 * 512 + 2 * 512)
_FC = 512 * 1000 + 1000
TORCHVISION_PEER_PARAMS = {
    "resnet18": _LAYER4_FIRST_BLOCK + 1 * _LAYER4_BLOCK + _FC,  # 8,906,728
    "resnet34": _LAYER4_FIRST_BLOCK + 2 * _LAYER4_BLOCK + _FC,  # 13,627,368
}


def assert_built_in_layers_only(model):
    """No custom or Lambda layers besides the fused BN: files load without custom code."""
    for layer in model.layers:
        stock = getattr(type(layer), "stock_class", type(layer))
        assert stock.__module__.startswith("keras.src.layers"), layer.name
    assert len(model.operations) == len(model.layers)  # no bare keras.ops in the graph


def trainable_count(model):
    return int(sum(np.prod(v.shape) for v in model.trainable_weights))


def stage_shapes(model):
    return [tuple(model.get_layer(name).output.shape[1:]) for name in models.stage_names(model)]


def peer_stage(name):
    return next((stage for prefix, stage in PEER_FROM.items() if name.startswith(prefix)), "group2")


def test_every_zoo_name_is_registered():
    zoo = set(REFERENCE) | set(TORCHVISION_PARAMS)
    assert zoo <= set(models.BUILDERS)
    not_wrn = {name for name in models.BUILDERS if not name.startswith("wrn_")}
    assert not_wrn == {name for name in zoo if not name.startswith("wrn_")}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_zoo_model_matches_pytorch(name):
    params_100, params_10, peer_params_100, shapes = REFERENCE[name]
    keras.utils.set_random_seed(0)
    model = models.build(name, (32, 32, 3), 100)
    assert model.name == name
    assert trainable_count(model) == params_100
    assert stage_shapes(model) == [*shapes, (100,)]
    assert models.penultimate_stage(model) == peer_stage(name)
    peer = peer_lib.build_peer(model)
    assert peer.inputs[0].name == f"teacher_{peer_stage(name)}"
    assert trainable_count(peer) == peer_params_100
    # BN counted as PyTorch does: gamma/beta trainable, moving statistics not.
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and all(
        len(layer.trainable_weights) == 2 and len(layer.non_trainable_weights) == 2
        for layer in norms
    )
    assert_built_in_layers_only(model)
    logits = model(np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32))
    assert logits.shape == (2, 100) and logits.dtype == "float32"
    assert np.all(np.isfinite(np.asarray(logits)))
    assert trainable_count(models.build(name, (32, 32, 3), 10)) == params_10
    keras.backend.clear_session()


# First convolution (out channels, kernel size): a 1-channel input saves (3 - 1) * out * k * k.
FIRST_CONV = {
    "resnet8": (16, 3), "resnet8x4": (32, 3), "vgg8": (64, 3), "mobilenetv2": (16, 3),
    "shufflenetv1": (24, 1), "shufflenetv2": (24, 1), "resnet18": (64, 7),
}


@pytest.mark.parametrize("name", sorted(FIRST_CONV))
def test_grayscale_28x28_input(name):
    """Fashion-MNIST-sized input: every family builds, runs and saves only stem weights."""
    filters, kernel = FIRST_CONV[name]
    reference = REFERENCE[name][1] if name in REFERENCE else TORCHVISION_PARAMS[name] - _FC + 5130
    model = models.build(name, (28, 28, 1), 10)
    assert trainable_count(model) == reference - 2 * filters * kernel * kernel
    assert model(np.zeros((2, 28, 28, 1), np.float32)).shape == (2, 10)


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_imagenet_resnets_match_torchvision(name):
    model = models.build(name, (64, 64, 3), 1000)
    assert model.name == name
    assert trainable_count(model) == TORCHVISION_PARAMS[name]
    assert trainable_count(models.build(name, (32, 32, 3), 10)) == (
        TORCHVISION_PARAMS[name] - _FC + 512 * 10 + 10
    )
    # Stem: stride-2 conv then stride-2 max pool; groups at strides 1, 2, 2, 2.
    assert stage_shapes(model) == [
        (16, 16, 64), (16, 16, 64), (8, 8, 128), (4, 4, 256), (2, 2, 512), (512,), (1000,),
    ]
    assert stage_shapes(models.build(name, (32, 32, 3), 10))[:5] == [
        (8, 8, 64), (8, 8, 64), (4, 4, 128), (2, 2, 256), (1, 1, 512),
    ]
    assert models.penultimate_stage(model) == "group3"
    peer = peer_lib.build_peer(model)
    assert peer.inputs[0].name == "teacher_group3"
    assert trainable_count(peer) == TORCHVISION_PEER_PARAMS[name]
    assert_built_in_layers_only(model)
    logits = model(np.zeros((2, 64, 64, 3), np.float32))
    assert logits.shape == (2, 1000) and logits.dtype == "float32"
    keras.backend.clear_session()


def test_vgg_pools_block3_from_64_pixels():
    small = models.build("vgg13", (32, 32, 3), 100)
    large = models.build("vgg13", (64, 64, 3), 100)
    assert isinstance(small.get_layer("group3"), keras.layers.ReLU)
    assert isinstance(large.get_layer("group3"), keras.layers.MaxPooling2D)
    assert stage_shapes(large)[3:5] == [(4, 4, 512), (4, 4, 512)]
    assert trainable_count(peer_lib.build_peer(large)) == REFERENCE["vgg13"][2]


def wrn_params_by_hand(depth, width, num_classes, channels=3):
    """Pre-activation WRN: conv weights + 2 per BN channel + dense (the official layout)."""
    blocks = (depth - 4) // 6
    total, previous = 9 * channels * 16, 16
    for filters in (16 * width, 32 * width, 64 * width):
        for block in range(blocks):
            inputs = previous if block == 0 else filters
            total += 2 * inputs + 9 * inputs * filters + 2 * filters + 9 * filters * filters
            total += inputs * filters if inputs != filters else 0
        previous = filters
    return total + 2 * previous + previous * num_classes + num_classes


def test_any_wrn_name_resolves():
    assert wrn_params_by_hand(40, 2, 100) == REFERENCE["wrn_40_2"][0]  # the formula itself
    model = models.build("wrn_22_4", (32, 32, 3), 100)
    assert model.name == "wrn_22_4"
    assert trainable_count(model) == wrn_params_by_hand(22, 4, 100)
    assert stage_shapes(model)[1:4] == [(32, 32, 64), (16, 16, 128), (8, 8, 256)]
    names = {layer.name for layer in model.layers}
    assert "group3_block3_bn1" in names and "group3_block4_bn1" not in names  # (22 - 4) / 6
    assert models.builder("wrn_16_1") is models.BUILDERS["wrn_16_1"]
    assert "wrn_22_4" not in models.BUILDERS  # resolved, not registered


@pytest.mark.parametrize("name", ["wrn_20_2", "wrn_4_1", "wrn_16_0", "wrn_016_1", "wrn_16"])
def test_invalid_wrn_names_list_the_valid_form(name):
    with pytest.raises(ConfigError, match=r"wrn_\{depth\}_\{width\} \(depth = 6n \+ 4"):
        models.build(name, (32, 32, 3), 10)


def test_unknown_name_lists_the_zoo_and_the_wrn_form():
    with pytest.raises(ConfigError, match=r"'resnet9'.*'resnet8x4'.*'vgg13'.*wrn_\{depth\}"):
        models.build("resnet9", (32, 32, 3), 10)


def test_channel_shuffle_and_slice_follow_pytorch_indexing():
    x = np.arange(6, dtype=np.float32).reshape(1, 1, 1, 6)
    inputs = keras.Input((1, 1, 6))
    shuffled = keras.Model(inputs, layers.channel_shuffle(inputs, 3, "shuffle"))
    # view(3, 2) = [[0, 1], [2, 3], [4, 5]] -> transpose -> [[0, 2, 4], [1, 3, 5]].
    np.testing.assert_array_equal(np.asarray(shuffled(x))[0, 0, 0], [0, 2, 4, 1, 3, 5])
    sliced = keras.Model(inputs, layers.channel_slice(inputs, 2, 5, "slice"))
    np.testing.assert_array_equal(np.asarray(sliced(x))[0, 0, 0], [2, 3, 4])


def test_stride_two_layers_sample_pytorch_grids():
    """Explicit padding + "valid", never Keras "same" (which pads bottom/right only)."""
    # ShuffleNet V1's stride-2 shortcut: AvgPool2d(3, 2, padding=1) counts padded zeros.
    model = models.build("shufflenetv1", (8, 8, 3), 10)
    shortcut = keras.Model(
        model.get_layer("stem").output, model.get_layer("group1_block1_shortcut").output
    )
    pooled = np.asarray(shortcut(np.ones((1, 8, 8, 24), np.float32)))[0, :, :, 0]
    np.testing.assert_allclose(pooled[0, 0], 4 / 9, rtol=1e-6)  # 2x2 of 3x3 inside
    np.testing.assert_allclose(pooled[0, 1], 6 / 9, rtol=1e-6)
    np.testing.assert_allclose(pooled[1, 1], 1.0, rtol=1e-6)
    # Stride-2 depthwise conv (MobileNetV2): output (i, j) reads padded rows 2i .. 2i + 2.
    mobile = models.build("mobilenetv2", (16, 16, 3), 10)
    pad = mobile.get_layer("blocks2_1_depthwise_pad")
    conv = mobile.get_layer("blocks2_1_depthwise")
    assert conv.padding == "valid" and pad.padding == ((1, 1), (1, 1))
    x = np.random.default_rng(0).normal(size=(1, 8, 8, 72)).astype(np.float32)
    y = np.asarray(conv(pad(x)))
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    kernel = np.asarray(conv.kernel)[..., 0]
    for i, j in [(0, 0), (3, 3), (1, 2)]:
        expected = np.einsum("hwc,hwc->c", padded[0, 2 * i:2 * i + 3, 2 * j:2 * j + 3], kernel)
        np.testing.assert_allclose(y[0, i, j], expected, rtol=1e-4, atol=1e-5)
    # torchvision's stem: 7x7 stride 2 padding 3, then 3x3 max pool stride 2 padding 1.
    resnet = models.build("resnet18", (32, 32, 3), 10)
    assert resnet.get_layer("stem_conv_pad").padding == ((3, 3), (3, 3))
    assert resnet.get_layer("stem_pool_pad").padding == ((1, 1), (1, 1))
    assert resnet.get_layer("stem").padding == "valid"


@pytest.mark.parametrize("name", ["resnet8x4", "vgg8", "mobilenetv2", "shufflenetv1",
                                  "shufflenetv2", "resnet18"])
def test_copied_peer_reproduces_the_teacher(name):
    teacher = models.build(name, (16, 16, 3), 10)
    peer = peer_lib.build_peer(teacher, init="copy")
    reconstructed = peer_lib.build_reconstructed_teacher(teacher, peer)
    images = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(reconstructed(images)), np.asarray(teacher(images)), rtol=1e-5, atol=1e-5
    )


def sokd_pair(teacher_name, student_name, marks=()):
    return pytest.param(teacher_name, student_name, marks=marks,
                        id=f"{teacher_name}->{student_name}")


@pytest.mark.parametrize(
    "teacher_name, student_name",
    [
        sokd_pair("resnet8x4", "resnet8"),
        sokd_pair("vgg8", "resnet8", pytest.mark.slow),
        sokd_pair("mobilenetv2", "resnet8", pytest.mark.slow),
        sokd_pair("shufflenetv1", "resnet8", pytest.mark.slow),
        sokd_pair("shufflenetv2", "resnet8", pytest.mark.slow),
        sokd_pair("resnet18", "resnet8", pytest.mark.slow),
        sokd_pair("resnet32x4", "shufflenetv2", pytest.mark.slow),
        sokd_pair("vgg13", "mobilenetv2", pytest.mark.slow),
    ],
)
def test_sokd_fit_step_per_family(teacher_name, student_name):
    """One real SOKD step: the teacher's parameters stay, every peer/student one moves."""
    keras.utils.set_random_seed(1)
    teacher = models.build(teacher_name, (16, 16, 3), 10, model_name="teacher")
    peer = peer_lib.build_peer(teacher)
    student = models.build(student_name, (16, 16, 3), 10, model_name="student")
    teacher_parameters = [v for v in teacher.weights if "moving" not in v.path]
    teacher_before = snapshot(teacher_parameters)
    peer_before = snapshot(peer.trainable_weights)
    student_before = snapshot(student.trainable_weights)
    trainer = distillers.SemiOnlineDistiller(teacher, peer, student)

    history = compile_and_fit(trainer, steps_per_epoch=1, validate=False)

    assert all(np.isfinite(values[0]) for values in history.history.values())
    assert same(teacher_before, teacher_parameters)
    assert all_changed(peer_before, peer.trainable_weights)
    assert all_changed(student_before, student.trainable_weights)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["shufflenetv1", "shufflenetv2"])
def test_shufflenets_export_to_litert_and_qat(name, tmp_path):
    """Channel slices, shuffles and split grouped convs convert and rebuild for QAT."""
    from sokd_tf.data.info import DatasetInfo
    from sokd_tf.export import qat, tflite
    from sokd_tf.export.preprocess import normalize_numpy

    info = DatasetInfo(
        "random", 10, (16, 16, 3), tuple(str(i) for i in range(10)), {"train": 8},
        (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
    )
    images = np.random.default_rng(0).integers(0, 256, size=(8, 16, 16, 3), dtype=np.uint8)
    model = models.build(name, (16, 16, 3), 10)
    expected = np.asarray(model(normalize_numpy(images, info), training=False))
    path = tflite.write_tflite(tflite.convert_tflite("fp32", model, info), str(tmp_path / "m.tflite"))
    np.testing.assert_allclose(
        tflite.LiteRTClassifier(path).logits(images), expected, rtol=1e-4, atol=1e-4
    )
    rebuilt = qat.rebuild_in_tf_keras(model, check_images_normalized=normalize_numpy(images, info))
    assert qat.quantization_aware_model(rebuilt) is not None
