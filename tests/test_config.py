"""Config dataclasses: defaults = paper recipe, presets, overrides, validation."""

import pytest

from sokd_tf import config as config_lib
from sokd_tf.errors import ConfigError


def test_defaults_are_the_paper_recipe():
    config = config_lib.RunConfig()
    assert (config.model.teacher, config.model.student) == ("wrn_40_2", "wrn_40_1")
    assert config.model.peer_init == "fresh"
    assert (config.data.source, config.data.name, config.data.batch_size) == ("tfds", "cifar100", 128)
    assert config.data.normalization == "cifar10"
    assert config.train.epochs == 200 and config.train.lr_decay_epochs == (100, 150)
    assert config.train.student_learning_rate == config.train.peer_learning_rate == 0.1
    assert (config.train.momentum, config.train.nesterov, config.train.weight_decay) == (0.9, False, 5e-4)
    assert config.train.seed == 8888
    assert config.loss.temperature == 4.0
    assert set(config.loss.sokd_weights().values()) == {1.0}
    assert config.loss.kd_weights() == {"student/ce": 0.1, "student/kd_from_teacher": 0.9}


def test_precision_and_batch_norm_default_to_auto_but_the_quickstart_pins_float32():
    assert "auto" in config_lib.PRECISIONS and config_lib.BATCH_NORMS == ("auto", "fused", "stock")
    assert config_lib.RunConfig().train.precision == "auto"
    assert config_lib.RunConfig().model.batch_norm == "auto"
    # The README's quickstart numbers are float32 ones, whatever the CPU.
    assert config_lib.resolve("quickstart").train.precision == "float32"
    assert config_lib.resolve("quickstart", {"train.precision": "auto"}).train.precision == "auto"
    assert config_lib.resolve("cifar100_wrn40_2_wrn40_1").train.precision == "auto"


def test_preset_then_overrides():
    config = config_lib.resolve("quickstart", {"train.epochs": 7, "data.batch_size": 64})
    assert config.data.source == "fashion_mnist"
    assert config.train.epochs == 7
    assert config.data.batch_size == 64
    # Untouched fields keep the library default.
    assert config.train.weight_decay == 5e-4


def test_paper_preset_equals_defaults_on_the_recipe():
    paper = config_lib.resolve("cifar100_wrn40_2_wrn40_1")
    assert paper == config_lib.RunConfig()


def test_json_round_trip():
    config = config_lib.resolve("quickstart", {"export.tflite_variants": ["fp32", "int8"]})
    assert config_lib.RunConfig.from_dict(config.to_dict()) == config
    assert config.export.tflite_variants == ("fp32", "int8")


@pytest.mark.parametrize(
    "overrides, culprit",
    [
        ({"loss.temperature": -1.0}, "loss.temperature"),
        ({"loss.temperature": 0.0}, "loss.temperature"),
        ({"train.method": "crd"}, "train.method"),
        ({"train.lr_decay_epochs": (150, 100)}, "train.lr_decay_epochs"),
        ({"data.batch_size": 0}, "data.batch_size"),
        ({"loss.peer_kd_weight": -0.5}, "loss.peer_kd_weight"),
        ({"export.tflite_variants": ("fp64",)}, "export.tflite_variants"),
        ({"train.precision": "bfloat16"}, "train.precision"),
        ({"model.batch_norm": "sync"}, "model.batch_norm"),
        ({"train.nonsense": 1}, "train.nonsense"),
    ],
)
def test_bad_values_name_the_culprit(overrides, culprit):
    with pytest.raises(ConfigError, match=culprit.replace(".", r"\.")):
        config_lib.resolve(None, overrides)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset"):
        config_lib.resolve("imagenet")


def test_paper_preset_is_the_paper_protocol_and_holdout_is_ours():
    paper = config_lib.resolve("cifar100_wrn40_2_wrn40_1")
    assert paper.data.validation_size == 0  # all 50,000 images; best and last on test
    holdout = config_lib.resolve("cifar100_wrn40_2_wrn40_1_holdout")
    assert holdout.data.validation_size == 5000
    assert holdout.train == paper.train and holdout.model == paper.model


def test_baselines_get_their_standard_recipe_unless_set():
    kd = config_lib.resolve("quickstart", {"train.method": "kd"})
    assert kd.train.teacher_bn_mode == "frozen"
    assert (kd.train.nesterov, kd.train.weight_decay) == (False, 5e-4)
    dml = config_lib.resolve("quickstart", {"train.method": "dml"})
    assert (dml.train.nesterov, dml.train.weight_decay) == (True, 1e-4)
    assert dml.train.teacher_bn_mode == "official"
    sokd = config_lib.resolve("quickstart", {"train.method": "sokd"})
    assert sokd.train.teacher_bn_mode == "official"
    assert (sokd.train.nesterov, sokd.train.weight_decay) == (False, 5e-4)
    # An explicit value wins over the recipe; "sokd" puts every baseline on SOKD's recipe.
    kd_official = config_lib.resolve(None, {"train.method": "kd", "train.teacher_bn_mode": "official"})
    assert kd_official.train.teacher_bn_mode == "official"
    dml_sokd = config_lib.resolve(None, {"train.method": "dml", "train.baseline_recipe": "sokd"})
    assert (dml_sokd.train.nesterov, dml_sokd.train.weight_decay) == (False, 5e-4)


def test_config_file_json_yaml_and_resolved_config_round_trip(tmp_path):
    import json

    resolved = config_lib.resolve("quickstart", {"train.method": "kd", "train.epochs": 3})
    path = tmp_path / "config.json"
    path.write_text(resolved.to_json())
    # A run's resolved config.json is itself a valid --config input, even under another preset.
    assert config_lib.resolve("cifar100_wrn40_2_wrn40_1", config_file=config_lib.read_config_file(str(path))) == resolved
    dotted = tmp_path / "dotted.json"
    dotted.write_text(json.dumps({"train.epochs": 5, "loss": {"temperature": 2.0}}))
    config = config_lib.resolve(
        "quickstart", {"train.epochs": 6}, config_file=config_lib.read_config_file(str(dotted))
    )
    assert config.train.epochs == 6  # flags win over the file
    assert config.loss.temperature == 2.0


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"train": {"epochs": 3, "nonsense": 1}}', r"unknown config fields \['train.nonsense'\]"),
        ('{"training": {"epochs": 3}}', "unknown config section 'training'"),
        ("{not json", "not valid JSON/YAML"),
        ("[1, 2]", "must hold a mapping"),
    ],
)
def test_bad_config_file_names_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        config_lib.read_config_file(str(path))
    with pytest.raises(ConfigError, match="cannot be read"):
        config_lib.read_config_file(str(tmp_path / "missing.json"))


def test_fitnet_and_at_are_kd_with_one_feature_term():
    from sokd_tf import distillers

    fitnet = config_lib.resolve("quickstart", {"train.method": "fitnet"})
    assert fitnet.loss.kd_weights() == {"student/ce": 1.0, "student/kd_from_teacher": 0.0}
    assert fitnet.loss.kd_feature_weights()["student/hint_from_teacher"] == 100.0
    at = config_lib.resolve("quickstart", {"train.method": "at", "loss.attention_weight": 500.0})
    assert at.loss.kd_feature_weights() == {"student/hint_from_teacher": 0.0, "student/at_from_teacher": 500.0}
    assert at.train.teacher_bn_mode == "frozen"
    assert set(distillers.METHODS) == set(config_lib.METHODS)
    assert distillers.METHODS["fitnet"].needs_teacher and not distillers.METHODS["dml"].needs_teacher
