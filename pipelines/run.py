"""End-to-end job: teacher -> SOKD -> evaluation -> export -> report.md.

    python -m pipelines.run --workdir=workdir/quickstart            # quickstart preset
    python -m pipelines.run --preset=cifar100_wrn40_2_wrn40_1 --workdir=runs/paper

Rerunning the same command on the same workdir resumes from the last completed epoch;
after a divergence, add the lowered rate and --resume_changed=student_learning_rate.
"""

from absl import app

from pipelines import common
from sokd_tf.stages import run

common.define_config_flags(default_preset="quickstart")
common.define_workdir_flags()


def body():
    config = common.config_from_flags()
    outcome = run.run(config, common.FLAGS.workdir, overwrite=common.FLAGS.overwrite,
                      resume_changed=common.resume_changed())
    if "evaluation" in outcome:
        print(f"report: {common.FLAGS.workdir}/report.md")
    else:
        print("training done; the chief worker evaluates, exports and writes the report")


if __name__ == "__main__":
    app.run(common.main_wrapper(body))
