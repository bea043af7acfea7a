"""Distillers: real `fit` steps on tiny models, the optimisation recipe, learning, resume."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from sokd_tf import distillers, losses, models
from sokd_tf.config import TrainConfig
from sokd_tf.distillers import optimization
from sokd_tf.errors import ConfigError
from sokd_tf.models import peer as peer_lib

SHAPE = (16, 16, 3)
CLASSES = 10
BATCH = 8


def random_data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, *SHAPE)).astype(np.float32)
    return images, (np.arange(n) % CLASSES).astype(np.int32)


def build(name, seed):
    keras.utils.set_random_seed(seed)
    return models.BUILDERS["wrn_16_1"](SHAPE, CLASSES, name=name)


def snapshot(variables):
    return [np.array(v.numpy(), copy=True) for v in variables]


def same(before, variables):
    return all(np.array_equal(b, v.numpy()) for b, v in zip(before, variables, strict=True))


def all_changed(before, variables):
    return all(not np.array_equal(b, v.numpy()) for b, v in zip(before, variables, strict=True))


def moving_statistics(model):
    return [v for v in model.weights if "moving" in v.path]


def compile_and_fit(trainer, steps_per_epoch=2, epochs=1, jit_compile=False, validate=True):
    trainer.compile(
        optimizer=distillers.make_optimizer(TrainConfig(), steps_per_epoch),
        jit_compile=jit_compile,
    )
    images, labels = random_data(steps_per_epoch * BATCH)
    return trainer.fit(
        images, labels, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0,
        validation_data=(images, labels) if validate else None,
    )


def expected_metrics(terms, roles, validate=True):
    accuracy = {f"{role}/{k}" for role in roles for k in ("top1", "top5")}
    train = {"loss", *terms, *accuracy}
    return train | {f"val_{name}" for name in train} if validate else train


@pytest.mark.parametrize("teacher_bn_mode", ["official", "frozen"])
def test_sokd_fit_step(teacher_bn_mode):
    teacher = build("teacher", 1)
    peer = peer_lib.build_peer(teacher)
    student = build("student", 2)
    trainer = distillers.SemiOnlineDistiller(
        teacher, peer, student, teacher_bn_mode=teacher_bn_mode
    )
    assert trainer.student is student and trainer.peer is peer and trainer.teacher is teacher
    teacher_trainable = [v for v in teacher.weights if "moving" not in v.path]
    teacher_before = snapshot(teacher_trainable)
    stats_before = snapshot(moving_statistics(teacher))
    peer_before, student_before = snapshot(peer.weights), snapshot(student.weights)
    # Only peer and student variables are trainable, hence optimised.
    assert {id(v) for v in trainer.trainable_variables} == {
        id(v) for v in peer.trainable_variables + student.trainable_variables
    }

    history = compile_and_fit(trainer)

    assert set(history.history) == expected_metrics(losses.SOKD_TERMS, ["peer", "student"])
    assert all(np.isfinite(values[0]) for values in history.history.values())
    # Every trained variable moved (BN moving statistics included).
    assert all_changed(peer_before, peer.weights)
    assert all_changed(student_before, student.weights)
    assert same(teacher_before, teacher_trainable)
    if teacher_bn_mode == "frozen":
        assert same(stats_before, moving_statistics(teacher))
    else:
        assert all_changed(stats_before, moving_statistics(teacher))
    # Momentum slots exist for exactly the trained variables (plus the step counter).
    slots = [v for v in trainer.optimizer.variables if "momentum" in v.path]
    assert len(slots) == len(trainer.trainable_variables)
    assert trainer.predict(random_data(4)[0], verbose=0).shape == (4, CLASSES)


@pytest.mark.parametrize("teacher_bn_mode", ["official", "frozen"])
def test_kd_fit_step(teacher_bn_mode):
    teacher, student = build("teacher", 1), build("student", 2)
    trainer = distillers.KnowledgeDistiller(teacher, student, teacher_bn_mode=teacher_bn_mode)
    assert trainer.loss_weights_by_term == {"student/ce": 0.1, "student/kd_from_teacher": 0.9}
    teacher_before, student_before = snapshot(teacher.weights), snapshot(student.weights)
    stats_before = snapshot(moving_statistics(teacher))
    history = compile_and_fit(trainer, validate=False)
    assert set(history.history) == expected_metrics(losses.KD_TERMS, ["student"], False)
    assert all_changed(student_before, student.weights)
    teacher_parameters = [v for v in teacher.weights if "moving" not in v.path]
    assert same(
        [b for b, v in zip(teacher_before, teacher.weights, strict=True) if "moving" not in v.path],
        teacher_parameters,
    )
    moved = not same(stats_before, moving_statistics(teacher))
    assert moved == (teacher_bn_mode == "official")


def test_dml_fit_step_updates_both_networks():
    peer, student = build("peer", 1), build("student", 2)
    trainer = distillers.MutualLearner(peer, student)
    peer_before, student_before = snapshot(peer.weights), snapshot(student.weights)
    history = compile_and_fit(trainer)
    assert set(history.history) == expected_metrics(losses.DML_TERMS, ["peer", "student"])
    assert all_changed(peer_before, peer.weights)
    assert all_changed(student_before, student.weights)


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_vanilla_fit_step(role):
    network = build(role, 1)
    trainer = distillers.VanillaTrainer(network, role=role)
    assert getattr(trainer, role) is network
    before = snapshot(network.weights)
    history = compile_and_fit(trainer, validate=role == "student")
    assert set(history.history) == expected_metrics([f"{role}/ce"], [role], role == "student")
    assert all_changed(before, network.weights)
    # Plain CE: the logged loss equals the CE term.
    assert history.history["loss"] == pytest.approx(history.history[f"{role}/ce"])


def test_top5_only_with_more_than_five_classes():
    keras.utils.set_random_seed(0)
    network = models.BUILDERS["wrn_16_1"](SHAPE, 5)
    trainer = distillers.VanillaTrainer(network)
    assert [m.name for m in trainer.metrics] == ["loss", "student/ce", "student/top1"]


def test_sokd_peer_from_another_stage():
    teacher, student = build("teacher", 1), build("student", 2)
    peer = peer_lib.build_peer(teacher, from_stage="group1")
    with pytest.raises(ConfigError, match="from_stage='group2'"):
        distillers.SemiOnlineDistiller(teacher, peer, student)
    trainer = distillers.SemiOnlineDistiller(teacher, peer, student, from_stage="group1")
    images, labels = random_data(4)
    terms, logits = trainer.forward(images, labels, training=False)
    assert set(terms) == set(losses.SOKD_TERMS)
    assert logits["peer"].shape == logits["student"].shape == (4, CLASSES)
    assert trainer.get_config()["from_stage"] == "group1"


def test_bad_arguments_raise_config_errors():
    teacher, student = build("teacher", 1), build("student", 2)
    with pytest.raises(ConfigError, match="teacher_bn_mode"):
        distillers.KnowledgeDistiller(teacher, student, teacher_bn_mode="eval")
    with pytest.raises(ConfigError, match="student/kd_from_teacher"):
        distillers.KnowledgeDistiller(teacher, student, weights={"student/ce": 1.0})
    with pytest.raises(ConfigError, match="role"):
        distillers.VanillaTrainer(student, role="assistant")


def pytorch_sgd_reference(w, gradient_fn, learning_rates, momentum, weight_decay):
    """torch.optim.SGD(lr, momentum, weight_decay) written out (dampening 0, no Nesterov)."""
    w = np.array(w, np.float64)
    buffer = None
    for lr in learning_rates:
        d = gradient_fn(w) + weight_decay * w
        buffer = d if buffer is None else momentum * buffer + d
        w = w - lr * buffer
    return w


def run_role_steps(optimizer, role, w0, coefficients, steps):
    variable = keras.Variable(np.array(w0, np.float32))
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(variable * coefficients) + 0.5 * tf.reduce_sum(variable**2)
            scaled = optimizer.scale_loss(loss)
        optimization.apply_role_gradients(optimizer, tape, scaled, {role: [variable]})
    return variable.numpy()


def test_coupled_l2_momentum_and_role_rate_match_pytorch_by_hand():
    coefficients = np.array([0.5, 1.0], np.float32)
    w0 = [1.0, -2.0]
    # One step by hand: d = c + w + wd * w = [1.6, -1.2]; w -= lr_peer * d.
    optimizer = optimization.PyTorchSGD(
        0.1, momentum=0.9, coupled_weight_decay=0.1, role_learning_rate_scales={"peer": 0.5}
    )
    w1 = run_role_steps(optimizer, "peer", w0, coefficients, 1)
    np.testing.assert_allclose(w1, [1.0 - 0.05 * 1.6, -2.0 - 0.05 * -1.2], rtol=1e-6)
    # Four steps, rate decayed after two (epoch of 2 steps, decay at epoch 1).
    schedule = optimization.EpochStepDecay(0.1, steps_per_epoch=2, decay_epochs=(1,))
    optimizer = optimization.PyTorchSGD(
        schedule, momentum=0.9, coupled_weight_decay=0.1, role_learning_rate_scales={"peer": 0.5}
    )
    w4 = run_role_steps(optimizer, "peer", w0, coefficients, 4)
    expected = pytorch_sgd_reference(
        w0, lambda w: coefficients + w, [0.05, 0.05, 0.005, 0.005], 0.9, 0.1
    )
    np.testing.assert_allclose(w4, expected, rtol=1e-5)


def test_role_scale_equals_a_per_role_learning_rate():
    coefficients = np.array([0.3, -1.0, 2.0], np.float32)
    w0 = [0.5, 1.5, -1.0]
    scaled = optimization.PyTorchSGD(
        0.1, momentum=0.9, coupled_weight_decay=5e-4, role_learning_rate_scales={"peer": 0.5}
    )
    direct = optimization.PyTorchSGD(0.05, momentum=0.9, coupled_weight_decay=5e-4)
    np.testing.assert_allclose(
        run_role_steps(scaled, "peer", w0, coefficients, 5),
        run_role_steps(direct, "peer", w0, coefficients, 5),
        rtol=1e-6,
    )


def test_make_optimizer_follows_the_config():
    config = TrainConfig(peer_learning_rate=0.05, teacher_learning_rate=0.2, weight_decay=1e-3)
    optimizer = distillers.make_optimizer(config, steps_per_epoch=7)
    assert isinstance(optimizer, keras.optimizers.SGD)
    assert optimizer.momentum == 0.9 and not optimizer.nesterov
    assert optimizer.coupled_weight_decay == 1e-3
    assert optimizer.role_learning_rate_scales == pytest.approx(
        {"student": 1.0, "peer": 0.5, "teacher": 2.0}
    )
    teacher_optimizer = distillers.make_optimizer(config, 7, base_learning_rate=0.2)
    assert teacher_optimizer.role_learning_rate_scales["teacher"] == pytest.approx(1.0)
    schedule = keras.saving.deserialize_keras_object(optimizer.get_config()["learning_rate"])
    assert isinstance(schedule, optimization.EpochStepDecay)
    rates = [float(schedule(step)) for step in (0, 699, 700, 1049, 1050, 1399)]
    assert rates == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    restored = optimization.PyTorchSGD.from_config(optimizer.get_config())
    assert restored.role_learning_rate_scales == optimizer.role_learning_rate_scales


class RecordLearningRate(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.rates = []

    def on_epoch_begin(self, epoch, logs=None):
        self.rates.append(float(self.model.optimizer.learning_rate))


def test_learning_rate_steps_at_the_decay_epoch_in_fit():
    trainer = distillers.VanillaTrainer(build("student", 1))
    config = TrainConfig(lr_decay_epochs=(1, 2))
    trainer.compile(optimizer=distillers.make_optimizer(config, steps_per_epoch=2))
    images, labels = random_data(16)
    recorder = RecordLearningRate()
    trainer.fit(images, labels, batch_size=BATCH, epochs=3, steps_per_epoch=2, verbose=0,
                callbacks=[recorder])
    assert recorder.rates == pytest.approx([0.1, 0.01, 0.001])
    assert int(trainer.optimizer.iterations) == 6


def test_jit_compiled_sokd_step():
    teacher = build("teacher", 1)
    trainer = distillers.SemiOnlineDistiller(
        teacher, peer_lib.build_peer(teacher), build("student", 2)
    )
    student_before = snapshot(trainer.student.weights)
    history = compile_and_fit(trainer, steps_per_epoch=1, jit_compile=True, validate=False)
    assert trainer.jit_compile
    assert np.isfinite(history.history["loss"][0])
    assert all_changed(student_before, trainer.student.weights)


class StopAtEpoch(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError("simulated interruption")


def sokd_trainer(seed):
    teacher = build("teacher", seed)
    return distillers.SemiOnlineDistiller(
        teacher, peer_lib.build_peer(teacher), build("student", seed + 1)
    )


def fit_epochs(trainer, epochs, callbacks):
    trainer.compile(optimizer=distillers.make_optimizer(TrainConfig(lr_decay_epochs=(1,)), 2))
    images, labels = random_data(16)
    return trainer.fit(images, labels, batch_size=BATCH, epochs=epochs, shuffle=False,
                       verbose=0, callbacks=callbacks)


def test_backup_and_restore_resumes_weights_momentum_and_epoch(tmp_path):
    reference = sokd_trainer(10)
    fit_epochs(reference, 2, [])

    interrupted = sokd_trainer(10)
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    with pytest.raises(RuntimeError, match="simulated"):
        fit_epochs(interrupted, 2, [backup, StopAtEpoch(1)])

    resumed = sokd_trainer(20)  # different initial weights: all state must come from disk
    history = fit_epochs(resumed, 2, [keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))])
    assert history.epoch == [1]
    assert int(resumed.optimizer.iterations) == int(reference.optimizer.iterations) == 4
    for role in ("student", "peer", "teacher"):
        for a, b in zip(getattr(reference, role).weights, getattr(resumed, role).weights,
                        strict=True):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6,
                                       err_msg=f"{role} {a.path}")
    for a, b in zip(reference.optimizer.variables, resumed.optimizer.variables, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def learnable_problem(n, seed, num_classes=4, shape=(8, 8, 3)):
    """Images = class-dependent mean pattern + unit noise."""
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(123).normal(size=(num_classes, *shape)).astype(np.float32)
    labels = rng.integers(0, num_classes, size=n).astype(np.int32)
    images = means[labels] + rng.normal(size=(n, *shape)).astype(np.float32)
    return images, labels


def test_sokd_learns_a_small_problem():
    shape, classes = (8, 8, 3), 4
    train_images, train_labels = learnable_problem(512, seed=1)
    test_images, test_labels = learnable_problem(256, seed=2)
    keras.utils.set_random_seed(0)
    teacher = models.BUILDERS["wrn_16_1"](shape, classes, name="teacher")
    teacher_trainer = distillers.VanillaTrainer(teacher, role="teacher")
    teacher_trainer.compile(optimizer=distillers.make_optimizer(TrainConfig(), 16))
    teacher_trainer.fit(train_images, train_labels, batch_size=32, epochs=2, verbose=0)

    student = models.BUILDERS["wrn_16_1"](shape, classes, name="student")
    trainer = distillers.SemiOnlineDistiller(teacher, peer_lib.build_peer(teacher), student)
    trainer.compile(optimizer=distillers.make_optimizer(TrainConfig(), 16))
    trainer.fit(train_images, train_labels, batch_size=32, epochs=3, verbose=0)
    results = trainer.evaluate(test_images, test_labels, batch_size=64, verbose=0,
                               return_dict=True)
    assert results["student/top1"] > 0.8, results  # chance: 0.25
    assert results["peer/top1"] > 0.8, results


MIRRORED_SCRIPT = """
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from sokd_tf import distillers, models
from sokd_tf.config import TrainConfig
from sokd_tf.models import peer as peer_lib

