"""`.keras` round trips (safe_mode on) of every model the pipeline saves, and of trainers."""

import keras
import numpy as np
import pytest

from sokd_tf import distillers, models
from sokd_tf.config import TrainConfig
from sokd_tf.models import peer as peer_lib

SHAPE = (16, 16, 3)


def images(n=4, seed=0):
    return np.random.default_rng(seed).normal(size=(n, *SHAPE)).astype(np.float32)


@pytest.fixture(scope="module")
def trained_sokd():
    """A SOKD trainer after one real step (BN statistics and weights off their init)."""
    keras.utils.set_random_seed(0)
    teacher = models.BUILDERS["wrn_16_1"](SHAPE, 10, name="teacher")
    peer = peer_lib.build_peer(teacher)
    student = models.BUILDERS["wrn_16_1"](SHAPE, 10, name="student")
    trainer = distillers.SemiOnlineDistiller(teacher, peer, student)
    trainer.compile(optimizer=distillers.make_optimizer(TrainConfig(), 1))
    trainer.fit(images(8), np.arange(8) % 10, batch_size=8, epochs=1, verbose=0)
    return trainer


def round_trip(model, path):
    model.save(path)
    return keras.models.load_model(path, safe_mode=True)


@pytest.mark.parametrize("role", ["student", "peer", "reconstructed_teacher", "teacher"])
def test_models_round_trip(trained_sokd, tmp_path, role):
    if role == "reconstructed_teacher":
        model = peer_lib.build_reconstructed_teacher(trained_sokd.teacher, trained_sokd.peer)
        inputs = images()
    elif role == "peer":
        model = trained_sokd.peer
        inputs, _ = trained_sokd.teacher_trunk(images(), training=False)
    else:
        model = getattr(trained_sokd, role)
        inputs = images()
    loaded = round_trip(model, str(tmp_path / f"{role}.keras"))
    assert loaded.name == model.name
    assert loaded.count_params() == model.count_params()
    np.testing.assert_array_equal(
        loaded.predict(inputs, verbose=0), model.predict(inputs, verbose=0)
    )
    assert models.stage_names(loaded) == models.stage_names(model)


def test_reconstructed_teacher_loads_standalone(trained_sokd, tmp_path):
    reconstructed = peer_lib.build_reconstructed_teacher(trained_sokd.teacher, trained_sokd.peer)
    loaded = round_trip(reconstructed, str(tmp_path / "reconstructed.keras"))
    # Independent of the trainer's models: changing the peer leaves the file's model alone.
    before = loaded.predict(images(), verbose=0)
    for variable in trained_sokd.peer.trainable_variables:
        variable.assign(variable * 0.0)
    np.testing.assert_array_equal(loaded.predict(images(), verbose=0), before)


def test_trainer_round_trips_with_its_config(trained_sokd, tmp_path):
    loaded = round_trip(trained_sokd, str(tmp_path / "sokd.keras"))
    assert isinstance(loaded, distillers.SemiOnlineDistiller)
    assert loaded.teacher_bn_mode == "official" and loaded.temperature == 4.0
    assert loaded.loss_weights_by_term == trained_sokd.loss_weights_by_term
    np.testing.assert_array_equal(
        loaded.predict(images(), verbose=0), trained_sokd.predict(images(), verbose=0)
    )
    assert not loaded.teacher.trainable_weights  # the teacher stays out of the optimizer


@pytest.mark.parametrize("kind", ["vanilla", "kd", "dml"])
def test_baseline_trainers_round_trip(tmp_path, kind):
    keras.utils.set_random_seed(1)
    student = models.BUILDERS["wrn_16_1"](SHAPE, 10, name="student")
    other = models.BUILDERS["wrn_16_1"](SHAPE, 10, name="other")
    trainer = {
        "vanilla": lambda: distillers.VanillaTrainer(student, role="student"),
        "kd": lambda: distillers.KnowledgeDistiller(other, student, teacher_bn_mode="frozen"),
        "dml": lambda: distillers.MutualLearner(other, student, temperature=2.0),
    }[kind]()
    loaded = round_trip(trainer, str(tmp_path / f"{kind}.keras"))
    assert type(loaded) is type(trainer)
    assert loaded.get_config().keys() == trainer.get_config().keys()
    np.testing.assert_array_equal(
        loaded.predict(images(), verbose=0), trainer.predict(images(), verbose=0)
    )


