"""TF Serving conventions: versioned directories, warm-up records, request protos.

Reference: TF Serving docs, "SavedModel Warmup" (`assets.extra/tf_serving_warmup_requests`,
a TFRecord file of `PredictionLog` protos) and "Serving a TensorFlow Model"
(`<base_path>/<integer version>/`).
"""

from __future__ import annotations

import io
import os

import numpy as np
import tensorflow as tf

from sokd_tf.errors import ExportError
from sokd_tf.export.preprocess import IMAGE_FEATURE

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
IMAGES_INPUT = "images"
EXAMPLES_INPUT = "examples"
EXAMPLES_SIGNATURE = "predict_examples"


def existing_versions(model_dir: str) -> list[int]:
    """Integer version directories under a TF Serving model's base path, ascending."""
    if not os.path.isdir(model_dir):
        return []
    return sorted(
        int(name)
        for name in os.listdir(model_dir)
        if name.isdigit() and os.path.isdir(os.path.join(model_dir, name))
    )


def next_version(model_dir: str, version: int | None) -> int:
    """Resolves the version to write: `version`, or newest + 1 (1 for a new model).

    Versions only grow: TF Serving's default policy serves the highest version, so a new
    export numbered below the newest would be written and never served.

    Raises:
      ExportError: `version` exists already, is below 1, or is not above the newest.
    """
    versions = existing_versions(model_dir)
    if version is None:
        return (versions[-1] + 1) if versions else 1
    if version < 1:
        raise ExportError(f"export.version must be a positive integer, got {version}")
    if version in versions or os.path.exists(os.path.join(model_dir, str(version))):
        raise ExportError(
            f"version {version} already exists in {model_dir}; versions are never "
            f"overwritten (existing: {versions}); pass a new version or leave it unset"
        )
    if versions and version < versions[-1]:
        raise ExportError(
            f"version {version} is below the newest version {versions[-1]} in {model_dir}; "
            f"versions only grow (TF Serving serves the highest): pass a version above "
            f"{versions[-1]} or leave it unset"
        )
    return version


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of one `[H, W, C]` uint8 image."""
    return tf.io.encode_png(tf.convert_to_tensor(image, tf.uint8)).numpy()


def image_example(encoded: bytes) -> bytes:
    """A serialized `tf.Example` with the encoded image under `image/encoded`."""
    feature = tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded]))
    example = tf.train.Example(features=tf.train.Features(feature={IMAGE_FEATURE: feature}))
    return example.SerializeToString()


def predict_request(model_name: str, signature_name: str, inputs: dict[str, np.ndarray]):
    """A `tensorflow_serving.apis.predict_pb2.PredictRequest` for `inputs`."""
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    return request


def write_warmup_requests(
    version_dir: str, model_name: str, images_uint8: np.ndarray, *, max_images: int = 4
) -> int:
    """Writes real warm-up requests for both signatures into `assets.extra/`.

    One request per signature and batch size 1 and `max_images` (TF Serving loads at
    most 1000 records).

    Args:
      version_dir: the SavedModel directory.
      model_name: TF Serving model name.
      images_uint8: `[n, H, W, C]` real raw images; the first `max_images` are used.
      max_images: size of the larger warm-up batch.

    Returns:
      Number of records written.
    """
    from tensorflow_serving.apis import prediction_log_pb2

    batches = [images_uint8[:1], images_uint8[:max_images]]
    requests = []
    for batch in batches:
        requests.append(predict_request(model_name, "serving_default", {IMAGES_INPUT: batch}))
        examples = np.array([image_example(encode_png(image)) for image in batch], dtype=object)
        requests.append(
            predict_request(model_name, EXAMPLES_SIGNATURE, {EXAMPLES_INPUT: examples})
        )
    path = os.path.join(version_dir, WARMUP_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for request in requests:
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())
    return len(requests)


def read_warmup_requests(version_dir: str) -> list:
    """Parses the warm-up file back into `PredictionLog` protos."""
    from tensorflow_serving.apis import prediction_log_pb2

    records = []
    for raw in tf.data.TFRecordDataset(os.path.join(version_dir, WARMUP_FILE)):
        log = prediction_log_pb2.PredictionLog()
        log.ParseFromString(raw.numpy())
        records.append(log)
    return records


def models_config(entries: dict[str, str]) -> str:
    """Text of a TF Serving `models.config` for `{model_name: base_path}`."""
    out = io.StringIO()
    out.write("model_config_list {\n")
    for name, base_path in entries.items():
        out.write("  config {\n")
        out.write(f'    name: "{name}"\n')
        out.write(f'    base_path: "{base_path}"\n')
        out.write('    model_platform: "tensorflow"\n')
        out.write("  }\n")
    out.write("}\n")
    return out.getvalue()
