"""The TFX Trainer module: run_fn on ExampleGen shards, with and without a Transform graph.

`FnArgs` below carries exactly the fields of TFX 1.21.0's
`tfx.components.trainer.fn_args_utils.FnArgs`; `DataAccessor` is built from tfx-bsl the
way TFX's `tfxio_utils.get_tf_dataset_factory_from_artifact` builds it.
"""

import collections
import dataclasses
import importlib.util
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from conftest import write_fashion_mnist_subset

from sokd_tf import config
from sokd_tf.beam import make_tfrecords
from sokd_tf.beam.options import pipeline_options
from sokd_tf.data import fashion_mnist
from sokd_tf.errors import ConfigError
from sokd_tf.export import serving
from sokd_tf.tfx import trainer_module

TFX_MISSING = importlib.util.find_spec("tfx") is None
TFX_REASON = ("tfx is not installed: tfx 1.21's ml-metadata and tensorflow-data-validation "
              "ship only manylinux_2_39 wheels (glibc >= 2.39); see docs/BATCH.md")
FN_ARGS_FIELDS = (
    "working_dir", "train_files", "eval_files", "train_steps", "eval_steps", "schema_path",
    "schema_file", "transform_graph_path", "transform_output", "data_accessor",
    "serving_model_dir", "eval_model_dir", "model_run_dir", "base_model", "hyperparameters",
    "custom_config",
)


@dataclasses.dataclass
class FnArgs:
    working_dir: str | None = None
    train_files: list | None = None
    eval_files: list | None = None
    train_steps: int | None = None
    eval_steps: int | None = None
    schema_path: str | None = None
    schema_file: str | None = None
    transform_graph_path: str | None = None
    transform_output: str | None = None
    data_accessor: object = None
    serving_model_dir: str | None = None
    eval_model_dir: str | None = None
    model_run_dir: str | None = None
    base_model: str | None = None
    hyperparameters: dict | None = None
    custom_config: dict | None = None


DataAccessor = collections.namedtuple(
    "DataAccessor", ["tf_dataset_factory", "record_batch_factory", "data_view_decode_fn"])


def _data_accessor():
    from tfx_bsl.tfxio import tf_example_record

    def tf_dataset_factory(file_pattern, options, schema):
        return tf_example_record.TFExampleRecord(
            file_pattern=file_pattern, schema=schema,
            telemetry_descriptors=["Trainer"]).TensorFlowDataset(options)

    def record_batch_factory(file_pattern, options, schema):
        return tf_example_record.TFExampleRecord(
            file_pattern=file_pattern, schema=schema,
            telemetry_descriptors=["Trainer"]).RecordBatches(options)

    return DataAccessor(tf_dataset_factory, record_batch_factory, None)


def _fn_args(examples_dir, tmp_path, **fields):
    run = tmp_path / "trainer_output"
    values = dict(
        working_dir=str(run / "working"),
        train_files=[os.path.join(examples_dir, "Split-train", "*")],
        eval_files=[os.path.join(examples_dir, "Split-eval", "*")],
        serving_model_dir=str(run / "model" / "Format-Serving"),
        eval_model_dir=str(run / "model" / "Format-TFMA"),
        model_run_dir=str(run / "model_run"),
    )
    values.update(fields)
    return FnArgs(**values)


def _records(pattern):
    files = sorted(tf.io.gfile.glob(pattern))
    return [r.numpy() for r in tf.data.TFRecordDataset(files, compression_type="GZIP")]


def _labels(records, key="image/class/label"):
    return np.array([tf.train.Example.FromString(r).features.feature[key].int64_list.value[0]
                     for r in records])


@pytest.fixture(scope="module")
def examplegen_dir(tmp_path_factory):
    """3,000 train / 500 eval real Fashion-MNIST images in ExampleGen's layout (Beam)."""
    idx = write_fashion_mnist_subset(str(tmp_path_factory.mktemp("fmnist_3000")), 3000, 500)
    out = str(tmp_path_factory.mktemp("examplegen") / "examples")
    make_tfrecords.run(config.DataConfig(source="fashion_mnist", name="fashion_mnist",
                                         data_dir=idx), out, num_shards=4)
    return out


def test_fn_args_fields_are_tfx_1_21s():
    assert tuple(field.name for field in dataclasses.fields(FnArgs)) == FN_ARGS_FIELDS


@pytest.mark.skipif(TFX_MISSING, reason=TFX_REASON)
def test_fn_args_fields_match_the_installed_tfx():
    import attr
    from tfx.components.trainer import fn_args_utils

    assert tuple(field.name for field in attr.fields(fn_args_utils.FnArgs)) == FN_ARGS_FIELDS


