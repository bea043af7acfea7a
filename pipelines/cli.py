"""The `sokd-tf` command: one subcommand per entry-point module of `pipelines/`.

    sokd-tf run --workdir=workdir/quickstart
    sokd-tf distill --help
    python -m sokd_tf run --workdir=workdir/quickstart      # the same, without the script

Each subcommand is a module with a `main(argv)` and its own flags; only the chosen module
is imported, so a command defines and lists only its own flags. A new subcommand is one
line in `COMMANDS`. `python -m pipelines.<module>` runs the same module directly.
"""

from __future__ import annotations

import importlib
import os
import sys

# Subcommand -> (module with `main(argv)`, one-line summary).
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("pipelines.run", "the whole job: teacher -> distillation -> evaluation -> export -> report"),
    "train-teacher": ("pipelines.train_teacher", "vanilla training of the teacher -> teacher/teacher.keras"),
    "distill": ("pipelines.distill", "train the student with --method=vanilla|kd|fitnet|at|dml|sokd"),
    "evaluate": ("pipelines.evaluate", "top-1/top-5 of every model saved in --workdir, or of one .keras"),
    "export": ("pipelines.export_student", "SavedModel + verified LiteRT files + export/report.json"),
    "make-tfrecords": ("pipelines.make_tfrecords", "write any data source as sharded TFRecords of tf.Example"),
    "reproduce": ("pipelines.reproduce", "a reproduction study: one teacher, every method's students over seeds"),
    "make-tfrecords-beam": ("pipelines.make_tfrecords_beam", "make-tfrecords as an Apache Beam job (TFX ExampleGen layout)"),
    "batch-predict": ("pipelines.batch_predict", "batch prediction with an exported student on Apache Beam"),
    "kfp": ("pipelines.kfp_pipeline", "compile (or run locally) the Kubeflow pipeline of the whole job"),
}
USAGE_ERROR = 2


def _program() -> str:
    if os.path.basename(sys.argv[0]) == "__main__.py":
        return "python -m sokd_tf"
    return "sokd-tf"


def usage(program: str) -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"usage: {program} COMMAND [--flag=value ...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", f"`{program} COMMAND --help` lists the command's flags with the values it would use.",
              "Exit status: 0 success, 2 a bad command line or a user error (one `error:` line)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Dispatches `argv[1]` to its module's `main` with the rest of the command line."""
    argv = list(sys.argv if argv is None else argv)
    program = _program()
    if len(argv) > 1 and argv[1] in ("-h", "--help", "help"):
        print(usage(program))
        sys.exit(0)
    command = argv[1] if len(argv) > 1 else None
    if command not in COMMANDS:
        problem = "no command given" if command is None else f"unknown command {command!r}"
        print(f"error: {problem}; choose one of {', '.join(COMMANDS)} (`{program} --help`)",
              file=sys.stderr)
        sys.exit(USAGE_ERROR)
    module = importlib.import_module(COMMANDS[command][0])
    module.main([f"{program} {command}", *argv[2:]])


if __name__ == "__main__":
    main()
