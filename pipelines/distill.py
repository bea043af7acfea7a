"""Distillation stage: --method=vanilla|kd|dml|sokd.

    sokd-tf distill --workdir=workdir/quickstart --method=sokd

kd and sokd read the teacher from --teacher_checkpoint, else from the workdir's
teacher/teacher.keras (written by `sokd-tf train-teacher`); dml and vanilla need none.
"""

from absl import flags

from pipelines import common
from sokd_tf.data import load_dataset
from sokd_tf.stages import distill, run

common.define_config_flags(default_preset="quickstart")
common.define_workdir_flags()
flags.adopt_module_key_flags(common)


def body():
    config = common.config_from_flags()
    workdir = common.FLAGS.workdir
    distill.check_teacher(config, workdir)
    dataset = load_dataset(config.data, seed=config.train.seed)
    run.prepare_workdir(config, workdir, overwrite=common.FLAGS.overwrite,
                        resume_changed=common.resume_changed())
    results = distill.distill(config, workdir, dataset)
    for role, record in results["roles"].items():
        print(f"{role}: last test top-1 {record['last_test_top1']}, best epoch {record['best_epoch']}")


def main(argv=None):
    common.main(body, argv, module=__name__)


if __name__ == "__main__":
    main()
