"""Distillation stage: --method=vanilla|kd|dml|sokd.

    python -m pipelines.distill --workdir=workdir/quickstart --method=sokd

kd and sokd read the teacher from --teacher_checkpoint, else from the workdir's
teacher/teacher.keras (written by pipelines.train_teacher); dml and vanilla need none.
"""

from absl import app

from pipelines import common
from sokd_tf.data import load_dataset
from sokd_tf.stages import distill, run

common.define_config_flags(default_preset="quickstart")
common.define_workdir_flags()


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


if __name__ == "__main__":
    app.run(common.main_wrapper(body))
