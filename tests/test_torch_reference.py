"""The PyTorch reference of the step benchmark lives in the repository and states the
networks sokd_tf builds (torch itself is only in the benchmark's own venv)."""

import ast
import importlib.util
import math
import os

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
REFERENCE = os.path.join(BENCHMARKS, "torch_reference.py")


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reference_counts():
    """`REFERENCE_PARAMETER_COUNTS` of torch_reference.py, read without importing torch."""
    with open(REFERENCE) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign | ast.Assign):
            targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
            if any(getattr(t, "id", None) == "REFERENCE_PARAMETER_COUNTS" for t in targets):
                return ast.literal_eval(node.value)
    raise AssertionError("REFERENCE_PARAMETER_COUNTS not found in torch_reference.py")


def test_step_benchmark_runs_the_reference_from_the_repository():
    step_throughput = _load(os.path.join(BENCHMARKS, "step_throughput.py"), "step_throughput")
    assert step_throughput.DEFAULT_TORCH_SCRIPT == REFERENCE
    assert os.path.isfile(REFERENCE)
    assert step_throughput.parse_args([]).torch_script == REFERENCE


@pytest.mark.parametrize("depth, width", [(16, 1), (40, 1), (40, 2)])
def test_reference_counts_equal_the_keras_networks(depth, width):
    from sokd_tf import models
    from sokd_tf.models import peer as peer_lib

    network_count, peer_count = _reference_counts()[(depth, width)][100]
    network = models.build(f"wrn_{depth}_{width}", (32, 32, 3), 100)
    peer = peer_lib.build_peer(network)
    assert _trainable(network) == network_count
    assert _trainable(peer) == peer_count


def _trainable(model):
    return sum(math.prod(w.shape) for w in model.trainable_weights)


def test_reference_self_check_passes_where_torch_is_installed():
    pytest.importorskip("torch")
    reference = _load(REFERENCE, "torch_reference")
    assert reference.self_check() == {"teacher": 2_255_156, "peer": 1_720_036, "student": 569_780}
