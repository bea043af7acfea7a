"""The command line: `--help` with effective values, one-line errors, quiet start, progress.

The command-line checks run the real entry points (`python -m sokd_tf ...`,
`python -m pipelines.<module>`) in subprocesses, with `TF_CPP_MIN_LOG_LEVEL` removed from
their environment so the quiet start has to come from the commands themselves. Each
subprocess pays one TensorFlow import, so the invocations of a test run side by side.
The installed `sokd-tf` script is exercised in tests/test_package.py.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from pipelines import cli, common
from pipelines import run as run_pipeline  # noqa: F401  (defines the flags of `run`)
from sokd_tf import config as config_lib
from sokd_tf.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
TIMEOUT_S = 300


def _env():
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    env.pop("TF_CONFIG", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    return env


def _commands(*commands):
    """Runs each argument list as `python ARGS...` at the same time; CompletedProcess each."""
    processes = [
        subprocess.Popen([sys.executable, *args], cwd=REPO, env=_env(), text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for args in commands
    ]
    results = []
    try:
        for args, process in zip(commands, processes, strict=True):
            stdout, stderr = process.communicate(timeout=TIMEOUT_S)
            results.append(subprocess.CompletedProcess(args, process.returncode, stdout, stderr))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


def _flag_entry(help_text: str, name: str) -> tuple[str, str]:
    """(`--name=value ...` line, one-line help) of flag `name` in a command's --help."""
    match = re.search(rf"^  --{name}\b(.*)\n      (.*)$", help_text, flags=re.M)
    assert match, f"--{name} not in the help:\n{help_text}"
    return match.group(1), match.group(2)


# --- in-process: flags, help text and precedence -----------------------------------


def test_every_config_field_has_a_flag_with_its_docstring_help():
    helps = common.field_help()
    for dotted in config_lib.field_types():
        name = common.flag_name(dotted)
        assert name in FLAGS, name
        assert dotted in helps, f"{dotted} has no entry in its dataclass's Attributes docstring"
        assert helps[dotted] in FLAGS[name].help
        assert len(helps[dotted]) > 10
    assert helps["loss.temperature"] == "T of SOKD and KD (KL terms scaled by T^2)."
    # "a .. b" and "a, b" entries document every field they name.
    assert helps["loss.peer_kd_weight"] == helps["loss.student_ml_weight"]
    assert helps["train.peer_learning_rate"] == helps["train.teacher_learning_rate"]


def test_precedence_defaults_preset_config_file_flags(tmp_path):
    path = tmp_path / "overrides.yaml"
    path.write_text("train:\n  epochs: 5\n  teacher_epochs: 2\nloss.temperature: 2.5\n")
    if not FLAGS.is_parsed():
        FLAGS(["test", f"--workdir={tmp_path}"])
    with flagsaver.flagsaver(config=str(path), epochs=7):
        config = common.config_from_flags()
    assert config.train.epochs == 7  # flag > file
    assert (config.train.teacher_epochs, config.loss.temperature) == (2, 2.5)  # file > preset
    assert config.model.teacher == "wrn_16_1"  # preset > library default
    assert config.train.momentum == 0.9  # library default
    assert common.config_from_flags().train.epochs == 8  # the quickstart preset again


def test_workdir_commands_use_the_stored_config_and_refuse_a_preset(tmp_path):
    stored = config_lib.resolve("quickstart", {"train.epochs": 3})
    (tmp_path / "config.json").write_text(stored.to_json())
    if not FLAGS.is_parsed():
        FLAGS(["test", f"--workdir={tmp_path}"])
    with flagsaver.flagsaver(eval_batch_size=64):
        config = common.config_for_workdir(str(tmp_path))
    assert config.train.epochs == 3 and config.data.eval_batch_size == 64
    with flagsaver.flagsaver(preset="cifar100_wrn40_2_wrn40_1"), pytest.raises(
        ConfigError, match="--preset does not apply"
    ):
        common.config_for_workdir(str(tmp_path))


def test_jit_compile_under_multi_worker_is_refused():
    with pytest.raises(ConfigError, match="train.jit_compile does not apply"):
        config_lib.resolve(None, {"train.jit_compile": True, "train.strategy": "multi_worker"})


