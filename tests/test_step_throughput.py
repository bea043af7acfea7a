"""benchmarks/step_throughput.py: counted FLOPs by hand, any model pair, one real timed step."""

import importlib.util
import os

import keras
import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture(scope="module")
def step_throughput():
    path = os.path.join(BENCHMARKS, "step_throughput.py")
    spec = importlib.util.spec_from_file_location("step_throughput", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_forward_macs_by_hand(step_throughput):
    images = keras.Input((8, 8, 4))
    x = keras.layers.Conv2D(6, 3, padding="same")(images)  # 8*8*6 * 3*3*4 = 13,824
    x = keras.layers.Conv2D(6, 1, groups=2)(x)  # grouped: 8*8*6 * 1*1*3 = 1,152
    x = keras.layers.DepthwiseConv2D(3, strides=2, padding="same")(x)  # 4*4*6 * 3*3 = 864
    x = keras.layers.GlobalAveragePooling2D()(x)
    inner = keras.Model(images, keras.layers.Dense(5)(x))  # 6*5 = 30
    outer = keras.Model(images, inner(images))  # a nested model counts once
    assert step_throughput._forward_macs(outer) == 13_824 + 1_152 + 864 + 30


def test_default_pair_and_spec_errors(step_throughput, capsys):
    args = step_throughput.parse_args([])
    assert (args.teacher, args.student) == ("wrn_40_2", "wrn_40_1")
    assert step_throughput._torch_skip_note(args) == ""
    other = step_throughput.parse_args(["--teacher=vgg13", "--student=mobilenetv2"])
    assert "PyTorch reference skipped" in step_throughput._torch_skip_note(other)
    assert "vgg13 -> mobilenetv2" in step_throughput._torch_skip_note(other)
    with pytest.raises(SystemExit):
        step_throughput.parse_args(["--student=resnet_9000"])
    assert "--student: unknown model spec 'resnet_9000'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        step_throughput.parse_args(["--rounds=0"])
    assert "--rounds must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        step_throughput.parse_args(["--op_profile"])  # default precisions: two of them
    assert "--op_profile profiles one configuration per method" in capsys.readouterr().err


def test_one_timed_kd_step_for_a_zoo_pair(step_throughput):
    args = step_throughput.parse_args([
        "--worker", "--method=kd", "--precision=float32", "--jit=off", "--batch=8",
        "--batch_norm=stock", "--steps=1", "--repeats=1", "--warmup=1", "--max_other_load=1e9",
        "--teacher=resnet8", "--student=resnet8x4",
    ])
    args.batch = args.batch[0]
    record = step_throughput.run_worker(args)
    assert (record["teacher"], record["student"], record["method"]) == ("resnet8", "resnet8x4", "kd")
    assert record["images_per_s_median"] > 0 and record["final_loss_finite"]
    assert record["peak_rss_mib"] >= record["rss_after_import_mib"] > 0

    from sokd_tf import models

    # KD trains the student (3x its forward pass) and runs the frozen teacher once.
    student = step_throughput._forward_macs(models.build("resnet8x4", (32, 32, 3), 100))
    teacher = step_throughput._forward_macs(models.build("resnet8", (32, 32, 3), 100))
    assert record["gflop_per_image"] == round(2 * (3 * student + teacher) / 1e9, 4)


def _record(method, round_, rate, low, high, batch_norm="fused"):
    return {"batch": 64, "method": method, "precision": "float32", "jit": "off",
            "batch_norm": batch_norm, "round": round_, "images_per_s_median": rate,
            "images_per_s_min": low, "images_per_s_max": high, "cpu_use_per_window": [1.9],
            "peak_rss_mib": 1000 + round_, "gflop_per_image": 0.5}


def test_rounds_pair_each_tensorflow_rate_with_its_own_rounds_pytorch_rate(step_throughput):
    records = [
        _record("vanilla", 1, 300.0, 290.0, 310.0), _record("vanilla", 2, 240.0, 230.0, 250.0),
        _record("vanilla", 3, 250.0, 200.0, 260.0), _record("sokd", 1, 90.0, 88.0, 95.0),
    ]
    records.append(dict(_record("vanilla", 1, None, None, None, "stock"), skipped="no"))
    torch_rounds = {64: [{"vanilla": 200.0, "sokd": 100.0}, {"vanilla": 300.0}, {"vanilla": 250.0}]}
    combined = {(r["method"], r["batch_norm"]): r
                for r in step_throughput.combine_rounds(records, torch_rounds)}
    vanilla = combined[("vanilla", "fused")]
    # Per-round ratios 300/200 = 1.5, 240/300 = 0.8, 250/250 = 1.0: median 1.0, range 0.8-1.5.
    # (Pooled medians would give 250/250 = 1.0 too, but not the range.)
    assert vanilla["x_torch"] == pytest.approx(1.0)
    assert (vanilla["x_torch_min"], vanilla["x_torch_max"]) == (pytest.approx(0.8), pytest.approx(1.5))
    assert vanilla["images_per_s_median"] == 250.0
    assert (vanilla["images_per_s_min"], vanilla["images_per_s_max"]) == (200.0, 310.0)
    assert vanilla["rounds"] == 3 and vanilla["peak_rss_mib"] == 1003 and "round" not in vanilla
    assert step_throughput._ratio_cell(vanilla) == "1.00 (0.80-1.50)"
    sokd = combined[("sokd", "fused")]
    assert sokd["x_torch"] == pytest.approx(0.9) and step_throughput._ratio_cell(sokd) == "0.90"
    assert combined[("vanilla", "stock")]["x_torch"] is None
    table = step_throughput._table(list(combined.values()), {"float32": 200.0, "bfloat16": None})
    assert "| 64 | vanilla | float32 | off | fused | 250.0 (200.0-310.0) | 1.00 (0.80-1.50) |" in table


@pytest.mark.parametrize("op_type, op_name, expected", [
    ("_MklNativeConv2D", "StatefulPartitionedCall/student_1/conv/Conv2D", "conv forward"),
    ("_MklNativeConv2DBackpropInput", "g/conv", "conv backward-data"),
    ("Conv2DBackpropFilter", "g/conv", "conv backward-weights"),
    ("DepthwiseConv2dNative", "s/dw", "conv forward"),
    ("_MklNativeFusedBatchNormEx", "s/bn", "batch norm forward"),
    ("_MklNativeFusedBatchNormGradV3", "g/bn", "batch norm backward"),
    ("ReluGrad", "g/relu", "ReLU"),
    ("AddV2", "StatefulPartitionedCall/student_1/group1_block1_add_1/Add", "element-wise"),
    ("_MklAddN", "StatefulPartitionedCall/AddN_3", "element-wise"),
    # The update's ops are found by the optimizer's scope, whatever their type.
    ("Mul", "StatefulPartitionedCall/pytorch_sgd/Mul_161", "optimizer update"),
    ("Mul", "StatefulPartitionedCall/pytorch_sgd_2/Mul", "element-wise"),
    ("SparseSoftmaxCrossEntropyWithLogits", "s/loss", "other"),
    ("IDLE", "IDLE", None),
])
def test_op_categories_of_tensorflow_kernels(step_throughput, op_type, op_name, expected):
    assert step_throughput.tf_op_category(op_type, op_name, "pytorch_sgd") == expected


def test_op_profile_table_sums_and_compares_by_category(step_throughput):
    categories = step_throughput.OP_CATEGORIES
    tf_ms = dict.fromkeys(categories, 0.0)
    del tf_ms["conv backward (both)"]
    tf_ms.update({"conv forward": 60.0, "conv backward-data": 50.0, "conv backward-weights": 70.0,
                  "ReLU": 4.0})
    record = {"op_profile": {"ms_per_step": tf_ms, "profiled_wall_ms_per_step": 190.0}}
    torch_profile = {"ms_per_step": {"conv forward": 80.0, "conv backward (both)": 100.0,
                                     "ReLU": 8.0, "other": 12.0},
                     "profiled_wall_ms_per_step": 205.0}
    table = step_throughput.op_profile_table("vanilla", record, torch_profile)
    assert "TensorFlow 190.0 ms, PyTorch 205.0 ms" in table
    assert "| conv forward | 60.0 | 80.0 | 0.75 |" in table
    assert "| conv backward-data | 50.0 | n/a | n/a |" in table
    assert "| conv backward (both) | 120.0 | 100.0 | 1.20 |" in table
    assert "| ReLU | 4.0 | 8.0 | 0.50 |" in table
    assert "| all ops | 184.0 | 200.0 | 0.92 |" in table  # the combined row counted once
    assert "| all ops | 184.0 | n/a | n/a |" in step_throughput.op_profile_table("vanilla", record, None)
