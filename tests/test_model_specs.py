"""Model specs: zoo names, keras.applications.NAME, .keras files; every refusal with its
message; SOKD fit steps with a keras.applications pair and a user's .keras teacher."""

import keras
import numpy as np
import pytest

from sokd_tf import distillers, losses, models
from sokd_tf.config import TrainConfig
from sokd_tf.errors import ConfigError
from sokd_tf.models import peer as peer_lib
from sokd_tf.models import specs


class TripleScale(keras.layers.Layer):
    """A user's custom layer, not registered with Keras: found only via custom_modules."""

    def call(self, x):
        return 3.0 * x


def user_model(shape=(16, 16, 3), classes=10, head=None, name="users_net"):
    """A user-style functional CNN with arbitrary layer names."""
    inputs = keras.Input(shape, name="picture")
    x = keras.layers.Conv2D(8, 3, padding="same", name="first_look")(inputs)
    x = keras.layers.BatchNormalization(name="calm")(x)
    x = keras.layers.ReLU(name="wake")(x)
    y = keras.layers.Conv2D(8, 3, padding="same", name="second_look")(x)
    x = keras.layers.Add(name="merge_one")([x, y])
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", name="shrink")(x)
    x = keras.layers.ReLU(name="wake_again")(x)
    y = keras.layers.Conv2D(16, 3, padding="same", name="third_look")(x)
    x = keras.layers.Add(name="merge_two")([x, y])
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", name="shrink_more")(x)
    x = keras.layers.GlobalAveragePooling2D(name="summary")(x)
    outputs = (head or (lambda t: keras.layers.Dense(classes, name="answer")(t)))(x)
    return keras.Model(inputs, outputs, name=name)


def save(model, tmp_path, name="model.keras"):
    path = str(tmp_path / name)
    model.save(path)
    return path


# --- spec kinds -------------------------------------------------------------------------


def test_spec_kinds_and_unknown_specs():
    assert specs.spec_kind("wrn_16_1") == "zoo"
    assert specs.spec_kind("keras.applications.MobileNetV2") == "keras_applications"
    assert specs.spec_kind("runs/teacher.keras") == "keras_file"
    with pytest.raises(ConfigError, match=r"unknown model spec 'resnet9000'.*zoo name.*"
                                          r"keras.applications.NAME.*\.keras"):
        specs.spec_kind("resnet9000")
    with pytest.raises(ConfigError, match="unknown keras.applications model 'MobileNetV9'"):
        specs.spec_kind("keras.applications.MobileNetV9")
    with pytest.raises(ConfigError, match="re-save it as .keras"):
        specs.spec_kind("teacher.h5")
    with pytest.raises(ConfigError, match="role"):
        specs.build_model("wrn_10_1", (28, 28, 1), 10, role="mentor")


def test_zoo_spec_is_the_zoo_builder():
    model = specs.build_model("wrn_10_1", (28, 28, 1), 10, role="student", name="small")
    assert model.name == "small" and model.count_params() == models.build(
        "wrn_10_1", (28, 28, 1), 10).count_params()


# --- keras.applications ------------------------------------------------------------------


def test_keras_applications_spec_gives_logits_at_the_run_shape():
    model = specs.build_model("keras.applications.MobileNetV3Small", (32, 32, 3), 10,
                              role="student", name="phone")
    assert model.name == "phone"
    assert tuple(model.inputs[0].shape) == (None, 32, 32, 3)
    assert tuple(model.outputs[0].shape) == (None, 10)
    # No built-in rescaling (the pipeline normalises) and no softmax (logits).
    assert not any(isinstance(layer, keras.layers.Rescaling) for layer in model.layers)
    logits = np.asarray(model(np.random.default_rng(0).normal(size=(2, 32, 32, 3))))
    assert not np.allclose(logits.sum(axis=-1), 1.0)


def test_keras_applications_too_small_input_names_the_image_size_flag():
    with pytest.raises(ConfigError, match=r"at least 32x32.*--image_size=32"):
        specs.build_model("keras.applications.MobileNetV2", (28, 28, 1), 10, role="student")
    with pytest.raises(ConfigError, match=r"at least 75x75.*--image_size=75"):
        specs.build_model("keras.applications.InceptionV3", (32, 32, 3), 10, role="teacher")


