"""Flags shared by every pipeline, generated from the config dataclasses.

Each config field gets one flag (named after the field; `data.name` is `--dataset`)
whose default is None = "not set": the value then comes from the preset, else from the
dataclass default, so every default exists once, in `sokd_tf/config.py`. Choices are
`DEFINE_enum`s over plain tuples/dicts, so a typo is rejected before anything is built.
"""

from __future__ import annotations

import sys
import types
import typing

from absl import flags, logging

from sokd_tf import config as config_lib
from sokd_tf.errors import UserError

FLAGS = flags.FLAGS
# TensorFlow logs every SavedModel write at INFO through absl; keep the console to
# progress bars, epoch summaries and warnings (`--verbosity=0` brings INFO back).
FLAGS.set_default("verbosity", -1)
logging.set_verbosity(logging.WARNING)


# Choices of the enum-valued fields (models are filled in by define_config_flags).
_CHOICES = {
    "model.peer_init": config_lib.PEER_INITS,
    "model.batch_norm": config_lib.BATCH_NORMS,
    "data.source": config_lib.DATA_SOURCES,
    "data.normalization": config_lib.NORMALIZATIONS,
    "train.method": config_lib.METHODS,
    "train.teacher_bn_mode": config_lib.TEACHER_BN_MODES,
    "train.precision": config_lib.PRECISIONS,
    "train.strategy": config_lib.STRATEGIES,
}


# Flag names come from the library, so custom_config keys (TFX) and flags agree.
flag_name = config_lib.flag_name


def _defaults() -> dict[str, typing.Any]:
    defaults = config_lib.RunConfig().to_dict()
    return {
        f"{section}.{field}": value
        for section, fields in defaults.items()
        for field, value in fields.items()
    }


def define_config_flags(*, default_preset: str | None = "quickstart") -> None:
    """Defines --preset and one flag per config field (once per process)."""
    from sokd_tf import models

    if "preset" in FLAGS:
        return
    choices = dict(_CHOICES)
    choices["model.teacher"] = tuple(models.BUILDERS)
    choices["model.student"] = tuple(models.BUILDERS)
    flags.DEFINE_enum(
        "preset", default_preset, list(config_lib.PRESETS),
        "Named override set applied on top of the library defaults (the paper recipe).",
    )
    defaults = _defaults()
    for dotted, annotation in config_lib.field_types().items():
        name = flag_name(dotted)
        base = _without_none(annotation)
        help_text = f"{dotted} (library default: {defaults[dotted]!r})"
        if dotted in choices:
            flags.DEFINE_enum(name, None, list(choices[dotted]), help_text)
        elif base is bool:
            flags.DEFINE_boolean(name, None, help_text)
        elif base is int:
            flags.DEFINE_integer(name, None, help_text)
        elif base is float:
            flags.DEFINE_float(name, None, help_text)
        elif typing.get_origin(base) is tuple:
            flags.DEFINE_list(name, None, help_text + " (comma-separated)")
        else:
            flags.DEFINE_string(name, None, help_text)


def _without_none(annotation):
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return args[0]
    return annotation


def overrides_from_flags() -> dict[str, typing.Any]:
    """Dotted-name overrides for every config flag the user set."""
    overrides = {}
    for dotted, annotation in config_lib.field_types().items():
        value = getattr(FLAGS, flag_name(dotted))
        if value is None:
            continue
        base = _without_none(annotation)
        if typing.get_origin(base) is tuple:
            (item_type, _) = typing.get_args(base)
            try:
                value = tuple(item_type(item) for item in value)
            except ValueError:
                raise UserError(
                    f"--{flag_name(dotted)} must be a comma-separated list of {item_type.__name__}, "
                    f"got {','.join(value)!r}"
                ) from None
        overrides[dotted] = value
    return overrides


def config_from_flags() -> config_lib.RunConfig:
    return config_lib.resolve(FLAGS.preset, overrides_from_flags())


def config_for_workdir(workdir: str) -> config_lib.RunConfig:
    """The workdir's own config.json (flags set on the command line override it)."""
    from sokd_tf.stages import workdir as workdir_lib

    stored = workdir_lib.read_json(workdir_lib.Workdir(workdir).config)
    if stored is None:
        return config_from_flags()
    return config_lib.apply_overrides(config_lib.RunConfig.from_dict(stored), overrides_from_flags())


def main_wrapper(body):
    """absl main that turns a UserError into one line on stderr and exit status 2."""

    def main(argv):
        if len(argv) > 1:
            print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
            sys.exit(2)
        try:
            body()
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    return main


def define_workdir_flags() -> None:
    """Defines --workdir and --overwrite (once per process)."""
    if "workdir" in FLAGS:
        return
    flags.DEFINE_string("workdir", None, "Directory of the run's artifacts.", required=True)
    flags.DEFINE_boolean(
        "overwrite", False,
        "Delete an existing run in --workdir (needed when its config differs) and start over.",
    )
    flags.DEFINE_list(
        "resume_changed", [],
        "Continue the run in --workdir from its last completed epoch although these fields "
        "changed (e.g. after a divergence: --student_learning_rate=0.05 "
        f"--resume_changed=student_learning_rate); allowed: {', '.join(config_lib.RESUMABLE_FIELDS)} "
        "(dotted or flag names). The change is recorded in config.json's history.",
    )


def resume_changed() -> tuple[str, ...]:
    """--resume_changed as dotted config fields (flag names are accepted too)."""
    by_flag = {flag_name(dotted): dotted for dotted in config_lib.field_types()}
    return tuple(by_flag.get(name, name) for name in FLAGS.resume_changed)


__all__ = [
    "FLAGS", "config_for_workdir", "config_from_flags", "define_config_flags",
    "define_workdir_flags", "main_wrapper", "resume_changed",
]
