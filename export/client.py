"""Sends real images to a student served by TF Serving (REST or gRPC) and prints predictions.

Standalone: needs numpy, tensorflow and tensorflow-serving-api (gRPC only), not sokd_tf.

    # PNG/JPEG files of any size, as tf.Example (resized inside the model):
    python export/client.py --rest=http://localhost:8501 --model=student \
        --signature=predict_examples --class_names=CLASS_NAMES_TXT photo1.png photo2.jpg
    # raw uint8 pixels of real Fashion-MNIST test images over gRPC:
    python export/client.py --grpc=localhost:8500 --model=student \
        --fashion_mnist_dir=/usr/share/datasets/fashion-mnist --count=8

`serving_default` takes `images`: uint8 `[batch, H, W, C]` raw pixels (files are decoded
and resized here); `predict_examples` takes `examples`: serialized `tf.Example` strings
with the encoded file under `image/encoded`. Both return `logits`, `probabilities` and
`classes`. The class names are the SavedModel's `assets/class_names.txt`.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import os
import struct
import sys
import urllib.request

import numpy as np

IMAGES_SIGNATURE = "serving_default"
EXAMPLES_SIGNATURE = "predict_examples"
IMAGES_INPUT = "images"
EXAMPLES_INPUT = "examples"
IMAGE_FEATURE = "image/encoded"


def image_example(encoded: bytes) -> bytes:
    """Serialized `tf.Example` carrying PNG/JPEG bytes under `image/encoded`."""
    import tensorflow as tf

    feature = tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded]))
    example = tf.train.Example(features=tf.train.Features(feature={IMAGE_FEATURE: feature}))
    return example.SerializeToString()


def decode_file(path: str, image_shape: tuple[int, int, int]) -> np.ndarray:
    """A PNG/JPEG file as uint8 `[H, W, C]`, converted and resized to `image_shape`."""
    import tensorflow as tf

    height, width, channels = image_shape
    image = tf.io.decode_image(
        tf.io.read_file(path), channels=channels, expand_animations=False
    )
    if tuple(image.shape[:2]) != (height, width):
        image = tf.image.resize(tf.cast(image, tf.float32), (height, width), antialias=True)
        image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    return image.numpy()


def fashion_mnist_test_images(data_dir: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` real Fashion-MNIST test images `[n, 28, 28, 1]` uint8 and labels."""
    with gzip.open(os.path.join(data_dir, "t10k-images-idx3-ubyte.gz"), "rb") as f:
        data = f.read()
    _, total, rows, cols = struct.unpack(">IIII", data[:16])
    count = min(count, total)
    images = np.frombuffer(data, np.uint8, count * rows * cols, 16).reshape(count, rows, cols, 1)
    with gzip.open(os.path.join(data_dir, "t10k-labels-idx1-ubyte.gz"), "rb") as f:
        labels = np.frombuffer(f.read(), np.uint8, count, 8)
    return images, labels


def rest_images_body(images_uint8: np.ndarray, signature: str = IMAGES_SIGNATURE) -> dict:
    """REST predict body (row format) for raw uint8 images `[n, H, W, C]`."""
    return {"signature_name": signature, "instances": np.asarray(images_uint8).tolist()}


def rest_examples_body(encoded_images: list[bytes]) -> dict:
    """REST predict body for encoded images, sent as base64 `tf.Example` strings."""
    return {
        "signature_name": EXAMPLES_SIGNATURE,
        "instances": [
            {"b64": base64.b64encode(image_example(encoded)).decode("ascii")}
            for encoded in encoded_images
        ],
    }


def grpc_images_request(model: str, images_uint8: np.ndarray, version: int | None = None):
    """gRPC `PredictRequest` for raw uint8 images on `serving_default`."""
    return _predict_request(model, IMAGES_SIGNATURE, IMAGES_INPUT,
                            np.asarray(images_uint8, np.uint8), version)


def grpc_examples_request(model: str, encoded_images: list[bytes], version: int | None = None):
    """gRPC `PredictRequest` for encoded images on `predict_examples`."""
    examples = np.array([image_example(e) for e in encoded_images], dtype=object)
    return _predict_request(model, EXAMPLES_SIGNATURE, EXAMPLES_INPUT, examples, version)


def _predict_request(model, signature, input_name, value, version):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    request.inputs[input_name].CopyFrom(tf.make_tensor_proto(value))
    return request


def predict_rest(url: str, model: str, body: dict, version: int | None = None,
                 timeout_s: float = 30.0) -> dict:
    """POSTs `body` to TF Serving's REST predict API; returns outputs as numpy arrays."""
    path = f"/v1/models/{model}" + (f"/versions/{version}" if version else "") + ":predict"
    request = urllib.request.Request(
        url.rstrip("/") + path, data=json.dumps(body).encode("utf-8"),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        predictions = json.loads(response.read())["predictions"]
    return {key: np.array([row[key] for row in predictions]) for key in predictions[0]}


def predict_grpc(target: str, request, timeout_s: float = 30.0) -> dict:
    """Sends a `PredictRequest` over gRPC; returns outputs as numpy arrays."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        response = stub.Predict(request, timeout_s)
    return {key: tf.make_ndarray(value) for key, value in response.outputs.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    server = parser.add_mutually_exclusive_group(required=True)
    server.add_argument("--rest", help="REST base URL, e.g. http://localhost:8501")
    server.add_argument("--grpc", help="gRPC target, e.g. localhost:8500")
    parser.add_argument("--model", default="student", help="TF Serving model name")
    parser.add_argument("--version", type=int, default=None, help="model version (default: newest)")
    parser.add_argument("--signature", choices=(IMAGES_SIGNATURE, EXAMPLES_SIGNATURE),
                        default=IMAGES_SIGNATURE)
    parser.add_argument("--image_shape", default="28,28,1",
                        help="H,W,C of the model (files are resized to it for serving_default)")
    parser.add_argument("--fashion_mnist_dir", help="send real Fashion-MNIST test images")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--class_names", help="the SavedModel's assets/class_names.txt")
    parser.add_argument("files", nargs="*", help="PNG/JPEG files")
    args = parser.parse_args(argv)

    import tensorflow as tf

    image_shape = tuple(int(v) for v in args.image_shape.split(","))
    labels = None
    if args.files:
        images = np.stack([decode_file(path, image_shape) for path in args.files])
        encoded = []
        for path in args.files:
            with open(path, "rb") as f:
                encoded.append(f.read())
    elif args.fashion_mnist_dir:
        images, labels = fashion_mnist_test_images(args.fashion_mnist_dir, args.count)
        encoded = [tf.io.encode_png(image).numpy() for image in images]
    else:
        parser.error("give image files or --fashion_mnist_dir")
    names = None
    if args.class_names:
        with open(args.class_names, encoding="utf-8") as f:
            names = [line.rstrip("\n") for line in f]

    if args.rest:
        body = (rest_images_body(images) if args.signature == IMAGES_SIGNATURE
                else rest_examples_body(encoded))
        outputs = predict_rest(args.rest, args.model, body, args.version)
    else:
        request = (grpc_images_request(args.model, images, args.version)
                   if args.signature == IMAGES_SIGNATURE
                   else grpc_examples_request(args.model, encoded, args.version))
        outputs = predict_grpc(args.grpc, request)

    for i, (cls, probs) in enumerate(zip(outputs["classes"], outputs["probabilities"], strict=True)):
        name = names[int(cls)] if names else str(int(cls))
        truth = "" if labels is None else f"  (label {int(labels[i])})"
        print(f"image {i}: class {int(cls)} {name!r} p={float(np.max(probs)):.3f}{truth}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
