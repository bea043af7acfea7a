"""Flags of every entry point, generated from the config dataclasses, and the one parse step.

Each config field gets one flag (named after the field; `data.name` is `--dataset`) whose
one-line help is the field's entry in its dataclass's `Attributes:` docstring and whose
absl default is None = "not set": the value then comes from `--config`, the preset or the
dataclass default, so every default exists once, in `sokd_tf/config.py`. Precedence:
library default < `--preset` < `--config` file < flags the user set (a flag counts as
set when it is not on its default, `FLAGS[name].using_default_value`). Choices are
`DEFINE_enum`s over the library's own tuples, so a typo is rejected before anything runs.

`main` is the parse step of every command: `--help` prints the command's own flags with the
values this command line would use; every bad invocation (unknown flag, bad number, enum
typo, missing `--workdir`, a `UserError` of the library) ends with one `error: ...` line on
stderr and exit status 2.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging as python_logging
import os
import re
import sys
import types
import typing

from absl import flags, logging

from sokd_tf import config as config_lib
from sokd_tf.errors import ConfigError, UserError

FLAGS = flags.FLAGS
USAGE_ERROR = 2
# TensorFlow logs every SavedModel write at INFO through absl; keep the console to
# progress lines, epoch summaries and warnings (`--verbosity=0` brings INFO back).
FLAGS.set_default("verbosity", -1)
logging.set_verbosity(logging.WARNING)


# Choices of the enum-valued fields. Model specs (--teacher, --student) are strings: a zoo
# name, keras.applications.NAME or a .keras file, checked by the config.
_CHOICES = {
    "model.peer_init": config_lib.PEER_INITS,
    "model.batch_norm": config_lib.BATCH_NORMS,
    "data.source": config_lib.DATA_SOURCES,
    "data.normalization": config_lib.NORMALIZATIONS,
    "data.cache": config_lib.CACHE_MODES,
    "data.augmentation": config_lib.AUGMENTATIONS,
    "train.method": config_lib.METHODS,
    "train.teacher_bn_mode": config_lib.TEACHER_BN_MODES,
    "train.baseline_recipe": config_lib.BASELINE_RECIPES,
    "train.precision": config_lib.PRECISIONS,
    "train.strategy": config_lib.STRATEGIES,
}
_HELP_ARGS = ("-h", "-help", "--help", "-?", "--helpshort")
# What absl's validator of a `required=True` flag says when the flag is missing.
_REQUIRED_MESSAGE = r"Flag --\w+ must have a value other than None"


# Flag names come from the library, so custom_config keys (TFX) and flags agree.
flag_name = config_lib.flag_name


def _defined_fields() -> dict[str, typing.Any]:
    """Dotted field -> type annotation, for the config fields this process has flags for."""
    return {
        dotted: annotation for dotted, annotation in config_lib.field_types().items()
        if flag_name(dotted) in FLAGS
    }


def define_config_flags(*, sections=tuple(config_lib.SECTIONS), default_preset="quickstart") -> None:
    """Defines --preset, --config and one flag per field of `sections` (once per process)."""
    if "preset" in FLAGS:
        return
    choices = dict(_CHOICES)
    flags.DEFINE_enum(
        "preset", default_preset, list(config_lib.PRESETS),
        "Named override set applied on top of the library defaults (the paper recipe).",
    )
    flags.DEFINE_string(
        "config", None,
        "JSON or YAML file of config fields (sections or dotted names; a run's config.json "
        "is valid); flags set on the command line win.",
    )
    helps = field_help()
    for dotted, annotation in config_lib.field_types().items():
        if dotted.split(".", 1)[0] not in sections:
            continue
        name = flag_name(dotted)
        base = _without_none(annotation)
        help_text = helps.get(dotted, dotted)
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


def define_workdir_flags(*, overwrite: bool = True) -> None:
    """Defines --workdir (required) and, where the command honours it, --overwrite."""
    if "workdir" not in FLAGS:
        flags.DEFINE_string("workdir", None, "Directory of the run's artifacts.", required=True)
    if overwrite and "overwrite" not in FLAGS:
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



def define_tfrecord_flags(*, out_dir_help: str, other_split: str) -> None:
    """The flags of the two TFRecord writers (in-process and Beam), defined once per process."""
    from sokd_tf.data.tfrecord import IMAGE_FORMATS, IMAGE_KEY, LABEL_KEY

    if "out_dir" in FLAGS:
        return
    flags.DEFINE_string("out_dir", None, out_dir_help, required=True)
    flags.DEFINE_integer("num_shards", 8, f"Shards of the train split ({other_split}: proportional).",
                         lower_bound=1)
    flags.DEFINE_enum("image_format", "png", list(IMAGE_FORMATS),
                      "Encoding of image/encoded: png (lossless) or jpeg (quality 95).")
    flags.DEFINE_string("image_key", IMAGE_KEY, "tf.Example feature of the encoded image.")
    flags.DEFINE_string("label_key", LABEL_KEY, "tf.Example feature of the int64 label.")

# --- one-line help from the dataclass docstrings ------------------------------------

_ATTRIBUTE = re.compile(r"^  ([a-z0-9_]+(?:(?:, | \.\. )[a-z0-9_]+)*): (.*)$")
_SENTENCE_END = re.compile(r"(?<!e\.g)(?<!i\.e)\.(?:\s|$)")


def field_help() -> dict[str, str]:
    """Dotted field -> the first sentence of its `Attributes:` docstring entry."""
    out = {}
    for section, cls in config_lib.SECTIONS.items():
        names = [field.name for field in dataclasses.fields(cls)]
        for keys, text in _attribute_entries(inspect.getdoc(cls) or ""):
            for key in _expand(keys, names):
                out[f"{section}.{key}"] = _first_sentence(text)
    return out


def _attribute_entries(docstring: str):
    lines = docstring.splitlines()
    if "Attributes:" not in lines:
        return
    entry = None
    for line in lines[lines.index("Attributes:") + 1:]:
        match = _ATTRIBUTE.match(line)
        if match:
            if entry:
                yield entry[0], " ".join(entry[1])
            entry = (match.group(1), [match.group(2)])
        elif line.startswith("    ") and entry:
            entry[1].append(line.strip())
        elif line.strip() == "" or not line.startswith(" "):
            break
    if entry:
        yield entry[0], " ".join(entry[1])


def _expand(keys: str, names: list[str]) -> list[str]:
    if " .. " in keys:
        first, last = keys.split(" .. ")
        return names[names.index(first): names.index(last) + 1]
    return keys.split(", ")


def _first_sentence(text: str) -> str:
    match = _SENTENCE_END.search(text)
    return text[: match.start() + 1] if match else text


# --- flags -> config ----------------------------------------------------------------


def _without_none(annotation):
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return args[0]
    return annotation


def explicitly_set(name: str) -> bool:
    """True when the user set flag `name` (on the command line, or in a test's flagsaver)."""
    return name in FLAGS and not FLAGS[name].using_default_value


def overrides_from_flags() -> dict[str, typing.Any]:
    """Dotted-name overrides for every config flag the user set."""
    overrides = {}
    for dotted, annotation in _defined_fields().items():
        name = flag_name(dotted)
        value = FLAGS[name].value
        if not explicitly_set(name) or value is None:
            continue
        base = _without_none(annotation)
        if typing.get_origin(base) is tuple:
            (item_type, _) = typing.get_args(base)
            try:
                value = tuple(item_type(item) for item in value)
            except ValueError:
                raise UserError(
                    f"--{name} must be a comma-separated list of {item_type.__name__}, "
                    f"got {','.join(value)!r}"
                ) from None
        overrides[dotted] = value
    return overrides


def config_file_fields() -> dict[str, typing.Any]:
    """The `--config` file's fields (dotted names), or {} without --config."""
    return config_lib.read_config_file(FLAGS.config) if FLAGS.config else {}


def config_from_flags() -> config_lib.RunConfig:
    """Library defaults < --preset < --config < flags."""
    return config_lib.resolve(FLAGS.preset, overrides_from_flags(), config_file=config_file_fields())


def config_for_workdir(workdir: str | None) -> config_lib.RunConfig:
    """The workdir's own config.json (then --config, then flags), else `config_from_flags`.

    Raises:
      ConfigError: --preset given for a workdir that has its config.json (the run's own
        config is what the command uses; a preset would silently not apply).
    """
    from sokd_tf.stages import workdir as workdir_lib

    stored = workdir_lib.read_json(workdir_lib.Workdir(workdir).config) if workdir else None
    if stored is None:
        return config_from_flags()
    if explicitly_set("preset"):
        raise ConfigError(
            f"--preset does not apply here: {workdir_lib.Workdir(workdir).config} is the run's "
            f"config; change single fields with --config or flags"
        )
    config = config_lib.apply_overrides(config_lib.RunConfig.from_dict(stored), config_file_fields())
    return config_lib.apply_overrides(config, overrides_from_flags())


# --- the parse step -----------------------------------------------------------------


def fail(message: str) -> typing.NoReturn:
    """One line on stderr and the usage exit status."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(USAGE_ERROR)


def _flag_error_message(error: flags.Error) -> str:
    message = str(error)
    missing = re.match(r"flag --(\w+)=None: " + _REQUIRED_MESSAGE, message)
    if missing:
        return f"--{missing.group(1)} is required"
    return message


def main(body, argv=None, *, module: str, config=config_from_flags, pipeline_args=False) -> None:
    """Parses the command line, then runs `body()`; the whole life of a command.

    Args:
      body: the command, a function of no arguments reading FLAGS.
      argv: the command line, program name first (default: `sys.argv`).
      module: `__name__` of the command's module (its flags are listed by `--help`).
      config: zero-argument function giving the command's effective config (the values
        `--help` shows); None for a command without config flags.
      pipeline_args: hand every argument absl does not know to `body(arguments)` (Beam
        pipeline options such as `--runner=DataflowRunner`) instead of refusing it.
    """
    argv = list(sys.argv if argv is None else argv)
    wants_help = [arg for arg in argv[1:] if arg in _HELP_ARGS]
    if "--helpfull" in argv[1:]:
        FLAGS.mark_as_parsed()
        print(FLAGS.get_help())
        sys.exit(0)
    try:
        rest = FLAGS([arg for arg in argv if arg not in _HELP_ARGS], known_only=pipeline_args)
    except flags.Error as error:
        message = _flag_error_message(error)
        if not (wants_help and message.endswith(" is required")):
            fail(message)
        rest = [argv[0]]  # --help without --workdir: every flag was parsed, show the help
    if len(rest) > 1 and not pipeline_args:
        fail(f"unexpected arguments {rest[1:]}")
    try:
        if wants_help:
            print(help_text(argv[0], module, config() if config else None))
            sys.exit(0)
        _show_library_progress()
        if pipeline_args:
            body(rest[1:])
        else:
            body()
    except UserError as error:
        fail(str(error))


def _show_library_progress() -> None:
    """The library's progress lines (Python logging, logger "sokd_tf") go to stdout as-is."""
    logger = python_logging.getLogger("sokd_tf")
    if not logger.handlers:
        handler = python_logging.StreamHandler(sys.stdout)
        handler.setFormatter(python_logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(python_logging.INFO)
    logger.propagate = False


# --- --help -------------------------------------------------------------------------


def help_text(program: str, module: str, config: config_lib.RunConfig | None) -> str:
    """The command's own flags, one-line help each, with the values this command line uses."""
    module_name = sys.argv[0] if module == "__main__" else module
    own = {flag.name: flag for flag in FLAGS.get_key_flags_for_module(module_name)}
    command_module = sys.modules.get(module)
    summary = (inspect.getdoc(command_module) or "").split("\n\n")[0] if command_module else ""
    fields = {flag_name(dotted): dotted for dotted in _defined_fields()}
    defaults = config_lib.RunConfig().to_dict()
    effective = config.to_dict() if config else {}
    required = "".join(f" --{name}=..." for name, flag in own.items() if _required(flag))
    precedence = " (library default < --preset < --config < flags)" if config else ""
    lines = [f"usage: {_program_name(program)}{required} [--flag=value ...]", "", summary, "",
             f"Values shown are the ones this command line uses{precedence}; --helpfull also "
             "lists absl's and TensorFlow's flags."]
    groups: dict[str, list[str]] = {"command": []}
    for name, flag in own.items():
        if name in fields and config:
            section, field = fields[name].split(".", 1)
            value, library = effective[section][field], defaults[section][field]
            groups.setdefault(section, []).append(_flag_lines(flag, value, library))
        else:
            groups["command"].append(_flag_lines(flag, flag.value, flag.default, required=_required(flag)))
    for group, entries in groups.items():
        if entries:
            lines += ["", f"{group} flags:", *entries]
    return "\n".join(lines)


def _program_name(program: str) -> str:
    if os.path.basename(program) == "sokd-tf" or " " in program:
        return program
    return f"python -m {_module_of(program)}"


def _module_of(path: str) -> str:
    parts = os.path.normpath(path).split(os.sep)
    stem = os.path.splitext(parts[-1])[0]
    return ".".join([*parts[-2:-1], stem]) if len(parts) > 1 else stem


def _required(flag) -> bool:
    return any(re.match(_REQUIRED_MESSAGE, str(getattr(v, "message", ""))) for v in flag.validators)


def _format_value(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(item) for item in value)
    return str(value)


def _flag_lines(flag, value, library, *, required=False) -> str:
    head = f"  --{flag.name}"
    if value is None:
        head += "  (required)" if required else "  (unset)"
    else:
        head += f"={_format_value(value)}"
    if isinstance(flag, flags.EnumFlag):
        head += f"  {{{','.join(flag.parser.enum_values)}}}"
    if library != value and not required:
        head += f"  (library default: {_format_value(library)})"
    help_line = re.sub(r"^<[^>]*>: ", "", flag.help.split("\n")[0])  # absl's enum prefix
    return f"{head}\n      {help_line}"


def resume_changed() -> tuple[str, ...]:
    """--resume_changed as dotted config fields (flag names are accepted too)."""
    by_flag = {flag_name(dotted): dotted for dotted in config_lib.field_types()}
    return tuple(by_flag.get(name, name) for name in FLAGS.resume_changed)


__all__ = [
    "FLAGS", "config_for_workdir", "config_from_flags", "define_config_flags",
    "define_tfrecord_flags", "define_workdir_flags", "explicitly_set", "fail", "field_help", "main", "resume_changed",
]
