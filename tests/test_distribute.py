"""Strategies, chief/worker files, the multi-worker loop and resume.

Tests that need several replicas run in subprocesses (`tests/distributed_worker.py`):
logical CPU devices must be configured before TensorFlow initialises, and a
`MultiWorkerMirroredStrategy` needs one process per worker. Every subprocess has a
timeout and is killed when the test ends.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from sokd_tf.errors import ConfigError
from sokd_tf.runtime import backup, cluster, loop
from sokd_tf.runtime import strategy as strategy_lib

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBPROCESS_TIMEOUT_S = 240


# --- in-process: a tiny model with the distillers' loss convention -----------------


class TinyClassifier(keras.Model):
    """Dense -> BN -> Dense with a custom train_step scaled by the global batch."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.net = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(8),
                keras.layers.BatchNormalization(synchronized=True),
                keras.layers.Dense(3),
            ]
        )
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.built = True

    def call(self, images, training=False):
        return self.net(images, training=training)

    @property
    def metrics(self):
        return [self.loss_tracker]

    def train_step(self, data):
        images, labels = data
        local_batch = tf.cast(tf.shape(images)[0], "float32")
        global_batch = tf.distribute.get_replica_context().all_reduce("SUM", local_batch)
        with tf.GradientTape() as tape:
            per_example = keras.losses.sparse_categorical_crossentropy(
                labels, self(images, training=True), from_logits=True
            )
            loss = tf.reduce_sum(per_example) / global_batch
        variables = self.net.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        self.loss_tracker.update_state(per_example)
        return {"loss": self.loss_tracker.result()}

    def test_step(self, data):
        images, labels = data
        per_example = keras.losses.sparse_categorical_crossentropy(
            labels, self(images, training=False), from_logits=True
        )
        self.loss_tracker.update_state(per_example)
        return {"loss": self.loss_tracker.result()}


def _tiny_data(size=48, batch=16):
    rng = np.random.default_rng(3)
    images = rng.normal(size=(size, 4)).astype("float32")
    labels = rng.integers(0, 3, size).astype("int32")
    train = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch).repeat()
    validation = tf.data.Dataset.from_tensor_slices((images[:40], labels[:40])).batch(batch)
    return train, validation


def _tiny_model(seed=0):
    keras.utils.set_random_seed(seed)
    model = TinyClassifier()
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    return model


def _weights(model):
    return [np.array(w) for w in model.get_weights()]


def _assert_same_weights(first, second, atol=1e-6):
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_allclose(a, b, atol=atol, rtol=0)


# --- strategy and precision helpers -------------------------------------------------


def test_make_strategy_rejects_unknown_names_and_stray_devices():
    with pytest.raises(ConfigError, match="train.strategy"):
        strategy_lib.make_strategy("horovod")
    with pytest.raises(ConfigError, match="mirrored"):
        strategy_lib.make_strategy("default", devices=["/cpu:0"])


def test_default_strategy_is_single_process_chief():
    strategy = strategy_lib.make_strategy("default")
    assert strategy.num_replicas_in_sync == 1
    assert cluster.is_chief(strategy)
    assert not cluster.is_multi_worker(strategy)
    assert not loop.uses_custom_loop(strategy)


def test_synchronized_bn_resolution():
    strategy = strategy_lib.make_strategy("default")
    assert strategy_lib.use_synchronized_bn(None, strategy) is False
    assert strategy_lib.use_synchronized_bn(True, strategy) is True
    assert strategy_lib.use_synchronized_bn(False, strategy) is False


def test_set_precision_sets_and_rejects():
    try:
        policy = strategy_lib.set_precision("mixed_bfloat16")
        assert policy.compute_dtype == "bfloat16"
        assert policy.variable_dtype == "float32"
        assert keras.layers.Dense(2).dtype_policy.compute_dtype == "bfloat16"
        with pytest.raises(ConfigError, match="train.precision"):
            strategy_lib.set_precision("float8")
    finally:
        strategy_lib.set_precision("float32")
    assert keras.config.dtype_policy().name == "float32"


def test_chief_writes_to_base(tmp_path):
    strategy = strategy_lib.make_strategy("default")
    base = str(tmp_path / "checkpoints")
    assert cluster.worker_dir(base, strategy) == base
    assert os.path.isdir(base)
    cluster.remove_worker_dir(base, base)
    assert os.path.isdir(base), "the chief's directory is never removed"