# What a user writes to load a student file: keras, and `import sokd_tf` (or not).
LOAD_SCRIPT = """
import sys
import keras
import numpy as np
{import_sokd_tf}
model = keras.saving.load_model(sys.argv[1])  # safe mode on
print("LAYERS", *sorted({{f"{{type(l).__module__}}.{{type(l).__name__}}"
                         for l in model._flatten_layers()}}))
np.save(sys.argv[3], np.asarray(model(np.load(sys.argv[2]), training=False)))
"""


def test_student_file_loads_in_a_fresh_process_with_import_sokd_tf_alone(tmp_path):
    """`import sokd_tf` registers the builders' FusedBatchNormalization; without it,
    plain `keras.saving.load_model` cannot load the file."""
    import os
    import subprocess
    import sys

    student = models.BUILDERS["wrn_10_1"](SHAPE, 10, name="student")
    path = str(tmp_path / "student.keras")
    student.save(path)
    expected = np.asarray(student(images(), training=False))
    np.save(tmp_path / "images.npy", images())
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [root, *filter(None, [os.environ.get("PYTHONPATH")])]), TF_CPP_MIN_LOG_LEVEL="2")
    runs = {}
    for name, line in (("with", "import sokd_tf"),
                       ("without", "assert 'sokd_tf' not in sys.modules")):
        script = tmp_path / f"load_{name}.py"
        script.write_text(LOAD_SCRIPT.format(import_sokd_tf=line))
        arguments = [path, str(tmp_path / "images.npy"), str(tmp_path / f"logits_{name}.npy")]
        runs[name] = subprocess.Popen(
            [sys.executable, str(script), *arguments], env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
    results = {}
    for name, run in runs.items():
        stdout, stderr = run.communicate(timeout=300)
        results[name] = (run.returncode, stdout, stderr)

    code, stdout, stderr = results["with"]
    assert code == 0, stderr[-3000:]
    layers = stdout.split("LAYERS", 1)[1].split()
    assert "sokd_tf.models.fused_batch_norm.FusedBatchNormalization" in layers, layers
    np.testing.assert_allclose(np.load(tmp_path / "logits_with.npy"), expected,
                               rtol=1e-5, atol=1e-5)

    code, stdout, stderr = results["without"]
    assert code != 0, stdout
    assert "Could not locate class 'FusedBatchNormalization'" in stderr, stderr[-3000:]
    assert not (tmp_path / "logits_without.npy").exists()


TRAINER_LOAD_SCRIPT = """
import sys
import keras
import numpy as np
import sokd_tf
trainer = keras.saving.load_model(sys.argv[1])  # safe mode on
print("LOADED", type(trainer).__name__, type(trainer.optimizer).__name__,
      int(trainer.optimizer.iterations), *[m.name for m in trainer.metrics])
np.save(sys.argv[3], np.asarray(trainer(np.load(sys.argv[2]), training=False)))
"""


def test_trainer_file_loads_in_a_fresh_process_with_import_sokd_tf_alone(tmp_path):
    """A whole trainer `.keras` (trainer class, PyTorchSGD, EpochStepDecay, user metrics)
    loads with plain `keras.saving.load_model` once `sokd_tf` is imported."""
    import os
    import subprocess
    import sys

    keras.utils.set_random_seed(2)
    teacher = models.BUILDERS["wrn_10_1"](SHAPE, 10, name="teacher")
    student = models.BUILDERS["wrn_10_1"](SHAPE, 10, name="student")
    trainer = distillers.SemiOnlineDistiller(teacher, peer_lib.build_peer(teacher), student)
    trainer.compile(optimizer=distillers.make_optimizer(TrainConfig(), 1), metrics=["accuracy"])
    trainer.fit(images(8), np.arange(8) % 10, batch_size=8, epochs=1, verbose=0)
    path = str(tmp_path / "sokd.keras")
    trainer.save(path)
    np.save(tmp_path / "images.npy", images())
    script = tmp_path / "load_trainer.py"
    script.write_text(TRAINER_LOAD_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [root, *filter(None, [os.environ.get("PYTHONPATH")])]), TF_CPP_MIN_LOG_LEVEL="2")
    run = subprocess.run(
        [sys.executable, str(script), path, str(tmp_path / "images.npy"),
         str(tmp_path / "logits.npy")],
        env=env, text=True, capture_output=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = run.stdout.split("LOADED", 1)[1].split()
    assert loaded[:3] == ["SemiOnlineDistiller", "PyTorchSGD", "1"]
    assert "student/accuracy" in loaded and "peer/accuracy" in loaded
    np.testing.assert_array_equal(np.load(tmp_path / "logits.npy"),
                                  np.asarray(trainer(images(), training=False)))
