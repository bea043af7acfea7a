"""Top-1/top-5 of a saved model (student, teacher, reconstructed teacher) on a split.

    python -m pipelines.evaluate --workdir=workdir/quickstart                 # every saved model
    python -m pipelines.evaluate --workdir=workdir/quickstart --model_path=m.keras --split=test

The data comes from the workdir's config.json (or the preset/flags when there is none).
"""

import json

from absl import app, flags

from pipelines import common
from sokd_tf.data import load_dataset
from sokd_tf.stages.evaluate import evaluate_model, evaluate_workdir, load_model

common.define_config_flags(default_preset="quickstart")
common.define_workdir_flags()
flags.DEFINE_string("model_path", None, "A .keras model; unset = every model saved in --workdir.")
flags.DEFINE_enum("split", "test", ["train", "validation", "test"], "Split to evaluate on.")


def body():
    config = common.config_for_workdir(common.FLAGS.workdir)
    dataset = load_dataset(config.data, seed=config.train.seed)
    if common.FLAGS.model_path:
        model = load_model(common.FLAGS.model_path)
        results = evaluate_model(model, dataset.eval_batches(common.FLAGS.split, config.data.eval_batch_size))
    else:
        results = evaluate_workdir(config, common.FLAGS.workdir, dataset)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    app.run(common.main_wrapper(body))
