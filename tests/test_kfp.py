"""The KFP v2 pipeline: compiles to IR YAML and runs end to end with kfp.local."""

import glob
import json
import os

import pytest
import yaml

from pipelines import kfp_pipeline
from sokd_tf import config
from sokd_tf.beam import batch_predict, make_tfrecords
from sokd_tf.errors import ConfigError
from sokd_tf.kfp import steps

COMPONENTS = ["batch-predict", "distill", "evaluate", "export", "train-teacher"]


def test_compiles_to_ir_yaml_with_every_stage(tmp_path):
    path = kfp_pipeline.compile_pipeline(str(tmp_path / "pipeline.yaml"),
                                         base_image="registry.example/sokd-tf:1")
    with open(path) as handle:
        spec = yaml.safe_load(handle)
    assert spec["pipelineInfo"]["name"] == kfp_pipeline.PIPELINE_NAME
    components = sorted(name.removeprefix("comp-") for name in spec["components"])
    assert [c for c in components if not c.startswith("condition")] == COMPONENTS
    images = {executor["container"]["image"]
              for executor in spec["deploymentSpec"]["executors"].values()}
    assert images == {"registry.example/sokd-tf:1"}
    tasks = spec["root"]["dag"]["tasks"]
    # Artifacts wire the stages: distill reads the teacher's, export the student's.
    assert tasks["distill"]["inputs"]["artifacts"]["teacher"]["taskOutputArtifact"] == {
        "outputArtifactKey": "teacher", "producerTask": "train-teacher"}
    assert tasks["export"]["inputs"]["artifacts"]["student"]["taskOutputArtifact"][
        "producerTask"] == "distill"
    assert set(spec["root"]["inputDefinitions"]["parameters"]) == {
        "preset", "options", "predict_input"}


def test_options_are_flag_names_validated_into_the_config():
    run_config = steps.run_config('{"method": "kd", "epochs": 2}', "quickstart")
    assert run_config.train.method == "kd" and run_config.train.epochs == 2
    assert run_config.model.student == "wrn_10_1"
    with pytest.raises(ConfigError, match=r"\['epoch'\]"):
        steps.run_config('{"epoch": 2}')
    with pytest.raises(ConfigError, match="JSON object"):
        steps.run_config("[1, 2]")


@pytest.mark.slow
def test_runs_end_to_end_with_kfp_local(small_fashion_mnist, tmp_path):
    examples = str(tmp_path / "examples")
    make_tfrecords.run(config.DataConfig(source="fashion_mnist", name="fashion_mnist",
                                         data_dir=small_fashion_mnist), examples, num_shards=2)
    options = json.dumps({
        "source": "tfrecord", "data_dir": examples, "method": "sokd", "teacher": "wrn_16_1",
        "student": "wrn_10_1", "teacher_epochs": 1, "epochs": 1, "steps_per_epoch": 4,
        "batch_size": 32, "validation_size": 64, "tflite_variants": ["fp32"],
        "latency_runs": 1})
    root = str(tmp_path / "kfp_root")
    kfp_pipeline.run_local(root, options=options,
                           predict_input=os.path.join(examples, "Split-eval", "*"))

    def outputs(component, name):
        (path,) = glob.glob(os.path.join(root, "sokd-tf-*", component, name))
        return path

    assert os.path.exists(os.path.join(outputs("train-teacher", "teacher"),
                                       "teacher", "teacher.keras"))
    assert os.path.exists(os.path.join(outputs("distill", "student"),
                                       "distill", "student_last.keras"))
    with open(outputs("evaluate", "executor_output.json")) as handle:
        (metrics_artifact,) = json.load(handle)["artifacts"]["metrics"]["artifacts"]
    metrics = metrics_artifact["metadata"]
    assert 0.0 <= metrics["test/top1"] <= 1.0 and metrics["params"] > 0
    serving_root = os.path.join(outputs("export", "serving_model"), "export", "serving",
                                "student", "1")
    assert os.path.exists(os.path.join(serving_root, "saved_model.pb"))
    rows = batch_predict.read_jsonl(sorted(glob.glob(
        os.path.join(outputs("batch-predict", "predictions"), "predictions-*.jsonl"))))
    assert len(rows) == 256  # every eval record of the small Fashion-MNIST subset
