"""LiteRT variants: run in the interpreter, agree with Keras; QAT starts from the student."""

import json
import os

import export_support as support
import keras
import numpy as np
import pytest

from sokd_tf import export
from sokd_tf.errors import ExportError
from sokd_tf.export import qat, tflite
from sokd_tf.stages import workdir as workdir_lib

VARIANTS = ("fp32", "fp16", "dynamic_int8", "int8", "int8_float_io", "qat_int8")


@pytest.fixture(scope="module")
def trained_export(tmp_path_factory):
    return support.exported(str(tmp_path_factory.getbasetemp() / "trained"))


def _ops(path):
    classifier = tflite.LiteRTClassifier(path)
    return [op["op_name"] for op in classifier.interpreter._get_ops_details()]


def _tensor_dtypes(path):
    classifier = tflite.LiteRTClassifier(path)
    return [np.dtype(t["dtype"]).name for t in classifier.interpreter.get_tensor_details()]


@pytest.mark.slow
def test_every_variant_runs_in_litert_and_agrees_with_keras(trained_export):
    export_dir, report = trained_export
    with open(os.path.join(export_dir, workdir_lib.EXPORT_REPORT)) as f:
        assert json.load(f) == json.loads(json.dumps(report))
    assert tuple(report["tflite"]) == VARIANTS
    keras_top1 = report["keras"]["top1"]
    assert keras_top1 > 0.6, "the fixture student should have learned something"
    fp32_size = report["tflite"]["fp32"]["size_bytes"]
    for variant, result in report["tflite"].items():
        path = os.path.join(export_dir, "tflite", f"{variant}.tflite")
        assert result["path"] == path and os.path.getsize(path) == result["size_bytes"]
        assert result["num_examples"] == support.TEST_SIZE
        assert result["latency_ms_median"] > 0 and result["latency_runs"] == 20
        if variant in ("fp32", "fp16"):
            assert result["agreement"] >= 0.995, variant
        else:
            # Quantization may cost up to ~1 pt (on 1,000 images of a briefly trained
            # student it sometimes gains as much); QAT also moves the weights a little.
            assert result["top1"] >= keras_top1 - 0.01, variant
            assert result["agreement"] >= (0.95 if variant == "qat_int8" else 0.97), variant
        if variant in ("int8", "int8_float_io", "qat_int8"):
            assert result["size_bytes"] < fp32_size / 3, variant
        # Every file ships with its card (input contract) and the shared labels.txt.
        with open(result["model_card"]) as f:
            card = json.load(f)
        assert card["model_file"] == f"{variant}.tflite" and card["variant"] == variant
        assert card["input"]["dtype"] == result["input_dtype"]
        quantization = card["input"]["quantization"] or {"scale": 0.0, "zero_point": 0}
        assert quantization == result["input_quantization"], variant
        assert result["labels"] == os.path.join(export_dir, "tflite", "labels.txt")
    assert report["tflite"]["fp16"]["size_bytes"] < 0.6 * fp32_size
    assert report["saved_model"]["verification"]["serving_default"]["agreement"] == 1.0
    assert report["saved_model"]["verification"]["predict_examples"]["agreement"] == 1.0


@pytest.mark.slow
def test_fp32_file_reproduces_keras_logits_from_raw_pixels(trained_export):
    export_dir, _ = trained_export
    info, _, _, test_images, _ = support.data()
    expected = support.keras_logits(support.trained_student(), test_images[:100], info)
    classifier = tflite.LiteRTClassifier(os.path.join(export_dir, "tflite", "fp32.tflite"))
    np.testing.assert_allclose(classifier.logits(test_images[:100]), expected, atol=1e-3)


