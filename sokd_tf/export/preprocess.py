"""Raw-pixel preprocessing folded into every exported graph, and input validation.

Clients of an exported student send the dataset's raw pixels (0-255, shape
`info.raw_image_shape`) or encoded images; everything the training pipeline did between
those and the model lives inside the graph: the optional resize to `info.image_shape`,
the normalisation `(pixels / 255 - mean) / std` of `DatasetInfo`, the optional grayscale
-> 3-channel repeat (`sokd_tf.data.model_inputs`, the pipeline's own function).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from sokd_tf.data.info import DatasetInfo
from sokd_tf.data.inputs import model_inputs
from sokd_tf.errors import ExportError

IMAGE_FEATURE = "image/encoded"


def normalize_pixels(pixels: tf.Tensor, info: DatasetInfo) -> tf.Tensor:
    """Maps raw pixels to the student's input, exactly as the training pipeline does.

    Args:
      pixels: `[batch, H, W, C]` raw pixels in [0, 255], any real or integer dtype,
        `(H, W, C) = info.raw_image_shape`.
      info: supplies the per-channel `mean` and `std` (of pixels scaled to [0, 1]) and
        the raw and model image shapes.

    Returns:
      `[batch, h, w, c]` float32 model input, `(h, w, c) = info.image_shape`: resized
      if the shapes differ, `(pixels / 255 - mean) / std`, grayscale repeated if asked.
    """
    return model_inputs(pixels, info)


def normalize_numpy(images_uint8: np.ndarray, info: DatasetInfo) -> np.ndarray:
    """`normalize_pixels` on a NumPy batch, for feeding the Keras student directly."""
    return model_inputs(images_uint8, info).numpy()


def decode_examples(serialized: tf.Tensor, info: DatasetInfo) -> tf.Tensor:
    """Decodes serialized `tf.Example`s carrying PNG/JPEG bytes under `image/encoded`.

    Images of another size are resized (bilinear, antialiased) to `info.raw_image_shape`;
    grayscale/RGB are converted to the dataset's channel count by the decoder. The result
    is what `serving_default` takes, so both signatures share the rest of the graph.

    Args:
      serialized: `[batch]` tf.string, serialized `tf.Example` protos.
      info: supplies `raw_image_shape` (H, W, C).

    Returns:
      `[batch, H, W, C]` float32 raw pixels in [0, 255].
    """
    features = tf.io.parse_example(
        serialized, {IMAGE_FEATURE: tf.io.FixedLenFeature([], tf.string)}
    )
    return decode_images(features[IMAGE_FEATURE], info)


def decode_images(encoded: tf.Tensor, info: DatasetInfo) -> tf.Tensor:
    """Decodes a batch of PNG/JPEG bytes `[batch]` to float32 raw pixels `[batch, H, W, C]`.

    Resized (bilinear, antialiased) to `info.raw_image_shape` when needed, as in
    `decode_examples`.
    """
    height, width, channels = info.raw_image_shape

    def decode_one(encoded):
        image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
        image = tf.cast(image, tf.float32)
        image = tf.image.resize(image, (height, width), antialias=True)
        return tf.ensure_shape(image, (height, width, channels))

    return tf.map_fn(
        decode_one,
        encoded,
        fn_output_signature=tf.TensorSpec((height, width, channels), tf.float32),
    )


def check_images(images: np.ndarray | None, info: DatasetInfo, what: str) -> np.ndarray:
    """Validates a batch of raw images against the dataset's raw image shape.

    Args:
      images: `[n, H, W, C]` raw pixels (uint8, or any dtype with values in [0, 255]).
      info: the dataset the student was trained on.
      what: name of the argument, for the error message.

    Returns:
      The images as a uint8 array.

    Raises:
      ExportError: None, empty, wrong rank or shape, or values outside [0, 255].
    """
    if images is None:
        raise ExportError(f"{what} is missing: {_expected(info)}")
    images = np.asarray(images)
    raw_shape = tuple(info.raw_image_shape)
    if images.ndim == 3 and raw_shape[-1] == 1 and images.shape[1:] == raw_shape[:2]:
        images = images[..., None]
    if images.ndim != 4 or tuple(images.shape[1:]) != raw_shape:
        raise ExportError(f"{what} has shape {images.shape}: {_expected(info)}")
    if images.shape[0] == 0:
        raise ExportError(f"{what} is empty: {_expected(info)}")
    if images.dtype != np.uint8:
        if images.min() < 0 or images.max() > 255:
            raise ExportError(
                f"{what} holds values in [{images.min()}, {images.max()}]: expected raw "
                "pixels in [0, 255], not normalised images"
            )
        images = np.rint(images).astype(np.uint8)
    return images


def _expected(info: DatasetInfo) -> str:
    return f"expected raw pixels [n >= 1, {', '.join(map(str, info.raw_image_shape))}] in [0, 255]"


def check_student(student: keras.Model, info: DatasetInfo) -> None:
    """Raises ExportError unless `student` maps `info.image_shape` images (the model-side
    shape, after any resize) to class logits."""
    if not isinstance(student, keras.Model) or len(student.inputs or []) != 1:
        raise ExportError("the student must be a functional keras.Model with one image input")
    input_shape = tuple(student.inputs[0].shape[1:])
    if input_shape != tuple(info.image_shape):
        raise ExportError(
            f"student {student.name!r} takes images of shape {input_shape} but dataset "
            f"{info.name!r} has {tuple(info.image_shape)}"
        )
    output_shape = tuple(student.outputs[0].shape[1:])
    if output_shape != (info.num_classes,):
        raise ExportError(
            f"student {student.name!r} outputs {output_shape} but dataset {info.name!r} has "
            f"{info.num_classes} classes"
        )
