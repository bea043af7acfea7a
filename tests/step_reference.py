"""The independent training step that tests/test_step_*.py compare the trainers with.

Nothing here calls `sokd_tf.losses` or a distiller's `forward`: the reference runs the
role models itself, writes each method's terms with plain TensorFlow ops (CE through
`log_softmax`, `T^2 * KL` by hand), takes the gradients with its own `tf.GradientTape`,
adds coupled L2 (`wd * w`) and applies the first step of PyTorch-form momentum SGD at
each role's rate (step 1: `buffer = d`, `w -= lr_role * buffer`; Nesterov:
`w -= lr_role * (d + momentum * buffer)`).

A `Case` holds role models at fixed initial weights, the reference update of every
trained variable, the BatchNorm moving statistics the reference forward left, and a
factory for the trainer under test. `real_step` runs one real `fit` step of that trainer
from the same weights; `relative_errors` compares the two updates per role.

Reference: docs/METHOD.md, "Objective", "Teacher BatchNorm", "Optimisation" and
"Baselines".
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from sokd_tf import distillers
from sokd_tf.config import TrainConfig
from sokd_tf.models import peer as peer_lib
from sokd_tf.models import wide_resnet

SHAPE = (8, 8, 3)
CLASSES = 5
BATCH = 8
TEMPERATURE = 4.0
# Distinct per-role rates and a large L2 factor, so a rate or L2 applied to the wrong
# role, or left out, moves the update far beyond TOLERANCE.
LEARNING_RATES = {"student": 0.2, "peer": 0.1, "teacher": 0.3}
WEIGHT_DECAY = 0.05
MOMENTUM = 0.9
# float32 steps agree with the reference to ~2e-6 (reduction order of the kernels).
TOLERANCE = 1e-5
# A mixed_float16 step against the float32 reference: float16 activations agree to ~2e-3.
FLOAT16_TOLERANCE = 1e-2


@contextlib.contextmanager
def dtype_policy(name: str):
    """Keras' global dtype policy set to `name` inside the block."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


@contextlib.contextmanager
def full_float32_matmuls():
    """TF32 (on recent GPUs) would round matmul inputs to 10 bits, far above TOLERANCE."""
    previous = tf.config.experimental.tensor_float_32_execution_enabled()
    tf.config.experimental.enable_tensor_float_32_execution(False)
    try:
        yield
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(previous)


