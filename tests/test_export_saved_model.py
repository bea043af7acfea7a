"""SavedModel export: both signatures vs Keras, asset, warm-up, versioned atomic layout."""

import os
import subprocess
import sys

import export_support as support
import numpy as np
import pytest
import tensorflow as tf

from sokd_tf import export
from sokd_tf.errors import ExportError
from sokd_tf.export import serving


@pytest.fixture(scope="module")
def trained_export(tmp_path_factory):
    export_dir, report = support.exported(str(tmp_path_factory.getbasetemp() / "trained"))
    return export_dir, report, report["saved_model"]["path"]


def _tree(root):
    return sorted(
        os.path.relpath(os.path.join(d, name), root)
        for d, dirs, files in os.walk(root)
        for name in dirs + files
    )


@pytest.mark.slow
def test_both_signatures_match_keras_on_real_test_images(trained_export):
    _, _, version_dir = trained_export
    info, _, _, test_images, _ = support.data()
    expected = support.keras_logits(support.trained_student(), test_images, info)
    loaded = tf.saved_model.load(version_dir)
    assert set(loaded.signatures) == {"serving_default", "predict_examples"}

    outputs = loaded.signatures["serving_default"](images=tf.constant(test_images))
    assert set(outputs) == {"logits", "probabilities", "classes"}
    np.testing.assert_allclose(outputs["logits"].numpy(), expected, atol=1e-4)
    np.testing.assert_array_equal(outputs["classes"].numpy(), np.argmax(expected, -1))
    np.testing.assert_allclose(outputs["probabilities"].numpy().sum(-1), 1.0, atol=1e-5)

    count = 64
    examples = [serving.image_example(serving.encode_png(image)) for image in test_images[:count]]
    outputs = loaded.signatures["predict_examples"](examples=tf.constant(examples))
    np.testing.assert_allclose(outputs["logits"].numpy(), expected[:count], atol=1e-4)
    np.testing.assert_array_equal(outputs["classes"].numpy(), np.argmax(expected[:count], -1))

    # JPEG and a larger image are decoded (and resized) inside the graph.
    jpeg = tf.io.encode_jpeg(test_images[0], quality=100).numpy()
    large = tf.image.resize(test_images[1], (56, 56), method="nearest")
    large_png = tf.io.encode_png(tf.cast(large, tf.uint8)).numpy()
    outputs = loaded.signatures["predict_examples"](examples=tf.constant(
        [serving.image_example(jpeg), serving.image_example(large_png)]))
    assert outputs["probabilities"].shape == (2, info.num_classes)


@pytest.mark.slow
def test_class_names_asset_and_real_warmup_requests(trained_export):
    _, _, version_dir = trained_export
    info, _, _, test_images, _ = support.data()
    with open(os.path.join(version_dir, "assets", "class_names.txt"), encoding="utf-8") as f:
        assert tuple(f.read().splitlines()) == info.class_names

    records = serving.read_warmup_requests(version_dir)
    assert len(records) == 4
    loaded = tf.saved_model.load(version_dir)
    signatures = [r.predict_log.request.model_spec.signature_name for r in records]
    assert signatures == ["serving_default", "predict_examples"] * 2
    for record in records:
        request = record.predict_log.request
        assert request.model_spec.name == "student"
        inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
        if "images" in inputs:
            n = inputs["images"].shape[0]
            np.testing.assert_array_equal(inputs["images"].numpy(), test_images[:n])
        # Replay as TF Serving does at load time.
        outputs = loaded.signatures[request.model_spec.signature_name](**inputs)
        assert outputs["classes"].shape[0] in (1, 4)


@pytest.mark.slow
def test_saved_model_cli_show_and_run(trained_export, tmp_path):
    _, _, version_dir = trained_export
    info, _, _, test_images, _ = support.data()
    expected = np.argmax(support.keras_logits(support.trained_student(), test_images[:16], info), -1)
    cli = [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]

    shown = subprocess.run(cli + ["show", "--dir", version_dir, "--all"],
                           capture_output=True, text=True, check=True).stdout
    for text in ("signature_def['serving_default']", "signature_def['predict_examples']",
                 "inputs['images']", "DT_UINT8", "inputs['examples']", "DT_STRING",
                 "outputs['probabilities']", "outputs['classes']", "outputs['logits']"):
        assert text in shown

    images_npy = str(tmp_path / "images.npy")
    np.save(images_npy, test_images[:16])
    examples_npy = str(tmp_path / "examples.npy")
    np.save(examples_npy, np.array(
        [serving.image_example(serving.encode_png(image)) for image in test_images[:16]]))
    for signature, name, path in (("serving_default", "images", images_npy),
                                  ("predict_examples", "examples", examples_npy)):
        outdir = tmp_path / signature
        subprocess.run(cli + ["run", "--dir", version_dir, "--tag_set", "serve",
                              "--signature_def", signature, "--inputs", f"{name}={path}",
                              "--outdir", str(outdir)],
                       capture_output=True, text=True, check=True)
        np.testing.assert_array_equal(np.load(outdir / "classes.npy"), expected)


def test_versions_only_grow_and_are_never_overwritten(tmp_path):
    info, _, _, test_images, _ = support.data()
    student = support.tiny_student(info)
    root = str(tmp_path / "serving")

    def write(version=None):
        return export.export_saved_model(student, info, root, "student", version=version,
                                         warmup_images_uint8=test_images[:4])

    assert write() == os.path.join(root, "student", "1")
    assert write() == os.path.join(root, "student", "2")
    with open(os.path.join(root, "student", "2", "saved_model.pb"), "rb") as f:
        before = f.read()
    with pytest.raises(ExportError, match="version 2 already exists"):
        write(2)
    with open(os.path.join(root, "student", "2", "saved_model.pb"), "rb") as f:
        assert f.read() == before
    assert write(7).endswith(os.path.join("student", "7"))
    assert write().endswith(os.path.join("student", "8"))
    assert sorted(os.listdir(os.path.join(root, "student"))) == ["1", "2", "7", "8"]


def test_next_version_ignores_non_integer_entries(tmp_path):
    model_dir = tmp_path / "m"
    assert serving.next_version(str(model_dir), None) == 1
    for name in ("3", "10", ".tmp-11-abc", "notes"):
        (model_dir / name).mkdir(parents=True)
    (model_dir / "12").write_text("a file, not a version")
    assert serving.existing_versions(str(model_dir)) == [3, 10]
    assert serving.next_version(str(model_dir), None) == 11
    assert serving.next_version(str(model_dir), 42) == 42
    with pytest.raises(ExportError, match="already exists"):
        serving.next_version(str(model_dir), 10)
    with pytest.raises(ExportError, match="version 4 is below the newest version 10"):
        serving.next_version(str(model_dir), 4)


def test_failed_write_leaves_no_partial_version(tmp_path, monkeypatch):
    info, _, _, test_images, _ = support.data()
    student = support.tiny_student(info)
    root = str(tmp_path / "serving")
    export.export_saved_model(student, info, root, "student", warmup_images_uint8=test_images[:2])
    before = _tree(root)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    # Fault injection after the SavedModel itself was written to the staging directory.
    monkeypatch.setattr(serving, "write_warmup_requests", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export.export_saved_model(student, info, root, "student",
                                  warmup_images_uint8=test_images[:2])
    assert _tree(root) == before
