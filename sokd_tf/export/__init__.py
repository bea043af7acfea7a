"""Deployment exports of a trained student: TF Serving SavedModel and LiteRT files.

Main entry: `export_student(student, info, export_dir, export_config, *,
train_images_uint8, test_images_uint8, test_labels) -> report`; `load_student(path)`
turns load failures into `ExportError`. Beside each `.tflite` file the export writes
`labels.txt` and `<variant>.model_card.json` (see `model_card.py`). The pieces (`export_saved_model`,
`convert_tflite`, `evaluate_tflite`, `quantization_aware_finetune`) are importable alone.
"""

from sokd_tf.export.exporter import (
    export_student,
    load_student,
    verify_saved_model,
)
from sokd_tf.export.preprocess import check_student, normalize_numpy, normalize_pixels
from sokd_tf.export.qat import quantization_aware_finetune, rebuild_in_tf_keras
from sokd_tf.export.report import add_ratios, format_table, goals
from sokd_tf.export.saved_model import export_saved_model
from sokd_tf.export.serving import next_version
from sokd_tf.export.tflite import LiteRTClassifier, convert_tflite, evaluate_tflite, write_tflite

__all__ = [
    "LiteRTClassifier",
    "add_ratios",
    "check_student",
    "convert_tflite",
    "evaluate_tflite",
    "export_saved_model",
    "export_student",
    "format_table",
    "goals",
    "load_student",
    "next_version",
    "normalize_numpy",
    "normalize_pixels",
    "quantization_aware_finetune",
    "rebuild_in_tf_keras",
    "verify_saved_model",
    "write_tflite",
]
