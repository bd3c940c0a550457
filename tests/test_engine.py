"""The Adam engine against tf-keras: golden trajectories, spec examples and engine properties."""

import contextlib
import re

import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
import pytest
from tests.conformance_cases import Case, assert_close, case_names, family_case_names, load_case
from tests.test_family import replay_in_engine

from optserve.server.engine import (
    AdamState,
    SparseGrad,
    finalize,
    init,
    learning_rate_at,
    make_step,
    parse_config,
    sparse_grad,
)
from optserve.server.engine import pipeline
from optserve.server.engine.aggregate import sum_in_order, zeros_like_shapes
from optserve.server.errors import InvalidArgument

INT32_MAX = 2**31 - 1


def _device_grads(grads: dict) -> dict:
    """Case gradients for the engine: (indices, values) pairs become padded `SparseGrad`s."""
    return {name: sparse_grad(*g) if isinstance(g, tuple) else g for name, g in grads.items()}


def _replay(case: Case, jit_compile: bool) -> None:
    replay_in_engine(case, jit_compile)


@pytest.mark.parametrize("name", case_names())
def test_jitted_engine_reproduces_tf_keras_trajectory(name):
    _replay(load_case(name), jit_compile=True)


@pytest.mark.parametrize("name", [n for n in family_case_names() if n.startswith("adam_adaptive_epsilon")])
@pytest.mark.parametrize("jit_compile", [True, False])
def test_adaptive_epsilon_reproduces_tf_keras_2_21(name, jit_compile):
    _replay(load_case(name), jit_compile=jit_compile)


@pytest.mark.parametrize(
    "name", ["ema_overwrite3", "combo_amsgrad_wd_gclip_ema_sched", "sched_cosine_restarts", "sparse_duplicates_amsgrad"]
)
def test_unjitted_engine_reproduces_tf_keras_trajectory(name):
    _replay(load_case(name), jit_compile=False)


def _run(config: dict, params: dict, grads_per_step: list[dict], names=None) -> AdamState:
    parsed = parse_config(config)
    state = init(params, parsed)
    step = make_step(parsed, names or list(params))
    for grads in grads_per_step:
        state = step(state, grads)
    return state


def test_amsgrad_matches_spec_golden_float32_rows():
    """spec/keras-adam.md §6.1 (Keras 3 adam_test golden data, float32 values from tf-keras)."""
    grads = [{"x": np.full(10, 0.01, np.float32)}] + [{"x": np.arange(1, 11, dtype=np.float32) / 10}] * 5
    state = _run({"amsgrad": True}, {"x": np.ones(10, np.float32)}, grads)
    want = [0.9944426, 0.9945148, 0.99454004, 0.9945529, 0.99456066]
    want += [0.99456584, 0.9945696, 0.9945724, 0.99457467, 0.99457633]
    np.testing.assert_allclose(state.params["x"], want, rtol=2e-7)


def test_ema_starts_from_initial_params_like_tf_keras():
    """spec §6.3: tf-keras averages after steps 1 and 2 (Keras 3 would differ)."""
    config = {"learning_rate": 1.0, "use_ema": True, "ema_momentum": 0.9}
    params = {"x": np.array([1.0, 2.0], np.float32)}
    grads = {"x": np.array([0.1, 0.2], np.float32)}
    state = _run(config, params, [grads])
    np.testing.assert_allclose(state.ema["x"], [0.9000038, 1.9000022], rtol=1e-6)
    state = make_step(parse_config(config), ["x"])(state, grads)
    np.testing.assert_allclose(state.ema["x"], [0.71001047, 1.7100064], rtol=1e-6)
    np.testing.assert_allclose(finalize(state).params["x"], [0.71001047, 1.7100064], rtol=1e-6)


def test_sparse_duplicates_are_summed_like_tf_keras():
    """spec §6.4: rows (1,2),(3,4) at index 1 and (0.5,0.5) at index 3, Adam(0.1), 3 steps."""
    grad = sparse_grad(np.array([1, 1, 3]), np.array([[1, 2], [3, 4], [0.5, 0.5]], np.float32))
    state = _run({"learning_rate": 0.1}, {"e": np.ones((4, 2), np.float32)}, [{"e": grad}] * 3)
    params = np.asarray(state.params["e"])
    np.testing.assert_allclose(params[1], [0.7000022, 0.70000213], rtol=1e-6)
    np.testing.assert_allclose(params[3], [0.7000035, 0.7000035], rtol=1e-6)
    np.testing.assert_array_equal(params[[0, 2]], np.ones((2, 2)))
    np.testing.assert_allclose(state.m["e"][1], [1.084, 1.626], rtol=1e-6)