def test_quiet_start_hides_cpp_lines_below_the_level_and_keeps_everything_else():
    from pipelines import startup

    info = b"I0000 00:00:1796165066.862425   21489 port.cc:153] oneDNN custom operations are on.\n"
    error = b"E0000 00:00:1796165085.755779   21489 cuda_platform.cc:52] failed call to cuInit\n"
    notice = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    python_warning = b"/x.py:3: UserWarning: something of ours\n"
    assert [startup._is_hidden(line, 3) for line in (info, error, notice, python_warning)] == [
        True, True, True, False]
    assert [startup._is_hidden(line, 2) for line in (info, error)] == [True, False]


# --- the real entry points ---------------------------------------------------------


def test_bad_number_is_one_line_and_exit_2_without_tensorflow_start_up_lines(tmp_path):
    (result,) = _commands(["-m", "sokd_tf", "run", f"--workdir={tmp_path}", "--temperature=abc"])
    assert result.returncode == 2
    assert result.stderr == "error: flag --temperature=abc: could not convert string to float: 'abc'\n"
    assert result.stdout == ""


@pytest.mark.slow
def test_every_bad_invocation_is_one_error_line_and_exit_2(tmp_path):
    stored = tmp_path / "stored"
    stored.mkdir()
    (stored / "config.json").write_text(config_lib.resolve("quickstart").to_json())
    work = f"--workdir={tmp_path / 'work'}"
    cases = {
        ("-m", "sokd_tf", "run", work, "--method=sokdd"):
            f"error: flag --method=sokdd: value should be one of <{'|'.join(config_lib.METHODS)}>",
        ("-m", "sokd_tf", "run"): "error: --workdir is required",
        ("-m", "sokd_tf", "evaluate", work, "--overwrite"): "error: Unknown command line flag 'overwrite'",
        ("-m", "sokd_tf", "export", f"--workdir={stored}", "--preset=quickstart"):
            f"error: --preset does not apply here: {stored}/config.json is the run's config; "
            "change single fields with --config or flags",
        ("-m", "sokd_tf", "run", work, "--jit_compile", "--strategy=multi_worker"):
            "error: train.jit_compile does not apply under train.strategy='multi_worker': its "
            "training loop runs the step without XLA (docs/SCALING.md); unset jit_compile",
        ("-m", "sokd_tf", "run", work, "stray"): "error: unexpected arguments ['stray']",
        ("-m", "sokd_tf", "teach"):
            f"error: unknown command 'teach'; choose one of {', '.join(cli.COMMANDS)} "
            "(`python -m sokd_tf --help`)",
        ("-m", "sokd_tf", "run", work, "--student=keras.applications.MobileNetV9"):
            "error: model.student: unknown keras.applications model 'MobileNetV9'",
        ("-m", "pipelines.make_tfrecords", "--num_shards=0", f"--out_dir={tmp_path}"):
            "error: flag --num_shards=0: ",
        # The quiet start: only our line, though TensorFlow was imported and probed CUDA.
        ("-m", "pipelines.run", work, "--data_dir=/nonexistent"):
            "error: Fashion-MNIST directory /nonexistent does not exist",
    }
    results = _commands(*cases)
    for (args, expected), result in zip(cases.items(), results, strict=True):
        assert result.returncode == 2, (args, result.stderr[-2000:])
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr[-2000:])
        assert lines[0].startswith(expected), (args, lines[0])
    assert not (tmp_path / "work" / "config.json").exists()


