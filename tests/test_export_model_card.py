"""LiteRT files ship with labels.txt and a model card: a LiteRT interpreter that reads
only the exported tflite folder (copied elsewhere) classifies real Fashion-MNIST test
images, taking the input dtype and quantization from the card and the names from
labels.txt."""

import functools
import json
import os
import shutil
import subprocess
import sys

import export_support as support
import keras
import numpy as np
import pytest

import sokd_tf
from sokd_tf import export
from sokd_tf.config import ExportConfig
from sokd_tf.export import model_card, serving

VARIANTS = ("fp32", "int8")
NUM_IMAGES = 200


@functools.cache
def briefly_trained_student():
    """Two strided convs + dense, 100 Adam steps on real Fashion-MNIST (~80 % top-1)."""
    info, train_images, train_labels, _, _ = support.data()
    keras.utils.set_random_seed(0)
    images = keras.Input(info.image_shape)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(images)
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.Flatten()(x)
    student = keras.Model(images, keras.layers.Dense(info.num_classes)(x), name="student")
    student.compile(optimizer=keras.optimizers.Adam(2e-3),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    student.fit(export.normalize_numpy(train_images[:6400], info), train_labels[:6400],
                batch_size=64, epochs=1, shuffle=False, verbose=0)
    return student


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    info, train_images, _, test_images, test_labels = support.data()
    export_dir = str(tmp_path_factory.mktemp("card") / "export")
    report = export.export_student(
        briefly_trained_student(), info, export_dir,
        ExportConfig(tflite_variants=VARIANTS, representative_size=100, latency_runs=5),
        train_images_uint8=train_images, test_images_uint8=test_images[:NUM_IMAGES],
        test_labels=test_labels[:NUM_IMAGES], source_model_file="/runs/a/student.best.keras",
    )
    return export_dir, report


def classify_from_folder(folder, variant, images_uint8):
    """What an app does with the folder alone: card -> how to feed, labels -> names."""
    from ai_edge_litert.interpreter import Interpreter

    with open(os.path.join(folder, f"{variant}.model_card.json"), encoding="utf-8") as f:
        card = json.load(f)
    with open(os.path.join(folder, card["labels_file"]), encoding="utf-8") as f:
        names = f.read().splitlines()
    interpreter = Interpreter(model_path=os.path.join(folder, card["model_file"]))
    interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"],
                                    [len(images_uint8), *card["input"]["shape"][1:]])
    interpreter.allocate_tensors()
    pixels = images_uint8.astype(np.float32)
    quantization = card["input"]["quantization"]
    if quantization is not None:
        limits = np.iinfo(card["input"]["dtype"])
        pixels = np.clip(np.round(pixels / quantization["scale"] + quantization["zero_point"]),
                         limits.min, limits.max)
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"],
                           pixels.astype(card["input"]["dtype"]))
    interpreter.invoke()
    scores = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    if card["output"]["quantization"] is not None:
        out = card["output"]["quantization"]
        scores = out["scale"] * (scores.astype(np.float32) - out["zero_point"])
    classes = scores.argmax(-1)
    return classes, [names[c] for c in classes], card


def test_a_litert_interpreter_reading_only_the_folder_classifies_real_images(
        exported, tmp_path):
    export_dir, report = exported
    info, _, _, test_images, test_labels = support.data()
    images, labels = test_images[:NUM_IMAGES], test_labels[:NUM_IMAGES]
    folder = str(tmp_path / "phone")
    shutil.copytree(os.path.join(export_dir, "tflite"), folder)
    assert sorted(os.listdir(folder)) == sorted(
        ["labels.txt", *[f"{v}.tflite" for v in VARIANTS],
         *[f"{v}.model_card.json" for v in VARIANTS]])
    keras_classes = support.keras_logits(briefly_trained_student(), images, info).argmax(-1)
    assert np.mean(keras_classes == labels) > 0.7, "the fixture student should have learned"

    for variant in VARIANTS:
        classes, names, card = classify_from_folder(folder, variant, images)
        assert np.mean(classes == labels) > 0.7, variant  # chance is 0.1
        assert np.mean(classes == keras_classes) >= 0.97, variant
        assert names == [info.class_names[c] for c in classes]
        assert card["evaluation"]["top1"] == pytest.approx(np.mean(classes == labels))
        assert report["tflite"][variant]["model_card"] == os.path.join(
            export_dir, "tflite", f"{variant}.model_card.json")

    # The deployment kit's example finds the names in the folder too (labels.txt).
    paths = []
    for i, image in enumerate(images[:3]):
        paths.append(str(tmp_path / f"image{i}.png"))
        with open(paths[-1], "wb") as f:
            f.write(serving.encode_png(image))
    kit = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "export")
    result = subprocess.run(
        [sys.executable, os.path.join(kit, "litert_example.py"),
         "--model", os.path.join(folder, "int8.tflite"), *paths],
        capture_output=True, text=True, check=True)
    classes, names, _ = classify_from_folder(folder, "int8", images[:3])
    lines = [line for line in result.stdout.splitlines() if line.startswith(str(tmp_path))]
    for line, cls, name in zip(lines, classes, names, strict=True):
        assert f"class {cls} {name!r}" in line


def test_cards_state_the_input_contract_and_where_they_come_from(exported):
    export_dir, report = exported
    info = support.data()[0]
    folder = os.path.join(export_dir, "tflite")
    with open(os.path.join(folder, "labels.txt"), encoding="utf-8") as f:
        assert f.read() == "".join(f"{name}\n" for name in info.class_names)
    cards = {}
    for variant in VARIANTS:
        with open(os.path.join(folder, f"{variant}.model_card.json")) as f:
            cards[variant] = json.load(f)
        card = cards[variant]
        assert card["format"] == model_card.CARD_FORMAT and card["variant"] == variant
        assert card["model_file"] == f"{variant}.tflite"
        assert card["input"]["shape"] == [-1, 28, 28, 1]
        assert card["input"]["pixel_range"] == [0, 255]
        assert card["output"]["shape"] == [-1, 10]
        assert card["output"]["meaning"].startswith("logits")
        assert card["class_names"] == list(info.class_names) and card["num_classes"] == 10
        assert card["input"]["folded_normalization"] == {"mean": list(info.mean),
                                                         "std": list(info.std)}
        assert card["source_model"] == {
            "name": "student", "file": "student.best.keras",
            "parameters": briefly_trained_student().count_params()}
        assert card["producer"] == {"library": "sokd_tf", "version": sokd_tf.__version__}
        assert card["size_bytes"] == report["tflite"][variant]["size_bytes"]
        classifier = export.LiteRTClassifier(os.path.join(folder, f"{variant}.tflite"))
        assert card["input"]["dtype"] == classifier.input_dtype
    assert cards["fp32"]["input"]["quantization"] is None
    assert cards["fp32"]["output"]["quantization"] is None
    # Full-integer: uint8 raw pixels (scale 1, zero point 0: calibrated on 0..255).
    assert cards["int8"]["input"]["dtype"] == "uint8"
    assert cards["int8"]["input"]["quantization"] == {"scale": 1.0, "zero_point": 0}
    assert cards["int8"]["input"]["quantization"] == report["tflite"]["int8"][
        "input_quantization"]
    assert cards["int8"]["output"]["dtype"] == "uint8"
    assert cards["int8"]["output"]["quantization"]["scale"] > 0
