"""Deployment kit: client requests (REST JSON, gRPC) fed to the SavedModel in-process,
the LiteRT example, and the models.config template."""

import base64
import importlib.util
import json
import os
import subprocess
import sys

import export_support as support
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format

from sokd_tf import export
from sokd_tf.config import FASHION_MNIST_DIR
from sokd_tf.export import serving, tflite

KIT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "export")


def _load_kit_module(name):
    spec = importlib.util.spec_from_file_location(f"kit_{name}", os.path.join(KIT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


client = _load_kit_module("client")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny student exported as a SavedModel, loaded as TF Serving would load it."""
    info, _, _, test_images, _ = support.data()
    student = support.tiny_student(info, seed=5)
    version_dir = export.export_saved_model(
        student, info, str(tmp_path_factory.mktemp("kit") / "serving"), "student",
        warmup_images_uint8=test_images[:2])
    expected = np.argmax(support.keras_logits(student, test_images[:16], info), -1)
    return tf.saved_model.load(version_dir), test_images[:16], expected, version_dir, student


def test_rest_images_body_is_json_the_signature_accepts(served):
    loaded, images, expected, _, _ = served
    body = json.loads(json.dumps(client.rest_images_body(images)))
    assert body["signature_name"] == "serving_default"
    # TF Serving turns row-format `instances` into the signature's single input tensor.
    tensor = tf.constant(np.array(body["instances"], np.uint8))
    outputs = loaded.signatures[body["signature_name"]](images=tensor)
    np.testing.assert_array_equal(outputs["classes"].numpy(), expected)


def test_rest_examples_body_carries_base64_tf_examples(served):
    loaded, images, expected, _, _ = served
    encoded = [serving.encode_png(image) for image in images]
    body = json.loads(json.dumps(client.rest_examples_body(encoded)))
    assert body["signature_name"] == "predict_examples"
    examples = [base64.b64decode(instance["b64"]) for instance in body["instances"]]
    outputs = loaded.signatures[body["signature_name"]](examples=tf.constant(examples))
    np.testing.assert_array_equal(outputs["classes"].numpy(), expected)


def test_grpc_requests_carry_tensors_the_signatures_accept(served):
    loaded, images, expected, _, _ = served
    request = client.grpc_images_request("student", images, version=3)
    assert request.model_spec.name == "student"
    assert request.model_spec.version.value == 3
    assert request.model_spec.signature_name == "serving_default"
    tensor = tf.make_ndarray(request.inputs["images"])
    assert tensor.dtype == np.uint8
    outputs = loaded.signatures["serving_default"](images=tf.constant(tensor))
    np.testing.assert_array_equal(outputs["classes"].numpy(), expected)

    request = client.grpc_examples_request("student", [serving.encode_png(i) for i in images])
    assert request.model_spec.signature_name == "predict_examples"
    examples = tf.make_ndarray(request.inputs["examples"])
    outputs = loaded.signatures["predict_examples"](examples=tf.constant(examples))
    np.testing.assert_array_equal(outputs["classes"].numpy(), expected)
    # The library's warm-up requests are the same protos.
    warmup = serving.predict_request("student", "serving_default", {"images": images})
    np.testing.assert_array_equal(tf.make_ndarray(warmup.inputs["images"]), tensor)


def test_client_reads_real_images_from_files_and_idx(tmp_path):
    info, _, _, test_images, test_labels = support.data()
    images, labels = client.fashion_mnist_test_images(FASHION_MNIST_DIR, 5)
    np.testing.assert_array_equal(images, test_images[:5])
    np.testing.assert_array_equal(labels, test_labels[:5])
    path = tmp_path / "shirt.png"
    path.write_bytes(serving.encode_png(test_images[0]))
    np.testing.assert_array_equal(client.decode_file(str(path), info.image_shape), test_images[0])
    large = tmp_path / "large.png"
    large.write_bytes(tf.io.encode_png(tf.image.resize(
        test_images[0], (56, 56), method="nearest")).numpy())
    assert client.decode_file(str(large), info.image_shape).shape == info.image_shape


def test_litert_example_classifies_files_like_keras(served, tmp_path):
    _, images, expected, version_dir, student = served
    info = support.data()[0]
    model = tflite.write_tflite(tflite.convert_tflite("fp32", student, info),
                                str(tmp_path / "fp32.tflite"))
    paths = []
    for i, image in enumerate(images[:4]):
        paths.append(str(tmp_path / f"image{i}.png"))
        with open(paths[-1], "wb") as f:
            f.write(serving.encode_png(image))
    names = os.path.join(version_dir, "assets", "class_names.txt")
    result = subprocess.run(
        [sys.executable, os.path.join(KIT, "litert_example.py"), "--model", model,
         "--class_names", names, *paths],
        capture_output=True, text=True, check=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith(str(tmp_path))]
    assert len(lines) == 4
    for line, cls in zip(lines, expected[:4], strict=True):
        assert f"class {cls} {info.class_names[cls]!r}" in line


def test_models_config_template_parses_as_tf_serving_config():
    from tensorflow_serving.config import model_server_config_pb2

    with open(os.path.join(KIT, "models.config")) as f:
        template = f.read()
    for text in (template, serving.models_config({"student": "/models/student"})):
        config = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
        entry = config.model_config_list.config[0]
        assert (entry.name, entry.base_path, entry.model_platform) == (
            "student", "/models/student", "tensorflow")