def test_clipnorm_clips_raw_sparse_rows_before_summing_duplicates():
    """spec §2.1 step 6: rows (3) and (4) at index 0 with clipnorm 1 become 0.6 + 0.8 = 1.4."""
    grad = sparse_grad(np.array([0, 0]), np.array([[3.0], [4.0]], np.float32))
    state = _run({"clipnorm": 1.0}, {"e": np.zeros((2, 1), np.float32)}, [{"e": grad}])
    np.testing.assert_allclose(state.m["e"], [[0.14], [0.0]], rtol=1e-6)


def test_sparse_gradient_matches_its_dense_equivalent():
    rng = np.random.default_rng(0)
    params = {"e": rng.normal(size=(6, 3)).astype(np.float32)}
    indices = [np.array([0, 2, 5]), np.array([4, 1]), np.array([3, 0, 2, 5])]
    values = [rng.normal(size=(len(i), 3)).astype(np.float32) for i in indices]
    dense = []
    for i, v in zip(indices, values):
        d = np.zeros((6, 3), np.float32)
        d[i] = v
        dense.append({"e": d})
    config = {"learning_rate": 0.01, "amsgrad": True, "weight_decay": 0.01, "clipvalue": 0.5}
    sparse_state = _run(config, params, [{"e": sparse_grad(i, v)} for i, v in zip(indices, values)])
    dense_state = _run(config, params, dense)
    for slot in ("params", "m", "v", "vhat"):
        got, want = getattr(sparse_state, slot)["e"], getattr(dense_state, slot)["e"]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9, err_msg=slot)


@pytest.mark.parametrize(
    "config",
    [{"learning_rate": 0.1}, {"clipnorm": 0.5}, {"global_clipnorm": 0.5}, {"clipvalue": 0.5, "amsgrad": True}],
    ids=["plain", "clipnorm", "global_clipnorm", "clipvalue_amsgrad"],
)
def test_padding_rows_do_not_change_results(config):
    indices = np.array([3, 1, 3], np.int32)
    values = np.array([[1.0, -2.0], [0.5, 4.0], [-3.0, 0.25]], np.float32)
    padded = sparse_grad(indices, values)
    assert padded.indices.shape == (4,)
    unpadded = SparseGrad(jnp.asarray(indices), jnp.asarray(values))
    params = {"e": np.arange(10, dtype=np.float32).reshape(5, 2), "b": np.ones(2, np.float32)}
    dense_b = np.array([0.3, -0.7], np.float32)
    with_padding = _run(config, params, [{"e": padded, "b": dense_b}] * 3)
    without_padding = _run(config, params, [{"e": unpadded, "b": dense_b}] * 3)
    for slot in ("params", "m", "v"):
        for name in params:
            np.testing.assert_array_equal(getattr(with_padding, slot)[name], getattr(without_padding, slot)[name])