def test_unknown_custom_config_keys_are_named(tmp_path):
    fn_args = _fn_args(str(tmp_path), tmp_path, custom_config={
        "method": "kd", "epoch": 3, "studnet": "wrn_10_1"})
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['epoch', 'studnet'\]"):
        trainer_module.run_fn(fn_args)


def test_custom_config_values_are_validated_into_the_run_config():
    run_config, module = trainer_module.config_from_custom_config({
        "method": "kd", "teacher_checkpoint": "/models/teacher.keras", "temperature": "2.5",
        "lr_decay_epochs": [3, 4], "dataset": "my_images", "image_key": "jpeg",
        "preset": "quickstart"})
    assert run_config.train.method == "kd"
    assert run_config.model.teacher_checkpoint == "/models/teacher.keras"
    assert run_config.loss.temperature == 2.5
    assert run_config.train.lr_decay_epochs == (3, 4)
    assert run_config.data.name == "my_images"
    assert run_config.model.student == "wrn_10_1"  # from the quickstart preset
    assert module["image_key"] == "jpeg"
    with pytest.raises(ConfigError, match="train.method must be one of"):
        trainer_module.config_from_custom_config({"method": "crd"})
    with pytest.raises(ConfigError, match="epochs must be int"):
        trainer_module.config_from_custom_config({"epochs": "many"})


def test_train_steps_and_custom_config_epochs_clash(examplegen_dir, tmp_path):
    fn_args = _fn_args(examplegen_dir, tmp_path, train_steps=10, custom_config={
        "method": "vanilla", "student": "wrn_10_1", "epochs": 2, "validation_size": 0})
    with pytest.raises(ConfigError, match=r"\['epochs'\].*num_steps"):
        trainer_module.run_fn(fn_args)


@pytest.mark.slow
def test_run_fn_distills_and_exports_a_student_that_scores_the_eval_shards(
        examplegen_dir, tmp_path):
    fn_args = _fn_args(
        examplegen_dir, tmp_path, train_steps=80, eval_steps=4,
        data_accessor=_data_accessor(),
        custom_config={"method": "sokd", "teacher": "wrn_16_1", "student": "wrn_10_1",
                       "teacher_epochs": 1, "batch_size": 64, "eval_batch_size": 128,
                       "validation_size": 300, "temperature": 4.0,
                       "student_learning_rate": 0.05, "peer_learning_rate": 0.05,
                       "teacher_learning_rate": 0.05})
    trainer_module.run_fn(fn_args)

    with open(os.path.join(fn_args.model_run_dir, "config.json")) as handle:
        stored = json.load(handle)
    # 2,700 training images / 64 = 43 steps a pass -> 2 epochs of 40 steps.
    assert stored["train"]["epochs"] == 2 and stored["train"]["steps_per_epoch"] == 40
    assert stored["train"]["method"] == "sokd" and stored["model"]["teacher"] == "wrn_16_1"
    assert stored["data"]["source"] == "tfrecord" and stored["data"]["data_dir"] == examplegen_dir
    logs = [name for _, _, names in os.walk(fn_args.model_run_dir) for name in names
            if name.startswith("events.out.tfevents")]
    assert logs, "no TensorBoard event files under model_run_dir"

    serving_dir = fn_args.serving_model_dir
    assert os.path.exists(os.path.join(serving_dir, "saved_model.pb"))
    assert len(serving.read_warmup_requests(serving_dir)) == 4
    loaded = tf.saved_model.load(serving_dir)
    assert set(loaded.signatures) == {"serving_default", serving.EXAMPLES_SIGNATURE}
    records = _records(os.path.join(examplegen_dir, "Split-eval", "*"))
    outputs = loaded.signatures[serving.EXAMPLES_SIGNATURE](examples=tf.constant(records))
    accuracy = float(np.mean(outputs["classes"].numpy() == _labels(records)))
    print(f"student eval accuracy through predict_examples: {accuracy:.3f}")
    assert accuracy > 0.3, accuracy  # chance is 0.1
    with open(os.path.join(serving_dir, "assets", "class_names.txt")) as handle:
        assert handle.read().split("\n")[:2] == list(fashion_mnist.CLASS_NAMES[:2])


