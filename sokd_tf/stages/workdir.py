"""The run's workdir: every file name in it, and the one atomic write.

Stages talk to each other only through these files, like pipeline components:

    workdir/config.json                      resolved RunConfig, written first (+ the
                                             `history` of changes made on resume)
    workdir/teacher/teacher.keras            trained teacher (never overwritten later)
    workdir/teacher/{history.csv,history.json,logs/,checkpoints/,results.json}
    workdir/distill/student_{best,last}.keras, peer_*.keras, reconstructed_teacher_*.keras
    workdir/distill/{history.csv,history.json,logs/,checkpoints/,results.json}
    workdir/<stage>/diverged.json            where a stage stopped on a non-finite value
    workdir/evaluation.json                  test top-1/top-5 of every saved model
    workdir/export/serving/<model>/<version>/, export/tflite/*.tflite, export/report.json
    workdir/run.json                         wall time and peak memory of the last `run`
    workdir/report.md, workdir/plots/*.png

No other module spells these names; the stages and the exporter ask this one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable

RESULTS = "results.json"
DIVERGED = "diverged.json"
EXPORT_REPORT = "report.json"
SERVING_DIR = "serving"
TFLITE_DIR = "tflite"


@dataclasses.dataclass(frozen=True)
class StageFiles:
    """The files of one training stage (`teacher/` or `distill/`) under `root`.

    Under multi-worker training a non-chief worker writes the same names under a
    temporary `root`; the chief's `root` is the stage directory.
    """

    root: str

    @property
    def results(self) -> str:
        return os.path.join(self.root, RESULTS)

    @property
    def diverged(self) -> str:
        """The record of a divergence that stopped the stage (absent once it trains on)."""
        return os.path.join(self.root, DIVERGED)

    @property
    def history_json(self) -> str:
        return os.path.join(self.root, "history.json")

    @property
    def history_csv(self) -> str:
        return os.path.join(self.root, "history.csv")

    @property
    def logs(self) -> str:
        return os.path.join(self.root, "logs")

    @property
    def backup(self) -> str:
        return os.path.join(self.root, "checkpoints", "backup")

    @property
    def best_state(self) -> str:
        return os.path.join(self.root, "checkpoints", "best.json")

    def model(self, stem: str, which: str) -> str:
        """A saved model of the stage, e.g. model("student", "last")."""
        return os.path.join(self.root, f"{stem}_{which}.keras")


@dataclasses.dataclass(frozen=True)
class Workdir:
    """Paths of one run's artifacts."""

    root: str

    @property
    def config(self) -> str:
        return os.path.join(self.root, "config.json")

    @property
    def teacher_dir(self) -> str:
        return os.path.join(self.root, "teacher")

    @property
    def teacher(self) -> StageFiles:
        return StageFiles(self.teacher_dir)

    @property
    def teacher_checkpoint(self) -> str:
        return os.path.join(self.teacher_dir, "teacher.keras")

    @property
    def distill_dir(self) -> str:
        return os.path.join(self.root, "distill")

    @property
    def distill(self) -> StageFiles:
        return StageFiles(self.distill_dir)

    def distilled(self, stem: str, which: str = "best") -> str:
        """Path of a distillation output, e.g. distilled("student", "last")."""
        return self.distill.model(stem, which)

    @property
    def evaluation(self) -> str:
        return os.path.join(self.root, "evaluation.json")

    @property
    def export_dir(self) -> str:
        return os.path.join(self.root, "export")

    @property
    def export_report(self) -> str:
        return os.path.join(self.export_dir, EXPORT_REPORT)

    @property
    def report(self) -> str:
        return os.path.join(self.root, "report.md")

    @property
    def run_record(self) -> str:
        return os.path.join(self.root, "run.json")

    @property
    def plots_dir(self) -> str:
        return os.path.join(self.root, "plots")

    def stage_paths(self) -> list[str]:
        """Everything a run writes (what `--overwrite` removes)."""
        return [
            self.config, self.teacher_dir, self.distill_dir, self.evaluation,
            self.export_dir, self.report, self.run_record, self.plots_dir,
        ]


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Calls `write(tmp)` for a temporary path beside `path`, then renames it into place.

    A process killed at any moment leaves either the old file or the new one, never
    half a file; a failing `write` leaves nothing behind.
    """
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    base = os.path.basename(path)
    stem, dot, suffix = base.rpartition(".")
    fd, tmp = tempfile.mkstemp(
        dir=directory, prefix=f".tmp_{stem if dot else base}_", suffix=f".{suffix}" if dot else ""
    )
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def write_json(path: str, value) -> None:
    """Writes JSON atomically (sorted keys, indented, trailing newline)."""
    write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def read_json(path: str, default=None):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def save_model(model, path: str) -> None:
    """Saves a `.keras` file atomically, so a killed run never leaves half a model."""
    atomic_write(path, model.save)
