"""TFX Trainer module: `run_fn(fn_args)` distills a student with sokd_tf.

Pass this file as `Trainer(module_file=...)` (or `run_fn="sokd_tf.tfx.trainer_module.run_fn"`)
with ExampleGen's examples (optionally Transform's graph), e.g.:

    Trainer(module_file=sokd_tf.tfx.trainer_module.__file__,
            examples=example_gen.outputs["examples"],
            train_args=trainer_pb2.TrainArgs(num_steps=2000),
            eval_args=trainer_pb2.EvalArgs(num_steps=20),
            custom_config={"method": "sokd", "teacher": "wrn_16_1", "student": "wrn_10_1",
                           "temperature": 4.0, "validation_size": 5000})

`fn_args` is TFX's `FnArgs` (tfx 1.21.0, tfx/components/trainer/fn_args_utils.py):
working_dir, train_files, eval_files, train_steps, eval_steps, schema_path, schema_file,
transform_graph_path, transform_output, data_accessor, serving_model_dir,
eval_model_dir, model_run_dir, base_model, hyperparameters, custom_config. Used here:
  - train_files / eval_files: ExampleGen split patterns (`.../Split-train/*`); read
    through `data_accessor` when TFX provides one, else directly (GZIP shards);
    the eval split is the run's test split.
  - transform_output (or transform_graph_path): a TF Transform graph; applied to raw
    examples, skipped when the examples are already transformed (see
    `transformed_examples` below), and built into the exported `predict_examples`
    signature so serving clients send raw tf.Examples.
  - schema_path: SchemaGen's schema, used to parse raw examples when given.
  - train_steps: length of the distillation stage, as whole epochs of equal length:
    epochs = ceil(train_steps / steps in one pass), steps_per_epoch =
    ceil(train_steps / epochs). A teacher trained in the run takes `teacher_epochs`
    epochs of the same length.
  - eval_steps: evaluate on the first eval_steps * eval_batch_size eval examples.
  - model_run_dir: the run's workdir (config.json, checkpoints, TensorBoard logs under
    teacher/logs and distill/logs, results.json).
  - serving_model_dir: the student's TF Serving SavedModel (both signatures, warm-up
    records), what TFX's Evaluator and Pusher take.
  - custom_config: the run's options by their CLI flag names (`method`, `student`,
    `teacher`, `teacher_checkpoint`, `temperature`, `epochs`, `batch_size`,
    `validation_size`, ...; `preset` too), plus the module's own keys in MODULE_KEYS.
    Unknown keys are a ConfigError naming them. Options that say where data comes
    from (`source`, `data_dir`) are ignored: TFX supplies the data.
Not used: working_dir, schema_file (= schema_path), eval_model_dir (Estimator only),
base_model, hyperparameters.

No `tfx` import anywhere: the module runs where TFX runs it and in plain Python.

Reference: docs/BATCH.md, "TFX Trainer module".
"""

from __future__ import annotations

import math
import os
from typing import Any

import tensorflow as tf

from sokd_tf import config as config_lib
from sokd_tf.data import tfrecord
from sokd_tf.data.pipeline import dataset_from_source
from sokd_tf.data.tfrecord import IMAGE_KEY, LABEL_KEY
from sokd_tf.errors import ConfigError
from sokd_tf.stages import distill, run, teacher
from sokd_tf.stages import workdir as workdir_lib
from sokd_tf.tfx import examples

# The module's own custom_config keys (beside the config's flag names) and defaults.
MODULE_KEYS = {
    # The (transformed) features holding the image and the integer label.
    "image_key": IMAGE_KEY,
    "label_key": LABEL_KEY,
    # A Transform vocabulary (vocab_filename) listing the class names in label order.
    "label_vocabulary": None,
    # True: the examples are Transform's transformed_examples; False: raw; None: raw
    # unless the first training record already holds every transformed feature.
    "transformed_examples": None,
    # Named override set applied before the other keys (as the CLI's --preset).
    "preset": None,
}
# Where TFX supplies the data, the data options default to "normalise with the data's
# own statistics"; custom_config overrides these like any other option.
MODULE_DEFAULTS = {"data.normalization": "dataset"}