def _preprocessing_fn(inputs):
    import tensorflow_transform as tft

    pixels = tf.map_fn(lambda encoded: tf.io.decode_png(encoded, channels=1),
                       tf.reshape(inputs["image/encoded"], [-1]),
                       fn_output_signature=tf.TensorSpec([28, 28, 1], tf.uint8))
    return {
        "pixels": tf.cast(pixels, tf.float32),
        "label": tft.compute_and_apply_vocabulary(
            tf.reshape(inputs["image/class/text"], [-1]), vocab_filename="label"),
    }


@pytest.fixture(scope="module")
def transformed(examplegen_dir, tmp_path_factory):
    """Raw examples with the class as text, and the Transform graph of `_preprocessing_fn`
    analysed on Beam's in-process runner."""
    import tensorflow_transform as tft
    import tensorflow_transform.beam as tft_beam
    from tensorflow_transform.tf_metadata import dataset_metadata, metadata_io, schema_utils
    from tfx_bsl.tfxio import tf_example_record

    root = tmp_path_factory.mktemp("transform")
    raw_dir = root / "raw"
    for split in ("train", "eval"):
        (raw_dir / f"Split-{split}").mkdir(parents=True)
        path = str(raw_dir / f"Split-{split}" / "data_tfrecord-00000-of-00001.gz")
        with tf.io.TFRecordWriter(path, options="GZIP") as writer:
            for record in _records(os.path.join(examplegen_dir, f"Split-{split}", "*")):
                features = tf.train.Example.FromString(record).features.feature
                label = features["image/class/label"].int64_list.value[0]
                text = fashion_mnist.CLASS_NAMES[label].encode()
                writer.write(tf.train.Example(features=tf.train.Features(feature={
                    "image/encoded": features["image/encoded"],
                    "image/class/text": tf.train.Feature(
                        bytes_list=tf.train.BytesList(value=[text]))})).SerializeToString())
    schema = schema_utils.schema_from_feature_spec({
        "image/encoded": tf.io.FixedLenFeature([], tf.string),
        "image/class/text": tf.io.FixedLenFeature([], tf.string)})
    source = tf_example_record.TFExampleRecord(
        file_pattern=str(raw_dir / "Split-train" / "*"), schema=schema)
    graph_dir = str(root / "transform_graph")
    import apache_beam as beam

    with beam.Pipeline(options=pipeline_options()) as pipeline, \
            tft_beam.Context(temp_dir=str(root / "tmp")):
        transform_fn = ((pipeline | source.BeamSource(), source.TensorAdapterConfig())
                        | tft_beam.AnalyzeDataset(_preprocessing_fn))
        _ = transform_fn | tft_beam.WriteTransformFn(graph_dir)
    # As TFX's Transform component does, the raw schema goes beside the graph.
    metadata_io.write_metadata(dataset_metadata.DatasetMetadata(schema), os.path.join(
        graph_dir, tft.TFTransformOutput.RAW_METADATA_DIR))
    return str(raw_dir), graph_dir


@pytest.fixture(scope="module")
def transformed_examples(transformed, tmp_path_factory):
    """Transform's `transformed_examples` of the raw eval split, written as TFX does."""
    import apache_beam as beam
    import tensorflow_transform as tft
    import tensorflow_transform.beam as tft_beam
    from tfx_bsl.tfxio import tf_example_record

    raw_dir, graph_dir = transformed
    output = tft.TFTransformOutput(graph_dir)
    out_dir = tmp_path_factory.mktemp("transformed_examples")
    source = tf_example_record.TFExampleRecord(
        file_pattern=os.path.join(raw_dir, "Split-eval", "*"),
        schema=output.raw_metadata.schema)
    coder = tft.coders.ExampleProtoCoder(output.transformed_metadata.schema)
    with beam.Pipeline(options=pipeline_options()) as pipeline, \
            tft_beam.Context(temp_dir=str(out_dir / "tmp")):
        transform_fn = pipeline | tft_beam.ReadTransformFn(graph_dir)
        data, _ = (((pipeline | source.BeamSource(), source.TensorAdapterConfig()),
                    transform_fn) | tft_beam.TransformDataset())
        _ = (data | beam.Map(coder.encode)
             | beam.io.WriteToTFRecord(str(out_dir / "Split-eval" / "data_tfrecord"),
                                       file_name_suffix=".gz"))
    return str(out_dir)


