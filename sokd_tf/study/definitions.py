"""The named studies: which runs, on which budget, compared how.

A study is one shared set of config overrides (data, models, budget), a list of
*variants* (a method plus its own overrides, e.g. `sokd` or `sokd_no_peer_kd`), the seeds,
and whether one teacher serves every seed (as KD papers distil every student from one
pretrained teacher) or each seed trains its own.

Reference: docs/METHOD.md, "Protocol"; docs/results/ for the committed studies.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sokd_tf.config import FASHION_MNIST_DIR
from sokd_tf.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compared configuration: a method and the overrides that make it this variant.

    Attributes:
      name: the label in tables (`vanilla`, `kd`, `sokd_T2`, ...).
      method: `train.method`.
      overrides: dotted config fields applied on top of the study's own.
    """

    name: str
    method: str
    overrides: tuple[tuple[str, Any], ...] = ()


@dataclasses.dataclass(frozen=True)
class Study:
    """A named comparison.

    Attributes:
      name: the study's name (`--study`).
      description: one line for the report.
      overrides: dotted config fields every run shares (data, models, budget).
      variants: the compared configurations, in table order.
      seeds: default seeds.
      teacher_per_seed: train a teacher per seed instead of one for all seeds.
      equal_budget_control: also train the teacher architecture for teacher epochs +
        distillation epochs (same schedule shape): the fair control for "the peer path
        beats the teacher", since the peer trains on top of the teacher's epochs.
    """

    name: str
    description: str
    overrides: tuple[tuple[str, Any], ...]
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    teacher_per_seed: bool = False
    equal_budget_control: bool = True

    def variant(self, name: str) -> Variant:
        for variant in self.variants:
            if variant.name == name:
                return variant
        raise ConfigError(
            f"study {self.name!r} has no variant {name!r}; choose from {[v.name for v in self.variants]}"
        )


_BASELINES = (
    Variant("vanilla", "vanilla"),
    Variant("kd", "kd"),
    Variant("dml", "dml"),
    Variant("sokd", "sokd"),
)

_FASHION_MNIST_DATA = (
    ("data.source", "fashion_mnist"),
    ("data.name", "fashion_mnist"),
    ("data.data_dir", FASHION_MNIST_DIR),
    ("data.normalization", "dataset"),
    ("data.pad", 2),
    ("data.batch_size", 128),
    ("data.validation_size", 0),
    # Pinned so the numbers compare across CPUs (an "auto" precision would depend on the CPU).
    ("train.precision", "float32"),
)

_SOKD_TERMS = (
    ("peer_ce", "loss.peer_ce_weight"),
    ("peer_kd", "loss.peer_kd_weight"),
    ("peer_ml", "loss.peer_ml_weight"),
    ("student_ce", "loss.student_ce_weight"),
    ("student_ml", "loss.student_ml_weight"),
)

STUDIES: dict[str, Study] = {
    # Sized for a 2-core CPU: the methods differ visibly on this budget.
    "fashion_mnist": Study(
        name="fashion_mnist",
        description=(
            "Fashion-MNIST (all 60,000 training images), WRN-16-2 teacher -> WRN-16-1 "
            "student, 4 teacher + 4 student epochs, batch 128, step x0.1 at epochs 3 and 4, "
            "reflect-pad 2, T = 4; best and last epoch on test, as the paper reports"
        ),
        overrides=_FASHION_MNIST_DATA + (
            ("model.teacher", "wrn_16_2"),
            ("model.student", "wrn_16_1"),
            ("train.teacher_epochs", 4),
            ("train.epochs", 4),
            ("train.lr_decay_epochs", (2, 3)),
            ("train.teacher_lr_decay_epochs", (2, 3)),
            ("loss.temperature", 4.0),
        ),
        variants=_BASELINES + (
            # The paper's feature-based extension: SOKD plus attention transfer from the
            # peer's stages to the student's (RepDistiller's AT weight).
            Variant("sokd_at", "sokd", (("loss.attention_weight", 1000.0),)),
        ),
    ),
    # One seed of SOKD ablations on the quickstart pair and budget.
    "fashion_mnist_ablations": Study(
        name="fashion_mnist_ablations",
        description=(
            "SOKD ablations on the quickstart pair and budget: WRN-16-1 teacher (3 epochs) "
            "-> WRN-10-1 student (8 epochs), Fashion-MNIST, one seed"
        ),
        overrides=_FASHION_MNIST_DATA + (
            ("model.teacher", "wrn_16_1"),
            ("model.student", "wrn_10_1"),
            ("train.teacher_epochs", 3),
            ("train.teacher_lr_decay_epochs", (2,)),
            ("train.epochs", 8),
            ("train.lr_decay_epochs", (5, 7)),
            ("data.pad", 4),
        ),
        variants=(
            Variant("sokd", "sokd"),
            Variant("sokd_teacher_bn_frozen", "sokd", (("train.teacher_bn_mode", "frozen"),)),
            Variant("sokd_peer_init_copy", "sokd", (("model.peer_init", "copy"),)),
            *(Variant(f"sokd_without_{label}", "sokd", ((field, 0.0),)) for label, field in _SOKD_TERMS),
            Variant("sokd_T2", "sokd", (("loss.temperature", 2.0),)),
            Variant("sokd_T8", "sokd", (("loss.temperature", 8.0),)),
        ),
        seeds=(0,),
        equal_budget_control=False,
    ),
    # The paper's experiment, for a GPU user: CIFAR-100, WRN-40-2 -> WRN-40-1, 200 epochs.
    "cifar100_paper": Study(
        name="cifar100_paper",
        description=(
            "CIFAR-100, WRN-40-2 -> WRN-40-1, the paper's recipe and protocol "
            "(200 epochs, all 50,000 training images, best and last epoch on test)"
        ),
        overrides=(
            ("data.source", "tfds"),
            ("data.name", "cifar100"),
            ("data.normalization", "cifar10"),
            ("data.validation_size", 0),
            ("model.teacher", "wrn_40_2"),
            ("model.student", "wrn_40_1"),
        ),
        variants=_BASELINES,
    ),
}


def get_study(name: str) -> Study:
    """The study named `name`.

    Raises:
      ConfigError: unknown name.
    """
    if name not in STUDIES:
        raise ConfigError(f"unknown study {name!r}; choose one of {sorted(STUDIES)}")
    return STUDIES[name]
