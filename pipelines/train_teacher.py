"""Vanilla training of the teacher (or any model): writes workdir/teacher/teacher.keras.

    python -m pipelines.train_teacher --workdir=workdir/quickstart
"""

from absl import app

from pipelines import common
from sokd_tf.data import load_dataset
from sokd_tf.stages import run, teacher

common.define_config_flags(default_preset="quickstart")
common.define_workdir_flags()


def body():
    config = common.config_from_flags()
    dataset = load_dataset(config.data, seed=config.train.seed)
    run.prepare_workdir(config, common.FLAGS.workdir, overwrite=common.FLAGS.overwrite,
                        resume_changed=common.resume_changed())
    results = teacher.train_teacher(config, common.FLAGS.workdir, dataset)
    print(f"teacher: {results['checkpoint']}")


if __name__ == "__main__":
    app.run(common.main_wrapper(body))
