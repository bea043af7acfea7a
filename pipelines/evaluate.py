"""Top-1/top-5 of a saved model (student, teacher, reconstructed teacher) on a split.

    sokd-tf evaluate --workdir=workdir/quickstart                 # every saved model
    sokd-tf evaluate --workdir=workdir/quickstart --model_path=m.keras --split=test

The data comes from the workdir's config.json (then --config and flags; the preset only
when there is no config.json).
"""

import json

from absl import flags

from pipelines import common
from sokd_tf.data import load_dataset
from sokd_tf.stages.evaluate import evaluate_model, evaluate_workdir, load_model, saved_models

common.define_config_flags(default_preset="quickstart")
common.define_workdir_flags(overwrite=False)
flags.adopt_module_key_flags(common)
flags.DEFINE_string("model_path", None, "A .keras model; unset = every model saved in --workdir.")
flags.DEFINE_enum("split", "test", ["train", "validation", "test"],
                  "Split to evaluate on; workdir/evaluation.json is written for the test split only.")


def config():
    return common.config_for_workdir(common.FLAGS.workdir)


def body():
    run_config = config()
    split = common.FLAGS.split
    # Found before the data is read, so an empty workdir is refused at once.
    models = None if common.FLAGS.model_path else saved_models(run_config, common.FLAGS.workdir)
    dataset = load_dataset(run_config.data, seed=run_config.train.seed)
    if common.FLAGS.model_path:
        model = load_model(common.FLAGS.model_path)
        results = evaluate_model(model, dataset.eval_batches(split, run_config.data.eval_batch_size))
    else:
        results = evaluate_workdir(run_config, common.FLAGS.workdir, dataset, split=split,
                                   models=models)
    print(json.dumps(results, indent=2))


def main(argv=None):
    common.main(body, argv, module=__name__, config=config)


if __name__ == "__main__":
    main()
