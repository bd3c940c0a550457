"""The flat multi-tensor state: one buffer per slot, one fused step, per-tensor rules kept per segment."""

import jax
import numpy as np
import pytest
from tests.conformance_cases import assert_close, load_case

from optserve.server.engine import parse_config, pipeline
from optserve.server.overflow import ADAM_TENSORS
from optserve.server.modes import TrainingMode
from optserve.server.optimizer import Optimizer
from optserve.wire.layout import FlatLayout, aligned_empty

MIXED = {"learning_rate": 0.01, "clipnorm": 0.5, "weight_decay": 0.05, "exclude_from_weight_decay": ["bias"],
         "amsgrad": True, "use_ema": True, "ema_overwrite_frequency": 3}


def _tensors(count: int, seed: int = 0) -> dict[str, np.ndarray]:
    """`count` tensors of odd sizes (most leave padding), every third an embedding table, every fourth a bias."""
    rng = np.random.default_rng(seed)
    shapes = [(int(rng.integers(1, 40)), 3) if i % 3 == 0 else (int(rng.integers(1, 50)),) for i in range(count)]
    names = [f"layer{i}/bias" if i % 4 == 1 else f"layer{i}/kernel" for i in range(count)]
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in zip(names, shapes)}


def _grads(params: dict[str, np.ndarray], k: int) -> dict:
    """Step k's gradients: embedding tables sparse (with a duplicate row), the rest dense, mixed dtypes."""
    rng = np.random.default_rng(100 + k)
    grads = {}
    for i, (name, value) in enumerate(params.items()):
        if i % 3 == 0:
            rows = value.shape[0]
            indices = np.array([rng.integers(rows), 0, rng.integers(rows)])
            grads[name] = pipeline.sparse_grad(indices, rng.normal(size=(3, 3)).astype(np.float32))
        else:
            grads[name] = (rng.normal(size=value.shape) * 3).astype(np.float16 if i % 5 == 0 else np.float32)
    return grads


def test_many_mixed_tensors_step_as_each_would_alone():
    """Clipnorm, decay exclusions, amsgrad and EMA are per tensor, so a tensor alone is the reference."""
    params = _tensors(40)
    config = parse_config(MIXED)
    step = pipeline.make_step(config, list(params))
    state = pipeline.init(params, config)
    alone = {name: pipeline.init({name: value}, config) for name, value in params.items()}
    alone_steps = {name: pipeline.make_step(config, [name]) for name in params}
    for k in range(4):
        grads = _grads(params, k)
        state = step(state, grads)
        for name in params:
            alone[name] = alone_steps[name](alone[name], {name: grads[name]})
    for slot in ADAM_TENSORS:
        for name in params:
            np.testing.assert_allclose(getattr(state, slot)[name], getattr(alone[name], slot)[name],
                                       rtol=2e-6, atol=1e-7, err_msg=f"{slot}[{name}]")


@pytest.mark.parametrize("case_name", ["clipnorm", "sparse_duplicates_amsgrad", "combo_amsgrad_wd_gclip_ema_sched"])
def test_golden_trajectory_holds_among_many_other_tensors(case_name):
    """A conformance case's tensors, laid out after 30 others that get zero gradients, still follow tf-keras.

    Zero gradients keep the global norm of the case (its only cross-tensor number) unchanged.
    """
    case = load_case(case_name)
    fillers = _tensors(30, seed=1)
    params = {**fillers, **case.init}
    config = parse_config(case.config)
    state, step = pipeline.init(params, config), pipeline.make_step(config, list(params))
    for k in range(case.steps):
        zero = {name: np.zeros_like(value) for name, value in fillers.items()}
        case_grads = {name: pipeline.sparse_grad(*g) if isinstance(g, tuple) else g for name, g in case.grads[k].items()}
        state = step(state, {**zero, **case_grads})
        for name in case.init:
            assert_close(state.params[name], case.expect[k][name], f"{case_name} step {k + 1} params[{name}]")


@pytest.mark.parametrize("changes", [{"clipnorm": None, "global_clipnorm": 1.0}, {"epsilon": 0.0, "weight_decay": 1e38}],
                         ids=["global_clipnorm", "nan_making_epsilon_and_decay"])