def test_read_backup_epoch(tmp_path):
    assert backup.read_backup_epoch(str(tmp_path)) == 0
    (tmp_path / "training_metadata.json").write_text(json.dumps({"epoch": 7}))
    assert backup.read_backup_epoch(str(tmp_path)) == 7


# --- the custom loop against Keras' fit (one process) -------------------------------


def test_custom_loop_matches_keras_fit():
    train, validation = _tiny_data()
    strategy = tf.distribute.get_strategy()

    reference = _tiny_model()
    expected = reference.fit(
        train, epochs=2, steps_per_epoch=3, validation_data=validation, verbose=0
    ).history

    model = _tiny_model()
    history = loop.custom_fit(
        model, train, strategy=strategy, epochs=2, steps_per_epoch=3,
        validation_data=validation,
    ).history

    assert set(history) == {"loss", "val_loss"}
    for key in expected:
        np.testing.assert_allclose(history[key], expected[key], rtol=1e-6)
    _assert_same_weights(_weights(model), _weights(reference))
    assert model.optimizer.iterations.numpy() == 6
    evaluated = loop.custom_evaluate(model, validation, strategy=strategy)
    np.testing.assert_allclose(evaluated["loss"], history["val_loss"][-1], rtol=1e-6)
    dispatched = loop.evaluate_model(model, validation, strategy=strategy)
    np.testing.assert_allclose(dispatched["loss"], evaluated["loss"], rtol=1e-6)


def test_custom_loop_calls_callbacks_like_fit(tmp_path):
    train, _ = _tiny_data()
    csv_path = str(tmp_path / "history.csv")
    seen = []
    model = _tiny_model()
    loop.custom_fit(
        model, train, strategy=tf.distribute.get_strategy(), epochs=3, steps_per_epoch=2,
        initial_epoch=1,
        callbacks=[
            keras.callbacks.CSVLogger(csv_path),
            keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: seen.append(epoch)),
        ],
    )
    assert seen == [1, 2]
    with open(csv_path) as f:
        rows = f.read().splitlines()
    # Keras' CSVLogger always adds val_ columns (empty without validation data).
    assert rows[0].split(",")[:2] == ["epoch", "loss"]
    assert [row.split(",")[0] for row in rows[1:]] == ["1", "2"]


@pytest.mark.parametrize("driver", ["keras_fit", "custom_loop"])
def test_backup_and_restore_resumes_like_an_uninterrupted_run(tmp_path, driver):
    train, _ = _tiny_data()
    strategy = tf.distribute.get_strategy()

    def run(model, epochs, callbacks):
        if driver == "keras_fit":
            return model.fit(
                train, epochs=epochs, steps_per_epoch=3, callbacks=callbacks, verbose=0
            )
        return loop.custom_fit(
            model, train, strategy=strategy, epochs=epochs, steps_per_epoch=3,
            callbacks=callbacks,
        )

    uninterrupted = _tiny_model()
    run(uninterrupted, 3, [])

    backup_dir = str(tmp_path / "backup")
    first = _tiny_model()
    run(first, 2, [backup.BackupAndRestore(backup_dir, strategy, delete_checkpoint=False)])
    assert backup.read_backup_epoch(backup_dir) == 2
    assert sorted(os.listdir(backup_dir)) == ["epoch_2.weights.h5", "training_metadata.json"]

    # A fresh process would rebuild the model with different random weights.
    resumed = _tiny_model(seed=99)
    # The interrupted run's data iterator had consumed 2 epochs: skip them here.
    train = train.skip(6)
    history = run(resumed, 3, [backup.BackupAndRestore(backup_dir, strategy)])
    assert len(history.history["loss"]) == 1, "only the third epoch runs after the resume"
    assert resumed.optimizer.iterations.numpy() == 9
    _assert_same_weights(_weights(resumed), _weights(uninterrupted))
    assert not os.path.exists(backup_dir), "delete_checkpoint removes the backup at the end"


