"""The labels and the input/output contract shipped beside every `.tflite` file.

    export_dir/tflite/labels.txt                   one class name per line, line i = class i
    export_dir/tflite/<variant>.model_card.json    input dtype/shape/range/quantization,
                                                   output meaning, class names, source

Why not TFLite Metadata inside the flatbuffer: its maintained writers cannot be
installed beside TensorFlow 2.21 (protobuf >= 6.31). `tflite-support` 0.4.4 (the last
release, 2023) requires protobuf < 4; the MediaPipe releases that accept protobuf 6
(0.10.30 and later) ship `mediapipe.tasks.python.metadata` without the native module it
imports (`_pywrap_metadata_version`), so their metadata writers fail at import, and
those that still have it (0.10.21 and older) require protobuf < 5. A JSON card and a
plain labels file need no library to read, on a phone or anywhere else.

Reference: docs/DESIGN.md, "Exports".
"""

from __future__ import annotations

import os

import numpy as np

from sokd_tf import __version__
from sokd_tf.data.info import DatasetInfo
from sokd_tf.export import tflite

LABELS_FILE = "labels.txt"
MODEL_CARD_SUFFIX = ".model_card.json"
CARD_FORMAT = "sokd_tf.litert_model_card/1"

VARIANT_DESCRIPTIONS = {
    "fp32": "float32 weights and kernels",
    "fp16": "float16 weights, float32 kernels",
    "dynamic_int8": "int8 weights, float32 kernels (dynamic-range quantization)",
    "int8": "full-integer int8 kernels, uint8 input and output (post-training quantization)",
    "int8_float_io": "full-integer int8 kernels, float32 input and output "
                     "(post-training quantization)",
    "qat_int8": "full-integer int8 kernels, uint8 input and output "
                "(quantization-aware fine-tune)",
}


def model_card_name(variant: str) -> str:
    return f"{variant}{MODEL_CARD_SUFFIX}"


def labels_text(info: DatasetInfo) -> str:
    """`labels.txt`: one class name per line; line i (0-based) names class i."""
    return "".join(f"{name}\n" for name in info.class_names)


def _quantization(details: dict) -> dict | None:
    if np.dtype(details["dtype"]) == np.float32:
        return None
    scale, zero_point = details["quantization"]
    return {"scale": float(scale), "zero_point": int(zero_point)}


def model_card(path: str, variant: str, info: DatasetInfo, *, model_name: str,
               source_model: dict, evaluation: dict) -> dict:
    """The card of one `.tflite` file, read from the file itself where it can be.

    Args:
      path: the `.tflite` file (its tensors give dtypes, shapes, quantization).
      variant: its variant name (a key of `VARIANT_DESCRIPTIONS`).
      info: dataset facts (class names, normalisation folded into the graph).
      model_name: the export's model name.
      source_model: facts about the Keras model it was converted from (name, params).
      evaluation: `tflite.evaluate_tflite` results on the test images.

    Returns:
      A JSON-ready dict; `input`/`output` say how to feed the file and read it.
    """
    classifier = tflite.LiteRTClassifier(path)
    inputs, outputs = classifier.input, classifier.output
    input_quantization = _quantization(inputs)
    output_quantization = _quantization(outputs)
    input_dtype = np.dtype(inputs["dtype"]).name
    if input_quantization is None:
        feed = "float32 raw pixel values in [0, 255], no normalisation"
    else:
        feed = (f"{input_dtype} q = clip(round(pixels / scale + zero_point)); with scale "
                f"{input_quantization['scale']:g} and zero point "
                f"{input_quantization['zero_point']} that is the raw pixel value itself"
                if input_quantization == {"scale": 1.0, "zero_point": 0}
                else f"{input_dtype} q = clip(round(pixels / scale + zero_point))")
    read = "logits as they are" if output_quantization is None else (
        "logits = scale * (q - zero_point)")
    height, width, channels = info.image_shape
    return {
        "format": CARD_FORMAT,
        "model_file": os.path.basename(path),
        "model_name": model_name,
        "variant": variant,
        "variant_description": VARIANT_DESCRIPTIONS.get(variant, variant),
        "task": "image classification",
        "input": {
            "name": inputs["name"],
            "dtype": input_dtype,
            "shape": [int(v) for v in inputs["shape_signature"]],
            "shape_note": "-1 = any batch size",
            "layout": "NHWC",
            "image_size": {"height": height, "width": width, "channels": channels},
            "color": "grayscale" if channels == 1 else "RGB",
            "pixel_range": [0, 255],
            "normalization": "none by the client: (pixels / 255 - mean) / std is inside "
                             "the model",
            "folded_normalization": {"mean": list(info.mean), "std": list(info.std)},
            "quantization": input_quantization,
            "feed": feed,
        },
        "output": {
            "name": outputs["name"],
            "dtype": np.dtype(outputs["dtype"]).name,
            "shape": [int(v) for v in outputs["shape_signature"]],
            "meaning": "logits: unnormalised class scores; softmax gives probabilities, "
                       "argmax the class index (line of labels.txt)",
            "quantization": output_quantization,
            "read": read,
        },
        "labels_file": LABELS_FILE,
        "num_classes": info.num_classes,
        "class_names": list(info.class_names),
        "dataset": info.name,
        "source_model": dict(source_model),
        "evaluation": {
            "top1": evaluation.get("top1"),
            "agreement_with_keras": evaluation.get("agreement"),
            "num_examples": evaluation.get("num_examples"),
        },
        "size_bytes": os.path.getsize(path),
        "producer": {"library": "sokd_tf", "version": __version__},
    }
