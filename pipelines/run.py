"""End-to-end job: teacher -> SOKD -> evaluation -> export -> report.md.

    sokd-tf run --workdir=workdir/quickstart            # quickstart preset
    sokd-tf run --preset=cifar100_wrn40_2_wrn40_1 --workdir=runs/paper

Rerunning the same command on the same workdir resumes from the last completed epoch;
after a divergence, add the lowered rate and --resume_changed=student_learning_rate.
"""

from absl import flags

from pipelines import common
from sokd_tf.stages import report, run

common.define_config_flags(default_preset="quickstart")
common.define_workdir_flags()
flags.adopt_module_key_flags(common)


def body():
    config = common.config_from_flags()
    outcome = run.run(config, common.FLAGS.workdir, overwrite=common.FLAGS.overwrite,
                      resume_changed=common.resume_changed())
    if "evaluation" in outcome:
        print(f"done: {report.describe_resources(outcome['resources'])}; "
              f"report: {common.FLAGS.workdir}/report.md")
    else:
        print("training done; the chief worker evaluates, exports and writes the report")


def main(argv=None):
    common.main(body, argv, module=__name__)


if __name__ == "__main__":
    main()
