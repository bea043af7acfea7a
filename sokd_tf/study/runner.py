"""Runs a study run by run, resumably, and collects `results.json`.

Layout under the study's root directory (each run is an ordinary sokd_tf workdir, so
every run resumes epoch by epoch and is skipped once done):

    root/teachers/seed<S>/            teacher stage (one for every seed unless per-seed)
    root/teachers/seed<S>_equal_budget/  the control: teacher epochs + distillation epochs
    root/runs/<variant>/seed<S>/      distillation stage of one variant and seed
    root/results.json, results.md, plots/*.png

`results.json` is rebuilt from the runs' own `results.json` files every time, so the
table always shows what the runs measured.

Reference: docs/METHOD.md, "Protocol".
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from collections.abc import Callable, Sequence

from sokd_tf import config as config_lib
from sokd_tf import distillers
from sokd_tf.data import load_dataset
from sokd_tf.runtime import cpu
from sokd_tf.stages import distill as distill_stage
from sokd_tf.stages import run as run_stage
from sokd_tf.stages import teacher as teacher_stage
from sokd_tf.stages import workdir as workdir_lib
from sokd_tf.study import tables
from sokd_tf.study.definitions import Study, Variant

RUN_RECORD = "study_run.json"
_TEACHER = Variant("teacher", "vanilla")


def _percent(fraction):
    return None if fraction is None else round(100.0 * fraction, 2)


def _scaled_epochs(epochs: Sequence[int], old_total: int, new_total: int) -> tuple[int, ...]:
    """Decay epochs at the same fractions of a longer schedule (same schedule shape)."""
    return tuple(sorted({max(1, round(e * new_total / old_total)) for e in epochs}))


def run_config(study: Study, variant: Variant, seed: int, extra: dict | None = None):
    """The resolved RunConfig of one run (study overrides < variant < `extra`)."""
    overrides = dict(study.overrides)
    overrides.update(variant.overrides)
    overrides.update(extra or {})
    overrides["train.method"] = variant.method
    overrides["train.seed"] = seed
    return config_lib.resolve(None, overrides)


def equal_budget_config(teacher_config):
    """The teacher architecture trained for teacher epochs + distillation epochs."""
    train = teacher_config.train
    total = train.teacher_epochs + train.epochs
    decay = train.teacher_lr_decay_epochs or train.lr_decay_epochs
    return dataclasses.replace(teacher_config, train=dataclasses.replace(
        train, teacher_epochs=total,
        teacher_lr_decay_epochs=_scaled_epochs(decay, train.teacher_epochs, total),
    ))


def machine(features: cpu.MachineFeatures) -> dict:
    """The CPU the study ran on (model name and the ISA flags that matter for speed)."""
    return {
        "cpu": features.cpu_name,
        "isa": [name for name, present in features.isa_flags().items() if present],
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }


class StudyRunner:
    """Trains the study's teachers and runs, skipping every finished one.

    Args:
      study: the `Study`.
      root: the study's directory.
      seeds: seeds to run (default the study's).
      variants: variant names to run (default all).
      extra: dotted overrides for every run (e.g. a tiny budget in tests).
      command: the command line that started the study (recorded in results.json).
      log: where progress lines go.
    """

    def __init__(self, study: Study, root: str, *, seeds=None, variants=None, extra=None,
                 command: str = "", log: Callable[[str], None] = print):
        self.study = study
        self.root = root
        self.seeds = tuple(seeds or study.seeds)
        self.variants = tuple(study.variant(name) for name in (variants or [v.name for v in study.variants]))
        self.extra = dict(extra or {})
        self.command = command
        self.log = log
        self._datasets = {}
        # The CPU of this process: it names the machine in results.json and in every run
        # record finished here (a study resumed elsewhere records the other CPU).
        self.cpu = cpu.detect()

    def _dataset(self, config):
        key = (config.data, config.train.seed if config.data.validation_size else None)
        if key not in self._datasets:
            self._datasets[key] = load_dataset(config.data, seed=config.train.seed)
        return self._datasets[key]

    def teacher_seed(self, seed: int) -> int:
        return seed if self.study.teacher_per_seed else self.seeds[0]

    def teacher_dir(self, seed: int, equal_budget: bool = False) -> str:
        name = f"seed{self.teacher_seed(seed)}" + ("_equal_budget" if equal_budget else "")
        return os.path.join(self.root, "teachers", name)

    def run_dir(self, variant: Variant, seed: int) -> str:
        return os.path.join(self.root, "runs", variant.name, f"seed{seed}")

    def _train_teacher(self, config, directory: str, label: str) -> dict:
        record_path = os.path.join(directory, RUN_RECORD)
        if os.path.exists(record_path):
            return workdir_lib.read_json(record_path)
        self.log(f"[study {self.study.name}] {label}: training in {directory}")
        run_stage.prepare_workdir(config, directory)
        start = time.perf_counter()
        results = teacher_stage.train_teacher(config, directory, self._dataset(config))
        record = {
            "top1": _percent(results["roles"]["teacher"]["last_test_top1"]),
            "epochs": config.train.teacher_epochs,
            "wall_s": round(time.perf_counter() - start, 1),
            "cpu": self.cpu.cpu_name,
            "checkpoint": results["checkpoint"],
        }
        workdir_lib.write_json(record_path, record)
        return record

    def _teacher_config(self, seed: int):
        # One teacher config whatever the variant: the variants differ in distillation only.
        return run_config(self.study, _TEACHER, self.teacher_seed(seed), self.extra)

    def teacher(self, seed: int) -> dict:
        config = self._teacher_config(seed)
        return self._train_teacher(config, self.teacher_dir(seed), f"teacher seed {self.teacher_seed(seed)}")

    def equal_budget_teacher(self, seed: int) -> dict:
        config = equal_budget_config(self._teacher_config(seed))
        return self._train_teacher(
            config, self.teacher_dir(seed, equal_budget=True),
            f"equal-budget teacher seed {self.teacher_seed(seed)} ({config.train.teacher_epochs} epochs)",
        )

    def run_one(self, variant: Variant, seed: int) -> dict:
        """Trains (or resumes, or skips) one run; returns its results record."""
        directory = self.run_dir(variant, seed)
        record_path = os.path.join(directory, RUN_RECORD)
        if os.path.exists(record_path):
            return workdir_lib.read_json(record_path)
        # Every run reports the teacher (and the control) beside it, teacher or not.
        teacher = self.teacher(seed)
        control = self.equal_budget_teacher(seed) if self.study.equal_budget_control else None
        extra = dict(self.extra)
        if distillers.METHODS[variant.method].needs_teacher:
            extra["model.teacher_checkpoint"] = teacher["checkpoint"]
        config = run_config(self.study, variant, seed, extra)
        self.log(f"[study {self.study.name}] {variant.name} seed {seed}: training in {directory}")
        resumed = os.path.exists(workdir_lib.Workdir(directory).distill.backup)
        run_stage.prepare_workdir(config, directory)
        start = time.perf_counter()
        results = distill_stage.distill(config, directory, self._dataset(config))
        wall = time.perf_counter() - start
        student = results["roles"]["student"]
        record = {
            "variant": variant.name,
            "method": variant.method,
            "seed": seed,
            "student": {
                "best_top1": _percent(student["best_test_top1"]),
                "last_top1": _percent(student["last_test_top1"]),
                "best_epoch": student["best_epoch"],
            },
            "teacher_bn_mode": results.get("teacher_bn_mode"),
            "epochs": config.train.epochs,
            "wall_s": round(wall, 1),
            # The CPU that finished the run (a resumed run may have started on another).
            "cpu": self.cpu.cpu_name,
            "resumed": resumed,
            "workdir": os.path.relpath(directory, self.root),
        }
        record["teacher"] = {"top1": teacher["top1"]}
        if control is not None:
            record["teacher_equal_budget"] = {"top1": control["top1"]}
        if variant.method == "sokd":
            peer = results["roles"]["peer"]
            record["peer_path"] = {
                "top1": _percent(peer["last_test_top1"]),
                "best_top1": _percent(peer["best_test_top1"]),
            }
        workdir_lib.write_json(record_path, record)
        return record

    def collect(self) -> dict:
        """`results.json` from every finished run's record (unfinished runs are listed)."""
        runs, pending = [], []
        for variant in self.study.variants:
            for seed in self.seeds:
                path = os.path.join(self.run_dir(variant, seed), RUN_RECORD)
                if os.path.exists(path):
                    runs.append(workdir_lib.read_json(path))
                elif variant in self.variants:
                    pending.append(f"{variant.name}/seed{seed}")
        teachers = {}
        for seed in sorted({self.teacher_seed(s) for s in self.seeds}):
            for equal_budget in (False, True):
                path = os.path.join(self.teacher_dir(seed, equal_budget), RUN_RECORD)
                if os.path.exists(path):
                    record = dict(workdir_lib.read_json(path))
                    # Relative to the study's root, so results.json can move with it.
                    record["checkpoint"] = os.path.relpath(record["checkpoint"], self.root)
                    teachers[os.path.basename(self.teacher_dir(seed, equal_budget))] = record
        return {
            "study": self.study.name,
            "description": self.study.description,
            "command": self.command,
            "machine": machine(self.cpu),
            "seeds": list(self.seeds),
            "teachers": teachers,
            "runs": runs,
            "pending": pending,
        }

    def run(self) -> dict:
        """Every run of the study (finished ones skipped); writes results.json/.md + plots."""
        for seed in self.seeds:
            for variant in self.variants:
                self.run_one(variant, seed)
                self.write()
        return self.write()

    def write(self) -> dict:
        results = self.collect()
        workdir_lib.write_json(os.path.join(self.root, "results.json"), results)
        tables.write_tables(results, self.root)
        return results
