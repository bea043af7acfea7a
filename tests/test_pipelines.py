"""Pipelines: flag validation, refused config changes, an end-to-end run, resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from absl import flags
from absl.testing import flagsaver

from pipelines import common
from pipelines import distill as distill_pipeline
from sokd_tf import config as config_lib
from sokd_tf.errors import ConfigError, DataError, UserError
from sokd_tf.stages import run as run_stage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS


def _tiny_flags(data_dir, workdir, epochs=2):
    return [
        f"--workdir={workdir}",
        f"--data_dir={data_dir}",
        "--teacher=wrn_16_1",
        "--student=wrn_16_1",
        "--batch_size=64",
        "--eval_batch_size=128",
        "--validation_size=128",
        f"--epochs={epochs}",
        "--teacher_epochs=1",
        "--lr_decay_epochs=1",
        "--steps_per_epoch=3",
        "--tflite_variants=fp32",
        "--representative_size=16",
        "--latency_runs=5",
        "--qat_epochs=0",
    ]


@pytest.fixture
def parsed_flags(tmp_path):
    if not FLAGS.is_parsed():
        FLAGS(["test", f"--workdir={tmp_path}"])
    with flagsaver.flagsaver(workdir=str(tmp_path)):
        yield


def test_negative_temperature_is_a_config_error(parsed_flags):
    with flagsaver.flagsaver(temperature=-1.0), pytest.raises(ConfigError, match="loss.temperature"):
        common.config_from_flags()


def test_list_flag_with_bad_items(parsed_flags):
    with flagsaver.flagsaver(lr_decay_epochs=["ten"]), pytest.raises(UserError, match="lr_decay_epochs"):
        common.config_from_flags()


def test_unknown_model_spec_is_a_config_error(parsed_flags):
    with flagsaver.flagsaver(teacher="resnet_9000"), pytest.raises(
        ConfigError, match="unknown model spec 'resnet_9000'"
    ):
        common.config_from_flags()


def test_missing_teacher_checkpoint(parsed_flags, tmp_path):
    missing = str(tmp_path / "nope.keras")
    with flagsaver.flagsaver(method="sokd", teacher_checkpoint=missing), pytest.raises(
        UserError, match="nope.keras"
    ):
        distill_pipeline.body()


def test_unreadable_data_dir(parsed_flags, tmp_path):
    missing = str(tmp_path / "no_such_dir")
    with flagsaver.flagsaver(method="dml", data_dir=missing), pytest.raises(
        DataError, match="no_such_dir"
    ):
        distill_pipeline.body()


def test_changed_config_is_refused_unless_overwrite(tmp_path):
    first = config_lib.resolve("quickstart")
    run_stage.prepare_workdir(first, str(tmp_path))
    run_stage.prepare_workdir(first, str(tmp_path))  # Same config: resumes, no error.
    changed = config_lib.resolve("quickstart", {"train.epochs": 99})
    with pytest.raises(ConfigError, match=rf"train\.epochs: {first.train.epochs} -> 99"):
        run_stage.prepare_workdir(changed, str(tmp_path))
    (tmp_path / "distill").mkdir()
    run_stage.prepare_workdir(changed, str(tmp_path), overwrite=True)
    assert not (tmp_path / "distill").exists()
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["train"]["epochs"] == 99


def test_a_run_from_before_the_cache_modes_resumes(tmp_path):
    config = config_lib.resolve("quickstart")
    run_stage.prepare_workdir(config, str(tmp_path))
    stored = json.loads((tmp_path / "config.json").read_text())
    # config.json as written before `cache` had modes and a memory budget.
    stored["data"]["cache"] = True
    del stored["data"]["cache_budget_mb"]
    (tmp_path / "config.json").write_text(json.dumps(stored))
    run_stage.prepare_workdir(config, str(tmp_path))  # how data is held is not a change
    assert "history" not in json.loads((tmp_path / "config.json").read_text())
    streamed = config_lib.resolve("quickstart", {"data.cache": "never", "data.cache_budget_mb": 1})
    run_stage.prepare_workdir(streamed, str(tmp_path))
    reordered = config_lib.resolve("quickstart", {"data.shuffle_window_mb": 1})
    with pytest.raises(ConfigError, match=r"data\.shuffle_window_mb"):
        run_stage.prepare_workdir(reordered, str(tmp_path))


def _pipeline(name, args, **kwargs):
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, "-m", f"pipelines.{name}", *args],
        cwd=REPO, env=env, capture_output=True, text=True, **kwargs,
    )


def test_bad_flag_exits_nonzero_with_one_line(tmp_path):
    result = _pipeline("run", [f"--workdir={tmp_path}", "--temperature=-2"], timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: loss.temperature must be > 0.0, got -2.0"
    assert not (tmp_path / "config.json").exists()


def test_evaluate_on_a_workdir_without_models_is_one_error(tmp_path):
    result = _pipeline("evaluate", [f"--workdir={tmp_path}"], timeout=120)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {tmp_path} holds no saved model to evaluate")
    assert "--model_path" in last and "[data]" not in result.stderr  # refused before reading data


@pytest.mark.slow
def test_run_end_to_end(small_fashion_mnist, tmp_path):
    workdir = tmp_path / "run"
    result = _pipeline("run", _tiny_flags(small_fashion_mnist, workdir), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for path in (
        "config.json", "teacher/teacher.keras", "distill/student_best.keras",
        "distill/student_last.keras", "distill/reconstructed_teacher_best.keras",
        "distill/history.csv", "evaluation.json", "export/report.json", "report.md",
        "plots/distill_curves.png", "plots/accuracy.png",
    ):
        assert (workdir / path).exists(), path
    assert list((workdir / "export" / "tflite").glob("*.tflite"))
    assert list((workdir / "export" / "serving" / "student").iterdir())
    assert list((workdir / "distill" / "logs").rglob("events.out.tfevents.*"))
    history = json.loads((workdir / "distill" / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    assert {"test_student/top1", "val_peer/top1", "peer/kd_from_teacher", "learning_rate"} <= set(history[0])
    report = (workdir / "report.md").read_text()
    assert "student" in report and "reconstructed teacher" in report
    _check_numbers_agree(workdir)
    resources = json.loads((workdir / "run.json").read_text())
    assert resources["wall_seconds"] > 0 and resources["peak_rss_bytes"] > 100e6
    assert resources["resumed"] is False
    assert "Run: " in report and " min " in result.stdout and "peak memory" in result.stdout

    # The other entry points work on the finished workdir. Evaluating another split
    # prints it and leaves evaluation.json (test figures) as it was.
    written = (workdir / "evaluation.json").read_text()
    result = _pipeline("evaluate", [f"--workdir={workdir}", "--split=train"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    on_train = json.loads(result.stdout[result.stdout.index("{"):])
    assert set(on_train) == set(json.loads(written))
    assert 0.0 <= on_train["student_last"]["top1"] <= 1.0
    assert (workdir / "evaluation.json").read_text() == written
    result = _pipeline(
        "export_student",
        [f"--workdir={workdir}", f"--student_file={workdir}/distill/student_last.keras",
         "--tflite_variants=fp32", "--latency_runs=3"],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (workdir / "export" / "serving" / "student").iterdir()) == ["1", "2"]


def _percent(value):
    return f"{100 * value:.2f}"


def _table_rows(report, header):
    """Cells of the markdown table that follows `header` in report.md, by first cell."""
    lines = report[report.index(header):].splitlines()[1:]
    rows = {}
    for line in lines:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = cells
    del rows[next(iter(rows))]  # the header row
    rows = {key: cells for key, cells in rows.items() if not set(cells[1]) <= set("-:")}
    return rows


def _check_numbers_agree(workdir):
    """The re-evaluation from disk and the report say what the training stage measured."""
    distill = json.loads((workdir / "distill" / "results.json").read_text())
    evaluation = json.loads((workdir / "evaluation.json").read_text())
    history = json.loads((workdir / "distill" / "history.json").read_text())
    student = distill["roles"]["student"]
    # Same weights, same test split: the saved last student scores exactly what the
    # last epoch's test evaluation logged.
    assert evaluation["student_last"]["top1"] == student["last_test_top1"]
    assert student["last_test_top1"] == history[-1]["test_student/top1"]
    assert evaluation["reconstructed_teacher_last"]["top1"] == distill["roles"]["peer"]["last_test_top1"]
    assert evaluation["teacher"]["top1"] == distill["teacher"]["before_distillation"]["top1"]
    assert {"teacher_best", "student_best", "reconstructed_teacher_best"} <= set(evaluation)

    report = (workdir / "report.md").read_text()
    results = _table_rows(report, "## Results (test split)")
    assert results["student"][4] == _percent(student["last_test_top1"])
    assert results["student"][5] == _percent(student["last_test_top5"])
    assert results["student"][2] == str(student["best_epoch"])
    assert results["peer path (reconstructed teacher)"][4] == _percent(
        distill["roles"]["peer"]["last_test_top1"])
    assert results["teacher, before distillation"][4] == _percent(
        distill["teacher"]["before_distillation"]["top1"])
    on_disk = _table_rows(report, "## Saved models re-evaluated from disk")
    assert len(on_disk) == len(evaluation)
    for result in evaluation.values():
        cells = on_disk[f"`{os.path.relpath(result['path'], workdir)}`"]
        assert cells[1] == f"{result['params']:,}"
        assert cells[2] == _percent(result["top1"]) and cells[3] == _percent(result["top5"])
    export = json.loads((workdir / "export" / "report.json").read_text())
    variants = _table_rows(report, "## Exports")
    for signature, check in export["saved_model"]["verification"].items():
        assert (f"`{signature}` against the Keras student on {check['num_examples']:,} test images: "
                f"class agreement {_percent(check['agreement'])} %, max |logit difference| "
                f"{check['max_abs_logit_error']:.2g}") in report
    for name, result in export["tflite"].items():
        assert variants[name][3] == _percent(result["top1"])
        assert variants[name][4] == _percent(result["agreement"])


@pytest.mark.slow
def test_run_in_mixed_bfloat16_trains_in_bf16_and_exports_float32(small_fashion_mnist, tmp_path):
    """The whole job under --precision=mixed_bfloat16, QAT variant included."""
    import keras

    workdir = tmp_path / "run"
    flags = [f for f in _tiny_flags(small_fashion_mnist, workdir, epochs=1)
             if not f.startswith(("--tflite_variants", "--qat_epochs"))]
    flags += ["--precision=mixed_bfloat16", "--tflite_variants=fp32,qat_int8",
              "--qat_epochs=1", "--qat_max_steps=2"]
    result = _pipeline("run", flags, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    student = keras.saving.load_model(str(workdir / "distill" / "student_last.keras"))
    assert student.get_layer("group1_block1_conv1").dtype_policy.name == "mixed_bfloat16"
    report = json.loads((workdir / "export" / "report.json").read_text())
    assert report["tflite"]["fp32"]["input_dtype"] == "float32"
    assert report["tflite"]["fp32"]["agreement"] >= 0.99
    assert (workdir / "export" / "tflite" / "qat_int8.tflite").exists()
    assert report["saved_model"]["verification"]["serving_default"]["max_abs_logit_error"] < 1e-4


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(small_fashion_mnist, tmp_path):
    """Kill `run` right after the first distillation epoch is backed up, rerun, compare."""
    import keras
    import numpy as np

    epochs = 3
    reference = tmp_path / "reference"
    result = _pipeline("run", _tiny_flags(small_fashion_mnist, reference, epochs), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]

    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
    process = subprocess.Popen(
        [sys.executable, "-m", "pipelines.run", *_tiny_flags(small_fashion_mnist, killed, epochs)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    metadata = killed / "distill" / "checkpoints" / "backup" / "training_metadata.json"
    deadline = time.time() + 600
    try:
        while time.time() < deadline and process.poll() is None:
            if metadata.exists() and json.loads(metadata.read_text() or "{}").get("epoch") == 1:
                break
            time.sleep(0.05)
        assert process.poll() is None, "run finished before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert not (killed / "distill" / "results.json").exists()

    result = _pipeline("run", _tiny_flags(small_fashion_mnist, killed, epochs), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((killed / "distill" / "history.json").read_text())
    reference_history = json.loads((reference / "distill" / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2, 3]
    # The schedule continued: same learning rate per epoch as the uninterrupted run.
    assert [row["learning_rate"] for row in history] == [r["learning_rate"] for r in reference_history]
    resumed = keras.saving.load_model(killed / "distill" / "student_last.keras")
    uninterrupted = keras.saving.load_model(reference / "distill" / "student_last.keras")
    for a, b in zip(resumed.weights, uninterrupted.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_run_resources_line_and_record():
    from sokd_tf.stages import report as report_stage

    record = {"wall_seconds": 819.4, "peak_rss_bytes": 1_254_000_000, "resumed": False}
    assert report_stage.describe_resources(record) == "13 min 39 s wall, peak memory 1.25 GB"
    resumed = report_stage.describe_resources({**record, "resumed": True})
    assert resumed.startswith("13 min 39 s wall") and "resumed" in resumed
    started = time.monotonic() - 2.0
    measured = run_stage.resources(started, resumed=True)
    assert 2.0 <= measured["wall_seconds"] < 60 and measured["resumed"] is True
    # This test process has imported TensorFlow: well above 100 MB resident.
    assert measured["peak_rss_bytes"] > 100e6