@pytest.mark.slow
def test_full_integer_files_take_raw_uint8_pixels_and_use_builtin_int_kernels(trained_export):
    export_dir, report = trained_export
    for variant in ("int8", "qat_int8"):
        path = os.path.join(export_dir, "tflite", f"{variant}.tflite")
        classifier = tflite.LiteRTClassifier(path)
        assert classifier.input_dtype == "uint8"
        # Calibrated on raw 0..255 pixels: the uint8 input IS the raw pixel value.
        assert classifier.input_quantization == (1.0, 0)
        assert report["tflite"][variant]["input_quantization"] == {"scale": 1.0, "zero_point": 0}
        assert "float32" not in _tensor_dtypes(path), variant
    float_io = os.path.join(export_dir, "tflite", "int8_float_io.tflite")
    assert tflite.LiteRTClassifier(float_io).input_dtype == "float32"
    # Float only at the two ends (input pixels and output logits) around int8 kernels.
    assert _tensor_dtypes(float_io).count("float32") == 2
    for variant in VARIANTS:
        ops = _ops(os.path.join(export_dir, "tflite", f"{variant}.tflite"))
        assert "CONV_2D" in ops and "FULLY_CONNECTED" in ops
        assert not [op for op in ops if op.startswith("Flex") or op == "CUSTOM"], variant


@pytest.mark.slow
def test_tf_keras_rebuild_reproduces_keras_logits_and_qat_starts_from_its_weights():
    info, _, _, test_images, _ = support.data()
    student = support.trained_student()
    normalized = export.normalize_numpy(test_images[:128], info)
    rebuilt = qat.rebuild_in_tf_keras(student)
    expected = np.asarray(student(normalized, training=False))
    np.testing.assert_allclose(rebuilt(normalized, training=False).numpy(), expected,
                               atol=1e-4)
    assert np.argmax(expected, -1).tolist() == np.argmax(rebuilt(normalized).numpy(), -1).tolist()

    qat_model = qat.quantization_aware_model(rebuilt)
    kernels = 0
    for layer in qat_model.layers:
        inner = getattr(layer, "layer", None)
        kernel = [w for w in layer.weights if w.name.endswith("/kernel:0")]
        if kernel:
            np.testing.assert_array_equal(kernel[0].numpy(),
                                          student.get_layer(inner.name).kernel.numpy())
            kernels += 1
    assert kernels == sum(1 for layer in student.layers if hasattr(layer, "kernel"))
    bn = [layer for layer in qat_model.layers if type(layer).__name__ == "BatchNormalization"]
    assert bn and all(not layer.trainable for layer in bn)


def test_tiny_fp32_and_int8_match_keras(tmp_path):
    info, train_images, _, test_images, _ = support.data()
    student = support.tiny_student(info)
    expected = support.keras_logits(student, test_images[:50], info)
    for variant in ("fp32", "int8"):
        path = tflite.write_tflite(
            tflite.convert_tflite(variant, student, info,
                                  representative_images_uint8=train_images,
                                  representative_size=50),
            str(tmp_path / f"{variant}.tflite"))
        logits = tflite.LiteRTClassifier(path).logits(test_images[:50])
        tolerance = 1e-4 if variant == "fp32" else 0.1 * np.abs(expected).max()
        np.testing.assert_allclose(logits, expected, atol=tolerance)


class Scale(keras.layers.Layer):
    def call(self, x):
        return 2.0 * x


def test_rebuild_rejects_layers_without_tf_keras_twin():
    info = support.data()[0]
    images = keras.Input(info.image_shape)
    x = Scale(name="my_scale")(images)
    x = keras.layers.Flatten()(x)
    model = keras.Model(images, keras.layers.Dense(info.num_classes)(x))
    with pytest.raises(ExportError, match="my_scale"):
        qat.rebuild_in_tf_keras(model)

    x = keras.ops.abs(keras.layers.Flatten()(images))
    model = keras.Model(images, keras.layers.Dense(info.num_classes)(x))
    with pytest.raises(ExportError, match="not a Keras layer"):
        qat.rebuild_in_tf_keras(model)


def test_unknown_variant_and_missing_calibration_data_are_rejected():
    info = support.data()[0]
    student = support.tiny_student(info)
    with pytest.raises(ExportError, match="unknown TFLite variant"):
        tflite.convert_tflite("int4", student, info)
    with pytest.raises(ExportError, match="representative dataset.*missing"):
        tflite.convert_tflite("int8", student, info)