@pytest.mark.slow
def test_help_lists_the_commands_own_flags_with_effective_values(tmp_path):
    config_file = tmp_path / "config.yaml"
    config_file.write_text("train:\n  epochs: 5\n  teacher_epochs: 2\n")
    run_help, paper_help, kd_help, evaluate_help, tfrecords_help, top = _commands(
        ["-m", "sokd_tf", "run", "--help", f"--config={config_file}", "--teacher_epochs=4"],
        ["-m", "pipelines.run", "--preset=cifar100_wrn40_2_wrn40_1", "--help"],
        ["-m", "sokd_tf", "distill", "--method=kd", "-h"],
        ["-m", "sokd_tf", "evaluate", "--help"],
        ["-m", "sokd_tf", "make-tfrecords", "--help"],
        ["-m", "sokd_tf", "--help"],
    )
    for result in (run_help, paper_help, kd_help, evaluate_help, tfrecords_help, top):
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stderr == "", result.stderr[-2000:]

    text = run_help.stdout
    assert text.startswith("usage: python -m sokd_tf run --workdir=... [--flag=value ...]\n")
    assert _flag_entry(text, "temperature") == ("=4.0", "T of SOKD and KD (KL terms scaled by T^2).")
    # Defaults < preset (quickstart) < --config < flags, each shown as the value used.
    assert _flag_entry(text, "teacher")[0] == "=wrn_16_1  (library default: wrn_40_2)"
    assert _flag_entry(text, "teacher")[1].startswith("model spec of the teacher")
    assert _flag_entry(text, "epochs")[0] == "=5  (library default: 200)"
    assert _flag_entry(text, "teacher_epochs")[0] == "=4  (library default: 200)"
    assert _flag_entry(text, "workdir")[0] == "  (required)"
    assert _flag_entry(text, "overwrite")[0] == "=false"
    assert _flag_entry(text, "config")[1].startswith("JSON or YAML file of config fields")
    # Not absl's own flags, not TensorFlow's.
    for foreign in ("--verbosity", "--logtostderr", "--only_check_args", "--test_srcdir"):
        assert foreign not in text

    paper = paper_help.stdout
    assert paper.startswith("usage: python -m pipelines.run --workdir=...")
    assert _flag_entry(paper, "teacher")[0] == "=wrn_40_2"
    assert _flag_entry(paper, "epochs")[0] == "=200"
    assert _flag_entry(kd_help.stdout, "teacher_bn_mode")[0].startswith("=frozen  {official,frozen}")

    assert "--overwrite" not in evaluate_help.stdout
    assert _flag_entry(evaluate_help.stdout, "split")[0] == "=test  {train,validation,test}"
    tfrecords = tfrecords_help.stdout
    assert _flag_entry(tfrecords, "out_dir")[0] == "  (required)"
    assert _flag_entry(tfrecords, "source")[0].startswith("=fashion_mnist")
    assert "--temperature" not in tfrecords and "--epochs" not in tfrecords

    for command in ("run", "train-teacher", "distill", "evaluate", "export", "make-tfrecords",
                    "reproduce", "make-tfrecords-beam", "batch-predict", "kfp"):
        assert re.search(rf"^  {command} +\S", top.stdout, flags=re.M), command


# --- quiet fit and progress lines -----------------------------------------------------


def test_fit_on_our_datasets_raises_no_user_warning():
    import keras
    import tensorflow as tf

    from sokd_tf.runtime import loop
    from sokd_tf.runtime import strategy as strategy_lib

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    data = tf.data.Dataset.from_tensor_slices((np.ones((8, 3), "float32"), np.zeros(8, "int32"))).batch(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        history = loop.fit_model(model, data.repeat(), strategy=strategy_lib.make_strategy("default"),
                                 epochs=1, steps_per_epoch=2, verbose=0)
    assert len(history.history["loss"]) == 1


def test_data_loading_reports_progress_with_counts(small_fashion_mnist, caplog):
    from sokd_tf.data import load_dataset

    data_config = config_lib.DataConfig(source="fashion_mnist", name="fashion_mnist",
                                         data_dir=small_fashion_mnist, validation_size=128,
                                         normalization="none")
    with caplog.at_level(logging.INFO, logger="sokd_tf"):
        load_dataset(data_config, seed=1)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("sokd_tf")]
    assert messages == [
        f"[data] reading fashion_mnist (source fashion_mnist) from {small_fashion_mnist}",
        "[data] fashion_mnist: train 640, test 256 images of 28x28x1, 10 classes, labels checked",
        "[data] held out 128 validation images (seed 1): 512 left to train on",
    ]


