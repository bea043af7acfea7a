"""LiteRT (.tflite) conversion of a student and its verification with the interpreter.

Every variant takes the dataset's raw pixels (`info.raw_image_shape`; a training-time
resize or channel repeat is inside the graph), so no client ever preprocesses:
  - `fp32`, `fp16` (float16 weights), `dynamic_int8` (int8 weights, float kernels),
    `int8_float_io` (full-integer kernels, float32 I/O): float32 `[batch, H, W, C]`
    pixels in [0, 255] -> float32 logits.
  - `int8`, `qat_int8` (full-integer kernels and I/O): uint8 `[batch, H, W, C]` raw
    pixels -> uint8 logits. The input quantization is calibrated on raw training images
    (scale 1, zero point 0 when they span 0..255, i.e. the uint8 pixels are fed as they
    are); the output is dequantized with the output tensor's scale and zero point.
Only builtin ops are allowed (no SELECT_TF_OPS), so mobile apps need no Flex delegate.
The model's single output is `logits` `[batch, num_classes]`; softmax/argmax are left to
the app.

`graph_ops` lists a file's ops with their tensor types and `integer_graph_problems` checks
that a full-integer file is int8 from end to end: its only QUANTIZE/DEQUANTIZE ops are
the ones converting the model's input and output. The pre-activation WRN students
convert to that shape: BN that follows a convolution is folded into it, BN on a
residual sum becomes an int8 MUL + ADD, and the folded normalisation an int8 MUL + SUB
(exact only as separate ops: zero padding of normalised pixels is not zero padding of
raw ones). XNNPACK (LiteRT's default CPU delegate) takes every int8 op between the two
boundary conversions; `LiteRTClassifier(delegate="builtin")` runs LiteRT's own kernels.

Reference: LiteRT post-training quantization guide (representative dataset,
`TFLITE_BUILTINS_INT8`, `inference_input_type`).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import tempfile
import time
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from sokd_tf.data.info import DatasetInfo
from sokd_tf.errors import ExportError
from sokd_tf.export.preprocess import check_images, normalize_pixels

POST_TRAINING_VARIANTS = ("fp32", "fp16", "dynamic_int8", "int8", "int8_float_io")
FULL_INTEGER_VARIANTS = ("int8", "int8_float_io", "qat_int8")
INPUT_NAME = "pixels"


def raw_pixel_saved_model(model: Callable, info: DatasetInfo, path: str) -> str:
    """Writes a SavedModel of `model` behind the folded normalisation, for conversion.

    Its `serving_default` maps float32 raw pixels `[batch, H, W, C]` in [0, 255] to
    `logits`. Converting from a SavedModel (rather than a concrete function) embeds the
    weights as constants for Keras 3 and tf_keras models alike.
    """
    spec = tf.TensorSpec((None, *info.raw_image_shape), tf.float32, name=INPUT_NAME)

    def predict(pixels):
        logits = model(normalize_pixels(pixels, info), training=False)
        return {"logits": tf.cast(logits, tf.float32)}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", predict, input_signature=[spec])
    archive.write_out(path, verbose=False)
    return path


def representative_images(images_uint8: np.ndarray, info: DatasetInfo, size: int, *,
                          seed: int = 0) -> np.ndarray:
    """The calibration images: `size` seeded-random raw training images, float32 0-255.

    Raises:
      ExportError: empty or wrong-shape images.
    """
    images = check_images(images_uint8, info, "representative dataset (training images)")
    order = np.random.default_rng(seed).permutation(len(images))[: min(size, len(images))]
    return images[np.sort(order)].astype(np.float32)


def representative_dataset(images_uint8: np.ndarray, info: DatasetInfo, size: int, *, seed: int = 0):
    """Calibration generator over `representative_images` (one image per call).

    Raises:
      ExportError: empty or wrong-shape images.
    """
    chosen = representative_images(images_uint8, info, size, seed=seed)

    def generate():
        for image in chosen:
            yield [image[None]]

    return generate


def convert_tflite(
    variant: str,
    model: Callable,
    info: DatasetInfo,
    *,
    representative_images_uint8: np.ndarray | None = None,
    representative_size: int = 500,
) -> bytes:
    """Converts `model` (normalised images -> logits) into one raw-pixel LiteRT variant.

    Args:
      variant: one of `POST_TRAINING_VARIANTS`, or `qat_int8` with `model` a
        quantization-aware tf_keras model (see `qat.py`).
      model: callable on normalised `[batch, H, W, C]` float32 images returning logits
        (a Keras 3 student, or the tf_keras QAT student for `qat_int8`).
      info: dataset facts; the normalisation is folded into the graph.
      representative_images_uint8: `[n, H, W, C]` raw training images; required by the
        full-integer variants.
      representative_size: calibration images drawn from them.

    Returns:
      The .tflite flatbuffer.

    Raises:
      ExportError: unknown variant, missing/empty/wrong-shape representative dataset, or
        a model the converter rejects with builtin ops only.
    """
    if variant not in (*POST_TRAINING_VARIANTS, "qat_int8"):
        raise ExportError(f"unknown TFLite variant {variant!r}")
    full_integer = variant in FULL_INTEGER_VARIANTS
    generate = None
    if full_integer:
        generate = representative_dataset(representative_images_uint8, info, representative_size)

    with tempfile.TemporaryDirectory(prefix="sokd-tflite-") as staging:
        converter = tf.lite.TFLiteConverter.from_saved_model(
            raw_pixel_saved_model(model, info, os.path.join(staging, "model"))
        )
        _configure(converter, variant, generate)
        try:
            return converter.convert()
        except Exception as err:  # the converter raises ConverterError and plain errors
            raise ExportError(f"TFLite conversion of variant {variant!r} failed: {err}") from err


def _configure(converter, variant: str, generate) -> None:
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    full_integer = variant in FULL_INTEGER_VARIANTS
    if variant != "fp32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == "fp16":
        converter.target_spec.supported_types = [tf.float16]
    if full_integer:
        converter.representative_dataset = generate
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if variant in ("int8", "qat_int8"):
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.uint8


def write_tflite(flatbuffer: bytes, path: str) -> str:
    """Writes `flatbuffer` to `path` via a temporary file and an atomic rename."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    staging = f"{path}.tmp-{os.getpid()}"
    with open(staging, "wb") as f:
        f.write(flatbuffer)
    os.replace(staging, path)
    return path