def _tiny_preactivation_student(info, seed=0):
    """A pre-activation residual block as the WRN students have: BN on a convolution's
    output (folds into it) and BN on a residual sum (cannot fold), trained-like BN."""
    keras.utils.set_random_seed(seed)
    images = keras.Input(info.image_shape)
    stem = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(images)
    x = keras.layers.BatchNormalization()(stem)
    x = keras.layers.ReLU()(x)
    x = keras.layers.ZeroPadding2D(1)(x)
    x = keras.layers.Conv2D(8, 3, strides=2, use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(x)
    shortcut = keras.layers.Conv2D(8, 1, strides=2, use_bias=False)(stem)
    x = keras.layers.Add()([shortcut, x])
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(images, keras.layers.Dense(info.num_classes)(x), name="tiny_preact")
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            channels = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, channels), rng.normal(0, 0.2, channels),
                               rng.normal(0, 0.3, channels), rng.uniform(0.5, 2.0, channels)])
    return model


def test_full_integer_graph_is_int8_between_the_input_and_output_conversions(tmp_path):
    info, train_images, _, _, _ = support.data()
    student = _tiny_preactivation_student(info)
    paths = {}
    for variant in ("int8", "int8_float_io", "fp32"):
        paths[variant] = tflite.write_tflite(
            tflite.convert_tflite(variant, student, info,
                                  representative_images_uint8=train_images,
                                  representative_size=50),
            str(tmp_path / f"{variant}.tflite"))

    ops = tflite.graph_ops(paths["int8"])
    assert tflite.integer_graph_problems(paths["int8"]) == []
    conversions = [op for op in ops if op.op_name in ("QUANTIZE", "DEQUANTIZE")]
    # uint8 pixels -> int8 first, int8 logits -> uint8 last; nothing else converts.
    assert [(op.op_name, op.input_dtypes, op.output_dtypes) for op in conversions] == [
        ("QUANTIZE", ("uint8",), ("int8",)), ("QUANTIZE", ("int8",), ("uint8",))]
    assert ops[0] == conversions[0] and ops[-1] == conversions[1]
    assert conversions[0].reads_graph_input and conversions[1].writes_graph_output
    # The BN after the stem and the strided conv fold into convolutions; the BN on the
    # residual sum stays as int8 elementwise ops; the normalisation is folded in.
    counts = tflite.op_counts(paths["int8"])
    assert counts["CONV_2D"] == 4 and counts["ADD"] >= 1 and counts["FULLY_CONNECTED"] == 1
    assert "BATCH_NORM" not in " ".join(counts)
    assert all(set(op.input_dtypes + op.output_dtypes) <= {"int8", "int32"}
               for op in ops[1:-1])

    float_io = tflite.graph_ops(paths["int8_float_io"])
    assert tflite.integer_graph_problems(paths["int8_float_io"]) == []
    assert (float_io[0].op_name, float_io[0].input_dtypes) == ("QUANTIZE", ("float32",))
    assert (float_io[-1].op_name, float_io[-1].output_dtypes) == ("DEQUANTIZE", ("float32",))
    # The checker does flag float kernels: every op of the fp32 file.
    problems = tflite.integer_graph_problems(paths["fp32"])
    assert len(problems) == len(tflite.graph_ops(paths["fp32"])) and "float32" in problems[0]

    # Every delegate setting runs the file and agrees with the default one (XNNPACK and
    # the builtin kernels may round a requantization differently: one output step).
    images = train_images[:8]
    default = tflite.LiteRTClassifier(paths["int8"])
    expected = default.logits(images)
    output_step = default.output["quantization"][0]
    for delegate in tflite.DELEGATES:
        classifier = tflite.LiteRTClassifier(paths["int8"], num_threads=2, delegate=delegate)
        np.testing.assert_allclose(classifier.logits(images), expected, atol=1.01 * output_step)
    with pytest.raises(ExportError, match="delegate"):
        tflite.LiteRTClassifier(paths["int8"], delegate="gpu")


