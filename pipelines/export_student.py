"""Exports a trained student: TF Serving SavedModel + verified TFLite files + report.json.

    python -m pipelines.export_student --workdir=workdir/quickstart
    python -m pipelines.export_student --workdir=w --student_file=w/distill/student_last.keras --version=7

Artifacts go to workdir/export/ (serving/<model_name>/<version>/, tflite/, report.json).
"""

import json

from absl import app, flags

from pipelines import common
from sokd_tf.data import load_dataset
from sokd_tf.stages.export import export_stage

common.define_config_flags(default_preset="quickstart")
common.define_workdir_flags()
flags.DEFINE_string("student_file", None, "Student .keras file; unset = workdir/distill/student_best.keras.")


def body():
    config = common.config_for_workdir(common.FLAGS.workdir)
    dataset = load_dataset(config.data, seed=config.train.seed)
    report = export_stage(config, common.FLAGS.workdir, dataset, common.FLAGS.student_file)
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    app.run(common.main_wrapper(body))
