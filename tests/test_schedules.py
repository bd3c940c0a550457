"""The six Keras learning-rate schedules against tf-keras reference values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optserve.server.engine import parse_config
from optserve.server.engine.schedules import (
    CosineDecay,
    CosineDecayRestarts,
    ExponentialDecay,
    InverseTimeDecay,
    PiecewiseConstantDecay,
    PolynomialDecay,
    learning_rate,
)
from tests.conformance_cases import case_names, load_case

STEPS = [0, 1, 5, 9, 10, 11, 15, 20, 25, 29, 30, 31, 40, 70]

# spec/keras-adam.md §4.2, values printed by tf-keras (== Keras 3) at STEPS; "… 0.01" expanded.
REFERENCE = [
    (
        ExponentialDecay(0.1, 10, 0.5),
        [0.1, 0.0933033, 0.07071068, 0.05358868, 0.05, 0.04665165, 0.03535534]
        + [0.025, 0.01767767, 0.01339717, 0.0125, 0.01166291, 0.00625, 0.00078125],
    ),
    (
        ExponentialDecay(0.1, 10, 0.5, staircase=True),
        [0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025, 0.025, 0.0125, 0.0125, 0.00625, 0.00078125],
    ),
    (
        PiecewiseConstantDecay((10, 20), (1, 0.5, 0.1)),
        [1, 1, 1, 1, 1, 0.5, 0.5, 0.5, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1],
    ),
    (
        PolynomialDecay(0.1, 10, end_learning_rate=0.01, power=2),
        [0.1, 0.0829, 0.0325, 0.0109] + [0.01] * 10,
    ),
    (
        PolynomialDecay(0.1, 10, end_learning_rate=0.01, power=1, cycle=True),
        [0.1, 0.091, 0.055, 0.019, 0.01, 0.0505, 0.0325, 0.01, 0.025, 0.013, 0.01, 0.03025, 0.01, 0.01],
    ),
    (
        InverseTimeDecay(0.1, 10, 0.5),
        [0.1, 0.0952381, 0.08, 0.06896552, 0.06666667, 0.06451613, 0.05714286]
        + [0.05, 0.04444445, 0.04081633, 0.04, 0.03921569, 0.03333334, 0.02222222],
    ),
    (
        InverseTimeDecay(0.1, 10, 0.5, staircase=True),
        [0.1, 0.1, 0.1, 0.1, 0.06666667, 0.06666667, 0.06666667]
        + [0.05, 0.05, 0.05, 0.04, 0.04, 0.03333334, 0.02222222],
    ),
    (
        CosineDecay(0.1, 10, alpha=0.1),
        [0.1, 0.09779754, 0.055, 0.01220246] + [0.01] * 10,
    ),
    (
        CosineDecay(0.0, 10, alpha=0.1, warmup_target=0.1, warmup_steps=5),
        [0, 0.02, 0.1, 0.06890576, 0.055, 0.04109422] + [0.01] * 8,
    ),
    (
        CosineDecayRestarts(0.1, 10, t_mul=2, m_mul=0.5, alpha=0.1),
        [0.1, 0.09779754, 0.055, 0.01220246, 0.055, 0.05472299, 0.04840991]
        + [0.0325, 0.0165901, 0.01027701, 0.0325, 0.03246532, 0.02920495, 0.02125],
    ),
    (
        CosineDecayRestarts(0.1, 10, t_mul=1, m_mul=0.5, alpha=0),
        [0.1, 0.09755283, 0.05, 0.002447176, 0.05, 0.04877641, 0.025]
        + [0.025, 0.0125, 0.0006117918, 0.0125, 0.0121941, 0.00625, 0.00078125],
    ),
]


@pytest.mark.parametrize("schedule, want", REFERENCE, ids=[repr(s) for s, _ in REFERENCE])
def test_schedule_matches_tf_keras_reference_table(schedule, want):
    got = [float(learning_rate(schedule, jnp.int32(step))) for step in STEPS]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("schedule, want", REFERENCE, ids=[repr(s) for s, _ in REFERENCE])
def test_jitted_schedule_equals_eager_and_is_float32(schedule, want):
    jitted = jax.jit(learning_rate, static_argnums=0)
    for step in STEPS:
        got = jitted(schedule, jnp.int32(step))
        assert got.shape == () and got.dtype == jnp.float32
        np.testing.assert_allclose(got, learning_rate(schedule, jnp.int32(step)), rtol=1e-5)


SCHEDULED_CASES = [name for name in case_names() if isinstance(load_case(name).config.get("learning_rate"), dict)]


@pytest.mark.parametrize("name", SCHEDULED_CASES)
def test_schedule_reproduces_learning_rate_recorded_by_tf_keras(name):
    case = load_case(name)
    schedule = parse_config(case.config).learning_rate
    got = [float(learning_rate(schedule, jnp.int32(k))) for k in range(case.steps)]
    np.testing.assert_allclose(got, case.lr, rtol=1e-5, atol=1e-12)


def test_piecewise_compares_integer_steps_exactly_beyond_float32_precision():
    """TF compares the int64 step with the boundaries; float32 cannot tell 2**24 + 1 from 2**24 + 2."""
    schedule = PiecewiseConstantDecay((2**24 + 1,), (1.0, 0.5))
    assert float(learning_rate(schedule, jnp.int32(2**24 + 1))) == 1.0
    assert float(learning_rate(schedule, jnp.int32(2**24 + 2))) == 0.5


def test_piecewise_float_boundary_goes_through_float32_then_int64_like_tf():
    """TF converts 2.9999999 to a float32 tensor (3.0), then casts it to the int64 step's dtype (3)."""
    schedule = PiecewiseConstantDecay((2.9999999,), (1.0, 0.5))
    assert [float(learning_rate(schedule, jnp.int32(k))) for k in (2, 3, 4)] == [1.0, 1.0, 0.5]


def test_piecewise_boundaries_beyond_the_int32_counter_never_switch():
    schedule = PiecewiseConstantDecay((1e300, 1e301), (1.0, 0.5, 0.1))
    assert float(learning_rate(schedule, jnp.int32(2**31 - 1))) == 1.0