def test_padding_stays_zero_and_garbage_outside_the_dense_tensors_is_ignored(changes):
    params = _tensors(12)
    config = parse_config({**MIXED, **changes})
    state = pipeline.init(params, config)
    layout = pipeline.layout_of(state)
    step = pipeline.make_step(config, list(params))
    reference = pipeline.init(params, config)
    for k in range(3):
        grads = _grads(params, k)
        sparse = {name: g for name, g in grads.items() if isinstance(g, pipeline.SparseGrad)}
        dense = np.full(layout.size, np.nan, np.float32)  # padding and the sparse tensors' segments: NaN
        for name, view in layout.views(dense, [n for n in grads if n not in sparse]).items():
            view[...] = grads[name]
        state = step(state, pipeline.FlatGrads(jax.device_put(dense), sparse))
        reference = step(reference, grads)
    inside = np.zeros(layout.size, bool)
    for view in layout.views(inside).values():
        view[...] = True
    assert (~inside).sum() > 0
    for slot in ADAM_TENSORS:
        flat = np.asarray(getattr(state, slot).flat)
        assert np.all(flat[~inside] == 0), slot
        np.testing.assert_array_equal(flat, np.asarray(getattr(reference, slot).flat), err_msg=slot)  # NaN == NaN


def test_a_gradient_already_in_the_layout_is_not_copied():
    layout = FlatLayout({"a": (3, 5), "b": (7,)})
    buffer = aligned_empty(layout.nbytes).view(np.float32)
    views = layout.views(buffer)
    laid_out = pipeline.flat_grads(layout, views)
    assert laid_out.dense.unsafe_buffer_pointer() == buffer.ctypes.data  # jax adopted the buffer
    copied = pipeline.flat_grads(layout, {name: np.array(view) for name, view in views.items()})
    assert copied.dense.unsafe_buffer_pointer() != buffer.ctypes.data


def _optimizer(params: dict[str, np.ndarray], config: dict, policy: str = "apply") -> Optimizer:
    parsed = parse_config(config)
    return Optimizer("t", parsed, policy, TrainingMode(), pipeline.init(params, parsed))


@pytest.mark.parametrize("names", [[], ["layer2/kernel"], ["layer5/bias", "layer0/kernel", "layer3/kernel"]],
                         ids=["all", "one", "subset_reordered"])
@pytest.mark.parametrize("into", [False, True])
def test_pull_copies_any_subset_out_of_the_flat_state(names, into):
    params = _tensors(8)
    opt = _optimizer(params, {"use_ema": True})
    opt.push({name: np.ones_like(value) for name, value in params.items()})
    buffers = []

    def supply(nbytes: int) -> np.ndarray:
        buffers.append(aligned_empty(nbytes))
        buffers[-1][:] = 0xFF  # a dirty reused buffer: every byte that matters must be overwritten
        return buffers[-1]

    state = opt.checkpoint().slots
    for kind, slot in (("weights", "params"), ("m", "m"), ("ema", "ema")):
        _, _, pulled = opt.pull(kind, names, into=supply if into else None)
        assert [name for name, _ in pulled] == (names or list(params))
        for name, array in pulled:
            np.testing.assert_array_equal(array, state[slot][name], err_msg=f"{kind}[{name}]")
    if into:
        assert len(buffers) == 3 and np.shares_memory(pulled[0][1], buffers[-1])


def test_refused_step_names_the_first_bad_tensor_in_layout_order():
    params = {f"t{i}": np.ones(5, np.float32) for i in range(6)}
    opt = _optimizer(params, {"learning_rate": 1e30}, policy="refuse")
    grads = {name: np.full(5, 1e-3, np.float32) for name in params}
    grads["t4"] = np.full(5, 3e38, np.float32)
    grads["t2"] = np.full(5, -3e38, np.float32)
    before = opt.checkpoint().slots
    with pytest.raises(Exception, match=r"gradients\['t2'\].*2 of 6 tensors"):
        opt.push(grads)
    after = opt.checkpoint().slots
    for name in params:
        np.testing.assert_array_equal(after["params"][name], before["params"][name])


def test_checked_step_reports_finiteness_per_tensor():
    params = _tensors(9)
    config = parse_config({})
    checked = pipeline.make_checked_step(config, list(params))
    grads = {name: np.ones_like(value) for name, value in params.items()}
    bad = list(params)[4]
    grads[bad] = np.full_like(params[bad], np.inf)
    state = pipeline.init(params, config)
    _, finite = checked(state, grads)
    assert [name for name, ok in zip(params, np.asarray(finite)) if not ok] == [bad]
    assert not state.params.flat.is_deleted()  # not donated: a refused step keeps it


