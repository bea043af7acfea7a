"""Kubeflow Pipelines (v2) definition: train teacher -> distill -> evaluate -> export -> predict.

    # compile the IR YAML to upload to Vertex AI Pipelines / Kubeflow
    python -m pipelines.kfp_pipeline --base_image=REGION-docker.pkg.dev/P/R/sokd-tf:1 \
        --output=sokd_tf_pipeline.yaml
    # or run it here, each component a local subprocess of this Python (kfp.local)
    python -m pipelines.kfp_pipeline --run_local --pipeline_root=kfp_outputs \
        --options='{"teacher_epochs": 1, "epochs": 1, "steps_per_epoch": 20}'

Each component runs one function of `sokd_tf.kfp.steps` in `--base_image` (an image with
this repository installed, see docs/BATCH.md); artifacts carry the run workdirs from
stage to stage. Pipeline parameters: `preset`, `options` (JSON keyed by the CLI flag
names: method, teacher, student, source, data_dir, epochs, ...), and `predict_input`
(TFRecord glob for the batch-prediction step; empty = skip it).
"""

import json

from absl import app, flags
from kfp import compiler, dsl

DEFAULT_IMAGE = "python:3.11"
PIPELINE_NAME = "sokd-tf"


def _train_teacher(preset: str, options: str, teacher: dsl.Output[dsl.Model],
                   metrics: dsl.Output[dsl.Metrics]):
    from sokd_tf.kfp import steps

    for name, value in steps.train_teacher(preset, options, teacher.path).items():
        metrics.log_metric(name, value)


def _distill(preset: str, options: str, teacher: dsl.Input[dsl.Model], student: dsl.Output[dsl.Model],
             metrics: dsl.Output[dsl.Metrics]):
    from sokd_tf.kfp import steps

    for name, value in steps.distill(preset, options, teacher.path, student.path).items():
        metrics.log_metric(name, value)


def _evaluate(preset: str, options: str, student: dsl.Input[dsl.Model], metrics: dsl.Output[dsl.Metrics]):
    from sokd_tf.kfp import steps

    for name, value in steps.evaluate(preset, options, student.path).items():
        metrics.log_metric(name, value)


def _export(preset: str, options: str, student: dsl.Input[dsl.Model], serving_model: dsl.Output[dsl.Model]):
    from sokd_tf.kfp import steps

    serving_model.metadata["saved_model"] = steps.export(preset, options, student.path,
                                                         serving_model.path)


def _batch_predict(serving_model: dsl.Input[dsl.Model], predict_input: str,
                   predictions: dsl.Output[dsl.Dataset], metrics: dsl.Output[dsl.Metrics]):
    from sokd_tf.kfp import steps

    for name, value in steps.batch_predict(serving_model.path, predict_input,
                                           predictions.path).items():
        metrics.log_metric(name, value)


def make_pipeline(base_image: str = DEFAULT_IMAGE):
    """The pipeline function, its components running in `base_image`."""

    def component(function):
        # The image has sokd_tf (and so kfp) installed: nothing to pip-install at run time.
        return dsl.component(function, base_image=base_image, install_kfp_package=False)

    train_teacher, distill, evaluate, export, batch_predict = (
        component(f) for f in (_train_teacher, _distill, _evaluate, _export, _batch_predict))

    @dsl.pipeline(name=PIPELINE_NAME,
                  description="Semi-Online Knowledge Distillation: teacher, student, exports.")
    def sokd_tf_pipeline(preset: str = "quickstart", options: str = "{}",
                         predict_input: str = ""):
        teacher = train_teacher(preset=preset, options=options).set_display_name(
            "train teacher")
        student = distill(preset=preset, options=options,
                          teacher=teacher.outputs["teacher"]).set_display_name("distill")
        evaluate(preset=preset, options=options,
                 student=student.outputs["student"]).set_display_name("evaluate")
        exported = export(preset=preset, options=options,
                          student=student.outputs["student"]).set_display_name("export")
        with dsl.If(predict_input != "", name="predict-input-given"):
            batch_predict(serving_model=exported.outputs["serving_model"],
                          predict_input=predict_input).set_display_name("batch predict")

    return sokd_tf_pipeline


def compile_pipeline(path: str, base_image: str = DEFAULT_IMAGE) -> str:
    """Writes the pipeline's IR YAML to `path`; returns it."""
    compiler.Compiler().compile(make_pipeline(base_image), package_path=path)
    return path


def run_local(pipeline_root: str, *, preset: str = "quickstart", options: str = "{}",
              predict_input: str = ""):
    """Runs the pipeline here with kfp.local: one subprocess of this Python per component."""
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=pipeline_root)
    return make_pipeline()(preset=preset, options=options, predict_input=predict_input)


flags.DEFINE_string("output", "sokd_tf_pipeline.yaml", "Path of the compiled IR YAML.")
flags.DEFINE_string("base_image", DEFAULT_IMAGE,
                    "Container image with sokd_tf installed, for every component.")
flags.DEFINE_boolean("run_local", False, "Run the pipeline here with kfp.local instead.")
flags.DEFINE_string("pipeline_root", "kfp_outputs", "kfp.local's output root (--run_local).")
flags.DEFINE_string("preset", "quickstart", "Pipeline parameter `preset`.")
flags.DEFINE_string("options", "{}", "Pipeline parameter `options`: JSON of flag names.")
flags.DEFINE_string("predict_input", "", "Pipeline parameter `predict_input` (TFRecord glob).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    json.loads(FLAGS.options)  # fail fast on malformed JSON
    if FLAGS.run_local:
        run_local(FLAGS.pipeline_root, preset=FLAGS.preset, options=FLAGS.options,
                  predict_input=FLAGS.predict_input)
        print(f"outputs under {FLAGS.pipeline_root}")
    else:
        print(compile_pipeline(FLAGS.output, FLAGS.base_image))


if __name__ == "__main__":
    app.run(main)
