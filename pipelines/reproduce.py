"""Reproduction study: one teacher, then every method's students over seeds, resumable.

    sokd-tf reproduce --study=fashion_mnist --root=runs/study_fashion_mnist
    sokd-tf reproduce --study=fashion_mnist_ablations --root=runs/ablations

Rerun the same command to continue: finished runs are skipped, an interrupted run
resumes from its last completed epoch. Writes ROOT/results.json, results.md, plots/.
`--report_only` writes them from the runs finished so far and trains nothing (safe while
the study itself runs in another process).
"""

import os
import sys

from absl import flags

from pipelines import common
from sokd_tf.errors import ConfigError
from sokd_tf.study import definitions, runner

flags.DEFINE_enum("study", "fashion_mnist", list(definitions.STUDIES), "The study to run.")
flags.DEFINE_string("root", None, "Directory of the study's runs and results.", required=True)
flags.DEFINE_list("seeds", None, "Seeds to run (default: the study's).")
flags.DEFINE_list("variants", None, "Variants to run (default: all of the study's).")
flags.DEFINE_list(
    "set", [], "Extra dotted config overrides for every run, e.g. train.steps_per_epoch=5."
)
flags.DEFINE_bool("report_only", False,
                  "Write results.json, results.md and plots from the runs finished so far; "
                  "train nothing.")


def _parse_value(text: str):
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


def body(argv):
    FLAGS = flags.FLAGS
    extra = {}
    for item in FLAGS.set:
        key, _, value = item.partition("=")
        extra[key] = _parse_value(value)
    study = definitions.get_study(FLAGS.study)
    seeds = [int(seed) for seed in FLAGS.seeds] if FLAGS.seeds else None
    # results.json names the command that trains the study, not a report-only call.
    command = [arg for arg in argv[1:] if arg not in ("--report_only", "--report_only=true")]
    study_runner = runner.StudyRunner(
        study, FLAGS.root, seeds=seeds, variants=FLAGS.variants, extra=extra,
        command=" ".join(["python -m pipelines.reproduce", *command]),
    )
    if FLAGS.report_only and not os.path.isdir(FLAGS.root):
        raise ConfigError(f"--root {FLAGS.root}: no such directory, so no finished runs to "
                          "report; run the study first (the same command without --report_only)")
    results = study_runner.write() if FLAGS.report_only else study_runner.run()
    pending = f", {len(results['pending'])} pending" if results["pending"] else ""
    print(f"{len(results['runs'])} runs done{pending}; table: {FLAGS.root}/results.md")


def main(argv=None):
    argv = list(sys.argv if argv is None else argv)
    common.main(lambda: body(argv), argv, module=__name__, config=None)


if __name__ == "__main__":
    main()