# --- several replicas, in subprocesses ------------------------------------------------


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_processes(commands_and_envs, log_dir, timeout_s=SUBPROCESS_TIMEOUT_S):
    """Runs processes concurrently; kills every one left on timeout or failure."""
    processes = []
    try:
        for index, (command, env) in enumerate(commands_and_envs):
            log = open(os.path.join(log_dir, f"process_{index}.log"), "w")  # noqa: SIM115
            processes.append((subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
            ), log))
        for process, _ in processes:
            process.wait(timeout=timeout_s)
    finally:
        for process, log in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()
    for index, (process, _) in enumerate(processes):
        if process.returncode != 0:
            with open(os.path.join(log_dir, f"process_{index}.log")) as f:
                tail = f.read()[-4000:]
            pytest.fail(f"subprocess {index} exited with {process.returncode}:\n{tail}")


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **extra)
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


# N replicas vs one device (or the same run on another BN code path) differ only by float32
# rounding, grown over 4 SGD steps; tests/distributed_worker.py keeps that small with a
# learning rate of 0.01. Measured there: weights 2.5e-4 apart, losses and loss terms
# 6e-5 (relative), where per-replica BN statistics (synchronized BN off) move the weights
# by 0.15 and the losses by 6e-4, and twice the gradient on the replicas (a per-replica
# instead of a global batch size) moves them by 0.013 and 3.6 %.
WEIGHT_ATOL = 5e-3
LOSS_RTOL = 1.5e-4
METRIC_RTOL = 1e-3


def _metric_atol(key):
    """Accuracies may flip one near-tied example of the 20 validation images."""
    return 0.05 + 1e-6 if key.endswith(("top1", "top5")) else 1e-6


def _load_state(path):
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def _max_difference(first, second):
    assert sorted(first) == sorted(second)
    return max(float(np.abs(first[key] - second[key]).max()) for key in first)


@pytest.mark.slow
def test_mirrored_two_cpus_matches_one_device(tmp_path):
    """(a) SOKD with synchronized BN: 2 replicas == 1 device on the same global batch."""
    _run_processes([([sys.executable, WORKER, "mirrored_vs_default", str(tmp_path)], _env())],
                   str(tmp_path))
    data = _load_state(tmp_path / "mirrored_vs_default.npz")
    assert int(data["default:replicas"]) == 1
    assert int(data["mirrored:replicas"]) == 2
    assert int(data["default:iterations"]) == int(data["mirrored:iterations"]) == 4
    np.testing.assert_allclose(data["mirrored:loss"], data["default:loss"], rtol=LOSS_RTOL)
    def variables(run):
        return {k.split(":", 1)[1]: v for k, v in data.items() if k.startswith(f"{run}:") and "/" in k}

    default, mirrored = variables("default"), variables("mirrored")
    assert len(default) > 100, "teacher, peer and student variables are all compared"
    assert _max_difference(default, mirrored) < WEIGHT_ATOL


def _train_workers(out_dir, epochs):
    ports = [_free_port(), _free_port()]
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    commands = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        commands.append(([sys.executable, WORKER, "train", str(out_dir), str(epochs)],
                         _env(TF_CONFIG=tf_config)))
    _run_processes(commands, str(out_dir))
    results = []
    for index in range(2):
        with open(out_dir / f"result_{index}.json") as f:
            results.append(json.load(f))
    return results