@pytest.mark.parametrize("n, bucket", [(0, 1), (1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (1000, 1024)])
def test_sparse_grad_pads_rows_to_next_power_of_two(n, bucket):
    grad = sparse_grad(np.arange(n), np.ones((n, 3), np.float16))
    assert grad.indices.shape == (bucket,) and grad.indices.dtype == jnp.int32
    assert grad.values.shape == (bucket, 3) and grad.values.dtype == jnp.float16
    assert not np.asarray(grad.values)[n:].any() and not np.asarray(grad.indices)[n:].any()


def test_state_leaves_keep_shape_and_dtype_over_steps():
    config = parse_config({"amsgrad": True, "use_ema": True, "ema_overwrite_frequency": 2, "weight_decay": 0.1})
    params = {"w": np.ones((3, 4), np.float32), "e": np.ones((8, 2), np.float32), "s": np.float32(2.0)}
    state = init(params, config)
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    step = make_step(config, list(params))
    for k in range(5):
        grads = {
            "w": jnp.full((3, 4), 0.5, jnp.bfloat16),
            "e": sparse_grad(np.array([k % 8]), np.ones((1, 2), np.float16)),
            "s": np.float32(0.1 * k),
        }
        state = step(state, grads)
        assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == shapes


@contextlib.contextmanager
def count_compilations():
    """Collects one entry per XLA compilation in the block (of any function, in this process)."""
    compilations = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compilations.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compilations
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_later_steps_and_new_learning_rates_compile_nothing():
    piecewise = {"boundaries": [1, 2, 3], "values": [0.4, 0.3, 0.2, 0.1]}
    schedule = {"class_name": "PiecewiseConstantDecay", "config": piecewise}
    config = parse_config({"learning_rate": schedule, "use_ema": True, "ema_overwrite_frequency": 2, "amsgrad": True})
    state = init({"w": np.ones(3, np.float32)}, config)
    step = make_step(config, ["w"])
    grads = {"w": jnp.ones(3, jnp.float32)}
    state = step(state, grads)
    with count_compilations() as compilations:
        for _ in range(5):
            state = step(state, grads)
        jax.block_until_ready(state)
    assert compilations == []
    assert step._cache_size() == 1
    assert sorted({learning_rate_at(config, k) for k in range(6)}) == pytest.approx([0.1, 0.2, 0.3, 0.4])


def test_step_donates_the_state():
    config = parse_config({})
    state = init({"w": np.ones(3, np.float32)}, config)
    new_state = make_step(config, ["w"])(state, {"w": np.ones(3, np.float32)})
    assert state.params.flat.is_deleted() and state.m.flat.is_deleted()
    assert not new_state.params.flat.is_deleted()


def test_iterations_saturate_at_int32_max():
    config = parse_config({"learning_rate": 0.1})
    state = init({"w": np.ones(2, np.float32)}, config)._replace(iterations=jnp.int32(INT32_MAX - 1))
    step = make_step(config, ["w"])
    for _ in range(2):
        state = step(state, {"w": np.ones(2, np.float32)})
        assert np.all(np.isfinite(state.params["w"]))
    assert int(state.iterations) == INT32_MAX
    assert learning_rate_at(config, 2**40) == pytest.approx(0.1)


def test_global_clipnorm_with_infinite_norm_gives_nan_like_tf():
    grads = {"a": np.array([np.inf, 1.0], np.float32), "b": np.array([1.0], np.float32)}
    state = _run({"global_clipnorm": 1.0}, {"a": np.ones(2, np.float32), "b": np.ones(1, np.float32)}, [grads])
    assert np.isnan(state.params["a"]).all() and np.isnan(state.params["b"]).all()


def test_exclude_from_weight_decay_regex_excludes_matching_tensors():
    """spec §6.2: lr 1, wd 0.004, zero gradients, 3 steps: decayed 2 * 0.996**3, excluded stays 2."""
    config = {"learning_rate": 1.0, "weight_decay": 0.004, "exclude_from_weight_decay": [r"bias:\d$"]}
    params = {"dense/kernel:0": np.full(2, 2.0, np.float32), "dense/bias:0": np.full(2, 2.0, np.float32)}
    state = _run(config, params, [{name: np.zeros(2, np.float32) for name in params}] * 3)
    np.testing.assert_allclose(state.params["dense/kernel:0"], [1.9760959] * 2, rtol=1e-7)
    np.testing.assert_array_equal(state.params["dense/bias:0"], [2.0, 2.0])


def test_weight_decay_precedes_adam_update():
    """spec §6.2: Adam(lr=0.1, weight_decay=0.5), theta (1, -2), g (0.3, 0.4), one step."""
    params = {"x": np.array([1.0, -2.0], np.float32)}
    state = _run({"learning_rate": 0.1, "weight_decay": 0.5}, params, [{"x": np.array([0.3, 0.4], np.float32)}])
    np.testing.assert_allclose(state.params["x"], [0.8500017, -1.9999986], rtol=1e-7)


def test_tensor_without_gradient_is_left_untouched():
    config = {"use_ema": True, "ema_overwrite_frequency": 1, "weight_decay": 0.1}
    params = {"a": np.ones(2, np.float32), "b": np.full(2, 5.0, np.float32)}
    state = _run(config, params, [{"a": np.ones(2, np.float32)}] * 2)
    assert int(state.iterations) == 2
    np.testing.assert_array_equal(state.params["b"], params["b"])
    np.testing.assert_array_equal(state.m["b"], [0.0, 0.0])
    np.testing.assert_array_equal(state.ema["b"], params["b"])
    assert not np.array_equal(state.params["a"], params["a"])


@pytest.mark.parametrize(
    "grads, field",
    [
        ({}, "gradients"),
        ({"nope": np.ones(2, np.float32)}, "gradients['nope']"),
        ({"w": np.ones(3, np.float32)}, "gradients['w'].shape"),
        ({"w": np.ones(2, np.int32)}, "gradients['w'].dtype"),
        ({"w": SparseGrad(jnp.zeros(1, jnp.int32), jnp.ones((1, 2), jnp.float32))}, "gradients['w'].values.shape"),
    ],
    ids=["empty", "unknown_name", "wrong_shape", "int_dtype", "sparse_wrong_row_shape"],
)
def test_bad_gradients_are_refused_before_the_state_is_donated(grads, field):
    config = parse_config({})
    state = init({"w": np.ones(2, np.float32)}, config)
    with pytest.raises(InvalidArgument, match="^" + re.escape(f"{field}: ")):
        make_step(config, ["w"])(state, grads)
    assert not state.params["w"].is_deleted()


@pytest.mark.parametrize(
    "indices, values, field",
    [
        (np.array([[0]]), np.ones((1, 2)), "indices"),
        (np.array([0.0]), np.ones((1, 2)), "indices"),
        (np.array([0, 1]), np.ones((3, 2)), "values"),
        (np.array([-1]), np.ones((1, 2)), "indices"),
    ],
    ids=["2d_indices", "float_indices", "row_count_mismatch", "negative_index"],
)
def test_sparse_grad_refuses_malformed_input(indices, values, field):
    with pytest.raises(InvalidArgument, match=f"^{field}: "):
        sparse_grad(indices, values)


def test_finalize_copies_averages_into_new_param_buffers():
    raw = {"use_ema": True, "learning_rate": 0.1}
    state = _run(raw, {"w": np.ones(2, np.float32)}, [{"w": np.ones(2, np.float32)}])
    final = finalize(state)
    np.testing.assert_array_equal(final.params["w"], state.ema["w"])
    assert final.params.flat.unsafe_buffer_pointer() != final.ema.flat.unsafe_buffer_pointer()
    make_step(parse_config(raw), ["w"])(final, {"w": np.ones(2, np.float32)})  # donating both buffers must work


def test_finalize_without_ema_keeps_params():
    state = _run({}, {"w": np.ones(2, np.float32)}, [{"w": np.ones(2, np.float32)}])
    assert finalize(state) is state


def test_init_copies_inputs_as_float32():
    source = jnp.ones(3, jnp.float32)
    state = init({"w": source, "h": np.ones(2, np.float16)}, parse_config({"use_ema": True, "amsgrad": True}))
    assert state.params["h"].dtype == jnp.float32 and state.ema["h"].dtype == jnp.float32
    assert state.params.flat.unsafe_buffer_pointer() != source.unsafe_buffer_pointer()
    assert state.ema.flat.unsafe_buffer_pointer() != state.params.flat.unsafe_buffer_pointer()
    assert state.iterations.dtype == jnp.int32 and int(state.iterations) == 0


def test_constant_learning_rate_is_reported_as_float32():
    assert learning_rate_at(parse_config({}), 0) == float(np.float32(0.001))
    with pytest.raises(InvalidArgument, match="^iterations: "):
        learning_rate_at(parse_config({}), -1)


# --- sync-round aggregation on the device ---------------------------------------


@pytest.mark.parametrize("workers", [1, 2, 3, 7])
@pytest.mark.parametrize("mean", [True, False])
@pytest.mark.parametrize("shapes", [{"w": (33, 7)}, {"w": (3, 4), "b": (5,)}], ids=["one", "two"])
def test_sum_in_order_is_the_host_loop_bit_for_bit(workers: int, mean: bool, shapes: dict) -> None:
    rng = np.random.default_rng(workers)
    dtypes = [np.float32, np.float16, jnp.bfloat16]
    grads = [{name: (rng.normal(size=shape) * 10.0 ** rng.integers(-4, 4)).astype(dtypes[k % 3])
              for name, shape in shapes.items()} for k in range(workers)]
    got = sum_in_order(zeros_like_shapes(shapes), grads, mean)
    for name in shapes:
        want = grads[0][name].astype(np.float32)
        for grad in grads[1:]:
            want = want + grad[name].astype(np.float32)  # ((g0 + g1) + g2): the documented order
        if mean:
            want = want / np.float32(workers)  # IEEE division, not a multiplication by 1/n
        np.testing.assert_array_equal(np.asarray(got[name]), want)


def test_sum_in_order_writes_into_the_donated_buffers_and_keeps_nothing_of_them():
    shapes = {"w": (1000,)}
    out = zeros_like_shapes(shapes)
    first = [{"w": np.full(1000, 3.0, np.float32)}, {"w": np.full(1000, 5.0, np.float32)}]
    out = sum_in_order(out, first, mean=True)
    address = out["w"].unsafe_buffer_pointer()
    second = [{"w": np.arange(1000, dtype=np.float32)}]  # a smaller round: nothing of the first may show
    with count_compilations() as compilations:
        again = sum_in_order(out, first, mean=True)
    assert compilations == [] and again["w"].unsafe_buffer_pointer() == address
    assert out["w"].is_deleted()  # donated
    result = sum_in_order(again, second, mean=True)
    assert result["w"].unsafe_buffer_pointer() == address
    np.testing.assert_array_equal(np.asarray(result["w"]), np.arange(1000, dtype=np.float32))


@pytest.mark.parametrize("lr", [1e-3, 0.1, 3e-4, 1, 7, 1e-7, 0.123456789, 2.5e16])
def test_a_constant_learning_rate_is_reported_as_the_step_uses_it(lr):
    """learning_rate_at answers a constant without a device call; it is the float32 the jitted step takes."""
    config = parse_config({"learning_rate": lr})
    assert learning_rate_at(config, 5) == float(pipeline._scheduled_rate(config, jnp.int32(5)))