images = np.random.default_rng(0).normal(size=(16, 16, 16, 3)).astype("float32")
labels = np.arange(16) % 10

def make():
    keras.utils.set_random_seed(0)
    build = models.BUILDERS["wrn_16_1"]
    teacher = build((16, 16, 3), 10, name="teacher", synchronized_bn=True)
    student = build((16, 16, 3), 10, name="student", synchronized_bn=True)
    trainer = distillers.SemiOnlineDistiller(teacher, peer_lib.build_peer(teacher), student)
    config = TrainConfig(peer_learning_rate=0.05, weight_decay=0.05)
    trainer.compile(optimizer=distillers.make_optimizer(config, 2))
    return trainer

one = make()
one.fit(images, labels, batch_size=8, epochs=1, shuffle=False, verbose=0)
with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
    two = make()
two.fit(images, labels, batch_size=8, epochs=1, shuffle=False, verbose=0)
for role in ("student", "peer", "teacher"):
    pairs = zip(getattr(one, role).weights, getattr(two, role).weights)
    print(role, max(float(np.abs(a.numpy() - b.numpy()).max()) for a, b in pairs))
"""


@pytest.mark.slow
def test_two_replicas_apply_the_same_update_as_one_device(tmp_path):
    """Global-batch loss, L2 / replicas and role scales under MirroredStrategy (sync BN)."""
    import os
    import subprocess
    import sys

    script = tmp_path / "mirrored.py"
    script.write_text(MIRRORED_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            env=env, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    differences = dict(line.split() for line in result.stdout.strip().splitlines()[-3:])
    assert set(differences) == {"student", "peer", "teacher"}
    assert all(float(value) < 1e-5 for value in differences.values()), differences