def test_the_trace_does_not_grow_with_dense_tensors():
    config = parse_config(MIXED)

    def equations(count: int) -> int:
        params = {f"t{i}": np.ones(i % 7 + 1, np.float32) for i in range(count)}
        state = pipeline.init(params, config)
        step = pipeline.make_step(config, list(params))
        grads = pipeline.flat_grads(pipeline.layout_of(state), {name: np.ones_like(v) for name, v in params.items()})
        blocks = pipeline._block_tables(pipeline.layout_of(state))
        run = step._run  # the jitted function the step calls
        limits = np.full(count, np.inf, np.float32)  # as every step of a "refuse" optimizer has them
        return len(jax.make_jaxpr(run.__wrapped__, static_argnums=6)(  # present: static, as the step has it
            state, grads.dense, {}, blocks, None, limits, None).jaxpr.eqns)

    assert equations(20) == equations(300)  # from 16 blocks on (a whole group of them), so every table is used


def test_per_tensor_sums_cover_whole_groups_straddling_blocks_and_the_tail():
    """Tensors spanning whole groups of blocks, sharing groups, empty, and ending the buffer mid-group."""
    sizes = [5000, 3, 0, 16 * 16 * 3, 17, 1, 40_000, 250]
    layout = FlatLayout({f"t{i}": (size,) for i, size in enumerate(sizes)})
    rng = np.random.default_rng(7)
    flat = np.full(layout.size, np.nan, np.float32)  # the padding of a gradient buffer may hold anything
    for view in layout.views(flat).values():
        view[:] = rng.normal(size=view.shape)
    segments = pipeline.Segments(layout, pipeline._block_tables(layout))
    got = np.asarray(jax.jit(segments.square_sums)(jax.numpy.asarray(flat)))
    want = [np.sum(np.square(view, dtype=np.float64)) for view in layout.views(flat).values()]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_a_round_sum_is_the_flat_gradient_written_into_the_last_rounds_buffer():
    """Workers' flat views (or copies) summed in worker order into one reused buffer; densified where mixed."""
    from optserve.server.modes import RoundSum

    layout = FlatLayout({"a": (5,), "b": (3, 2), "table": (4, 3)})
    rng = np.random.default_rng(3)

    def worker(k: int) -> dict:
        flat = aligned_empty(layout.nbytes).view(np.float32)  # a receive buffer in the layout
        grads = dict(layout.views(flat))
        for view in grads.values():
            view[:] = rng.normal(size=view.shape)
        grads["table"] = (np.array([0, 3, 0]), rng.normal(size=(3, 3)).astype(np.float32))
        return grads

    rounds = RoundSum("mean", layout)
    address = None
    for _ in range(3):
        contributions = {f"w{k}": worker(k) for k in (2, 0, 1)}
        contributions["w1"]["a"] = (np.array([4]), np.ones((1,), np.float32))  # sparse here, dense elsewhere
        combined = rounds.combine(contributions)
        if address is None:
            address = combined.flat.unsafe_buffer_pointer()
        assert combined.flat.unsafe_buffer_pointer() == address
        for name in ("a", "b"):
            want = np.zeros(layout.shapes[name], np.float32)
            for w in sorted(contributions):
                grad = contributions[w][name]
                if isinstance(grad, tuple):
                    grad = np.zeros(layout.shapes[name], np.float32)
                    np.add.at(grad, contributions[w][name][0], contributions[w][name][1])
                want = want + grad
            np.testing.assert_array_equal(combined[name], want / np.float32(3))
        assert set(combined.sparse) == {"table"} and combined["table"][1].shape == (9, 3)
        del combined  # its host views keep XLA from writing the next sum in place


@pytest.mark.parametrize("sizes", [[4096], [4096, 32, 16 * 300]], ids=["one", "three"])
def test_sums_of_a_layout_without_padding_read_the_buffer_as_it_is(sizes: list[int]) -> None:
    layout = FlatLayout({f"t{i}": (size,) for i, size in enumerate(sizes)})
    flat = np.random.default_rng(1).normal(size=layout.size).astype(np.float32)
    segments = pipeline.Segments(layout, pipeline._block_tables(layout))
    assert segments.inside() is True  # no padding: nothing to mask
    want = [np.sum(np.square(view, dtype=np.float64)) for view in layout.views(flat).values()]
    np.testing.assert_allclose(np.asarray(jax.jit(segments.square_sums)(jax.numpy.asarray(flat))), want, rtol=1e-5)
    np.testing.assert_allclose(float(jax.jit(segments.square_total)(jax.numpy.asarray(flat))), sum(want), rtol=1e-5)