def test_synchronized_bn_rebuilds_applications_with_weights_kept():
    keras.utils.set_random_seed(0)
    model = specs.build_model("keras.applications.MobileNetV3Small", (32, 32, 3), 10,
                              role="student", synchronized_bn=True)
    batch_norms = [layer for layer in model.layers
                   if isinstance(layer, keras.layers.BatchNormalization)]
    assert batch_norms and all(layer.synchronized for layer in batch_norms)
    plain = user_model()
    synchronized = specs.with_synchronized_batch_norm(plain)
    assert synchronized.get_layer("calm").synchronized and not plain.get_layer("calm").synchronized
    for before, after in zip(plain.get_weights(), synchronized.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)


# --- .keras files --------------------------------------------------------------------------


def test_user_keras_file_loads_and_is_checked(tmp_path):
    keras.utils.set_random_seed(0)
    original = user_model()
    path = save(original, tmp_path)
    loaded = specs.build_model(path, (16, 16, 3), 10, role="teacher", require_graph=True)
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded(x), original(x), atol=1e-6)
    renamed = specs.build_model(path, (16, 16, 3), 10, role="student", name="start")
    assert renamed.name == "start"
    with pytest.raises(ConfigError, match="no such file"):
        specs.build_model(str(tmp_path / "missing.keras"), (16, 16, 3), 10, role="teacher")
    (tmp_path / "junk.keras").write_text("not a zip")
    with pytest.raises(ConfigError, match="not a Keras .keras archive"):
        specs.build_model(str(tmp_path / "junk.keras"), (16, 16, 3), 10, role="teacher")


def test_lambda_layer_is_refused_unless_trusted(tmp_path):
    inputs = keras.Input((16, 16, 3), name="picture")
    x = keras.layers.Lambda(lambda t: t * 2.0, name="doubler")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    path = save(keras.Model(inputs, keras.layers.Dense(10)(x)), tmp_path)
    with pytest.raises(ConfigError, match=r"layer\(s\) \['doubler'\].*trust_custom_code=True"):
        specs.build_model(path, (16, 16, 3), 10, role="teacher")
    trusted = specs.build_model(path, (16, 16, 3), 10, role="teacher", trust_custom_code=True)
    assert trusted.get_layer("doubler") is not None


def test_custom_layers_come_only_from_named_modules(tmp_path):
    inputs = keras.Input((16, 16, 3))
    x = TripleScale(name="tripler")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    path = save(keras.Model(inputs, keras.layers.Dense(10)(x)), tmp_path)
    with pytest.raises(ConfigError, match=rf"'TripleScale'.*'{__name__}'.*custom_modules"):
        specs.build_model(path, (16, 16, 3), 10, role="teacher")
    with pytest.raises(ConfigError, match="custom module 'no_such_module_xyz'"):
        specs.build_model(path, (16, 16, 3), 10, role="teacher",
                          custom_modules=["no_such_module_xyz"])
    model = specs.build_model(path, (16, 16, 3), 10, role="teacher", custom_modules=[__name__])
    assert isinstance(model.get_layer("tripler"), TripleScale)


@pytest.mark.parametrize("head, culprit", [
    (lambda t: keras.layers.Dense(10, activation="softmax", name="probs")(t),
     r"softmax \(layer 'probs'\)"),
    (lambda t: keras.layers.Softmax(name="norm")(keras.layers.Dense(10)(t)),
     r"softmax \(layer 'norm'\)"),
    (lambda t: keras.layers.Activation("sigmoid", name="squeeze")(keras.layers.Dense(10)(t)),
     r"sigmoid \(layer 'squeeze'\)"),
    # Looked through: a reshape after the softmax changes nothing.
    (lambda t: keras.layers.Reshape((10,), name="tidy")(
        keras.layers.Dense(10, activation="softmax", name="probs")(t)),
     r"softmax \(layer 'probs'\)"),
])
def test_probability_outputs_are_refused(tmp_path, head, culprit):
    path = save(user_model(head=head), tmp_path)
    with pytest.raises(ConfigError, match=culprit + r": distillation needs logits"):
        specs.build_model(path, (16, 16, 3), 10, role="teacher")


def test_class_count_and_input_shape_mismatches_name_the_fix(tmp_path):
    path = save(user_model(classes=5), tmp_path, "five.keras")
    with pytest.raises(ConfigError, match=r"outputs shape \(5,\) but the data has 10 classes"):
        specs.build_model(path, (16, 16, 3), 10, role="teacher")
    rgb32 = save(user_model(shape=(32, 32, 3)), tmp_path, "rgb32.keras")
    with pytest.raises(ConfigError, match=r"\(32, 32, 3\) but the data gives \(28, 28, 1\): "
                                          r"pass --image_size=32 --channels=3"):
        specs.build_model(rgb32, (28, 28, 1), 10, role="teacher")
    with pytest.raises(ConfigError, match=r"pass --channels=3 \("):
        specs.build_model(rgb32, (32, 32, 1), 10, role="student")
    gray = save(user_model(shape=(16, 16, 1)), tmp_path, "gray.keras")
    with pytest.raises(ConfigError, match="converts only grayscale to 3 channels"):
        specs.build_model(gray, (16, 16, 3), 10, role="student")
    wide = save(user_model(shape=(16, 24, 3)), tmp_path, "wide.keras")
    with pytest.raises(ConfigError, match="non-square 16x24"):
        specs.build_model(wide, (16, 16, 3), 10, role="student")


