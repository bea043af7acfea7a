"""TF Serving-ready SavedModel of a student, with preprocessing inside the graph.

Signatures (both Predict-method; TF2 SavedModels carry no Classify/Regress signatures):
  - `serving_default`: `images` uint8 `[batch, H, W, C]` raw pixels of the dataset's own
    shape (`info.raw_image_shape`; any training-time resize or channel repeat is inside
    the graph).
  - `predict_examples`: `examples` tf.string `[batch]` serialized `tf.Example`s with
    PNG/JPEG bytes under `image/encoded` (resized to H x W if needed).
Both return `logits` float32 `[batch, num_classes]`, `probabilities` float32
`[batch, num_classes]` and `classes` int64 `[batch]`. The class names ship as the asset
`assets/class_names.txt` (one per line, index = class id).

Reference: TF Serving "SavedModel Warmup" and directory-layout docs; Keras
`keras.export.ExportArchive`.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf

from sokd_tf.data.info import DatasetInfo
from sokd_tf.errors import ExportError
from sokd_tf.export import serving
from sokd_tf.export.preprocess import (
    check_images,
    check_student,
    decode_examples,
    normalize_pixels,
)

CLASS_NAMES_ASSET = "class_names.txt"


def _outputs(student: keras.Model, pixels: tf.Tensor, info: DatasetInfo) -> dict:
    logits = student(normalize_pixels(pixels, info), training=False)
    logits = tf.cast(logits, tf.float32)
    return {
        "logits": logits,
        "probabilities": tf.nn.softmax(logits, axis=-1),
        "classes": tf.argmax(logits, axis=-1, output_type=tf.int64),
    }


def build_archive(student: keras.Model, info: DatasetInfo, asset_dir: str, *,
                  examples_to_pixels=None, track=()):
    """An `ExportArchive` with both serving signatures and the class-names asset.

    Args:
      student: functional Keras model, normalised images `[batch, H, W, C]` -> logits.
      info: dataset facts (normalisation, image shape, class names).
      asset_dir: directory where the class-names file is written before export.
      examples_to_pixels: serialized tf.Examples `[batch]` -> raw pixels
        `[batch, H, W, C]` for `predict_examples`; None = `decode_examples` (PNG/JPEG
        under `image/encoded`). A TFX Transform graph plugs in here.
      track: further resources the endpoints use (e.g. a Transform layer), saved with them.
    """
    image_spec = tf.TensorSpec((None, *info.raw_image_shape), tf.uint8,
                               name=serving.IMAGES_INPUT)
    example_spec = tf.TensorSpec((None,), tf.string, name=serving.EXAMPLES_INPUT)
    if examples_to_pixels is None:
        def examples_to_pixels(examples):
            return decode_examples(examples, info)

    def serve_images(images):
        return _outputs(student, images, info)

    def serve_examples(examples):
        return _outputs(student, examples_to_pixels(examples), info)

    class_names_path = os.path.join(asset_dir, CLASS_NAMES_ASSET)
    with open(class_names_path, "w", encoding="utf-8") as f:
        f.write("".join(f"{name}\n" for name in info.class_names))
    # ExportArchive saves tracked TrackableResources (with their assets) only: a
    # class id -> name table carries the file into `assets/`.
    class_names = tf.lookup.StaticHashTable(
        tf.lookup.TextFileInitializer(
            class_names_path,
            key_dtype=tf.int64,
            key_index=tf.lookup.TextFileIndex.LINE_NUMBER,
            value_dtype=tf.string,
            value_index=tf.lookup.TextFileIndex.WHOLE_LINE,
        ),
        default_value="",
    )

    archive = keras.export.ExportArchive()
    archive.track(student)
    archive.track(class_names)
    for resource in track:
        archive.track(resource)
    archive.add_endpoint("serving_default", serve_images, input_signature=[image_spec])
    archive.add_endpoint(
        serving.EXAMPLES_SIGNATURE, serve_examples, input_signature=[example_spec]
    )
    return archive


def write_saved_model(
    student: keras.Model,
    info: DatasetInfo,
    directory: str,
    *,
    model_name: str,
    warmup_images_uint8: np.ndarray,
    examples_to_pixels=None,
    track=(),
) -> str:
    """Writes the serving SavedModel (both signatures, warm-up records) into `directory`.

    The plain write behind `export_saved_model`, for callers that own the directory
    (a TFX Trainer's `serving_model_dir`). `examples_to_pixels` and `track` as in
    `build_archive`.

    Raises:
      ExportError: a student that does not fit `info`, or bad warm-up images.
    """
    check_student(student, info)
    warmup_images_uint8 = check_images(warmup_images_uint8, info, "warm-up images")
    asset_dir = tempfile.mkdtemp(prefix="sokd_tf-assets-")
    try:
        build_archive(student, info, asset_dir, examples_to_pixels=examples_to_pixels,
                      track=track).write_out(directory, verbose=False)
    finally:
        shutil.rmtree(asset_dir, ignore_errors=True)
    serving.write_warmup_requests(directory, model_name, warmup_images_uint8)
    return directory


def export_saved_model(
    student: keras.Model,
    info: DatasetInfo,
    serving_root: str,
    model_name: str,
    *,
    version: int | None = None,
    warmup_images_uint8: np.ndarray,
) -> str:
    """Writes `serving_root/<model_name>/<version>/` atomically; never overwrites.

    The SavedModel is written to a hidden temporary directory beside the version
    directories (TF Serving only watches integer names) and renamed into place, so a
    watching server never sees a half-written version.

    Args:
      student: functional Keras model, normalised images -> logits.
      info: dataset facts.
      serving_root: the `export/serving` directory.
      model_name: TF Serving model name.
      version: integer version; None = newest existing + 1.
      warmup_images_uint8: `[n, H, W, C]` real raw images (`info.raw_image_shape`) for the
        warm-up requests.

    Returns:
      Path of the new version directory.

    Raises:
      ExportError: existing version, bad warm-up images, or a failed write (nothing is
        left behind).
    """
    check_student(student, info)
    warmup_images_uint8 = check_images(warmup_images_uint8, info, "warm-up images")
    if not model_name or os.sep in model_name or model_name.startswith("."):
        raise ExportError(f"export.model_name must be a plain directory name, got {model_name!r}")
    model_dir = os.path.join(serving_root, model_name)
    version = serving.next_version(model_dir, version)
    os.makedirs(model_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=model_dir)
    final = os.path.join(model_dir, str(version))
    try:
        saved = os.path.join(staging, "model")
        write_saved_model(student, info, saved, model_name=model_name,
                          warmup_images_uint8=warmup_images_uint8)
        try:
            # rename(2) fails instead of replacing a non-empty directory: a version that
            # appeared meanwhile is kept.
            os.rename(saved, final)
        except OSError as err:
            raise ExportError(
                f"could not move the SavedModel into {final}: {err}; versions are never "
                "overwritten"
            ) from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final
