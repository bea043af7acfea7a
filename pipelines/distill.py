"""Distillation stage: --method=vanilla|kd|dml|sokd.

    python -m pipelines.distill --workdir=workdir/quickstart --method=sokd

kd and sokd read the teacher from --teacher_checkpoint, else from the workdir's
teacher/teacher.keras (written by pipelines.train_teacher); dml and vanilla need none.
"""

import os

from absl import app

from pipelines import common
from sokd_tf import artifacts, training, workflow
from sokd_tf.data import load_dataset
from sokd_tf.errors import UserError

common.define_config_flags(default_preset="quickstart")
common.define_workdir_flags()


def body():
    config = common.config_from_flags()
    workdir = common.FLAGS.workdir
    teacher = config.model.teacher_checkpoint or artifacts.Workdir(workdir).teacher_checkpoint
    if config.train.method in ("kd", "sokd") and not os.path.exists(teacher):
        raise UserError(
            f"--method={config.train.method} needs a trained teacher: {teacher!r} does not exist "
            f"(run pipelines.train_teacher first or pass --teacher_checkpoint)"
        )
    dataset = load_dataset(config.data, seed=config.train.seed)
    workflow.prepare_workdir(config, workdir, overwrite=common.FLAGS.overwrite)
    results = training.distill(config, workdir, dataset)
    for role, record in results["roles"].items():
        print(f"{role}: last test top-1 {record['last_test_top1']}, best epoch {record['best_epoch']}")


if __name__ == "__main__":
    app.run(common.main_wrapper(body))