def test_hard_silu_by_hand():
    values = np.array([-4.0, -3.0, -1.0, 0.0, 1.0, 3.0, 5.0], np.float32)
    expected = [0.0, 0.0, -1 / 3, 0.0, 2 / 3, 3.0, 5.0]  # x * relu6(x + 3) / 6
    np.testing.assert_allclose(qat.hard_silu(values).numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(qat.hard_silu(values).numpy(),
                               keras.ops.convert_to_numpy(keras.activations.hard_silu(values)),
                               rtol=1e-6)


def _tiny_mobilenet_v3_block(info, seed=0):
    """The Keras 3 constructs of keras.applications.MobileNetV3 that tf_keras lacks:
    `hard_silu` activations, a squeeze-excite `Multiply`, and keras.ops arithmetic with
    constants in the graph (its hard sigmoid is `ReLU(6)(x + 3) * (1 / 6)`)."""
    keras.utils.set_random_seed(seed)
    images = keras.Input(info.image_shape)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same")(images)
    x = keras.layers.Activation("hard_silu")(x)
    squeeze = keras.layers.GlobalAveragePooling2D(keepdims=True)(x)
    squeeze = keras.layers.Conv2D(8, 1)(squeeze)
    squeeze = keras.layers.ReLU(6.0)(squeeze + 3.0) * (1.0 / 6.0)
    x = keras.layers.Multiply()([x, squeeze])
    x = 2.0 - x / 4.0  # Subtract (constant first) and TrueDivide
    x = keras.layers.GlobalAveragePooling2D()(x - 0.5)
    return keras.Model(images, keras.layers.Dense(info.num_classes)(x), name="tiny_v3")


def test_qat_int8_of_mobilenet_v3_constructs_reproduces_keras_and_runs_in_litert(tmp_path):
    info, train_images, _, test_images, _ = support.data()
    student = _tiny_mobilenet_v3_block(info)
    operations = {type(op).__name__ for op in student.operations}
    assert {"Add", "Multiply", "Subtract", "TrueDivide"} <= operations  # keras.ops nodes
    normalized = export.normalize_numpy(test_images[:64], info)
    rebuilt = qat.rebuild_in_tf_keras(student, check_images_normalized=normalized)
    np.testing.assert_allclose(rebuilt(normalized).numpy(),
                               np.asarray(student(normalized, training=False)), atol=1e-5)
    kinds = [type(layer).__name__ for layer in rebuilt.layers]
    assert kinds.count("Rescaling") == 5 and kinds.count("Multiply") == 1

    qat_model, summary = qat.quantization_aware_finetune(
        student, info, train_images[:256], epochs=1, learning_rate=1e-3, batch_size=64,
        max_steps=2)
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])
    path = tflite.write_tflite(
        tflite.convert_tflite("qat_int8", qat_model, info,
                              representative_images_uint8=train_images,
                              representative_size=50),
        str(tmp_path / "qat_int8.tflite"))
    counts = tflite.op_counts(path)
    assert counts["HARD_SWISH"] == 1 and counts["CONV_2D"] == 2
    assert tflite.integer_graph_problems(path) == []
    expected = support.keras_logits(student, test_images[:100], info)
    logits = tflite.LiteRTClassifier(path).logits(test_images[:100])
    np.testing.assert_allclose(logits, expected, atol=0.1 * np.abs(expected).max())


def test_rebuild_refuses_keras_ops_between_two_tensors():
    info = support.data()[0]
    images = keras.Input(info.image_shape)
    x = keras.layers.Flatten()(images)
    x = x * x  # keras.ops.multiply of two tensors: no Rescaling can restate it
    model = keras.Model(images, keras.layers.Dense(info.num_classes)(x))
    with pytest.raises(ExportError, match="not arithmetic between a tensor and a constant"):
        qat.rebuild_in_tf_keras(model)
