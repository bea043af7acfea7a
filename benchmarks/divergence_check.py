"""Cost of the divergence check on a quickstart-sized training step.

The quickstart's step (Fashion-MNIST-shaped random images 28x28x1, batch 128, 10
classes; SOKD WRN-16-1 -> WRN-10-1, and the vanilla WRN-10-1 student, the cheapest step
and so the largest relative cost) is timed twice, in alternating windows of the same
process:

- checked: the library's step (`finite_checks` updated in the step, gradient norms per
  role) plus `DivergenceCheck.on_train_batch_end` after every step, as `fit` runs it;
- unchecked: the same step without either (the step as it was before the check).

The timed call is what `Model.fit` runs (`make_train_function()`); warm-up excluded.
Reported: median step time of each, and the median of the paired per-window ratios
(pairing cancels the drift of a shared machine).

Usage (from the repository root):
  python benchmarks/divergence_check.py [--methods=vanilla,sokd] [--steps=20] [--windows=15]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from sokd_tf import distillers, models
from sokd_tf.config import TrainConfig
from sokd_tf.distillers import optimization
from sokd_tf.models import peer as peer_lib
from sokd_tf.stages import divergence

IMAGE_SHAPE, NUM_CLASSES, BATCH = (28, 28, 1), 10, 128


def _unchecked_apply(optimizer, tape, scaled_loss, role_variables):
    """`optimization.apply_role_gradients` without the gradient norms."""
    recipe = optimization.recipe_optimizer(optimizer)
    variables = [v for role_vars in role_variables.values() for v in role_vars]
    gradients = iter(tape.gradient(scaled_loss, variables))
    adjusted = []
    for role, role_vars in role_variables.items():
        scale = recipe.role_learning_rate_scales.get(role, 1.0)
        for variable in role_vars:
            gradient = next(gradients) + ops.multiply(variable, recipe.coupled_weight_decay)
            adjusted.append(gradient * scale if scale != 1.0 else gradient)
    optimizer.apply_gradients(zip(adjusted, variables, strict=True))


def _unchecked(trainer_class):
    class Unchecked(trainer_class):
        def train_step(self, data):
            images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
            with tf.GradientTape() as tape:
                terms, logits = self.forward(images, labels, training=True)
                scaled_loss = self.optimizer.scale_loss(self.total_loss(terms, labels))
            _unchecked_apply(
                self.optimizer, tape, scaled_loss,
                {role: model.trainable_variables for role, model in self.role_models.items()},
            )
            return self.update_metrics(terms, labels, logits)

    return Unchecked


def _trainer(method: str, checked: bool):
    keras.utils.set_random_seed(0)
    student = models.build("wrn_10_1", IMAGE_SHAPE, NUM_CLASSES, model_name="student")
    if method == "vanilla":
        cls = distillers.VanillaTrainer if checked else _unchecked(distillers.VanillaTrainer)
        trainer = cls(student, role="student")
    else:
        teacher = models.build("wrn_16_1", IMAGE_SHAPE, NUM_CLASSES, model_name="teacher")
        peer = peer_lib.build_peer(teacher, init="fresh")
        weights = {"peer/ce": 1.0, "peer/kd_from_teacher": 1.0, "peer/ml_from_student": 1.0,
                   "student/ce": 1.0, "student/ml_from_peer": 1.0}
        cls = distillers.SemiOnlineDistiller
        trainer = (cls if checked else _unchecked(cls))(
            teacher, peer, student, temperature=4.0, weights=weights
        )
    trainer.compile(optimizer=distillers.make_optimizer(TrainConfig(), 100))
    return trainer


def _window(function, check, batch, steps) -> float:
    start = time.perf_counter()
    for step in range(steps):
        function(iter([batch]))
        if check is not None:
            check.on_train_batch_end(step)
    return (time.perf_counter() - start) / steps


def measure(method: str, steps: int, windows: int) -> dict:
    rng = np.random.default_rng(0)
    batch = (
        tf.constant(rng.normal(size=(BATCH, *IMAGE_SHAPE)).astype("float32")),
        tf.constant(rng.integers(0, NUM_CLASSES, BATCH).astype("int32")),
    )
    runs = {}
    for checked in (True, False):
        trainer = _trainer(method, checked)
        function = trainer.make_train_function()
        check = None
        if checked:
            fix = lambda term: divergence.likely_fix(TrainConfig(), ["student"], term)  # noqa: E731
            check = divergence.DivergenceCheck(
                "benchmark", tempfile.mkdtemp(), tf.distribute.get_strategy(), fix
            )
            check.set_model(trainer)
            check.on_train_begin()
        _window(function, check, batch, 5)  # trace and warm up
        runs[checked] = (function, check)
    times = {True: [], False: []}
    ratios = []
    for index in range(windows):
        order = (True, False) if index % 2 == 0 else (False, True)
        window = {checked: _window(*runs[checked], batch, steps) for checked in order}
        for checked, seconds in window.items():
            times[checked].append(seconds)
        ratios.append(window[True] / window[False])
    checked_ms = 1000 * statistics.median(times[True])
    unchecked_ms = 1000 * statistics.median(times[False])
    overhead = 100 * (statistics.median(ratios) - 1)
    return {"method": method, "checked_ms": checked_ms, "unchecked_ms": unchecked_ms,
            "overhead_percent": overhead,
            "ratio_range": (min(ratios), max(ratios))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="vanilla,sokd")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=15, help="timed windows per variant")
    args = parser.parse_args()
    print("| step | unchecked (ms) | checked (ms) | overhead (median paired ratio) |")
    print("|---|---:|---:|---:|")
    for method in args.methods.split(","):
        result = measure(method, args.steps, args.windows)
        low, high = result["ratio_range"]
        print(f"| {method} batch {BATCH} | {result['unchecked_ms']:.1f} | {result['checked_ms']:.1f} | "
              f"{result['overhead_percent']:+.2f} % (ratios {low:.3f}–{high:.3f}) |", flush=True)


if __name__ == "__main__":
    main()
