"""Bad input to the export: a clear ExportError and the export directory left as it was."""

import os

import export_support as support
import keras
import numpy as np
import pytest

from sokd_tf import export
from sokd_tf.config import ExportConfig
from sokd_tf.errors import ExportError
from sokd_tf.stages import workdir as workdir_lib
from sokd_tf.stages.workdir import Workdir

FAST = ExportConfig(tflite_variants=("fp32", "int8"), representative_size=20, latency_runs=2)


def _tree(root):
    if not os.path.exists(root):
        return None
    return sorted(
        os.path.relpath(os.path.join(d, name), root)
        for d, dirs, files in os.walk(root)
        for name in dirs + files
    )


def _export(student, export_dir, config=FAST, **overrides):
    info, train_images, _, test_images, test_labels = support.data()
    kwargs = {"train_images_uint8": train_images[:100], "test_images_uint8": test_images[:50],
              "test_labels": test_labels[:50]}
    kwargs.update(overrides)
    return export.export_student(student, info, export_dir, config, **kwargs)


def test_workdir_without_a_trained_student(tmp_path):
    workdir = Workdir(str(tmp_path / "run"))
    with pytest.raises(ExportError, match="no trained student"):
        export.load_student(workdir.distilled("student", "best"))
    assert not os.path.exists(workdir.export_dir)


def test_corrupt_or_truncated_keras_file(tmp_path):
    garbage = tmp_path / "student_best.keras"
    garbage.write_bytes(b"this is not a zip archive")
    with pytest.raises(ExportError, match="could not load the student"):
        export.load_student(str(garbage))

    info = support.data()[0]
    good = str(tmp_path / "good.keras")
    support.tiny_student(info).save(good)
    with open(good, "rb") as f:
        content = f.read()
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(content[: len(content) // 2])
    with pytest.raises(ExportError, match="truncated.keras"):
        export.load_student(str(truncated))


def test_load_student_round_trip(tmp_path):
    info, _, _, test_images, _ = support.data()
    student = support.tiny_student(info)
    path = str(tmp_path / "student.keras")
    student.save(path)
    loaded = export.load_student(path)
    np.testing.assert_allclose(support.keras_logits(loaded, test_images[:8], info),
                               support.keras_logits(student, test_images[:8], info), atol=1e-6)


def test_existing_version_is_rejected_before_any_work(tmp_path):
    info = support.data()[0]
    export_dir = str(tmp_path / "export")
    _export(support.tiny_student(info), export_dir)
    before = _tree(export_dir)
    with open(os.path.join(export_dir, workdir_lib.EXPORT_REPORT)) as f:
        report_before = f.read()
    taken = ExportConfig(version=1, tflite_variants=("fp32",), latency_runs=2)
    with pytest.raises(ExportError, match="version 1 already exists"):
        _export(support.tiny_student(info, seed=3), export_dir, taken)
    assert _tree(export_dir) == before
    with open(os.path.join(export_dir, workdir_lib.EXPORT_REPORT)) as f:
        assert f.read() == report_before


@pytest.mark.parametrize(
    "images, message",
    [
        (np.zeros((0, 28, 28, 1), np.uint8), "representative dataset.*is empty"),
        (np.zeros((10, 32, 32, 3), np.uint8), r"representative dataset.*shape \(10, 32, 32, 3\)"),
        (np.full((10, 28, 28, 1), -0.8, np.float32), "not normalised images"),
        (None, "representative dataset.*missing"),
    ],
)
def test_bad_representative_dataset(tmp_path, images, message):
    info = support.data()[0]
    export_dir = str(tmp_path / "export")
    with pytest.raises(ExportError, match=message):
        _export(support.tiny_student(info), export_dir, train_images_uint8=images)
    assert _tree(export_dir) is None


def test_student_that_does_not_fit_the_data(tmp_path):
    info = support.data()[0]
    export_dir = str(tmp_path / "export")
    with pytest.raises(ExportError, match=r"takes images of shape \(32, 32, 3\)"):
        _export(support.tiny_student(info, input_shape=(32, 32, 3)), export_dir)
    with pytest.raises(ExportError, match="test labels"):
        _export(support.tiny_student(info), export_dir,
                test_labels=support.data()[4][:49])
    assert _tree(export_dir) is None


class Doubling(keras.layers.Layer):
    def call(self, x):
        return 2.0 * x


def test_failure_after_the_saved_model_removes_everything_this_export_created(tmp_path):
    """A QAT-incompatible layer fails after the SavedModel and fp32 file were written."""
    info = support.data()[0]
    images = keras.Input(info.image_shape)
    x = keras.layers.Flatten()(Doubling(name="doubling")(images))
    student = keras.Model(images, keras.layers.Dense(info.num_classes)(x))
    export_dir = str(tmp_path / "export")
    _export(support.tiny_student(info), export_dir, ExportConfig(tflite_variants=("fp32",),
                                                                 latency_runs=2))
    before = _tree(export_dir)
    config = ExportConfig(tflite_variants=("fp32", "qat_int8"), latency_runs=2)
    with pytest.raises(ExportError, match="doubling"):
        _export(student, export_dir, config)
    assert _tree(export_dir) == before


def test_a_failing_model_card_leaves_no_tflite_file_behind(tmp_path, monkeypatch):
    """Cards and labels are staged with the .tflite files and move in only together
    (the failure is injected into the card writer)."""
    from sokd_tf.export import model_card

    def broken_card(*args, **kwargs):
        raise OSError("disk full while writing the model card")

    info = support.data()[0]
    export_dir = str(tmp_path / "export")
    monkeypatch.setattr(model_card, "model_card", broken_card)
    with pytest.raises(OSError, match="model card"):
        _export(support.tiny_student(info), export_dir)
    left = _tree(export_dir)
    assert not [p for p in left if os.path.isfile(os.path.join(export_dir, p))], left
    assert not [p for p in left if "tflite" in p or p.startswith("serving/student/")], left
