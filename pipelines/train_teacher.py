"""Vanilla training of the teacher (or any model): writes workdir/teacher/teacher.keras.

    sokd-tf train-teacher --workdir=workdir/quickstart
"""

from absl import flags

from pipelines import common
from sokd_tf.data import load_dataset
from sokd_tf.stages import run, teacher

common.define_config_flags(default_preset="quickstart")
common.define_workdir_flags()
flags.adopt_module_key_flags(common)


def body():
    config = common.config_from_flags()
    dataset = load_dataset(config.data, seed=config.train.seed)
    run.prepare_workdir(config, common.FLAGS.workdir, overwrite=common.FLAGS.overwrite,
                        resume_changed=common.resume_changed())
    results = teacher.train_teacher(config, common.FLAGS.workdir, dataset)
    record = results["roles"]["teacher"]
    print(f"teacher: {results['checkpoint']} (last test top-1 {record['last_test_top1']})")


def main(argv=None):
    common.main(body, argv, module=__name__)


if __name__ == "__main__":
    main()
