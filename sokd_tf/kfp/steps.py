"""One function per KFP component: train teacher -> distill -> evaluate -> export -> predict.

Components exchange artifacts, never a shared disk: each stage's output artifact is a
run workdir of its own (`config.json`, checkpoints, TensorBoard logs, results.json):
  train_teacher(options, workdir)                     workdir/teacher/teacher.keras
  distill(options, teacher_workdir, workdir)          workdir/distill/student_{best,last}.keras
  evaluate(options, student_workdir) -> metrics       test top-1 / top-5 of the student
  export(options, student_workdir, workdir)           workdir/export/serving/<model>/<version>/
  batch_predict(export_workdir, input, output_dir)    output_dir/predictions-*.jsonl
`options` is a JSON object keyed by the CLI flag names (`{"method": "sokd",
"source": "tfrecord", "data_dir": "gs://b/examples", ...}`), the same names as flags and
TFX `custom_config` keys, applied on top of the named `preset`.

Reference: docs/BATCH.md, "Kubeflow Pipelines / Vertex AI".
"""

from __future__ import annotations

import json
import os

from sokd_tf import config as config_lib
from sokd_tf.errors import ConfigError
from sokd_tf.stages import distill as distill_stage
from sokd_tf.stages import run, teacher
from sokd_tf.stages import workdir as workdir_lib


def run_config(options: str, preset: str | None = "quickstart") -> config_lib.RunConfig:
    """The run's config: `preset`, then the `options` JSON (flag names; a `preset` key
    there replaces the `preset` argument).

    Raises:
      ConfigError: not a JSON object, unknown keys (named), bad values.
    """
    try:
        values = json.loads(options or "{}")
    except json.JSONDecodeError as error:
        raise ConfigError(f"options must be a JSON object of flag names, got {options!r} "
                          f"({error})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"options must be a JSON object of flag names, got {options!r}")
    preset = values.pop("preset", preset) or None
    return config_lib.resolve(preset, config_lib.overrides_from_flag_names(values))


def _dataset(config: config_lib.RunConfig):
    from sokd_tf.data import load_dataset

    return load_dataset(config.data, seed=config.train.seed)


def _scalars(results: dict, role: str) -> dict[str, float]:
    record = results.get("roles", {}).get(role, {})
    return {f"{role}/{name}": float(value) for name, value in record.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def train_teacher(preset: str | None, options: str, workdir: str) -> dict[str, float]:
    """Trains the teacher into `workdir`; returns its scalar results (for KFP Metrics)."""
    config = run_config(options, preset)
    dataset = _dataset(config)
    run.prepare_workdir(config, workdir)
    return _scalars(teacher.train_teacher(config, workdir, dataset), "teacher")


def distill(preset: str | None, options: str, teacher_workdir: str | None, workdir: str) -> dict[str, float]:
    """Distills the student into `workdir` from the teacher trained in `teacher_workdir`.

    `teacher_workdir` None (or a `teacher_checkpoint` option) = no teacher artifact.
    """
    config = run_config(options, preset)
    if teacher_workdir and not config.model.teacher_checkpoint:
        config = config_lib.apply_overrides(config, {
            "model.teacher_checkpoint": workdir_lib.Workdir(teacher_workdir).teacher_checkpoint})
    dataset = _dataset(config)
    run.prepare_workdir(config, workdir)
    return _scalars(distill_stage.distill(config, workdir, dataset), "student")


def student_path(student_workdir: str) -> str:
    """The distilled student to evaluate and export: validation-best, else last epoch."""
    paths = workdir_lib.Workdir(student_workdir)
    best = paths.distilled("student", "best")
    return best if os.path.exists(best) else paths.distilled("student", "last")


def evaluate(preset: str | None, options: str, student_workdir: str) -> dict[str, float]:
    """Test-split top-1 / top-5 (and parameter count) of the distilled student."""
    from sokd_tf.stages.evaluate import evaluate_model, load_model

    config = run_config(options, preset)
    dataset = _dataset(config)
    model = load_model(student_path(student_workdir))
    scores = evaluate_model(model, dataset.eval_batches("test", config.data.eval_batch_size))
    out = {f"test/{name}": float(value) for name, value in scores.items()}
    out["params"] = float(model.count_params())
    return out


def export(preset: str | None, options: str, student_workdir: str, workdir: str) -> str:
    """Writes the student's TF Serving SavedModel and LiteRT files under `workdir/export/`.

    Returns:
      The SavedModel version directory (what `batch_predict` and TF Serving load).
    """
    from sokd_tf.stages.export import export_stage

    config = run_config(options, preset)
    dataset = _dataset(config)
    export_stage(config, workdir, dataset, student_path(student_workdir))
    return saved_model_dir(workdir)


def saved_model_dir(export_workdir: str) -> str:
    """The newest SavedModel version under an export workdir."""
    from sokd_tf.export import serving

    root = os.path.join(workdir_lib.Workdir(export_workdir).export_dir, workdir_lib.SERVING_DIR)
    for model_name in sorted(os.listdir(root)):
        versions = serving.existing_versions(os.path.join(root, model_name))
        if versions:
            return os.path.join(root, model_name, str(versions[-1]))
    raise ConfigError(f"{root} holds no exported SavedModel version")


def batch_predict(export_workdir: str, input_patterns: str, output_dir: str,
                  beam_args: list[str] | None = None) -> dict[str, float]:
    """Beam batch prediction of the exported student; returns the job's counters."""
    from sokd_tf.beam import batch_predict as job

    written = job.run(saved_model_dir(export_workdir), input_patterns, output_dir,
                      beam_args=beam_args or ())
    return {name: float(value) for name, value in written["counters"].items()}