def test_limits_step_an_honest_gradient_bit_for_bit_and_read_values_past_them_as_zero():
    """`FlatGrads.limits` (a same-host segment read in place): within its tensor's limit a value steps as it is;
    past it, or NaN, as 0, so bytes rewritten after they were measured cannot take the state past the proof."""
    params = _tensors(12)
    config = parse_config(MIXED)
    step = pipeline.make_step(config, list(params))
    plain, limited, hostile, zeroed = (pipeline.init(params, config) for _ in range(4))
    layout = pipeline.layout_of(plain)
    for k in range(3):
        grads = _grads(params, k)
        flat = pipeline.flat_grads(layout, grads)
        dense = [name for name in layout.shapes if name not in flat.sparse]
        limits = np.array([np.abs(np.asarray(grads[name], np.float32)).max() if name in dense else 0.0
                           for name in layout.shapes], np.float32)
        plain = step(plain, flat)
        limited = step(limited, flat._replace(limits=limits))
        rewritten, expected = np.array(flat.dense, np.float32), np.array(flat.dense, np.float32)
        for index, name in enumerate(layout.shapes):
            if name in dense:
                view, zero = layout.views(rewritten)[name].reshape(-1), layout.views(expected)[name].reshape(-1)
                view[::2] = np.where(np.arange(view[::2].size) % 2, np.nan, 2 * limits[index] + 1)
                zero[::2] = 0
        hostile = step(hostile, pipeline.FlatGrads(jax.device_put(rewritten), flat.sparse, None, limits))
        zeroed = step(zeroed, pipeline.FlatGrads(jax.device_put(expected), flat.sparse, None, limits))
    for slot in ADAM_TENSORS:
        np.testing.assert_array_equal(np.asarray(getattr(limited, slot).flat), np.asarray(getattr(plain, slot).flat),
                                      err_msg=slot)
        np.testing.assert_array_equal(np.asarray(getattr(hostile, slot).flat),
                                      np.asarray(getattr(zeroed, slot).flat), err_msg=slot)
        assert np.isfinite(np.asarray(getattr(hostile, slot).flat)).all(), slot


def test_limits_are_one_per_tensor():
    params = _tensors(3)
    config = parse_config(MIXED)
    state = pipeline.init(params, config)
    flat = pipeline.flat_grads(pipeline.layout_of(state), {n: np.ones(v.shape, np.float32) for n, v in params.items()})
    with pytest.raises(Exception, match=r"gradients\.limits: one per tensor"):
        pipeline.make_step(config, list(params))(state, flat._replace(limits=np.ones(2, np.float32)))


@pytest.mark.parametrize("sizes", [[16, 32], [3, 17]], ids=["unpadded", "padded"])
def test_a_fresh_slot_holds_its_initial_value_inside_every_tensor_and_zero_in_the_padding(sizes):
    params = {f"t{i}": np.arange(n, dtype=np.float32) for i, n in enumerate(sizes)}
    state = pipeline.init(params, parse_config({"initial_accumulator_value": 0.25}, "Adagrad"))
    layout = pipeline.layout_of(state)
    accumulator, weights = np.asarray(state.slots["accumulator"].flat), np.asarray(state.params.flat)
    inside = np.zeros(layout.size, bool)
    for name, view in layout.views(inside).items():
        view[...] = True
        np.testing.assert_array_equal(layout.views(weights)[name], params[name])
    assert np.all(accumulator[inside] == np.float32(0.25)) and np.all(accumulator[~inside] == 0)
    assert np.all(weights[~inside] == 0) and ((~inside).any() == (sizes == [3, 17]))


def test_the_state_owns_its_buffers_even_when_the_tensors_arrived_in_its_layout():
    """A create's receive buffer in the layout is copied once, into memory the (donating) step may reuse."""
    layout = FlatLayout({"a": (16,), "b": (32,)})
    buffer = aligned_empty(layout.nbytes).view(np.float32)
    buffer[...] = np.arange(layout.size)
    state = pipeline.init(layout.views(buffer), parse_config({}))
    assert state.params.flat.unsafe_buffer_pointer() != buffer.ctypes.data
    buffer[...] = -1
    np.testing.assert_array_equal(np.asarray(state.params.flat), np.arange(layout.size, dtype=np.float32))


def test_assign_writes_the_named_tensors_in_place_and_nothing_else():
    params = _tensors(5)
    state = pipeline.init(params, parse_config({}))
    before = np.asarray(state.params.flat).copy()
    layout = state.params.layout
    names = list(params)[1::2]
    values = {name: np.full(params[name].shape, 7.0, np.float32) for name in names}
    pointer = state.params.flat.unsafe_buffer_pointer()
    assigned = pipeline.assign(state.params, values)
    assert assigned.flat.unsafe_buffer_pointer() == pointer and state.params.flat.is_deleted()  # donated, reused
    after = np.asarray(assigned.flat)
    expected = before.copy()
    for name in names:
        layout.views(expected)[name][...] = 7.0
    np.testing.assert_array_equal(after, expected)
