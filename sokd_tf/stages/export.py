"""Export stage: the distilled student to TF Serving (SavedModel) and LiteRT (`.tflite`).

Reference: docs/DESIGN.md, "Exports".
"""

from __future__ import annotations

from sokd_tf import export
from sokd_tf.config import RunConfig
from sokd_tf.data import ImageDataset
from sokd_tf.errors import ExportError
from sokd_tf.stages import divergence
from sokd_tf.stages import workdir as workdir_lib


def export_stage(config: RunConfig, workdir: str, dataset: ImageDataset, student_path=None) -> dict:
    """Exports the distilled student (validation-best by default) for TF Serving and LiteRT.

    Raises:
      ExportError: the distill stage diverged and was not continued (unless
        `student_path` names the file to export), or as `export.export_student`.
    """
    paths = workdir_lib.Workdir(workdir)
    if student_path is None:
        record = divergence.read_record(paths.distill_dir)
        if record is not None:
            raise ExportError(
                f"the distill stage of {workdir!r} diverged at epoch {record['epoch']} "
                f"({record['term']} is {record['value']}) and did not finish; continue it "
                f"first with --resume_changed (see {paths.distill.diverged})"
            )
    student_path = student_path or paths.distilled("student", "best")
    student = export.load_student(student_path)
    # The whole training split: the int8 calibration takes `representative_size` of it,
    # the QAT fine-tune up to `qat_max_steps` batches.
    train_images, _ = dataset.raw_images("train")
    test_images, test_labels = dataset.raw_images("test")
    return export.export_student(
        student,
        dataset.info,
        paths.export_dir,
        config.export,
        train_images_uint8=train_images,
        test_images_uint8=test_images,
        test_labels=test_labels,
        source_model_file=student_path,
    )
