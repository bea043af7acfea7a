"""Reproduction study: one teacher, then every method's students over seeds, resumable.

    python -m pipelines.reproduce --study=fashion_mnist --root=runs/study_fashion_mnist
    python -m pipelines.reproduce --study=fashion_mnist_ablations --root=runs/ablations

Rerun the same command to continue: finished runs are skipped, an interrupted run
resumes from its last completed epoch. Writes ROOT/results.json, results.md, plots/.
"""

import sys

from absl import app, flags

from pipelines import common
from sokd_tf.study import definitions, runner

flags.DEFINE_enum("study", "fashion_mnist", list(definitions.STUDIES), "The study to run.")
flags.DEFINE_string("root", None, "Directory of the study's runs and results.", required=True)
flags.DEFINE_list("seeds", None, "Seeds to run (default: the study's).")
flags.DEFINE_list("variants", None, "Variants to run (default: all of the study's).")
flags.DEFINE_list(
    "set", [], "Extra dotted config overrides for every run, e.g. train.steps_per_epoch=5."
)


def _parse_value(text: str):
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


def body():
    FLAGS = flags.FLAGS
    extra = {}
    for item in FLAGS.set:
        key, _, value = item.partition("=")
        extra[key] = _parse_value(value)
    study = definitions.get_study(FLAGS.study)
    seeds = [int(seed) for seed in FLAGS.seeds] if FLAGS.seeds else None
    results = runner.StudyRunner(
        study, FLAGS.root, seeds=seeds, variants=FLAGS.variants, extra=extra,
        command=" ".join(["python -m pipelines.reproduce", *sys.argv[1:]]),
    ).run()
    print(f"{len(results['runs'])} runs done; table: {FLAGS.root}/results.md")


if __name__ == "__main__":
    app.run(common.main_wrapper(body))
