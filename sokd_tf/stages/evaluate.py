"""Evaluate stage: top-1/top-5 of any saved model, and of every model a run saved."""

from __future__ import annotations

import os

import keras
import numpy as np

from sokd_tf.config import ModelConfig, RunConfig
from sokd_tf.data import ImageDataset
from sokd_tf.data.records import data_errors
from sokd_tf.errors import ConfigError
from sokd_tf.models import specs
from sokd_tf.stages import teacher
from sokd_tf.stages import workdir as workdir_lib


def evaluate_model(model: keras.Model, data) -> dict[str, float]:
    """Top-1 and top-5 accuracy (top-5 only with more than 5 classes) of a logits model.

    Args:
      model: images `[batch, H, W, C]` -> logits `[batch, num_classes]`.
      data: finite dataset of `(images, labels)` batches.

    Returns:
      {"top1": float, "top5": float (when num_classes > 5), "examples": int}.
    """
    num_classes = model.output_shape[-1]
    top1 = keras.metrics.SparseCategoricalAccuracy()
    top5 = keras.metrics.SparseTopKCategoricalAccuracy(k=5) if num_classes > 5 else None
    with data_errors():
        logits = model.predict(data.map(lambda images, labels: images), verbose=0)
        labels = np.concatenate([labels for _, labels in data.as_numpy_iterator()])
    top1.update_state(labels, logits)
    if top5 is not None:
        top5.update_state(labels, logits)
    examples = int(labels.shape[0])
    results = {"top1": float(top1.result()), "examples": examples}
    if top5 is not None:
        results["top5"] = float(top5.result())
    return results


def load_model(path: str, model_config: ModelConfig | None = None) -> keras.Model:
    """Loads a `.keras` model in Keras' safe mode (see `models.specs.load_keras_file`).

    `model_config`'s `trust_custom_code` / `custom_modules` apply (the run's own opt-ins
    for the user's files carry over to the checkpoints made from them).

    Raises:
      ConfigError: missing or bad file, or code / custom classes without the opt-in.
    """
    model_config = model_config or ModelConfig()
    return specs.load_keras_file(
        path, trust_custom_code=model_config.trust_custom_code,
        custom_modules=model_config.custom_modules,
    )


# Every model a run may save, in report order: (name in evaluation.json, file stem, which).
SAVED_MODELS = (
    ("teacher_best", "teacher", "best"),
    ("student_best", "student", "best"),
    ("student_last", "student", "last"),
    ("peer_best", "peer", "best"),
    ("peer_last", "peer", "last"),
    ("reconstructed_teacher_best", "reconstructed_teacher", "best"),
    ("reconstructed_teacher_last", "reconstructed_teacher", "last"),
)


def saved_models(config: RunConfig, workdir: str) -> dict[str, str]:
    """Name -> path of every model file the run saved that exists (evaluation.json's keys).

    Raises:
      ConfigError: the workdir holds none of them (nothing to evaluate).
    """
    paths = workdir_lib.Workdir(workdir)
    candidates = {"teacher": teacher.teacher_path(config, workdir) or paths.teacher_checkpoint}
    for name, stem, which in SAVED_MODELS:
        stage = paths.teacher if stem == "teacher" else paths.distill
        candidates[name] = stage.model(stem, which)
    found = {name: path for name, path in candidates.items() if os.path.exists(path)}
    if not found:
        raise ConfigError(
            f"{workdir} holds no saved model to evaluate (looked for "
            f"{os.path.relpath(paths.teacher_checkpoint, workdir)} and distill/*_best.keras, "
            f"*_last.keras): train first (`sokd-tf run` or `sokd-tf distill`) or pass "
            f"--model_path=FILE.keras"
        )
    return found


def evaluate_workdir(config: RunConfig, workdir: str, dataset: ImageDataset, *,
                     split: str = "test", models: dict[str, str] | None = None) -> dict:
    """Top-1/top-5 on `split` of every model the run saved; on "test", writes `evaluation.json`.

    The teacher file distilled from, the teacher stage's validation-best teacher, and
    every `distill/*_{best,last}.keras` that takes images (student, DML's peer, SOKD's
    reconstructed teacher; SOKD's peer takes teacher features and is evaluated as the
    reconstructed teacher), each loaded from disk. `models` is `saved_models`' answer when
    the caller has it already. `evaluation.json` holds test figures only, so another
    split is returned, not written.
    """
    paths = workdir_lib.Workdir(workdir)
    batches = dataset.eval_batches(split, config.data.eval_batch_size)
    results = {}
    for name, path in (models or saved_models(config, workdir)).items():
        model = load_model(path, config.model)
        if tuple(model.input_shape[1:]) != tuple(dataset.info.image_shape):
            continue  # SOKD's peer takes teacher features; reconstructed_teacher is its image model.
        results[name] = {"path": path, "params": model.count_params(), **evaluate_model(model, batches)}
    if split == "test":
        workdir_lib.write_json(paths.evaluation, results)
    return results
