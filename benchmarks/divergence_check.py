"""Cost of the divergence check on a quickstart-sized training step.

The quickstart's step (Fashion-MNIST-shaped random images 28x28x1, batch 128, 10
classes; SOKD WRN-16-1 -> WRN-10-1, and the vanilla WRN-10-1 student, the cheapest step
and so the largest relative cost) is timed twice, in alternating windows of the same
process:

- checked: the library's step (`finite_checks` updated in the step, gradient norms per
  role) plus `DivergenceCheck.on_train_batch_end` after every step, as `fit` runs it;
- unchecked: the same step without either (the step as it was before the check).

The timed call is what `Model.fit` runs (`make_train_function()`); warm-up excluded.
Reported: median wall time per step of each; the median of the paired per-window ratios
of process CPU time (pairing cancels the drift of a shared machine, CPU time its
preemption); and, because a 1 % difference drowns in the noise of a shared machine, the
two added costs measured alone: the callback's read after a step, and the check's extra
ops (term means, per-role gradient norms, the sticky update) in their own `tf.function`
(an upper bound of what they add inside the fused step), as a fraction of the step.

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
from sokd_tf.distillers.finite_checks import FiniteChecks
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


def _window(function, check, iterator, steps) -> tuple[float, float]:
    """(wall, process CPU) seconds per step over `steps` steps."""
    wall, cpu = time.perf_counter(), time.process_time()
    for step in range(steps):
        logs = function(iterator)
        if check is not None:
            check.on_train_batch_end(step)
    float(keras.ops.convert_to_numpy(logs["loss"]))  # waits for the last step
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def _per_call(function, repeats) -> float:
    function()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats


def _components(trainer, check, repeats=300) -> tuple[float, float]:
    """Seconds per step of (the callback's read, the check's extra ops in the step).

    The extra ops run alone in their own `tf.function` on tensors shaped like one step's
    terms and gradients, minus an empty function's call: an upper bound of what they add
    inside the fused step.
    """
    read = _per_call(lambda: check.on_train_batch_end(0), repeats)
    role_gradients = {
        role: [tf.random.normal(v.shape) for v in model.trainable_variables]
        for role, model in trainer.role_models.items()
    }
    terms = {name: tf.random.uniform((BATCH,)) for name in trainer.finite_checks.term_names}
    checks = FiniteChecks(trainer.finite_checks.term_names, list(role_gradients))

    @tf.function
    def extra():
        checks.update_state(terms, {r: tf.linalg.global_norm(g) for r, g in role_gradients.items()})
        return checks.result()

    @tf.function
    def empty():
        return checks.result()

    in_step = max(0.0, _per_call(extra, repeats) - _per_call(empty, repeats))
    return read, in_step


def measure(method: str, steps: int, windows: int) -> dict:
    rng = np.random.default_rng(0)
    batch = (
        rng.normal(size=(BATCH, *IMAGE_SHAPE)).astype("float32"),
        rng.integers(0, NUM_CLASSES, BATCH).astype("int32"),
    )
    iterator = iter(tf.data.Dataset.from_tensors(batch).repeat())
    runs, trainers = {}, {}
    for checked in (True, False):
        trainer = _trainer(method, checked)
        trainer.make_train_function()
        check = None
        if checked:
            roles = list(trainer.role_models)
            check = divergence.DivergenceCheck(
                "benchmark", tempfile.mkdtemp(), tf.distribute.get_strategy(),
                lambda term, roles=roles: divergence.likely_fix(TrainConfig(), roles, term),
            )
            check.set_model(trainer)
            check.on_train_begin()
        runs[checked] = (trainer.train_function, check)
        trainers[checked] = trainer
        _window(*runs[checked], iterator, 5)  # trace and warm up
    walls = {True: [], False: []}
    cpus = {True: [], False: []}
    ratios = []
    for index in range(windows):
        order = (True, False) if index % 2 == 0 else (False, True)
        window = {checked: _window(*runs[checked], iterator, steps) for checked in order}
        for checked, (wall, cpu) in window.items():
            walls[checked].append(wall)
            cpus[checked].append(cpu)
        ratios.append(window[True][1] / window[False][1])
    read, in_step = _components(trainers[True], runs[True][1])
    step = statistics.median(walls[False])
    return {
        "method": method,
        "unchecked_ms": 1000 * step,
        "checked_ms": 1000 * statistics.median(walls[True]),
        "cpu_ratio_percent": 100 * (statistics.median(ratios) - 1),
        "cpu_ratio_range": (min(ratios), max(ratios)),
        "read_us": 1e6 * read,
        "in_step_us": 1e6 * in_step,
        "components_percent": 100 * (read + in_step) / step,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="vanilla,sokd")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=15, help="timed windows per variant")
    args = parser.parse_args()
    print("| step | unchecked (ms) | checked (ms) | paired CPU-time ratio | callback read (µs) "
          "| extra ops in the step (µs) | read + ops / step |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for method in args.methods.split(","):
        r = measure(method, args.steps, args.windows)
        low, high = r["cpu_ratio_range"]
        print(f"| {method}, batch {BATCH} | {r['unchecked_ms']:.1f} | {r['checked_ms']:.1f} | "
              f"{r['cpu_ratio_percent']:+.1f} % ({low:.2f}–{high:.2f}) | {r['read_us']:.0f} | "
              f"{r['in_step_us']:.0f} | {r['components_percent']:.2f} % |", flush=True)


if __name__ == "__main__":
    main()