class Subclassed(keras.Model):
    def __init__(self, classes=10, softmax=False, **kwargs):
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2D(4, 3)
        self.dense = keras.layers.Dense(classes, activation="softmax" if softmax else None)

    def call(self, x):
        return self.dense(keras.ops.mean(self.conv(x), axis=(1, 2)))


def test_subclassed_models_only_where_no_graph_is_needed():
    model = Subclassed(name="mine")
    specs.check_model(model, (16, 16, 3), 10, what="student 'mine'")  # KD/DML/vanilla
    with pytest.raises(ConfigError, match="teacher 'mine' is a subclassed.*KD, DML and vanilla"):
        specs.check_model(model, (16, 16, 3), 10, what="teacher 'mine'", require_graph=True)
    with pytest.raises(ConfigError, match="outputs shape"):
        specs.check_model(model, (16, 16, 3), 7, what="student 'mine'")
    with pytest.raises(ConfigError, match="probability vectors.*logits"):
        specs.check_model(Subclassed(softmax=True), (16, 16, 3), 10, what="student")


# --- SOKD fit steps with models beyond the WRN zoo -------------------------------------------


def snapshot(variables):
    return [np.array(v.numpy(), copy=True) for v in variables]


def changed(before, variables):
    return [not np.array_equal(b, v.numpy()) for b, v in zip(before, variables, strict=True)]


def sokd_fit_step(teacher, student, shape, run_eagerly=False):
    """One real SOKD fit step; asserts teacher unchanged, peer and student changed."""
    peer = peer_lib.build_peer(teacher)
    trainer = distillers.SemiOnlineDistiller(teacher, peer, student)
    teacher_parameters = [v for v in teacher.weights if "moving" not in v.path]
    teacher_before = snapshot(teacher_parameters)
    peer_before, student_before = snapshot(peer.trainable_weights), snapshot(
        student.trainable_weights)
    trainer.compile(optimizer=distillers.make_optimizer(TrainConfig(), 1),
                    run_eagerly=run_eagerly)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(8, *shape)).astype(np.float32)
    history = trainer.fit(images, np.arange(8) % 10, batch_size=8, epochs=1, verbose=0)
    assert set(losses.SOKD_TERMS) <= set(history.history)
    assert all(np.isfinite(values[0]) for values in history.history.values())
    assert not any(changed(teacher_before, teacher_parameters))
    # Nearly every trained variable moves in one step (a few SE biases may not, from zero).
    assert np.mean(changed(peer_before, peer.trainable_weights)) > 0.9
    assert np.mean(changed(student_before, student.trainable_weights)) > 0.9
    return peer


def test_sokd_step_with_a_users_keras_teacher(tmp_path):
    keras.utils.set_random_seed(3)
    path = save(user_model(), tmp_path, "teacher.keras")
    teacher = specs.build_model(path, (16, 16, 3), 10, role="teacher", require_graph=True)
    student = specs.build_model("wrn_10_1", (16, 16, 3), 10, role="student")
    peer = sokd_fit_step(teacher, student, (16, 16, 3))
    # Stages by resolution: 16x16 ends at merge_one, 8x8 at merge_two (the penultimate).
    assert peer.inputs[0].name == "teacher_merge_two"
    assert [layer.name for layer in peer.layers[1:]] == ["shrink_more", "summary", "answer"]


@pytest.mark.slow
def test_sokd_step_resnet50_v2_teacher_to_mobilenet_v3_small_student():
    # ResNet-50 v2 has 23.6 M parameters; eager mode avoids minutes of graph tracing on
    # 2 CPU cores for this one step.
    keras.utils.set_random_seed(4)
    shape = (32, 32, 3)
    teacher = specs.build_model("keras.applications.ResNet50V2", shape, 10, role="teacher",
                                require_graph=True)
    student = specs.build_model("keras.applications.MobileNetV3Small", shape, 10,
                                role="student")
    peer = sokd_fit_step(teacher, student, shape, run_eagerly=True)
    assert peer.inputs[0].name == "teacher_conv4_block5_out"