@pytest.mark.slow
def test_transformed_examples_are_detected_and_read_as_the_raw_ones(
        transformed, transformed_examples, tmp_path):
    raw_dir, graph_dir = transformed
    options = {"method": "vanilla", "image_key": "pixels", "label_key": "label",
               "label_vocabulary": "label", "validation_size": 0}
    run_config, module = trainer_module.config_from_custom_config(options)
    read = {}
    for name, directory in (("raw", raw_dir), ("transformed", transformed_examples)):
        fn_args = _fn_args(directory, tmp_path, transform_output=graph_dir,
                           train_files=[os.path.join(directory, "Split-eval", "*")],
                           eval_files=[os.path.join(directory, "Split-eval", "*")])
        source, _ = trainer_module._read_data(fn_args, run_config, module)
        read[name] = source
    assert read["raw"].class_names == read["transformed"].class_names
    raw, done = read["raw"].splits["train"], read["transformed"].splits["train"]
    # Beam's writer may reorder records: compare as sets of (pixels, label).
    def rows(split):
        return sorted((split.images[i].tobytes(), int(split.labels[i])) for i in range(split.size))
    assert rows(raw) == rows(done) and raw.size == 500


@pytest.mark.slow
def test_run_fn_applies_a_transform_graph_in_training_and_serving(transformed, tmp_path):
    import tensorflow_transform as tft

    raw_dir, graph_dir = transformed
    fn_args = _fn_args(
        raw_dir, tmp_path, train_steps=90, transform_graph_path=graph_dir,
        transform_output=graph_dir,
        custom_config={"method": "vanilla", "student": "wrn_10_1", "batch_size": 64,
                       "validation_size": 0, "student_learning_rate": 0.05,
                       "image_key": "pixels", "label_key": "label",
                       "label_vocabulary": "label"})
    trainer_module.run_fn(fn_args)

    vocabulary = [v.decode() for v in tft.TFTransformOutput(graph_dir).vocabulary_by_name("label")]
    assert sorted(vocabulary) == sorted(fashion_mnist.CLASS_NAMES)
    serving_dir = fn_args.serving_model_dir
    with open(os.path.join(serving_dir, "assets", "class_names.txt")) as handle:
        assert handle.read().splitlines() == vocabulary
    loaded = tf.saved_model.load(serving_dir)
    records = _records(os.path.join(raw_dir, "Split-eval", "*"))
    texts = [tf.train.Example.FromString(r).features.feature["image/class/text"]
             .bytes_list.value[0].decode() for r in records]
    outputs = loaded.signatures[serving.EXAMPLES_SIGNATURE](examples=tf.constant(records))
    predicted = [vocabulary[c] for c in outputs["classes"].numpy()]
    accuracy = float(np.mean([p == t for p, t in zip(predicted, texts, strict=True)]))
    print(f"transformed student eval accuracy through predict_examples: {accuracy:.3f}")
    assert accuracy > 0.3, accuracy
    # A serving client sends the image alone: the Transform's other raw input is filled.
    image_only = [serving.image_example(tf.train.Example.FromString(r).features
                                        .feature["image/encoded"].bytes_list.value[0])
                  for r in records[:8]]
    alone = loaded.signatures[serving.EXAMPLES_SIGNATURE](examples=tf.constant(image_only))
    np.testing.assert_array_equal(alone["classes"].numpy(), outputs["classes"].numpy()[:8])


@pytest.mark.skipif(TFX_MISSING, reason=TFX_REASON)
@pytest.mark.slow
def test_tfx_trainer_component_runs_the_module_under_local_dag_runner(examplegen_dir, tmp_path):
    from tfx import v1 as tfx

    # ImportExampleGen re-splits the train shards 2:1 into train/eval (its default).
    example_gen = tfx.components.ImportExampleGen(
        input_base=os.path.join(examplegen_dir, "Split-train"))
    trainer = tfx.components.Trainer(
        module_file=trainer_module.__file__,
        examples=example_gen.outputs["examples"],
        train_args=tfx.proto.TrainArgs(num_steps=60),
        eval_args=tfx.proto.EvalArgs(num_steps=2),
        custom_config={"method": "vanilla", "student": "wrn_10_1", "batch_size": 64,
                       "validation_size": 0})
    pipeline = tfx.dsl.Pipeline(
        pipeline_name="sokd_tf_trainer_test", pipeline_root=str(tmp_path / "root"),
        components=[example_gen, trainer],
        metadata_connection_config=tfx.orchestration.metadata
        .sqlite_metadata_connection_config(str(tmp_path / "metadata.db")))
    tfx.orchestration.LocalDagRunner().run(pipeline)
    models = tf.io.gfile.glob(str(tmp_path / "root" / "Trainer" / "model" / "*" / "Format-Serving"))
    assert models, "the Trainer wrote no serving model"
    assert set(tf.saved_model.load(models[0]).signatures) == {
        "serving_default", serving.EXAMPLES_SIGNATURE}
