"""The overflow pre-screen: ordinary steps take the in-place path; whatever it admits stays within its bounds."""

import math

import numpy as np
import pytest

from optserve.server import overflow
from optserve.server.engine import parse_config, pipeline

CONFIGS = [{}, {"amsgrad": True, "use_ema": True, "ema_overwrite_frequency": 3}, {"global_clipnorm": 1.0},
           {"clipnorm": 0.5, "weight_decay": 0.1}, {"clipvalue": 2.0, "learning_rate": 10.0},
           {"learning_rate": 1e30}, {"epsilon": 0.0}, {"epsilon": 1e-35}, {"beta_1": 0.9999999}]


def test_ordinary_steps_are_admitted_and_overflowing_ones_are_not() -> None:
    config = parse_config({})
    bounds = overflow.Bounds(1.0, 0.0, 0.0, 0.0, 0.0)
    ordinary = [overflow.magnitude(np.full(1000, 3.0, np.float32))]
    assert overflow.next_bounds(config, 0, bounds, ordinary) is not None
    for grad in [np.full(4, 3e38, np.float32), np.full(4, 1e20, np.float32)]:
        assert overflow.next_bounds(config, 0, bounds, [overflow.magnitude(grad)]) is None
    assert overflow.next_bounds(parse_config({"epsilon": 0.0}), 0, bounds, ordinary) is None


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_magnitude_is_the_largest_absolute_value(dtype: str) -> None:
    import ml_dtypes  # installed with JAX

    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    values = np.array([0.5, -6.0, 2.0], np.float32).astype(np_dtype)
    assert overflow.magnitude(values) == overflow.Magnitude(6.0, 3, 1)
    assert math.isinf(overflow.magnitude(np.array([1.0, np.inf], np.float32).astype(np_dtype)).largest)
    assert not math.isfinite(overflow.magnitude(np.array([np.nan, 1.0], np.float32).astype(np_dtype)).largest)
    sparse = (np.array([1, 1, 2]), values)
    assert overflow.magnitude(sparse) == overflow.Magnitude(6.0, 3, 3)


@pytest.mark.parametrize("raw", CONFIGS, ids=[str(c) for c in CONFIGS])
def test_every_admitted_step_stays_finite_and_within_its_bounds(raw: dict) -> None:
    """200 steps of gradients whose scale ranges over 1e-3..1e25; the exact maxima never exceed the bounds."""
    rng = np.random.default_rng(0)
    config = parse_config(raw)
    names = ["w", "emb"]
    state = pipeline.init({"w": rng.normal(size=(3, 4)).astype(np.float32), "emb": np.ones((5, 2), np.float32)}, config)
    step = pipeline.make_step(config, names)
    bounds = overflow.bounds_of(state)
    admitted = 0
    for k in range(200):
        scale = 10.0 ** rng.uniform(-3, 25)
        grads = {"w": (rng.normal(size=(3, 4)) * scale).astype(np.float32),
                 "emb": (np.array([1, 1, 4]), (rng.normal(size=(3, 2)) * scale).astype(np.float32))}
        if not all(np.isfinite(g[1] if isinstance(g, tuple) else g).all() for g in grads.values()):
            continue
        following = overflow.next_bounds(config, k, bounds, [overflow.magnitude(g) for g in grads.values()])
        if following is None:
            continue
        admitted += 1
        state = step(state, {"w": grads["w"], "emb": pipeline.sparse_grad(*grads["emb"])})
        exact = overflow.bounds_of(state)
        assert all(math.isfinite(x) for x in exact), (k, scale, exact)
        assert all(e <= b for e, b in zip(exact, following)), (k, scale, exact, following)
        bounds = following
    if raw in ({}, {"global_clipnorm": 1.0}):
        assert admitted > 20  # the in-place path is the common one


@pytest.mark.parametrize("size", [1, overflow.BLOCK - 1, overflow.BLOCK, 3 * overflow.BLOCK + 7])
def test_a_blocked_magnitude_sees_every_value_of_every_block(size: int) -> None:
    """The largest value, a NaN or an Inf in any block (first, last, a partial one) decides the magnitude."""
    values = np.random.default_rng(size).uniform(-1, 1, size).astype(np.float32)
    exact = float(np.max(np.abs(values)))
    measured = overflow.magnitude(values, squares=True)
    assert (measured.largest, measured.elements) == (exact, size)
    assert math.isclose(measured.squares, float(np.sum(values.astype(np.float64) ** 2)), rel_tol=1e-5)
    assert overflow.magnitude(values).squares is None  # not asked for: no dot pass
    for position in {0, size // 2, size - 1}:
        for bad in (np.nan, np.inf, -np.inf):
            spoiled = values.copy()
            spoiled[position] = bad
            assert not math.isfinite(overflow.magnitude(spoiled).largest), (position, bad)
        peak = values.copy()
        peak[position] = -7.5
        assert overflow.magnitude(peak).largest == 7.5


def test_a_measured_copy_is_the_copy_and_measures_each_tensor_of_the_copy() -> None:
    """Tensors straddling blocks, an empty one and padding: the bytes arrive whole, each tensor measured apart."""
    from optserve.wire.layout import FlatLayout

    layout = FlatLayout({"a": (3, overflow.BLOCK // 2 + 5), "empty": (0,), "one": (1,), "b": (overflow.BLOCK,),
                         "c": (17, 3)})
    source = np.random.default_rng(1).standard_normal(layout.size).astype(np.float32)
    source[layout.offsets["b"] + overflow.BLOCK - 1] = np.inf  # the last value of "b" only
    target = np.zeros(layout.size, np.float32)
    measured = overflow.measure_flat(source, layout, squares=True, into=target)
    assert target.tobytes() == source.tobytes()  # padding included
    for name, view in layout.views(target).items():
        alone = overflow.magnitude(view, squares=True)
        assert (measured[name].largest, measured[name].elements) == (alone.largest, alone.elements), name
        if name != "b":
            assert math.isclose(measured[name].squares, alone.squares, rel_tol=1e-5, abs_tol=1e-12), name
    assert math.isinf(measured["b"].largest) and math.isfinite(measured["a"].largest)


def test_measuring_in_place_gives_what_measuring_the_copy_gives() -> None:
    """A same-host segment read in place is measured without a copy, tensor by tensor, as its copy would be."""
    from optserve.wire.layout import FlatLayout

    layout = FlatLayout({"a": (3, overflow.BLOCK // 2 + 5), "empty": (0,), "one": (1,), "b": (overflow.BLOCK,)})
    source = np.random.default_rng(2).standard_normal(layout.size).astype(np.float32)
    source[layout.offsets["a"] + overflow.BLOCK + 3] = np.nan
    copied = overflow.measure_flat(source, layout, squares=True, into=np.zeros(layout.size, np.float32))
    in_place = overflow.measure_flat(source, layout, squares=True)
    assert set(in_place) == set(copied)
    for name in layout.shapes:
        assert (in_place[name].elements, in_place[name].duplicates) == (copied[name].elements, copied[name].duplicates)
        pairs = ((in_place[name].largest, copied[name].largest), (in_place[name].squares, copied[name].squares))
        for got, want in pairs:
            assert got == want or (math.isnan(got) and math.isnan(want)), name
    assert math.isnan(in_place["a"].largest) and math.isfinite(in_place["b"].largest)