# How LiteRT's CPU kernels are chosen: "xnnpack" (the default delegate, as apps get it),
# "xnnpack_latest" (the same with its newest operators on, e.g. dynamic-range int8
# kernels) or "builtin" (LiteRT's own kernels, no default delegate).
DELEGATES = ("xnnpack", "xnnpack_latest", "builtin")


def _interpreter(path: str, *, num_threads: int = 1, delegate: str = "xnnpack"):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    if delegate not in DELEGATES:
        raise ExportError(f"LiteRT delegate must be one of {list(DELEGATES)}, got {delegate!r}")
    resolver = (OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES if delegate == "builtin"
                else OpResolverType.AUTO)
    return Interpreter(
        model_path=path, num_threads=num_threads, experimental_op_resolver_type=resolver,
        experimental_default_delegate_latest_features=delegate == "xnnpack_latest",
    )


@dataclasses.dataclass(frozen=True)
class GraphOp:
    """One op of a .tflite graph: its type and the element types of its tensors."""

    index: int
    op_name: str
    input_dtypes: tuple[str, ...]
    output_dtypes: tuple[str, ...]
    reads_graph_input: bool
    writes_graph_output: bool


def graph_ops(path: str) -> list[GraphOp]:
    """The ops of a .tflite file in execution order, as converted (before any delegate)."""
    interpreter = _interpreter(path, delegate="builtin")
    tensors = interpreter.get_tensor_details()
    inputs = {detail["index"] for detail in interpreter.get_input_details()}
    outputs = {detail["index"] for detail in interpreter.get_output_details()}

    def dtypes(indices):
        return tuple(np.dtype(tensors[i]["dtype"]).name for i in indices if i >= 0)

    return [
        GraphOp(
            index=op["index"],
            op_name=op["op_name"],
            input_dtypes=dtypes(op["inputs"]),
            output_dtypes=dtypes(op["outputs"]),
            reads_graph_input=bool(inputs & set(op["inputs"])),
            writes_graph_output=bool(outputs & set(op["outputs"])),
        )
        for op in interpreter._get_ops_details()
    ]


def op_counts(path: str) -> dict[str, int]:
    """Op type -> how many, e.g. `{"CONV_2D": 9, "ADD": 7, "QUANTIZE": 2, ...}`."""
    return dict(collections.Counter(op.op_name for op in graph_ops(path)).most_common())


# Element types an int8 kernel may touch: int8 activations and weights, int32 biases and
# shape/axis operands.
_INTEGER_KERNEL_DTYPES = frozenset({"int8", "int32"})


def integer_graph_problems(path: str) -> list[str]:
    """What keeps a full-integer .tflite file from being int8 end to end ([] = nothing).

    A problem is a non-builtin op (Flex, CUSTOM), an op with a tensor other than int8 /
    int32 (a float fallback), or a QUANTIZE/DEQUANTIZE that does not convert the
    model's own input or output (an avoidable round trip inside the graph).
    """
    problems = []
    for op in graph_ops(path):
        if op.op_name.startswith("Flex") or op.op_name == "CUSTOM":
            problems.append(f"op {op.index} {op.op_name}: not a builtin op")
        elif op.op_name in ("QUANTIZE", "DEQUANTIZE"):
            if not (op.reads_graph_input or op.writes_graph_output):
                problems.append(f"op {op.index} {op.op_name}: a conversion inside the graph "
                                f"({op.input_dtypes} -> {op.output_dtypes})")
        else:
            other = sorted(set(op.input_dtypes + op.output_dtypes) - _INTEGER_KERNEL_DTYPES)
            if other:
                problems.append(f"op {op.index} {op.op_name}: {', '.join(other)} tensors "
                                f"({op.input_dtypes} -> {op.output_dtypes})")
    return problems


