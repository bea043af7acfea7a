"""Reproduction studies: definitions, the equal-budget control, and the machinery end to end."""

import json
import os
import subprocess
import sys

import pytest

from sokd_tf.errors import ConfigError
from sokd_tf.runtime import cpu
from sokd_tf.study import definitions, runner, tables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fashion_mnist_study_is_the_documented_budget():
    study = definitions.get_study("fashion_mnist")
    config = runner.run_config(study, study.variant("sokd"), seed=0)
    assert (config.model.teacher, config.model.student) == ("wrn_16_2", "wrn_16_1")
    assert config.data.validation_size == 0  # all 60,000 training images
    assert (config.train.teacher_epochs, config.train.epochs) == (4, 4)
    # x0.1 at epochs 3 and 4 (1-based) = 0-based decay epochs 2 and 3.
    assert config.train.lr_decay_epochs == config.train.teacher_lr_decay_epochs == (2, 3)
    assert (config.data.pad, config.data.batch_size, config.loss.temperature) == (2, 128, 4.0)
    assert [v.name for v in study.variants] == ["vanilla", "kd", "dml", "sokd", "sokd_at"]
    # Each baseline gets its standard recipe.
    assert runner.run_config(study, study.variant("kd"), 0).train.teacher_bn_mode == "frozen"
    assert runner.run_config(study, study.variant("dml"), 0).train.nesterov is True


def test_ablations_drop_each_term_and_vary_temperature():
    study = definitions.get_study("fashion_mnist_ablations")
    names = [v.name for v in study.variants]
    assert "sokd_without_peer_kd" in names and "sokd_T8" in names
    config = runner.run_config(study, study.variant("sokd_without_student_ml"), seed=0)
    assert config.loss.student_ml_weight == 0.0 and config.loss.peer_ml_weight == 1.0
    assert runner.run_config(study, study.variant("sokd_teacher_bn_frozen"), 0).train.teacher_bn_mode == "frozen"
    with pytest.raises(ConfigError, match="no variant 'fitnet'"):
        study.variant("fitnet")
    with pytest.raises(ConfigError, match="unknown study"):
        definitions.get_study("imagenet")


def test_equal_budget_control_keeps_the_schedule_shape():
    study = definitions.get_study("fashion_mnist")
    teacher = runner.run_config(study, study.variant("vanilla"), seed=0)
    control = runner.equal_budget_config(teacher)
    assert control.train.teacher_epochs == 8
    assert control.train.teacher_lr_decay_epochs == (4, 6)  # same fractions of 8 as (2, 3) of 4
    assert control.model == teacher.model and control.data == teacher.data


def _read_text(path):
    with open(path) as f:
        return f.read()


def _read_json(path):
    return json.loads(_read_text(path))


def _fake_results(best, last):
    return {
        "study": "toy", "description": "", "command": "c",
        "machine": {"cpu": "cpu", "isa": ["avx2"], "cores": 2},
        "runs": [
            {"variant": "kd", "method": "kd", "seed": s, "wall_s": 1.0, "workdir": f"runs/kd/seed{s}",
             "student": {"best_top1": best[i], "last_top1": last[i]}, "teacher": {"top1": 80.0}}
            for i, s in enumerate((0, 1))
        ],
    }


def test_table_is_computed_from_the_runs():
    text = tables.markdown(_fake_results([90.0, 92.0], [89.0, 91.0]))
    assert "| kd | kd | 0,1 | 91.00 ± 1.41 | 90.00 ± 1.41 |" in text
    changed = tables.markdown(_fake_results([90.0, 94.0], [89.0, 91.0]))
    assert "92.00 ± 2.83" in changed


@pytest.mark.slow
def test_study_end_to_end_on_a_tiny_budget(small_fashion_mnist, tmp_path):
    """2 methods x 2 seeds, a few steps each: results.json, results.md and plots from the runs."""
    tiny = {
        "data.data_dir": small_fashion_mnist,
        "data.eval_batch_size": 128,
        "model.teacher": "wrn_10_1",
        "model.student": "wrn_10_1",
        "train.teacher_epochs": 1,
        "train.teacher_lr_decay_epochs": (1,),
        "train.epochs": 2,
        "train.lr_decay_epochs": (1,),
        "train.steps_per_epoch": 2,
    }
    root = str(tmp_path / "study")
    study = definitions.get_study("fashion_mnist")
    study_runner = runner.StudyRunner(study, root, seeds=(0, 1), variants=["vanilla", "sokd"],
                                      extra=tiny, command="test", log=lambda line: None)
    results = study_runner.run()
    assert [(r["variant"], r["seed"]) for r in results["runs"]] == [
        ("vanilla", 0), ("vanilla", 1), ("sokd", 0), ("sokd", 1)
    ]
    assert results["pending"] == []
    # One teacher for every seed, plus its equal-budget control (1 + 2 epochs).
    assert sorted(results["teachers"]) == ["seed0", "seed0_equal_budget"]
    assert results["teachers"]["seed0_equal_budget"]["epochs"] == 3
    sokd = results["runs"][2]
    assert {"student", "teacher", "teacher_equal_budget", "peer_path", "wall_s", "cpu"} <= set(sokd)
    assert sokd["cpu"] == cpu.detect().cpu_name and results["teachers"]["seed0"]["cpu"]
    # The numbers are the runs' own: the distill stage's last-epoch test top-1, in percent.
    distill_results = _read_json(os.path.join(root, sokd["workdir"], "distill", "results.json"))
    assert sokd["student"]["last_top1"] == round(100 * distill_results["roles"]["student"]["last_test_top1"], 2)
    for name in ("accuracy.png", "peer_path.png", "learning_curves.png", "wall_time.png"):
        assert os.path.exists(os.path.join(root, "plots", name)), name
    assert "| sokd | sokd | 0,1 |" in _read_text(os.path.join(root, "results.md"))

    # Rerunning skips every finished run; editing a run's record changes the table.
    record_path = os.path.join(root, sokd["workdir"], runner.RUN_RECORD)
    record = _read_json(record_path)
    record["student"]["last_top1"] = 12.5
    record["student"]["best_top1"] = 12.5
    with open(record_path, "w") as f:
        json.dump(record, f)
    rerun = runner.StudyRunner(study, root, seeds=(0, 1), variants=["vanilla", "sokd"],
                               extra=tiny, command="test", log=lambda line: None).run()
    assert rerun["runs"][2]["student"]["last_top1"] == 12.5
    seed1 = results["runs"][3]["student"]
    row = (f"| sokd | sokd | 0,1 | {tables._cell([12.5, seed1['best_top1']])} | "
           f"{tables._cell([12.5, seed1['last_top1']])} |")
    assert row in _read_text(os.path.join(root, "results.md"))