def config_from_custom_config(custom_config: dict[str, Any] | None
                              ) -> tuple[config_lib.RunConfig, dict[str, Any]]:
    """The run's config and the module's own options from a TFX `custom_config`.

    Raises:
      ConfigError: unknown keys (all named), bad values, or an unknown preset.
    """
    values = dict(custom_config or {})
    module = {key: values.pop(key, default) for key, default in MODULE_KEYS.items()}
    overrides = dict(MODULE_DEFAULTS)
    overrides.update(config_lib.overrides_from_flag_names(values))
    return config_lib.resolve(module["preset"], overrides), module


def _transform_output(fn_args):
    path = getattr(fn_args, "transform_output", None) or getattr(
        fn_args, "transform_graph_path", None)
    if not path:
        return None
    import tensorflow_transform as tft

    return tft.TFTransformOutput(path)


def _schema(fn_args):
    if not getattr(fn_args, "schema_path", None):
        return None
    from google.protobuf import text_format
    from tensorflow_metadata.proto.v0 import schema_pb2

    with tf.io.gfile.GFile(fn_args.schema_path) as handle:
        return text_format.Parse(handle.read(), schema_pb2.Schema())


def _already_transformed(patterns, tft_output, choice) -> bool:
    if choice is not None:
        return bool(choice)
    files = examples.expand(patterns)
    first = next(iter(tf.data.TFRecordDataset(
        files[:1], compression_type=tfrecord.compression_type(files[:1]))))
    present = set(tf.train.Example.FromString(first.numpy()).features.feature)
    return set(tft_output.transformed_feature_spec()) <= present


def _read_data(fn_args, config: config_lib.RunConfig, module: dict):
    """SourceData of the train and eval splits, and the serving hooks of a Transform."""
    image_key, label_key = module["image_key"], module["label_key"]
    tft_output = _transform_output(fn_args)
    transform, serving_hooks, class_names, mean, std = None, {}, None, None, None
    if tft_output is None:
        from tensorflow_transform.tf_metadata import schema_utils

        schema = _schema(fn_args)
        if schema is not None:
            spec = schema_utils.schema_as_feature_spec(schema).feature_spec
        else:
            spec = examples.default_feature_spec(image_key, label_key)
            schema = schema_utils.schema_from_feature_spec(spec)
        metadata = examples.examplegen_metadata(fn_args.train_files)
        class_names = metadata.get("class_names")
        mean, std = metadata.get("mean"), metadata.get("std")
    elif _already_transformed(fn_args.train_files, tft_output, module["transformed_examples"]):
        spec = tft_output.transformed_feature_spec()
        schema = tft_output.transformed_metadata.schema
    else:
        spec = tft_output.raw_feature_spec()
        schema = tft_output.raw_metadata.schema
        transform = tft_output.transform_features_layer()
    if tft_output is not None:
        serving_hooks = _serving_hooks(tft_output, image_key)
        if module["label_vocabulary"]:
            class_names = [name.decode("utf-8") for name in
                           tft_output.vocabulary_by_name(module["label_vocabulary"])]
        elif label_key in tft_output.raw_feature_spec():
            # The label passes through the Transform: the examples' own class names hold.
            class_names = examples.examplegen_metadata(fn_args.train_files).get("class_names")
    eval_limit = (fn_args.eval_steps * config.data.eval_batch_size
                  if fn_args.eval_steps else None)
    splits = {}
    for split, patterns, limit in (("train", fn_args.train_files, None),
                                   ("test", fn_args.eval_files, eval_limit)):
        where = f"{'train' if split == 'train' else 'eval'} split ({', '.join(patterns)})"
        images, labels = examples.read_split(
            patterns, where=where, image_key=image_key, label_key=label_key,
            feature_spec=spec, schema=schema, data_accessor=fn_args.data_accessor,
            transform=transform, limit=limit)
        splits[split] = (images, labels, where)
    return examples.source_data(
        "tfx_examples", splits["train"], splits["test"], class_names=class_names,
        mean=mean, std=std), serving_hooks