@pytest.mark.slow
def test_export_reports_a_line_per_variant_with_counts(tmp_path, caplog):
    import export_support

    from sokd_tf import export

    info, train_images, _, test_images, test_labels = export_support.data()
    export_config = config_lib.ExportConfig(
        tflite_variants=("fp32", "dynamic_int8"), representative_size=16, latency_runs=2)
    with caplog.at_level(logging.INFO, logger="sokd_tf"):
        report = export.export_student(
            export_support.tiny_student(info), info, str(tmp_path), export_config,
            train_images_uint8=train_images[:64], test_images_uint8=test_images[:64],
            test_labels=test_labels[:64])
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("sokd_tf")]
    assert messages[0] == "[export] Keras student on 64 test images (the reference of every check)"
    assert re.fullmatch(r"\[export\] SavedModel student/1: both signatures verified \(class "
                        r"agreement serving_default \d+\.\d\d%, predict_examples \d+\.\d\d%\)",
                        messages[1]), messages[1]
    size_kb = os.path.getsize(tmp_path / "tflite" / "dynamic_int8.tflite") / 1024
    assert messages[2:] == [
        "[export 1/2] fp32: converting",
        f"[export 1/2] fp32: converted {os.path.getsize(tmp_path / 'tflite' / 'fp32.tflite') / 1024:.1f} KB",
        "[export 2/2] dynamic_int8: converting",
        f"[export 2/2] dynamic_int8: converted {size_kb:.1f} KB",
        *[
            f"[export {i}/2] {variant}: LiteRT top-1 {100 * report['tflite'][variant]['top1']:.2f}% "
            f"on 64 test images, agreement {100 * report['tflite'][variant]['agreement']:.2f}%, "
            f"median latency {report['tflite'][variant]['latency_ms_median']:.2f} ms"
            for i, variant in enumerate(("fp32", "dynamic_int8"), start=1)
        ],
        f"[export] done: 2 LiteRT file(s) in {tmp_path / 'tflite'}, report {tmp_path / 'report.json'}",
    ]
    assert json.loads((tmp_path / "report.json").read_text())["version"] == 1


@pytest.mark.slow
def test_stage_commands_under_two_workers_report_the_same_record(small_fashion_mnist, tmp_path):
    """`train-teacher` then `distill` with --strategy=multi_worker on 2 workers (127.0.0.1).

    Every worker prints its stage's results record; a non-chief worker used to fail on an
    empty one (KeyError), now both print the same numbers.
    """
    from test_distribute import _env as worker_env
    from test_distribute import _free_port, _run_processes

    workdir = tmp_path / "run"
    flags_ = [
        f"--workdir={workdir}", f"--data_dir={small_fashion_mnist}", "--strategy=multi_worker",
        "--teacher=wrn_10_1", "--student=wrn_10_1", "--batch_size=64", "--eval_batch_size=128",
        "--validation_size=128", "--epochs=1", "--teacher_epochs=1", "--lr_decay_epochs=1",
        "--teacher_lr_decay_epochs=1", "--steps_per_epoch=2",
    ]
    logs = {}
    for stage, extra in (("train-teacher", []), ("distill", ["--method=sokd"])):
        ports = [_free_port(), _free_port()]
        cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
        stage_dir = tmp_path / stage
        stage_dir.mkdir()
        commands = []
        for index in range(2):
            tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
            commands.append(([sys.executable, "-m", "sokd_tf", stage, *flags_, *extra],
                             worker_env(TF_CONFIG=tf_config, CI="1", PYTHONPATH=_env()["PYTHONPATH"])))
        _run_processes(commands, str(stage_dir), timeout_s=600)
        logs[stage] = [(stage_dir / f"process_{i}.log").read_text() for i in range(2)]

    teacher = json.loads((workdir / "teacher" / "results.json").read_text())
    expected = (f"teacher: {workdir}/teacher/teacher.keras "
                f"(last test top-1 {teacher['roles']['teacher']['last_test_top1']})")
    distilled = json.loads((workdir / "distill" / "results.json").read_text())
    for role in ("student", "peer"):
        record = distilled["roles"][role]
        line = f"{role}: last test top-1 {record['last_test_top1']}, best epoch {record['best_epoch']}"
        for log in logs["distill"]:
            assert line in log.splitlines(), log[-3000:]
    for log in logs["train-teacher"]:
        assert expected in log.splitlines(), log[-3000:]


def test_distill_summary_lists_every_method():
    from pipelines import cli
    from sokd_tf import config as config_lib

    summary = cli.COMMANDS["distill"][1]
    assert summary.endswith("--method=" + "|".join(config_lib.METHODS))
