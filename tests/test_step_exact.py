"""One real `fit` step of each method equals the independent step of step_reference.py.

SOKD (teacher BatchNorm "official" and "frozen"), KD (both modes), DML (T = 1 without
T^2 and Nesterov momentum as its standard recipe; T = 2 with T^2) and vanilla training (student and teacher roles) on tiny
BatchNorm models: the update of every trained variable agrees with the reference to
`TOLERANCE` (relative, per role), and every BatchNorm moving statistic (the teacher's
included) ends where the reference forward left it. tests/test_step_mutants.py shows
that a mis-wired step fails the same comparison.

Reference: docs/METHOD.md, "Objective", "Teacher BatchNorm", "Optimisation" and
"Baselines".
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import step_reference as reference

from sokd_tf.distillers import optimization

FLOAT32_CASES = [name for name in reference.CASES if not name.endswith("_float16")]
# These start like a fresh run (optimizer slots created inside the first step); the
# others like a resumed one (slots built before `fit`), which traces the step once.
FRESH_START = {"sokd_official", "kd_frozen"}


@pytest.fixture(scope="module")
def cases():
    return reference.case_cache()


@pytest.mark.parametrize("name", FLOAT32_CASES)
def test_one_fit_step_equals_the_reference_step(cases, name):
    case = cases(name)
    reference.real_step(case, optimizer_built=name not in FRESH_START)
    errors = reference.relative_errors(case)
    assert set(errors) == set(case.trained_roles)
    assert all(error < reference.TOLERANCE for error in errors.values()), errors
    # BatchNorm moving statistics moved exactly as the reference forward moved them:
    # the teacher's too in "official" mode; a "frozen" teacher stays bit-for-bit.
    for role, model in case.models.items():
        for variable, expected in zip(reference.moving_statistics(model), case.statistics[role],
                                      strict=True):
            np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-5, atol=1e-6,
                                       err_msg=f"{role} {variable.path}")
    if "teacher" in case.models and "teacher" not in case.trained_roles:
        teacher = case.models["teacher"]
        moved = [not np.array_equal(v.numpy(), w)
                 for v, w in zip(teacher.weights, case.initial["teacher"], strict=True)]
        assert any(moved) == name.endswith("_official")
        parameters = [(v, w) for v, w in zip(teacher.weights, case.initial["teacher"],
                                             strict=True) if "moving_" not in v.path]
        assert all(np.array_equal(v.numpy(), w) for v, w in parameters)


def test_mixed_float16_step_is_loss_scaled_and_equals_the_reference(cases):
    """Under mixed_float16 the step scales the loss: the update still equals the
    float32 reference (to float16 rounding); tests/test_step_mutants.py shows a step
    without `scale_loss` fails this comparison."""
    case = cases("sokd_official_float16")
    assert case.models["student"].get_layer("stem").compute_dtype == "float16"
    trainer = reference.real_step(case)
    assert isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer)
    assert optimization.recipe_optimizer(trainer.optimizer) is trainer.optimizer.inner_optimizer
    # A finite step at the initial dynamic scale 2^15 (a non-finite one would halve it).
    assert float(trainer.optimizer.dynamic_scale) == 2.0**15
    errors = reference.relative_errors(case)
    assert all(error < reference.FLOAT16_TOLERANCE for error in errors.values()), errors
