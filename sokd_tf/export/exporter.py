"""One call from a trained student to every deployment artifact and `report.json`.

    export_dir/serving/<model_name>/<version>/   SavedModel (TF Serving layout)
    export_dir/tflite/<variant>.tflite           LiteRT files, raw-pixel inputs
    export_dir/tflite/<variant>.model_card.json  each file's input/output contract
    export_dir/tflite/labels.txt                 class names, line i = class i
    export_dir/report.json                       sizes, accuracies, agreement, latencies

Everything is validated before anything is written, and a failure part-way removes what
this call created (the new version directory, staged .tflite files, cards and labels),
so a bad input leaves the export directory as it was.

Progress: one line per step and per variant (`[export 3/6] dynamic_int8: converted
93.7 KB`) through Python logging at INFO, logger `sokd_tf.export.exporter` (the CLI
prints them; a library user sees them after `logging.basicConfig(level=logging.INFO)`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf

from sokd_tf.config import ExportConfig
from sokd_tf.data.info import DatasetInfo
from sokd_tf.errors import ConfigError, ExportError
from sokd_tf.export import model_card, qat, saved_model, serving, tflite
from sokd_tf.export.preprocess import check_images, check_student, normalize_numpy
from sokd_tf.export.report import add_ratios
from sokd_tf.models import precision
from sokd_tf.stages import workdir as workdir_lib

logger = logging.getLogger(__name__)


def load_student(path: str) -> keras.Model:
    """Loads a student `.keras` file, turning every failure into an `ExportError`.

    Raises:
      ExportError: the file does not exist (no trained student), or is not a loadable
        Keras model (corrupt, truncated, another format).
    """
    if not os.path.isfile(path):
        raise ExportError(
            f"no trained student at {path!r}: train/distill first or pass the student's "
            ".keras file"
        )
    try:
        student = keras.saving.load_model(path, compile=False)
    except Exception as err:  # zip, h5 and deserialization errors alike
        raise ExportError(f"could not load the student {path!r} (corrupt or not a .keras "
                          f"model file): {type(err).__name__}: {err}") from err
    if not isinstance(student, keras.Model):
        raise ExportError(f"{path!r} holds a {type(student).__name__}, not a Keras model")
    return student


def check_finite_weights(student: keras.Model) -> None:
    """Refuses a model with a non-finite weight (a diverged run, whatever produced it).

    Raises:
      ExportError: naming the first variable holding nan or inf.
    """
    for variable in student.weights:
        value = keras.ops.convert_to_numpy(variable)
        if not np.all(np.isfinite(value)):
            count = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
            raise ExportError(
                f"student {student.name!r} has {count} non-finite values in {variable.path!r} "
                "(its training diverged); refusing to export it"
            )


def check_finite_outputs(student: keras.Model, images_normalized, what: str, *,
                         logits: np.ndarray | None = None) -> None:
    """Refuses a model whose logits on `images_normalized` (or given `logits`) are not finite.

    Raises:
      ExportError: naming how many of the `what` images gave nan or inf.
    """
    if logits is None:
        logits = student.predict(images_normalized, batch_size=256, verbose=0)
    finite = np.all(np.isfinite(logits), axis=-1)
    if not np.all(finite):
        raise ExportError(
            f"student {student.name!r} gives non-finite logits on {int(np.sum(~finite))} of "
            f"{len(finite)} {what} images; refusing to export it"
        )


def verify_saved_model(
    version_dir: str, images_uint8: np.ndarray, reference_logits: np.ndarray, *,
    example_limit: int = 256,
) -> dict:
    """Runs both signatures of the written SavedModel against the Keras logits.

    Returns:
      Per signature: `agreement` (class agreement with Keras), `max_abs_logit_error`,
      `num_examples`.
    """
    loaded = tf.saved_model.load(version_dir)
    results = {}
    outputs = []
    for start in range(0, len(images_uint8), 512):
        batch = tf.constant(images_uint8[start : start + 512])
        outputs.append(loaded.signatures["serving_default"](images=batch)["logits"].numpy())
    logits = np.concatenate(outputs)
    results["serving_default"] = _compare(logits, reference_logits)
    count = min(example_limit, len(images_uint8))
    examples = np.array(
        [serving.image_example(serving.encode_png(image)) for image in images_uint8[:count]],
        dtype=object,
    )
    logits = loaded.signatures[serving.EXAMPLES_SIGNATURE](examples=tf.constant(examples))
    results[serving.EXAMPLES_SIGNATURE] = _compare(
        logits["logits"].numpy(), reference_logits[:count]
    )
    return results


def _compare(logits: np.ndarray, reference_logits: np.ndarray) -> dict:
    return {
        "agreement": float(np.mean(np.argmax(logits, -1) == np.argmax(reference_logits, -1))),
        "max_abs_logit_error": float(np.max(np.abs(logits - reference_logits))),
        "num_examples": int(len(logits)),
    }


def export_student(
    student: keras.Model,
    info: DatasetInfo,
    export_dir: str,
    export_config: ExportConfig,
    *,
    train_images_uint8: np.ndarray,
    test_images_uint8: np.ndarray,
    test_labels: np.ndarray,
    source_model_file: str | None = None,
) -> dict:
    """Writes the SavedModel, every configured .tflite variant and `report.json`.

    Args:
      student: trained functional Keras 3 model, normalised images `[batch, H, W, C]`
        float32 -> logits `[batch, num_classes]`.
      info: dataset facts; the normalisation is folded into every artifact.
      export_dir: `workdir/export`.
      export_config: model name, version, variants, calibration and QAT settings.
      train_images_uint8: `[n, H, W, C]` raw training images: the representative
        dataset (`representative_size` drawn from them) and the QAT fine-tune data.
      test_images_uint8: `[m, H, W, C]` raw test images for verification.
      test_labels: `[m]` integer labels.
      source_model_file: the student's `.keras` file, named in the model cards.

    Returns:
      The report (also written to `export_dir/report.json`).

    Raises:
      ExportError: wrong student, non-finite weights or logits (on the calibration
        images or the test images), bad images or labels, an existing version, a failed
        conversion. Nothing this call created is left behind; a refused student leaves
        nothing at all (the checks run before the first write).
      DivergedError: the QAT fine-tune diverged.

    Every artifact is float32 (the integer variants quantize from it), whatever dtype
    policy the student was trained in: the student is re-typed to float32 and the export
    runs under Keras' float32 policy; the caller's global policy is restored afterwards.
    """
    check_student(student, info)
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        try:
            float32_student = precision.with_dtype_policy(student, "float32")
        except ConfigError as err:
            raise ExportError(str(err)) from err
        return _export_checked_student(
            float32_student, info, export_dir, export_config,
            train_images_uint8=train_images_uint8, test_images_uint8=test_images_uint8,
            test_labels=test_labels, source_model_file=source_model_file,
        )
    finally:
        keras.config.set_dtype_policy(previous_policy)


def _export_checked_student(
    student, info, export_dir, export_config, *, train_images_uint8, test_images_uint8,
    test_labels, source_model_file,
) -> dict:
    """`export_student` after the student check, in float32."""
    needs_training_images = any(
        v in tflite.FULL_INTEGER_VARIANTS for v in export_config.tflite_variants
    )
    if needs_training_images:
        train_images_uint8 = check_images(
            train_images_uint8, info, "representative dataset (training images)"
        )
    test_images_uint8 = check_images(test_images_uint8, info, "test images")
    test_labels = np.asarray(test_labels).reshape(-1)
    if len(test_labels) != len(test_images_uint8):
        raise ExportError(
            f"test labels ({len(test_labels)}) and test images ({len(test_images_uint8)}) "
            "differ in number"
        )
    model_dir = os.path.join(export_dir, workdir_lib.SERVING_DIR, export_config.model_name)
    # Resolve now so a taken version fails before any work.
    version = serving.next_version(model_dir, export_config.version)

    check_finite_weights(student)
    logger.info("[export] Keras student on %d test images (the reference of every check)",
                len(test_images_uint8))
    reference_logits = student.predict(
        normalize_numpy(test_images_uint8, info), batch_size=256, verbose=0
    )
    if needs_training_images:
        calibration = tflite.representative_images(
            train_images_uint8, info, export_config.representative_size
        )
        check_finite_outputs(student, normalize_numpy(calibration, info), "calibration")
    check_finite_outputs(student, None, "test", logits=reference_logits)
    reference_classes = np.argmax(reference_logits, axis=-1)
    created = []
    os.makedirs(export_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tmp-export-", dir=export_dir)
    try:
        version_dir = saved_model.export_saved_model(
            student, info, os.path.join(export_dir, workdir_lib.SERVING_DIR), export_config.model_name,
            version=version, warmup_images_uint8=test_images_uint8[:8],
        )
        created.append(version_dir)
        verification = verify_saved_model(version_dir, test_images_uint8, reference_logits)
        logger.info(
            "[export] SavedModel %s/%s: both signatures verified (class agreement %s)",
            export_config.model_name, version,
            ", ".join(f"{name} {100 * record['agreement']:.2f}%" for name, record in verification.items()),
        )
        report = {
            "model_name": export_config.model_name,
            "version": version,
            "dataset": info.name,
            "num_test_examples": int(len(test_labels)),
            "keras": {"top1": float(np.mean(reference_classes == test_labels))},
            "saved_model": {
                "path": version_dir,
                "signatures": ["serving_default", serving.EXAMPLES_SIGNATURE],
                "inputs": {
                    "serving_default": f"{serving.IMAGES_INPUT}: uint8 [batch, "
                    f"{', '.join(map(str, info.raw_image_shape))}] raw pixels",
                    serving.EXAMPLES_SIGNATURE: f"{serving.EXAMPLES_INPUT}: serialized "
                    "tf.Example strings [batch] with PNG/JPEG bytes under image/encoded",
                },
                "outputs": ["logits", "probabilities", "classes"],
                "verification": verification,
            },
            "tflite": {},
        }
        staged = _convert_variants(
            student, info, export_config, train_images_uint8, staging, report
        )
        for index, (variant, path) in enumerate(staged.items(), start=1):
            record = tflite.evaluate_tflite(
                path, test_images_uint8, test_labels,
                reference_classes=reference_classes,
                latency_runs=export_config.latency_runs,
            )
            report["tflite"][variant] = record
            logger.info(
                "[export %d/%d] %s: LiteRT top-1 %.2f%% on %d test images, agreement %.2f%%, "
                "median latency %.2f ms", index, len(staged), variant, 100 * record["top1"],
                record["num_examples"], 100 * record["agreement"], record["latency_ms_median"],
            )
        add_ratios(report)
        staged_names = _stage_cards(student, info, export_config, staged, report, staging,
                                    source_model_file)
        tflite_dir = os.path.join(export_dir, workdir_lib.TFLITE_DIR)
        os.makedirs(tflite_dir, exist_ok=True)
        for name in staged_names:
            os.replace(os.path.join(staging, name), os.path.join(tflite_dir, name))
        for variant in staged:
            report["tflite"][variant].update(
                path=os.path.join(tflite_dir, f"{variant}.tflite"),
                model_card=os.path.join(tflite_dir, model_card.model_card_name(variant)),
                labels=os.path.join(tflite_dir, model_card.LABELS_FILE),
            )
        workdir_lib.write_json(os.path.join(export_dir, workdir_lib.EXPORT_REPORT), report)
        logger.info("[export] done: %d LiteRT file(s) in %s, report %s", len(staged), tflite_dir,
                    os.path.join(export_dir, workdir_lib.EXPORT_REPORT))
    except BaseException:
        for path in created:
            shutil.rmtree(path, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _stage_cards(student, info, export_config, staged, report, staging, source_model_file):
    """Writes labels.txt and a model card per staged variant; returns every staged name."""
    source = {
        "name": student.name,
        "parameters": int(student.count_params()),
        "file": os.path.basename(source_model_file) if source_model_file else None,
    }
    def write_labels(tmp):
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(model_card.labels_text(info))

    workdir_lib.atomic_write(os.path.join(staging, model_card.LABELS_FILE), write_labels)
    names = [model_card.LABELS_FILE]
    for variant, path in staged.items():
        card = model_card.model_card(
            path, variant, info, model_name=export_config.model_name, source_model=source,
            evaluation=report["tflite"][variant],
        )
        workdir_lib.write_json(os.path.join(staging, model_card.model_card_name(variant)), card)
        names += [os.path.basename(path), model_card.model_card_name(variant)]
    return names


def _convert_variants(student, info, export_config, train_images_uint8, staging, report):
    staged = {}
    variants = export_config.tflite_variants
    for index, variant in enumerate(variants, start=1):
        step = f"[export {index}/{len(variants)}] {variant}"
        model = student
        if variant == "qat_int8":
            logger.info("%s: quantization-aware fine-tune (%s epoch(s), at most %s steps of %d "
                        "images)", step, export_config.qat_epochs,
                        export_config.qat_max_steps or "all", export_config.qat_batch_size)
            model, report["qat"] = qat.quantization_aware_finetune(
                student, info, train_images_uint8,
                epochs=export_config.qat_epochs,
                learning_rate=export_config.qat_learning_rate,
                batch_size=export_config.qat_batch_size,
                max_steps=export_config.qat_max_steps,
            )
            logger.info("%s: fine-tuned %d steps (final loss %s)", step, report["qat"]["steps"],
                        _format_loss(report["qat"]["final_loss"]))
        logger.info("%s: converting", step)
        flatbuffer = tflite.convert_tflite(
            variant, model, info,
            representative_images_uint8=train_images_uint8,
            representative_size=export_config.representative_size,
        )
        staged[variant] = tflite.write_tflite(
            flatbuffer, os.path.join(staging, f"{variant}.tflite")
        )
        logger.info("%s: converted %.1f KB", step, os.path.getsize(staged[variant]) / 1024)
    return staged


def _format_loss(loss: float | None) -> str:
    return "none: no steps" if loss is None else f"{loss:.4f}"