class LiteRTClassifier:
    """Runs a raw-pixel .tflite student with `ai_edge_litert` on raw uint8 images.

    Handles float and quantized inputs/outputs so every variant is fed the same raw
    pixels and returns float logits. `delegate` is one of `DELEGATES` (the default is
    what apps get; the others are for latency comparisons).
    """

    def __init__(self, path: str, *, num_threads: int = 1, delegate: str = "xnnpack"):
        self.path = path
        self.num_threads = num_threads
        self.delegate = delegate
        self.interpreter = _interpreter(path, num_threads=num_threads, delegate=delegate)
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self._batch = None

    @property
    def input_dtype(self) -> str:
        return np.dtype(self.input["dtype"]).name

    @property
    def input_quantization(self) -> tuple[float, int]:
        """(scale, zero_point) of the input; (0.0, 0) for float inputs."""
        scale, zero_point = self.input["quantization"]
        return float(scale), int(zero_point)

    def _resize(self, batch: int):
        if batch != self._batch:
            shape = [batch, *self.input["shape"][1:]]
            self.interpreter.resize_tensor_input(self.input["index"], shape)
            self.interpreter.allocate_tensors()
            self._batch = batch

    def _quantize_input(self, images_uint8: np.ndarray) -> np.ndarray:
        dtype = np.dtype(self.input["dtype"])
        if dtype == np.float32:
            return images_uint8.astype(np.float32)
        scale, zero_point = self.input_quantization
        info = np.iinfo(dtype)
        quantized = np.round(images_uint8.astype(np.float32) / scale + zero_point)
        return np.clip(quantized, info.min, info.max).astype(dtype)

    def _dequantize_output(self, values: np.ndarray) -> np.ndarray:
        if np.dtype(self.output["dtype"]) == np.float32:
            return values
        scale, zero_point = self.output["quantization"]
        return (values.astype(np.float32) - zero_point) * scale

    def logits(self, images_uint8: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
        """Float logits `[n, num_classes]` of raw images `[n, H, W, C]`."""
        outputs = []
        for start in range(0, len(images_uint8), batch_size):
            batch = self._quantize_input(images_uint8[start : start + batch_size])
            self._resize(len(batch))
            self.interpreter.set_tensor(self.input["index"], batch)
            self.interpreter.invoke()
            outputs.append(self._dequantize_output(self.interpreter.get_tensor(self.output["index"])))
        return np.concatenate(outputs, axis=0)

    def latency_ms(self, image_uint8: np.ndarray, *, runs: int, warmup_runs: int = 10) -> float:
        """Median wall time in ms of one single-image `invoke()` over `runs` runs."""
        batch = self._quantize_input(image_uint8[None])
        self._resize(1)
        self.interpreter.set_tensor(self.input["index"], batch)
        for _ in range(warmup_runs):
            self.interpreter.invoke()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            self.interpreter.invoke()
            times.append(time.perf_counter() - start)
        return float(np.median(times) * 1000.0)


def evaluate_tflite(
    path: str,
    images_uint8: np.ndarray,
    labels: np.ndarray,
    *,
    reference_classes: np.ndarray | None = None,
    latency_runs: int = 200,
) -> dict:
    """Top-1, agreement with the Keras student, size and single-image latency of a file.

    Args:
      path: .tflite file.
      images_uint8: `[n, H, W, C]` raw test images.
      labels: `[n]` integer labels.
      reference_classes: `[n]` Keras student's predicted classes (for agreement).
      latency_runs: timed single-image invocations (1 thread); the median is reported.

    Returns:
      Dict with `file`, `size_bytes`, `top1`, `agreement` (None without reference),
      `latency_ms_median`, `latency_runs`, `input_dtype`, `input_quantization`,
      `num_examples`, `op_counts`.
    """
    classifier = LiteRTClassifier(path, num_threads=1)
    classes = np.argmax(classifier.logits(images_uint8), axis=-1)
    labels = np.asarray(labels).reshape(-1)
    agreement = None
    if reference_classes is not None:
        agreement = float(np.mean(classes == np.asarray(reference_classes)))
    scale, zero_point = classifier.input_quantization
    return {
        "file": os.path.basename(path),
        "size_bytes": os.path.getsize(path),
        "top1": float(np.mean(classes == labels)),
        "agreement": agreement,
        "latency_ms_median": classifier.latency_ms(images_uint8[0], runs=latency_runs),
        "latency_runs": latency_runs,
        "input_dtype": classifier.input_dtype,
        "input_quantization": {"scale": scale, "zero_point": zero_point},
        "num_examples": int(len(labels)),
        "op_counts": op_counts(path),
    }


def keras_classes(student: keras.Model, images_uint8: np.ndarray, info: DatasetInfo) -> np.ndarray:
    """The Keras student's predicted classes `[n]` on raw images `[n, H, W, C]`."""
    from sokd_tf.export.preprocess import normalize_numpy

    logits = student.predict(normalize_numpy(images_uint8, info), batch_size=256, verbose=0)
    return np.argmax(logits, axis=-1)