def test_verdict_judges_differences_against_the_seed_spread():
    # Hand values: SOKD 91, 92 (mean 91.5, std 0.71); KD 90, 90.2 (90.1, std 0.14):
    # +1.40 > 0.71. DML 91, 91.4 (91.2, std 0.28): +0.30 < 0.71.
    assert tables.compare([91.0, 92.0], [90.0, 90.2])[0] == pytest.approx(1.4)
    assert tables.compare([91.0, 92.0], [90.0, 90.2])[1] == "larger than the seed-to-seed spread (0.71)"
    assert tables.compare([91.0, 92.0], [91.0, 91.4])[1].startswith("within the seed-to-seed spread (0.71)")
    assert "one seed" in tables.compare([91.0], [90.0])[1]
    runs = []
    for variant, method, values in (("kd", "kd", (90.0, 90.2)), ("sokd", "sokd", (91.0, 92.0)),
                                    ("sokd_T8", "sokd", (91.4,))):
        runs += [{"variant": variant, "method": method, "seed": s, "wall_s": 1.0,
                  "student": {"best_top1": v, "last_top1": v}} for s, v in enumerate(values)]
    results = {"study": "toy", "description": "", "command": "c",
               "machine": {"cpu": "cpu", "isa": [], "cores": 2}, "runs": runs}
    text = tables.markdown(results)
    assert ("- SOKD's student beats KD's by +1.40 pt (last epoch, mean 91.50 vs 90.10), larger "
            "than the seed-to-seed spread (0.71).") in text
    results["runs"][0]["student"]["last_top1"] = 90.8  # KD 90.8, 91.2: mean 91.0, +0.50 < 0.71
    results["runs"][1]["student"]["last_top1"] = 91.2
    assert ("- SOKD's student is above KD's by +0.50 pt (last epoch, mean 91.50 vs 91.00), within "
            "the seed-to-seed spread (0.71): noise, not a ranking.") in tables.markdown(results)
    assert "- sokd_T8 vs sokd: -0.10 pt (last epoch), one seed, so no seed-to-seed spread" in text
    assert "| kd | kd | 0,1 | 90.10 ± 0.14 | 90.10 ± 0.14 | -1.40 |" in text
    assert "| sokd | sokd | 0,1 | 91.50 ± 0.71 | 91.50 ± 0.71 | – |" in text


def test_report_only_writes_the_table_from_finished_runs_and_trains_nothing(tmp_path):
    root = tmp_path / "study"
    study = definitions.get_study("fashion_mnist")
    run_dir = runner.StudyRunner(study, str(root), log=lambda line: None).run_dir(
        study.variant("kd"), 0)
    os.makedirs(run_dir)
    record = {"variant": "kd", "method": "kd", "seed": 0, "wall_s": 3.0, "workdir": "runs/kd/seed0",
              "student": {"best_top1": 90.5, "last_top1": 90.25}, "teacher": {"top1": 91.0}}
    with open(os.path.join(run_dir, runner.RUN_RECORD), "w") as f:
        json.dump(record, f)
    command = [sys.executable, "-m", "pipelines.reproduce", "--study=fashion_mnist",
               f"--root={root}", "--report_only"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1 runs done, 14 pending" in result.stdout
    assert "| kd | kd | 0 | 90.50 | 90.25 |" in _read_text(root / "results.md")
    assert "| kd | 0 | 90.5 | 90.25 | None | 91.0 | 3.0 | False | not recorded |" in _read_text(
        root / "results.md")  # a record made before runs named their CPU
    results = _read_json(root / "results.json")
    assert "--report_only" not in results["command"] and "kd/seed0" not in results["pending"]
    assert sorted(os.listdir(root)) == ["plots", "results.json", "results.md", "runs"]  # no teacher trained

    missing = subprocess.run(command[:-2] + [f"--root={tmp_path / 'nothing'}", "--report_only"],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1].startswith("error: --root ")
