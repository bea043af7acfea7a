"""Batch prediction with an exported student on Apache Beam, with a dead-letter output.

    output/predictions-SSSSS-of-NNNNN.jsonl   {"key", "class", "class_name", "probabilities"}
    output/dead_letter-SSSSS-of-NNNNN.jsonl   {"key", "reason", "record_base64"}

Input: TFRecord globs (GZIP when a file name ends in `.gz`, as ExampleGen writes) of
serialized tf.Examples carrying the encoded image under `image/encoded`. The model is the
student's TF Serving SavedModel (`sokd_tf.export`), run through Beam's `RunInference`
with tfx-bsl's SavedModel model handler on the `predict_examples` signature (it loads
the signature without Keras, as TF Serving would).

Nothing is dropped silently and no single record fails the job:
  1. a file whose TFRecord framing is corrupt yields its readable records, then one
     dead letter for the unreadable rest (reason: the reader's error);
  2. each record is checked before inference: it must parse as a tf.Example, hold
     exactly one bytes value under the image key, and that value must decode as an
     image (and carry the key feature, when one is named); failures are dead letters
     with the reason and the record itself (base64), so they can be fixed and re-run;
  3. a batch that still fails inside the model is retried record by record, and a
     record that fails alone is a dead letter with the model's error.
Counters (namespace `sokd_tf.batch_predict`): `records_read`, `predictions_written`,
`dead_lettered`, `unreadable_file_tails`; `records_read + unreadable_file_tails ==
predictions_written + dead_lettered`.

Keys: `<file>:<record index>` by default, or the value of a named feature
(`key_feature`), so predictions join back to their inputs.

Reference: docs/BATCH.md, "batch_predict".
"""

from __future__ import annotations

import base64
import json
import os

import apache_beam as beam
import numpy as np
import tensorflow as tf
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from google.protobuf.message import DecodeError

from sokd_tf.beam.options import counter_values, pipeline_options
from sokd_tf.data import tfrecord
from sokd_tf.errors import DataError, ExportError
from sokd_tf.export.saved_model import CLASS_NAMES_ASSET
from sokd_tf.export.serving import EXAMPLES_SIGNATURE

NAMESPACE = "sokd_tf.batch_predict"
PREDICTIONS_PREFIX = "predictions"
DEAD_LETTER_PREFIX = "dead_letter"
JSONL_SUFFIX = ".jsonl"
_DEAD = "dead_letter"


def _dead_letter(key: str, reason: str, record: bytes) -> dict:
    return {"key": key, "reason": reason,
            "record_base64": base64.b64encode(record).decode("ascii")}


def _first_line(error: Exception) -> str:
    message = getattr(error, "message", None) or str(error)
    return f"{type(error).__name__}: {message.strip().splitlines()[0] if message.strip() else ''}"


class ReadRecords(beam.DoFn):
    """A TFRecord file path -> `(key, serialized record)`; an unreadable rest -> dead letter."""

    def __init__(self):
        self._read = beam.metrics.Metrics.counter(NAMESPACE, "records_read")
        self._tails = beam.metrics.Metrics.counter(NAMESPACE, "unreadable_file_tails")

    def process(self, path: str):
        index = 0
        try:
            records = tf.data.TFRecordDataset(
                path, compression_type=tfrecord.compression_type([path]))
            for record in records.as_numpy_iterator():
                self._read.inc()
                yield f"{path}:{index}", record
                index += 1
        except tf.errors.OpError as error:
            self._tails.inc()
            yield beam.pvalue.TaggedOutput(_DEAD, _dead_letter(
                f"{path}:{index}",
                f"corrupt or truncated TFRecord file: records from {index} on are unreadable "
                f"({_first_line(error)})", b""))


