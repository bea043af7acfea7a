"""A diverged run stops cleanly: one error line, nothing kept from the bad epoch, no NaN
export, float16 loss scaling untouched, and a documented way to continue."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from sokd_tf import config as config_lib
from sokd_tf import distillers, export, models
from sokd_tf.config import ExportConfig, TrainConfig
from sokd_tf.data import load_dataset
from sokd_tf.data.info import DatasetInfo
from sokd_tf.errors import ConfigError, DivergedError, ExportError
from sokd_tf.runtime import backup, loop
from sokd_tf.stages import callbacks, distill, divergence, report
from sokd_tf.stages import run as run_stage
from sokd_tf.stages import workdir as workdir_lib
from sokd_tf.stages.export import export_stage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (16, 16, 3)
CLASSES = 10
BATCH = 8
DEFAULT = tf.distribute.get_strategy()


@pytest.fixture(autouse=True)
def float32_policy():
    yield
    keras.config.set_dtype_policy("float32")


@pytest.fixture
def op_determinism_restored():
    """The stages turn on op determinism for the whole process (and with it XLA off);
    later tests in the same process get the state they started with."""
    from tensorflow.python.framework import config as tf_config  # no public off switch

    enabled = tf_config.is_op_determinism_enabled()
    yield
    if not enabled:
        tf_config.disable_op_determinism()


def random_data(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *SHAPE)).astype(np.float32), (np.arange(n) % CLASSES).astype(np.int32)


def network(name, seed):
    keras.utils.set_random_seed(seed)
    return models.build("wrn_10_1", SHAPE, CLASSES, model_name=name)


def check(directory, train_config=None, roles=("student",), stage="distill"):
    train_config = train_config or TrainConfig()

    def fix(term):
        return divergence.likely_fix(train_config, list(roles), term)

    return divergence.DivergenceCheck(stage, str(directory), DEFAULT, fix)


def weights_of(model):
    return [np.array(keras.ops.convert_to_numpy(w), copy=True) for w in model.weights]


def read_text(path):
    with open(path) as f:
        return f.read()


def files_under(root):
    found = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = f.read()
    return found


# --- the check in the step and its callback -----------------------------------------------


def test_the_first_nonfinite_named_term_is_reported_and_recorded(tmp_path):
    """A teacher with a NaN head makes KD's distillation term NaN while `student/ce`
    stays finite: the message names `student/kd_from_teacher`, the epoch and the step."""
    teacher = network("teacher", 1)
    head = teacher.get_layer("logits")
    kernel, bias = head.get_weights()
    images, labels = random_data(3 * BATCH)
    trainer = distillers.KnowledgeDistiller(teacher, network("student", 2), teacher_bn_mode="frozen")
    trainer.compile(optimizer=distillers.make_optimizer(TrainConfig(), 3))

    poison = keras.callbacks.LambdaCallback(
        on_train_batch_begin=lambda batch, logs: batch == 1 and head.set_weights(
            [np.full_like(kernel, np.nan), bias]
        )
    )
    with pytest.raises(DivergedError) as caught:
        trainer.fit(images, labels, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                    callbacks=[poison, check(tmp_path)])
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        "distill diverged at epoch 1, step 2: student/kd_from_teacher is nan; "
        "the learning rate is likely too high: lower --student_learning_rate (now 0.1)"
    )
    assert "--resume_changed=train.student_learning_rate" in message
    record = json.loads((tmp_path / workdir_lib.DIVERGED).read_text())
    assert record["term"] == "student/kd_from_teacher"
    assert (record["epoch"], record["step"], record["phase"]) == (1, 2, "training")
    assert "student/ce" not in record["non_finite"]
    assert record["non_finite"]["student/gradient_norm"] == "nan"
    assert record == caught.value.record


def test_healthy_training_leaves_the_checks_at_zero(tmp_path):
    images, labels = random_data(2 * BATCH)
    trainer = distillers.VanillaTrainer(network("student", 0))
    trainer.compile(optimizer=distillers.make_optimizer(TrainConfig(), 2))
    trainer.fit(images, labels, batch_size=BATCH, epochs=2, verbose=0,
                validation_data=(images, labels), callbacks=[check(tmp_path)])
    assert trainer.finite_checks.names == ("student/ce", "student/gradient_norm")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(trainer.finite_checks.result()), [0, 0])
    assert "finite_checks" not in trainer.history.history, "never logged"
    assert not (tmp_path / workdir_lib.DIVERGED).exists()


def test_every_method_checks_its_named_terms_and_each_trained_role():
    from sokd_tf.models import peer as peer_lib

    teacher = network("teacher", 1)
    trainers = {
        "kd": distillers.KnowledgeDistiller(teacher, network("student", 2)),
        "dml": distillers.MutualLearner(network("peer", 3), network("student", 2)),
        "sokd": distillers.SemiOnlineDistiller(teacher, peer_lib.build_peer(teacher),
                                               network("student", 2)),
    }
    assert trainers["kd"].finite_checks.names == (
        "student/ce", "student/kd_from_teacher", "student/gradient_norm")
    assert trainers["dml"].finite_checks.names == (
        "peer/ce", "peer/ml_from_student", "student/ce", "student/ml_from_peer",
        "peer/gradient_norm", "student/gradient_norm")
    assert trainers["sokd"].finite_checks.names == (
        "peer/ce", "peer/kd_from_teacher", "peer/ml_from_student", "student/ce",
        "student/ml_from_peer", "peer/gradient_norm", "student/gradient_norm")


def test_nonfinite_validation_stops_before_any_best_is_chosen(tmp_path):
    """Finite training, NaN validation: the check stops at the end of validation, before
    BestCheckpoints (after it in the list) could pick that epoch."""
    student = network("student", 0)
    images, labels = random_data(2 * BATCH)
    trainer = distillers.VanillaTrainer(student)
    trainer.compile(optimizer=distillers.make_optimizer(TrainConfig(), 2))
    kernel = student.get_layer("logits").kernel
    break_statistics = keras.callbacks.LambdaCallback(
        on_test_begin=lambda logs: kernel.assign(np.full(kernel.shape, np.nan, "float32"))
    )
    best = callbacks.BestCheckpoints(tmp_path, {"student": "val_student/top1"},
                                     {"student": {"student": student}})
    with pytest.raises(DivergedError, match=r"epoch 1, validation after step 2: student/ce is nan"):
        trainer.fit(images, labels, batch_size=BATCH, epochs=1, verbose=0,
                    validation_data=(images, labels),
                    callbacks=[break_statistics, check(tmp_path), best])
    assert not (tmp_path / "student_best.keras").exists()
    assert not os.path.exists(workdir_lib.StageFiles(str(tmp_path)).best_state)


def test_best_checkpoints_never_pick_a_nan_epoch(tmp_path):
    student = network("student", 0)
    best = callbacks.BestCheckpoints(tmp_path, {"student": "val_student/top1"},
                                     {"student": {"student": student}})
    best.on_train_begin()
    best.on_epoch_end(0, {"val_student/top1": float("nan")})
    assert not (tmp_path / "student_best.keras").exists()
    best.on_epoch_end(1, {"val_student/top1": 0.5})
    assert best.best["student"]["epoch"] == 2


def test_the_custom_loop_stops_like_fit(tmp_path):
    """`runtime.loop.custom_fit` (the multi-worker loop) runs the same check."""
    images, labels = random_data(3 * BATCH)
    images[2 * BATCH] = np.nan  # the first image of the third batch
    data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(BATCH).repeat()
    trainer = distillers.VanillaTrainer(network("student", 0))
    trainer.compile(optimizer=distillers.make_optimizer(TrainConfig(), 3))
    # Fused BN+ReLU kernels may map the NaN activations to 0, leaving the loss finite;
    # the gradient norm then tells the step.
    with pytest.raises(DivergedError, match=r"epoch 1, step 3: student/(ce|gradient_norm) is nan"):
        loop.custom_fit(trainer, data, strategy=DEFAULT, epochs=2, steps_per_epoch=3,
                        callbacks=[check(tmp_path)])


def test_the_likely_fix_names_the_role_rate_and_the_precision():
    train = TrainConfig(teacher_learning_rate=3.0, peer_learning_rate=0.5, precision="mixed_bfloat16")
    assert divergence.likely_fix(train, ["teacher"], "teacher/ce") == (
        "the learning rate is likely too high: lower --teacher_learning_rate (now 3), "
        "or train in --precision=float32",
        ["train.teacher_learning_rate", "train.precision"],
    )
    assert divergence.likely_fix(TrainConfig(peer_learning_rate=0.5), ["peer", "student"],
                                 "peer/gradient_norm") == (
        "the learning rate is likely too high: lower --peer_learning_rate (now 0.5)",
        ["train.peer_learning_rate"],
    )


def test_the_resume_changed_flag_takes_flag_or_dotted_names(tmp_path):
    from absl import flags
    from absl.testing import flagsaver

    from pipelines import common
    from pipelines import distill as distill_pipeline  # noqa: F401  (defines the flags)

    if not flags.FLAGS.is_parsed():
        flags.FLAGS(["test", f"--workdir={tmp_path}"])
    with flagsaver.flagsaver(resume_changed=["student_learning_rate", "train.precision"]):
        assert common.resume_changed() == ("train.student_learning_rate", "train.precision")


# --- float16 loss scaling -------------------------------------------------------------------


def _float16_trainer(initial_scale):
    keras.config.set_dtype_policy("mixed_float16")
    trainer = distillers.VanillaTrainer(network("student", 0))
    trainer.compile(optimizer=keras.optimizers.LossScaleOptimizer(
        distillers.make_optimizer(TrainConfig(), 12), initial_scale=initial_scale))
    return trainer


def test_float16_loss_scale_overflow_skips_steps_and_still_trains(tmp_path):
    """A huge initial loss scale overflows the float16 gradients: Keras' loss-scale
    optimizer skips those steps and halves the scale, which is not divergence."""
    trainer = _float16_trainer(2.0**24)
    before = weights_of(trainer.student)
    images, labels = random_data(12 * BATCH)
    trainer.fit(images, labels, batch_size=BATCH, epochs=1, verbose=0,
                callbacks=[check(tmp_path, TrainConfig(precision="mixed_float16"))])
    scale = float(keras.ops.convert_to_numpy(trainer.optimizer.dynamic_scale))
    applied = int(keras.ops.convert_to_numpy(trainer.optimizer.iterations))
    assert scale < 2.0**24, "some steps overflowed"
    assert 0 < applied < 12, "the overflowing steps were skipped, the others applied"
    assert all(np.all(np.isfinite(w)) for w in weights_of(trainer.student))
    assert any(not np.array_equal(b, a) for b, a in zip(before, weights_of(trainer.student), strict=True))
    assert not (tmp_path / workdir_lib.DIVERGED).exists()


def test_float16_nonfinite_unscaled_loss_stops(tmp_path):
    trainer = _float16_trainer(2.0**15)
    images, labels = random_data(4 * BATCH)
    gamma = trainer.student.get_layer("final_bn").gamma

    def overflow(batch, logs):
        # From step 2 on, the last BN's float16 outputs pass 65504 and become inf; its ReLU
        # keeps inf (a NaN it may turn into 0, depending on the CPU's float16 kernels, which
        # is why poisoned input pixels are not used here), so the float32 logits, and with
        # them the loss itself, are not finite.
        if batch == 1:
            gamma.assign(np.full(gamma.shape, 1e6, "float32"))

    with pytest.raises(DivergedError) as caught:
        trainer.fit(images, labels, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                    callbacks=[keras.callbacks.LambdaCallback(on_train_batch_begin=overflow),
                               check(tmp_path, TrainConfig(precision="mixed_float16"))])
    message = str(caught.value)
    assert re.search(r"epoch 1, step 2: student/ce is (nan|inf)", message), message
    assert "--precision=mixed_bfloat16 or float32" in message
    assert caught.value.record["fields_to_change"] == ["train.student_learning_rate", "train.precision"]


# --- export ------------------------------------------------------------------------------------


def _info():
    return DatasetInfo(name="random", num_classes=CLASSES, image_shape=SHAPE,
                       class_names=tuple(str(i) for i in range(CLASSES)),
                       split_sizes={"train": 32, "test": 16}, mean=(0.5,) * 3, std=(0.25,) * 3)


@pytest.mark.parametrize("broken", ["weights", "outputs"])
def test_export_refuses_a_nonfinite_model_and_writes_nothing(tmp_path, broken):
    student = network("student", 0)
    if broken == "weights":
        kernel, bias = student.get_layer("logits").get_weights()
        kernel[0, 0] = np.nan
        student.get_layer("logits").set_weights([kernel, bias])
        message = r"non-finite values in 'logits/kernel'"
    else:  # finite weights, infinite logits
        kernel, bias = student.get_layer("logits").get_weights()
        largest = np.finfo(np.float32).max
        student.get_layer("logits").set_weights([np.full_like(kernel, largest), bias + largest])
        message = r"non-finite logits on \d+ of 32 calibration images"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32, *SHAPE), dtype=np.uint8)
    export_dir = tmp_path / "export"
    with pytest.raises(ExportError, match=message):
        export.export_student(
            student, _info(), str(export_dir),
            ExportConfig(tflite_variants=("fp32", "int8"), representative_size=32, latency_runs=1),
            train_images_uint8=images, test_images_uint8=images[:16], test_labels=np.arange(16) % 10,
        )
    assert not export_dir.exists()


# --- continuing with changed settings -------------------------------------------------------


def test_resume_changed_allows_only_the_safe_fields(tmp_path):
    workdir = str(tmp_path)
    first = config_lib.resolve("quickstart", {"train.method": "vanilla"})
    with pytest.raises(ConfigError, match="does not exist"):
        run_stage.prepare_workdir(first, workdir, resume_changed=("train.student_learning_rate",))
    run_stage.prepare_workdir(first, workdir)

    lower = config_lib.apply_overrides(first, {"train.student_learning_rate": 0.01})
    with pytest.raises(ConfigError, match=r"--resume_changed=train\.student_learning_rate"):
        run_stage.prepare_workdir(lower, workdir)
    longer = config_lib.apply_overrides(lower, {"train.epochs": 99})
    with pytest.raises(ConfigError, match=r"train\.epochs: 8 -> 99"):
        run_stage.prepare_workdir(longer, workdir, resume_changed=("train.student_learning_rate",))
    with pytest.raises(ConfigError, match=r"may name only .*got \['train\.epochs'\]"):
        run_stage.prepare_workdir(longer, workdir, resume_changed=("train.epochs",))

    run_stage.prepare_workdir(lower, workdir, resume_changed=("train.student_learning_rate",))
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["history"] == [{
        "changed": {"train.student_learning_rate": {"from": 0.1, "to": 0.01}},
        "stages": {"teacher": {"resumes_at_epoch": 0}, "distill": {"resumes_at_epoch": 0}},
    }]
    assert config_lib.RunConfig.from_dict(stored) == lower
    from_file = config_lib.read_config_file(str(tmp_path / "config.json"))
    assert config_lib.apply_overrides(config_lib.RunConfig(), from_file) == lower
    run_stage.prepare_workdir(lower, workdir)  # the same config again: a plain resume
    assert len(json.loads((tmp_path / "config.json").read_text())["history"]) == 1


@pytest.mark.parametrize("first, second", [("float32", "mixed_float16"), ("mixed_float16", "float32")])
def test_backup_restores_the_optimizer_across_a_precision_change(tmp_path, first, second):
    """A precision change adds or drops the loss-scale wrapper; the step count (the
    learning-rate schedule) and the momentum survive the continuation."""
    images, labels = random_data(2 * BATCH)
    runs = []
    for policy in (first, second):
        keras.config.set_dtype_policy(policy)
        trainer = distillers.VanillaTrainer(network("student", 0))
        trainer.compile(optimizer=distillers.make_optimizer(TrainConfig(), 2))
        runs.append(trainer)
    runs[0].fit(images, labels, batch_size=BATCH, epochs=1, verbose=0,
                callbacks=[backup.BackupAndRestore(str(tmp_path), DEFAULT, delete_checkpoint=False)])
    restore = backup.BackupAndRestore(str(tmp_path), DEFAULT)
    restore.set_model(runs[1])
    restore.on_train_begin()
    saved, restored = (getattr(t.optimizer, "inner_optimizer", t.optimizer) for t in runs)
    assert int(restored.iterations.numpy()) == 2
    for a, b in zip(saved.variables, restored.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert runs[1]._initial_epoch == 1


# --- whole stages ------------------------------------------------------------------------------


class Interrupted:
    """A run's dataset whose training batches stop from epoch `epoch` (0-based) on, as if
    the process were killed there (an error raised when that batch is fetched)."""

    def __init__(self, dataset, epoch):
        self.dataset = dataset
        self.epoch = epoch

    def __getattr__(self, name):
        return getattr(self.dataset, name)

    def train_batches(self, batch_size, *, seed, first_epoch=0, steps_per_epoch=None, **kwargs):
        batches = self.dataset.train_batches(
            batch_size, seed=seed, first_epoch=first_epoch, steps_per_epoch=steps_per_epoch, **kwargs
        )
        limit = tf.constant((self.epoch - first_epoch) * steps_per_epoch, tf.int64)

        def stop(index, batch):
            with tf.control_dependencies([tf.debugging.assert_less(index, limit, "killed")]):
                return tf.identity(batch[0]), batch[1]

        return batches.enumerate().map(stop)


def _stage_config(data_dir, **overrides):
    return config_lib.resolve("quickstart", {
        "data.data_dir": data_dir, "data.validation_size": 128, "data.batch_size": 64,
        "data.eval_batch_size": 256, "train.method": "vanilla", "train.epochs": 2,
        "train.steps_per_epoch": 8, "train.student_learning_rate": 0.05, **overrides,
    })


@pytest.mark.slow
def test_divergence_in_epoch_two_keeps_epoch_one_and_the_run_continues(
    small_fashion_mnist, tmp_path, op_determinism_restored
):
    workdir = str(tmp_path / "run")
    paths = workdir_lib.Workdir(workdir)
    first = _stage_config(small_fashion_mnist)
    dataset = load_dataset(first.data, seed=first.train.seed)
    run_stage.prepare_workdir(first, workdir)
    with pytest.raises(tf.errors.InvalidArgumentError, match="killed"):
        distill.distill(first, workdir, Interrupted(dataset, epoch=1))
    after_epoch_one = files_under(paths.distill_dir)
    assert backup.read_backup_epoch(paths.distill.backup) == 1
    assert "student_best.keras" in after_epoch_one

    # Epoch 2 with a far too high rate diverges (the whole job, as `pipelines.run` runs it).
    too_high = config_lib.apply_overrides(first, {"train.student_learning_rate": 1e6})
    with pytest.raises(DivergedError, match=r"^distill diverged at epoch 2, step \d: "
                       r"student/(ce|gradient_norm) is (nan|inf)") as caught:
        run_stage.run(too_high, workdir, resume_changed=("train.student_learning_rate",))
    after_divergence = files_under(paths.distill_dir)
    # TensorBoard's event files (logs/) are left out: an interrupted writer flushes when
    # it likes. Everything else is byte-identical, and the only new file is the record.
    kept = {name: content for name, content in after_epoch_one.items() if not name.startswith("logs")}
    assert {name: after_divergence.get(name) for name in kept} == kept
    new = {name for name in set(after_divergence) - set(after_epoch_one) if not name.startswith("logs")}
    assert new == {workdir_lib.DIVERGED}
    assert caught.value.record["last_good_epoch"] == 1
    for path in (paths.distill.results, paths.distilled("student", "last"), paths.evaluation,
                 paths.export_dir):
        assert not os.path.exists(path), path
    best = keras.saving.load_model(paths.distilled("student", "best"), compile=False)
    assert all(np.all(np.isfinite(w)) for w in weights_of(best))
    stopped = read_text(paths.report)
    assert "## Stopped: the run diverged" in stopped
    assert "The **distill** stage diverged at epoch 2" in stopped
    with pytest.raises(ExportError, match="diverged at epoch 2"):
        export_stage(too_high, workdir, dataset)
    assert not os.path.exists(paths.export_dir)

    # Continue from the end of epoch 1 with a lower rate.
    lower = config_lib.apply_overrides(first, {"train.student_learning_rate": 0.02})
    run_stage.prepare_workdir(lower, workdir, resume_changed=("train.student_learning_rate",))
    results = distill.distill(lower, workdir, dataset)
    assert results["epochs_completed"] == 2
    assert not os.path.exists(paths.distill.diverged)
    history = json.loads(read_text(paths.distill.history_json))
    assert [row["epoch"] for row in history] == [1, 2]
    assert history[1]["learning_rate"] == pytest.approx(0.02)
    last = keras.saving.load_model(paths.distilled("student", "last"), compile=False)
    assert all(np.all(np.isfinite(w)) for w in weights_of(last))
    changes = json.loads(read_text(paths.config))["history"]
    assert [entry["changed"]["train.student_learning_rate"]["to"] for entry in changes] == [1e6, 0.02]
    assert changes[1]["stages"]["distill"]["resumes_at_epoch"] == 1
    assert changes[1]["stages"]["distill"]["after_divergence"]["epoch"] == 2
    text = read_text(report.write_report(workdir))
    assert "Stopped" not in text
    assert "## Continued with changed settings" in text
    assert "after diverging at epoch 2" in text


@pytest.mark.slow
def test_the_issue_command_exits_with_one_line_and_leaves_no_model(small_fashion_mnist, tmp_path):
    """`pipelines.distill` with a learning rate of 1e6, on a small real Fashion-MNIST subset."""
    workdir = tmp_path / "W"
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.distill", "--preset=quickstart", "--method=vanilla",
         "--student_learning_rate=1000000", "--epochs=2", "--steps_per_epoch=8",
         f"--data_dir={small_fashion_mnist}", "--validation_size=128", "--batch_size=64",
         f"--workdir={workdir}"],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3"),
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert re.fullmatch(
        r"error: distill diverged at epoch 1, step \d: student/(ce|gradient_norm) is (nan|inf); "
        r"the learning rate is likely too high: lower --student_learning_rate \(now 1e\+06\); "
        r"then continue from the start by rerunning with the new value and "
        r"--resume_changed=train\.student_learning_rate \(nothing from epoch 1 was kept\)",
        errors[0],
    ), errors[0]
    left = files_under(workdir)
    assert not [name for name in left if name.endswith(".keras")]
    assert "distill/results.json" not in left
    assert json.loads(left["distill/diverged.json"])["epoch"] == 1


@pytest.mark.slow
def test_the_qat_fine_tune_stops_on_divergence():
    from sokd_tf.export import qat

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (128, *SHAPE), dtype=np.uint8)
    with pytest.raises(DivergedError, match=(
        r"^export diverged in the QAT fine-tune at (step \d of 8: student/qat_ce|its last step "
        r"\(8\): weights of \S+) is nan; the learning rate is likely too high: lower "
        r"--qat_learning_rate \(now 1e\+30\); nothing was exported$"
    )):
        qat.quantization_aware_finetune(network("student", 0), _info(), images, epochs=1,
                                        learning_rate=1e30, batch_size=16, max_steps=8)
