"""Exports a trained student: TF Serving SavedModel + verified TFLite files + report.json.

    sokd-tf export --workdir=workdir/quickstart
    sokd-tf export --workdir=w --student_file=w/distill/student_last.keras --version=7

Artifacts go to workdir/export/ (serving/<model_name>/<version>/, tflite/, report.json).
The config comes from the workdir's config.json (then --config and flags).
"""

import json

from absl import flags

from pipelines import common
from sokd_tf.data import load_dataset
from sokd_tf.stages.export import export_stage

common.define_config_flags(default_preset="quickstart")
common.define_workdir_flags(overwrite=False)
flags.adopt_module_key_flags(common)
flags.DEFINE_string("student_file", None, "Student .keras file; unset = workdir/distill/student_best.keras.")


def config():
    return common.config_for_workdir(common.FLAGS.workdir)


def body():
    run_config = config()
    dataset = load_dataset(run_config.data, seed=run_config.train.seed)
    report = export_stage(run_config, common.FLAGS.workdir, dataset, common.FLAGS.student_file)
    print(json.dumps(report, indent=2, default=str))


def main(argv=None):
    common.main(body, argv, module=__name__, config=config)


if __name__ == "__main__":
    main()