class ValidateExample(beam.DoFn):
    """Passes `(key, record)` on when the model can read it, else a dead letter with why."""

    def __init__(self, image_key: str, key_feature: str | None):
        self._image_key = image_key
        self._key_feature = key_feature

    def process(self, element):
        key, record = element
        try:
            example = tf.train.Example.FromString(record)
        except DecodeError as error:
            yield beam.pvalue.TaggedOutput(_DEAD, _dead_letter(
                key, f"not a serialized tf.Example ({_first_line(error)})", record))
            return
        features = example.features.feature
        image = features.get(self._image_key)
        values = list(image.bytes_list.value) if image is not None else []
        if len(values) != 1:
            present = sorted(features.keys())
            yield beam.pvalue.TaggedOutput(_DEAD, _dead_letter(
                key, f"expected one encoded image (bytes) under {self._image_key!r}, found "
                     f"{len(values)} value(s); features present: {present}", record))
            return
        try:
            tf.io.decode_image(values[0], expand_animations=False)
        except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as error:
            yield beam.pvalue.TaggedOutput(_DEAD, _dead_letter(
                key, f"undecodable image under {self._image_key!r} ({_first_line(error)})",
                record))
            return
        if self._key_feature is not None:
            value = _feature_value(features.get(self._key_feature))
            if value is None:
                yield beam.pvalue.TaggedOutput(_DEAD, _dead_letter(
                    key, f"missing key feature {self._key_feature!r} (expected one value)",
                    record))
                return
            key = value
        yield key, record


def _feature_value(feature):
    if feature is None:
        return None
    kind = feature.WhichOneof("kind")
    values = list(getattr(feature, kind).value) if kind else []
    if len(values) != 1:
        return None
    value = values[0]
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else value


class FormatPrediction(beam.DoFn):
    """`(key, PredictionLog)` -> one JSON line."""

    def __init__(self, class_names: list[str]):
        self._class_names = class_names
        self._written = beam.metrics.Metrics.counter(NAMESPACE, "predictions_written")

    def process(self, element):
        key, log = element
        outputs = log.predict_log.response.outputs
        probabilities = tf.make_ndarray(outputs["probabilities"]).reshape(-1)
        predicted = int(np.asarray(tf.make_ndarray(outputs["classes"])).reshape(-1)[0])
        line = {"key": key, "class": predicted,
                "class_name": (self._class_names[predicted]
                               if predicted < len(self._class_names) else str(predicted)),
                "probabilities": [float(p) for p in probabilities]}
        self._written.inc()
        yield json.dumps(line)


class FormatDeadLetter(beam.DoFn):
    def __init__(self):
        self._dead = beam.metrics.Metrics.counter(NAMESPACE, "dead_lettered")

    def process(self, letter: dict):
        self._dead.inc()
        yield json.dumps(letter)


def _failed_elements(failure):
    """Elements of a failed RunInference batch: `(batch, error)` -> each `(key, record)`."""
    batch, _ = failure
    yield from batch


def _inference_dead_letter(failure):
    """A record that failed inference alone -> dead letter with the model's error."""
    batch, error = failure
    reason = error[1] if isinstance(error, tuple) and len(error) > 1 else str(error)
    reason = str(reason).strip().splitlines()[0] if str(reason).strip() else repr(error)
    for key, record in batch:
        yield _dead_letter(key, f"inference failed: {reason}", record)


def _handler(saved_model: str, batch_size: int | None):
    from tfx_bsl.public.beam import run_inference
    from tfx_bsl.public.proto import model_spec_pb2

    spec = model_spec_pb2.InferenceSpecType(saved_model_spec=model_spec_pb2.SavedModelSpec(
        model_path=saved_model, signature_name=[EXAMPLES_SIGNATURE]))
    if batch_size is not None:
        spec.batch_parameters.min_batch_size = 1
        spec.batch_parameters.max_batch_size = batch_size
    try:
        return KeyedModelHandler(run_inference.CreateModelHandler(spec))
    except (ValueError, OSError, tf.errors.OpError) as error:
        raise ExportError(f"{saved_model}: cannot serve the {EXAMPLES_SIGNATURE!r} signature "
                          f"({_first_line(error)}); expected a student SavedModel written by "
                          f"sokd_tf's export") from None


def class_names(saved_model: str) -> list[str]:
    """The class names shipped in the SavedModel's assets (empty when absent)."""
    path = os.path.join(saved_model, "assets", CLASS_NAMES_ASSET)
    if not tf.io.gfile.exists(path):
        return []
    with tf.io.gfile.GFile(path) as handle:
        return [line.rstrip("\n") for line in handle]


def input_files(patterns: str | list[str]) -> list[str]:
    """Sorted files matching comma-separated globs.

    Raises:
      DataError: a pattern matches nothing.
    """
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p]
    files = set()
    for pattern in patterns:
        matched = [path for path in tf.io.gfile.glob(pattern) if not tf.io.gfile.isdir(path)]
        if not matched:
            raise DataError(f"--input pattern {pattern!r} matches no files")
        files.update(matched)
    return sorted(files)