def tiny_model(name: str, seed: int) -> keras.Model:
    """stem conv -> [BN, ReLU, conv] `group1` -> [BN, ReLU, conv/2] `group2` -> BN head.

    The project's BatchNorm layer in every group and in the head, so the teacher trunk
    (to `group1`, where the SOKD peer branches off), the teacher head and the peer all
    normalise with batch statistics in training mode. Logits are float32.
    """
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(SHAPE)
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = wide_resnet.batch_norm("group1_bn", False)(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(4, 3, padding="same", name="group1")(x)
    x = wide_resnet.batch_norm("group2_bn", False)(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(6, 3, strides=2, padding="same", name="group2")(x)
    x = wide_resnet.batch_norm("final_bn", False)(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D(name="features")(x)
    outputs = keras.layers.Dense(CLASSES, dtype="float32", name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def batch():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(BATCH, *SHAPE)).astype(np.float32)
    labels = (np.arange(BATCH) % CLASSES).astype(np.int32)
    return images, labels


# --- The reference maths, plain TensorFlow ------------------------------------------


def cross_entropy(labels, logits):
    """Mean over the batch of -log softmax(logits)[label]."""
    log_probs = tf.nn.log_softmax(logits, axis=-1)
    return -tf.reduce_mean(tf.gather(log_probs, labels, axis=1, batch_dims=1))


def kl(target_logits, learner_logits, temperature, squared=True):
    """Batch mean of [T^2 *] KL(softmax(target / T) || softmax(learner / T)).

    The caller stops the target's gradient.
    """
    target = tf.nn.log_softmax(target_logits / temperature, axis=-1)
    learner = tf.nn.log_softmax(learner_logits / temperature, axis=-1)
    value = tf.reduce_mean(tf.reduce_sum(tf.exp(target) * (target - learner), axis=-1))
    return value * temperature**2 if squared else value


def reference_update(loss_fn, role_models, nesterov=False):
    """The first optimizer step the recipe takes on `loss_fn()`, per trained role.

    `torch.optim.SGD(lr_role, momentum, weight_decay, nesterov)` on its first step:
    `d = g + wd * w`, `buffer = d` (no history yet), `w -= lr_role * buffer`; with
    Nesterov `w -= lr_role * (d + momentum * buffer)`.
    """
    step_factor = 1.0 + MOMENTUM if nesterov else 1.0
    variables = {role: list(model.trainable_variables) for role, model in role_models.items()}
    with tf.GradientTape() as tape:
        loss = loss_fn()
    flat = [v for role_vars in variables.values() for v in role_vars]
    gradients = iter(tape.gradient(loss, flat))
    updates = {}
    for role, role_vars in variables.items():
        updates[role] = []
        for variable in role_vars:
            gradient = next(gradients)
            assert gradient is not None, f"no gradient for {role} {variable.path}"
            d = gradient + WEIGHT_DECAY * variable
            updates[role].append((-LEARNING_RATES[role] * step_factor * d).numpy())
    return updates


def sokd_reference(teacher, peer, student, images, labels, teacher_bn_mode):
    """SOKD: five terms, weight 1 each; no teacher -> student term."""
    trunk = keras.Model(teacher.inputs[0], [teacher.get_layer("group1").output, teacher.output])

    def loss():
        # "official": the teacher's BN normalises with batch statistics (and moves its
        # moving statistics); "frozen": inference mode.
        features, teacher_logits = trunk(images, training=teacher_bn_mode == "official")
        peer_logits = peer(tf.stop_gradient(features), training=True)
        student_logits = student(images, training=True)
        return (
            cross_entropy(labels, peer_logits)
            + kl(tf.stop_gradient(teacher_logits), peer_logits, TEMPERATURE)
            + kl(tf.stop_gradient(student_logits), peer_logits, TEMPERATURE)
            + cross_entropy(labels, student_logits)
            + kl(tf.stop_gradient(peer_logits), student_logits, TEMPERATURE)
        )

    return reference_update(loss, {"peer": peer, "student": student})


def kd_reference(teacher, student, images, labels, teacher_bn_mode):
    """KD: 0.1 * CE + 0.9 * T^2 * KL(p_teacher || p_student)."""

    def loss():
        teacher_logits = teacher(images, training=teacher_bn_mode == "official")
        student_logits = student(images, training=True)
        return 0.1 * cross_entropy(labels, student_logits) + 0.9 * kl(
            tf.stop_gradient(teacher_logits), student_logits, TEMPERATURE
        )

    return reference_update(loss, {"student": student})


def dml_reference(peer, student, images, labels, temperature, squared, nesterov):
    """DML: each network CE + KL(p_other || p_self), weight 1 each."""

    def loss():
        peer_logits = peer(images, training=True)
        student_logits = student(images, training=True)
        return (
            cross_entropy(labels, peer_logits)
            + kl(tf.stop_gradient(student_logits), peer_logits, temperature, squared)
            + cross_entropy(labels, student_logits)
            + kl(tf.stop_gradient(peer_logits), student_logits, temperature, squared)
        )

    return reference_update(loss, {"peer": peer, "student": student}, nesterov)


def vanilla_reference(network, role, images, labels):
    """Vanilla: CE only."""
    return reference_update(lambda: cross_entropy(labels, network(images, training=True)),
                            {role: network})


# --- Cases ------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    """Role models at fixed initial weights, the reference step, and the trainer."""

    models: dict[str, keras.Model]  # every role, trained or not
    trained_roles: tuple[str, ...]
    make_trainer: Callable[[], distillers.Distiller]
    nesterov: bool = False
    initial: dict[str, list[np.ndarray]] = dataclasses.field(default_factory=dict)
    updates: dict[str, list[np.ndarray]] = dataclasses.field(default_factory=dict)
    statistics: dict[str, list[np.ndarray]] = dataclasses.field(default_factory=dict)

    def restore(self):
        for role, model in self.models.items():
            for variable, value in zip(model.weights, self.initial[role], strict=True):
                variable.assign(value)


def moving_statistics(model):
    return [v for v in model.weights if "moving_" in v.path]


def make_case(models, trained_roles, make_trainer, reference, nesterov=False):
    case = Case(models, trained_roles, make_trainer, nesterov)
    case.initial = {role: [v.numpy().copy() for v in m.weights] for role, m in models.items()}
    images, labels = batch()
    with full_float32_matmuls():
        case.updates = reference(tf.constant(images), tf.constant(labels))
    # The reference forward moved the BN moving statistics: where the real step must too.
    case.statistics = {role: [v.numpy().copy() for v in moving_statistics(m)]
                       for role, m in models.items()}
    case.restore()
    return case


def sokd_models(precision="float32"):
    with dtype_policy(precision):
        teacher, student = tiny_model("teacher", 1), tiny_model("student", 2)
        keras.utils.set_random_seed(3)
        peer = peer_lib.build_peer(teacher)
    return {"teacher": teacher, "peer": peer, "student": student}


def sokd_trainer_factory(models, teacher_bn_mode, precision="float32"):
    def make():
        with dtype_policy(precision):
            return distillers.SemiOnlineDistiller(
                models["teacher"], models["peer"], models["student"], temperature=TEMPERATURE,
                teacher_bn_mode=teacher_bn_mode,
            )

    return make


def sokd_case(teacher_bn_mode):
    models = sokd_models()
    return make_case(
        models, ("peer", "student"), sokd_trainer_factory(models, teacher_bn_mode),
        lambda images, labels: sokd_reference(
            models["teacher"], models["peer"], models["student"], images, labels,
            teacher_bn_mode,
        ),
    )


def sokd_float16_case(float32_case):
    """The float32 SOKD case's reference, for the same models built under mixed_float16.

    Same architecture and initial weights (variables stay float32); only the compute
    dtype differs, so the float32 reference step is the float16 step's target.
    """
    models = sokd_models("mixed_float16")
    case = Case(models, float32_case.trained_roles,
                sokd_trainer_factory(models, "official", "mixed_float16"),
                initial=float32_case.initial, updates=float32_case.updates,
                statistics=float32_case.statistics)
    case.restore()
    return case


def kd_case(teacher_bn_mode):
    teacher, student = tiny_model("teacher", 1), tiny_model("student", 2)
    return make_case(
        {"teacher": teacher, "student": student},
        ("student",),
        lambda: distillers.KnowledgeDistiller(
            teacher, student, temperature=TEMPERATURE, teacher_bn_mode=teacher_bn_mode
        ),
        lambda images, labels: kd_reference(teacher, student, images, labels, teacher_bn_mode),
    )


def dml_case(temperature, squared, nesterov):
    peer, student = tiny_model("peer", 1), tiny_model("student", 2)
    return make_case(
        {"peer": peer, "student": student},
        ("peer", "student"),
        lambda: distillers.MutualLearner(
            peer, student, temperature=temperature, temperature_squared=squared
        ),
        lambda images, labels: dml_reference(peer, student, images, labels, temperature,
                                             squared, nesterov),
        nesterov,
    )


def vanilla_case(role):
    network = tiny_model(role, 1)
    return make_case(
        {role: network},
        (role,),
        lambda: distillers.VanillaTrainer(network, role=role),
        lambda images, labels: vanilla_reference(network, role, images, labels),
    )


CASES = {
    "sokd_official": lambda get: sokd_case("official"),
    "sokd_frozen": lambda get: sokd_case("frozen"),
    "sokd_official_float16": lambda get: sokd_float16_case(get("sokd_official")),
    "kd_official": lambda get: kd_case("official"),
    "kd_frozen": lambda get: kd_case("frozen"),
    # DML's standard recipe steps with Nesterov momentum.
    "dml": lambda get: dml_case(1.0, False, nesterov=True),
    "dml_t2_squared": lambda get: dml_case(2.0, True, nesterov=False),
    "vanilla_student": lambda get: vanilla_case("student"),
    "vanilla_teacher": lambda get: vanilla_case("teacher"),
}


def case_cache():
    """`get(name)`: the named case, built (reference computed) on first use."""
    built = {}

    def get(name):
        if name not in built:
            built[name] = CASES[name](get)
        return built[name]

    return get


def real_step(case: Case, *, run_eagerly: bool = False, optimizer_built: bool = False):
    """One `fit` step of the case's trainer from the initial weights; returns it.

    `optimizer_built`: build the optimizer's slots before `fit`, as a resumed run does
    (sokd_tf/runtime/backup.py), instead of inside the first trace of the step, which
    costs a second trace; the update is the same either way.
    """
    case.restore()
    trainer = case.make_trainer()
    config = TrainConfig(
        student_learning_rate=LEARNING_RATES["student"],
        peer_learning_rate=LEARNING_RATES["peer"],
        teacher_learning_rate=LEARNING_RATES["teacher"],
        weight_decay=WEIGHT_DECAY,
        momentum=MOMENTUM,
        nesterov=case.nesterov,
    )
    trainer.compile(optimizer=distillers.make_optimizer(config, steps_per_epoch=1),
                    jit_compile=False, run_eagerly=run_eagerly)
    if optimizer_built:
        trainer.optimizer.build(trainer.trainable_variables)
    images, labels = batch()
    with full_float32_matmuls():
        trainer.fit(images, labels, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    assert int(trainer.optimizer.iterations) == 1
    return trainer


def relative_errors(case: Case) -> dict[str, float]:
    """Per trained role: ||update_real - update_reference|| / ||update_reference||."""
    errors = {}
    for role in case.trained_roles:
        model = case.models[role]
        initial = dict(zip([id(v) for v in model.weights], case.initial[role], strict=True))
        real = [v.numpy() - initial[id(v)] for v in model.trainable_variables]
        reference = case.updates[role]
        squared_difference = sum(np.sum((a - b) ** 2) for a, b in zip(real, reference,
                                                                       strict=True))
        squared_norm = sum(np.sum(b**2) for b in reference)
        errors[role] = float(np.sqrt(squared_difference / squared_norm))
    return errors