def _serving_hooks(tft_output, image_key: str) -> dict:
    """`predict_examples` on raw tf.Examples: parse, apply the Transform, take the image."""
    from sokd_tf.export.preprocess import decode_images

    layer = tft_output.transform_features_layer()
    spec = examples.lenient_feature_spec(tft_output.raw_feature_spec())

    def make(info):
        def examples_to_pixels(serialized):
            image = layer(tf.io.parse_example(serialized, spec))[image_key]
            if image.dtype == tf.string:
                return decode_images(tf.reshape(image, [-1]), info)
            return tf.reshape(tf.cast(image, tf.float32), [-1, *info.image_shape])
        return examples_to_pixels

    return {"make": make, "track": (layer,)}


def _with_steps(config: config_lib.RunConfig, custom_config, dataset, train_steps):
    if not train_steps:
        return config
    clashing = sorted({"epochs", "steps_per_epoch"} & set(custom_config or {}))
    if clashing:
        raise ConfigError(f"custom_config {clashing} and the Trainer's train_args.num_steps "
                          f"({train_steps}) both set the training length; keep one")
    full = dataset.steps_per_epoch(config.data.batch_size)
    epochs = math.ceil(train_steps / full)
    return config_lib.apply_overrides(config, {
        "train.epochs": epochs, "train.steps_per_epoch": math.ceil(train_steps / epochs)})


def run_fn(fn_args) -> None:
    """TFX Trainer entry point: train (teacher ->) student, export it to serving_model_dir.

    Args:
      fn_args: TFX's `FnArgs`, or any object with its fields (module docstring).

    Raises:
      ConfigError: bad custom_config (unknown keys are named).
      DataError: unreadable examples or missing features (named).
    """
    from sokd_tf import export
    from sokd_tf.export.saved_model import write_saved_model

    config, module = config_from_custom_config(fn_args.custom_config)
    source, serving_hooks = _read_data(fn_args, config, module)
    # config.json records where the data really came from: the examples artifact.
    config = config_lib.apply_overrides(config, {
        "data.source": "tfrecord", "data.name": source.name,
        "data.data_dir": os.path.dirname(os.path.dirname(fn_args.train_files[0]))})
    dataset = dataset_from_source(source, config.data, seed=config.train.seed)
    config = _with_steps(config, fn_args.custom_config, dataset, fn_args.train_steps)
    workdir = fn_args.model_run_dir
    run.prepare_workdir(config, workdir)
    if teacher.trains_teacher(config, workdir):
        teacher.train_teacher(config, workdir, dataset)
    distill.distill(config, workdir, dataset)
    paths = workdir_lib.Workdir(workdir)
    best = paths.distilled("student", "best")
    student = export.load_student(best if os.path.exists(best)
                                  else paths.distilled("student", "last"))
    warmup, _ = dataset.raw_images("test", limit=4)
    write_saved_model(
        student, dataset.info, fn_args.serving_model_dir, model_name=config.export.model_name,
        warmup_images_uint8=warmup,
        examples_to_pixels=(serving_hooks["make"](dataset.info) if serving_hooks
                            else _examples_to_pixels(module["image_key"], dataset.info)),
        track=serving_hooks.get("track", ()))


def _examples_to_pixels(image_key: str, info):
    if image_key == IMAGE_KEY:
        return None  # the export's own decode_examples reads image/encoded
    from sokd_tf.export.preprocess import decode_images

    def examples_to_pixels(serialized):
        features = tf.io.parse_example(
            serialized, {image_key: tf.io.FixedLenFeature([], tf.string)})
        return decode_images(features[image_key], info)
    return examples_to_pixels