def run(
    saved_model: str,
    input_patterns: str | list[str],
    output_dir: str,
    *,
    image_key: str = tfrecord.IMAGE_KEY,
    key_feature: str | None = None,
    batch_size: int | None = None,
    validate: bool = True,
    beam_args: tuple[str, ...] | list[str] = (),
) -> dict:
    """Runs batch prediction; returns the output files and the job's counters.

    Args:
      saved_model: a student SavedModel version directory (with `predict_examples`).
      input_patterns: TFRecord glob(s), a list or comma-separated.
      output_dir: where `predictions-*.jsonl` and `dead_letter-*.jsonl` go; must not hold
        predictions already.
      image_key: the tf.Example feature the model reads the encoded image from (the
        exported signature reads `image/encoded`).
      key_feature: feature whose value keys each prediction; None = `<file>:<index>`.
      batch_size: largest inference batch; None = Beam's adaptive batching.
      validate: check each record before inference (step 2 of the module docstring);
        without it, bad records reach the model and are caught by step 3.
      beam_args: Beam pipeline options; the in-process FnApiRunner when no runner is named.

    Returns:
      {"predictions": [paths], "dead_letter": [paths], "counters": {...}}.

    Raises:
      DataError: no input files, or predictions already in `output_dir`.
      ExportError: `saved_model` has no usable `predict_examples` signature.
    """
    files = input_files(input_patterns)
    if not tf.saved_model.contains_saved_model(saved_model):
        raise ExportError(f"{saved_model} holds no SavedModel (expected a version directory "
                          f"such as export/serving/student/1)")
    if tf.io.gfile.glob(os.path.join(output_dir, f"{PREDICTIONS_PREFIX}-*")):
        raise DataError(f"{output_dir} already holds predictions; choose a new --output")
    handler = _handler(saved_model, batch_size)
    names = class_names(saved_model)
    pipeline = beam.Pipeline(options=pipeline_options(beam_args))
    read = (pipeline
            | "Files" >> beam.Create(files)
            | "Distribute" >> beam.Reshuffle()
            | "Read" >> beam.ParDo(ReadRecords()).with_outputs(_DEAD, main="records"))
    records = read.records
    dead = [read[_DEAD]]
    if validate:
        checked = records | "Validate" >> beam.ParDo(
            ValidateExample(image_key, key_feature)).with_outputs(_DEAD, main="valid")
        records = checked.valid
        dead.append(checked[_DEAD])
    predicted, failed = records | "Predict" >> RunInference(handler).with_exception_handling()
    retried, failed_alone = (
        failed.failed_inferences
        | "FailedBatchRecords" >> beam.FlatMap(_failed_elements)
        | "PredictOneByOne" >> RunInference(_handler(saved_model, 1)).with_exception_handling())
    dead.append(failed_alone.failed_inferences
                | "InferenceDeadLetters" >> beam.FlatMap(_inference_dead_letter))
    _ = ((predicted, retried)
         | "AllPredictions" >> beam.Flatten()
         | "FormatPredictions" >> beam.ParDo(FormatPrediction(names))
         | "WritePredictions" >> beam.io.WriteToText(
             os.path.join(output_dir, PREDICTIONS_PREFIX), file_name_suffix=JSONL_SUFFIX))
    _ = (dead
         | "AllDeadLetters" >> beam.Flatten()
         | "FormatDeadLetters" >> beam.ParDo(FormatDeadLetter())
         | "WriteDeadLetters" >> beam.io.WriteToText(
             os.path.join(output_dir, DEAD_LETTER_PREFIX), file_name_suffix=JSONL_SUFFIX))
    result = pipeline.run()
    result.wait_until_finish()
    return {
        "predictions": sorted(tf.io.gfile.glob(
            os.path.join(output_dir, f"{PREDICTIONS_PREFIX}-*{JSONL_SUFFIX}"))),
        "dead_letter": sorted(tf.io.gfile.glob(
            os.path.join(output_dir, f"{DEAD_LETTER_PREFIX}-*{JSONL_SUFFIX}"))),
        "counters": counter_values(result, NAMESPACE),
    }


def read_jsonl(paths: list[str]) -> list[dict]:
    """Every JSON line of `paths` (prediction or dead-letter files), in file order."""
    rows = []
    for path in paths:
        with tf.io.gfile.GFile(path) as handle:
            rows.extend(json.loads(line) for line in handle if line.strip())
    return rows
