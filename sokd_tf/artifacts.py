"""The run's workdir: its fixed layout and atomic writes of the files in it.

Stages talk to each other only through these files, like pipeline components:

    workdir/config.json                      resolved RunConfig, written first
    workdir/teacher/teacher.keras            trained teacher (never overwritten later)
    workdir/teacher/{history.csv,history.json,logs/,checkpoints/,results.json}
    workdir/distill/student_{best,last}.keras, peer_*.keras, reconstructed_teacher_*.keras
    workdir/distill/{history.csv,history.json,logs/,checkpoints/,results.json}
    workdir/evaluation.json                  test top-1/top-5 of every saved model
    workdir/export/...                       SavedModel, .tflite files, report.json
    workdir/report.md, workdir/plots/*.png
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import keras


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
    def teacher_checkpoint(self) -> str:
        return os.path.join(self.teacher_dir, "teacher.keras")

    @property
    def distill_dir(self) -> str:
        return os.path.join(self.root, "distill")

    def distilled(self, stem: str, which: str = "best") -> str:
        """Path of a distillation output, e.g. distilled("student", "last")."""
        return os.path.join(self.distill_dir, f"{stem}_{which}.keras")

    @property
    def evaluation(self) -> str:
        return os.path.join(self.root, "evaluation.json")

    @property
    def export_dir(self) -> str:
        return os.path.join(self.root, "export")

    @property
    def report(self) -> str:
        return os.path.join(self.root, "report.md")

    @property
    def plots_dir(self) -> str:
        return os.path.join(self.root, "plots")

    def stage_paths(self) -> list[str]:
        """Everything a run writes (what `--overwrite` removes)."""
        return [
            self.config, self.teacher_dir, self.distill_dir, self.evaluation,
            self.export_dir, self.report, self.plots_dir,
        ]


def write_json(path: str, value) -> None:
    """Writes JSON atomically (temp file in the same directory, then rename)."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str, default=None):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def save_model(model: keras.Model, path: str) -> None:
    """Saves a `.keras` file atomically, so a killed run never leaves half a model."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, ".tmp_" + os.path.basename(path))
    model.save(tmp)
    os.replace(tmp, path)
