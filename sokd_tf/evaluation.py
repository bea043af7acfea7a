"""Top-1/top-5 evaluation of any saved model on a dataset split."""

from __future__ import annotations

import os

import keras
import numpy as np

from sokd_tf.models import fused_batch_norm  # noqa: F401  (registers the layer for load_model)
from sokd_tf.errors import UserError


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


def load_model(path: str) -> keras.Model:
    """Loads a `.keras` model (safe mode on); a missing or bad file raises UserError."""
    if not os.path.exists(path):
        raise UserError(f"model file {path!r} does not exist")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as error:  # Keras raises many types for a bad file.
        raise UserError(f"cannot load model {path!r}: {error}") from None