@pytest.mark.slow
def test_multi_worker_sokd_trains_identically_and_resumes_from_the_chief(tmp_path):
    """(b) 2 workers on 127.0.0.1: identical weights, chief-only files, resume."""
    # Phase 1: one epoch, then the workers exit as if the job was stopped.
    phase_one = _train_workers(tmp_path, epochs=1)
    assert [r["chief"] for r in phase_one] == [True, False]
    assert all(r["custom_loop"] and r["replicas"] == 2 for r in phase_one)
    assert all(r["first_epoch"] == 0 for r in phase_one)
    assert backup.read_backup_epoch(str(tmp_path / "backup")) == 1
    # Phase 2: new processes resume from the chief's backup and run epoch 2.
    phase_two = _train_workers(tmp_path, epochs=2)
    for result in phase_two:
        assert result["first_epoch"] == 1
        assert len(result["history"]["loss"]) == 1, "only the second epoch ran"
        assert result["iterations"] == 4
    assert phase_two[0]["history"] == phase_two[1]["history"]
    assert phase_two[0]["evaluation"] == phase_two[1]["evaluation"]
    worker_states = [_load_state(tmp_path / f"weights_{i}.npz") for i in range(2)]
    assert _max_difference(worker_states[0], worker_states[1]) == 0.0

    # Only the chief's checkpoint is kept; the other worker's temp dir is gone.
    assert os.listdir(tmp_path / "checkpoints") == ["student.keras"]
    assert phase_two[0]["write_dir"] == str(tmp_path / "checkpoints")
    assert not os.path.exists(phase_two[1]["write_dir"])

    # The same two epochs in one process on the same global batches.
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    _run_processes([([sys.executable, WORKER, "train", str(reference_dir), "2"], _env())],
                   str(reference_dir))
    reference = _load_state(reference_dir / "weights_0.npz")
    assert _max_difference(worker_states[0], reference) < WEIGHT_ATOL
    with open(reference_dir / "result_0.json") as f:
        reference_history = json.load(f)["history"]
    with open(reference_dir / "result_0.json") as f:
        reference_evaluation = json.load(f)["evaluation"]
    for key, value in phase_two[0]["evaluation"].items():
        np.testing.assert_allclose(value, reference_evaluation[key], rtol=METRIC_RTOL,
                                   atol=_metric_atol(key), err_msg=key)
    for key, values in phase_two[0]["history"].items():
        np.testing.assert_allclose(
            values, reference_history[key][-1:], rtol=METRIC_RTOL, atol=_metric_atol(key),
            err_msg=key,
        )


@pytest.mark.slow
def test_multi_worker_divergence_on_one_worker_stops_every_worker_at_the_same_step(tmp_path):
    """Only worker 1's replica goes non-finite; the check's read is a sum over replicas,
    so both workers raise the same DivergedError at the same step and none hangs."""
    ports = [_free_port(), _free_port()]
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    commands = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        commands.append(([sys.executable, WORKER, "diverge", str(tmp_path)],
                         _env(TF_CONFIG=tf_config)))
    _run_processes(commands, str(tmp_path))
    results = [json.loads((tmp_path / f"result_{i}.json").read_text()) for i in range(2)]
    assert results[0]["error"] == results[1]["error"]
    assert results[0]["error"].startswith(
        "distill diverged at epoch 1, step 2: peer/ml_from_student is nan;"
    )
    record = json.loads((tmp_path / "distill" / "diverged.json").read_text())
    assert record["non_finite"]["student/ce"] == "nan"
    assert not os.path.exists(results[1]["write_dir"]), "the other worker's files are gone"
    assert not (tmp_path / "distill" / "backup").exists(), "no epoch completed"


@pytest.mark.slow
def test_multi_worker_pipeline_run_trains_on_both_and_exports_once(small_fashion_mnist, tmp_path):
    """`pipelines.run --strategy=multi_worker` on 2 workers: teacher, SOKD, chief-only rest."""
    from test_pipelines import _tiny_flags

    workdir = tmp_path / "run"
    ports = [_free_port(), _free_port()]
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    commands = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        command = [sys.executable, "-m", "pipelines.run", "--strategy=multi_worker",
                   *_tiny_flags(small_fashion_mnist, workdir, epochs=1)]
        commands.append((command, _env(TF_CONFIG=tf_config, CI="1")))
    _run_processes(commands, str(tmp_path), timeout_s=600)

    for path in ("teacher/teacher.keras", "teacher/results.json", "distill/student_last.keras",
                 "distill/results.json", "evaluation.json", "export/report.json", "report.md"):
        assert (workdir / path).exists(), path
    # Both workers trained every epoch together (the chief's history has them all) and
    # the other worker's temporary write directories are gone.
    history = json.loads((workdir / "distill" / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1]
    assert sorted(os.listdir(workdir)) == sorted(
        ["config.json", "teacher", "distill", "evaluation.json", "export", "report.md", "run.json",
         "plots"]
    )
    logs = [(tmp_path / f"process_{i}.log").read_text() for i in range(2)]
    assert f"report: {workdir}/report.md" in logs[0]
    assert "the chief worker evaluates, exports" in logs[1]
    assert sorted(p.name for p in (workdir / "export" / "serving" / "student").iterdir()) == ["1"]
