"""Every bad input gets the right status, a message naming the field, and no state change."""

import grpc
import numpy as np
import pytest

from optserve.client import Client, IndexedSlices, Optimizer, OptserveError
from optserve.v1 import optserve_pb2 as pb
from optserve.v1 import optserve_pb2_grpc as pb_grpc

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PARAMS = {
    "w": np.arange(15, dtype=np.float32).reshape(3, 5) / 10,
    "emb": np.ones((10, 4), np.float32),
    "b": np.zeros(4, np.float32),
}
CONFIG = {"learning_rate": 0.01, "amsgrad": True, "use_ema": True, "ema_momentum": 0.9}


def good_grads(scale: float = 1.0) -> dict:
    return {
        "w": np.full((3, 5), 0.1 * scale, np.float32),
        "emb": IndexedSlices(indices=np.array([1, 3, 1]), values=np.full((3, 4), scale, np.float32)),
        "b": np.full(4, -0.2 * scale, np.float32),
    }


def snapshot(opt) -> dict:
    """Every state tensor of an optimizer, plus its counters."""
    info = opt.info()
    state = {"iterations": info.iterations, "version": info.version}
    for kind, pulled in [("weights", opt.pull()), ("ema", opt.pull(ema=True)),
                         ("m", opt.pull_slot("m")), ("v", opt.pull_slot("v")), ("vhat", opt.pull_slot("vhat"))]:
        for name, array in pulled.items():
            state[f"{kind}/{name}"] = array.copy()
    return state


def snapshot_weights(opt) -> dict:
    """The weights and counters of an optimizer (for one without EMA or amsgrad)."""
    info = opt.info()
    return {"version": info.version, "iterations": info.iterations, **{k: v.copy() for k, v in opt.pull().items()}}


def assert_same_state(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)


@pytest.fixture
def opt(client: Client, name: str):
    """An optimizer that has taken two steps, so every slot holds non-trivial values."""
    optimizer = client.create_optimizer(name, PARAMS, CONFIG)
    optimizer.push(good_grads())
    optimizer.push(good_grads(-0.5))
    yield optimizer
    client.delete_optimizer(name)


def expect_error(code: grpc.StatusCode, fragment: str, call, *args, **kwargs) -> OptserveError:
    with pytest.raises(OptserveError) as caught:
        call(*args, **kwargs)
    assert caught.value.code() == code, caught.value.details()
    assert fragment in caught.value.details(), caught.value.details()
    return caught.value


def _with(**changes) -> dict:
    grads = good_grads()
    grads.update(changes)
    return {k: v for k, v in grads.items() if v is not None}


BAD_PUSHES = [
    ("unknown tensor", _with(extra=np.zeros(3, np.float32)), grpc.StatusCode.NOT_FOUND, "gradients['extra']"),
    ("missing tensor", _with(b=None), INVALID, "gradients: missing ['b']"),
    ("wrong shape", _with(w=np.zeros((5, 3), np.float32)), INVALID, "gradients['w'].shape"),
    ("wrong dtype", _with(w=np.zeros((3, 5), np.int32)), INVALID, "gradients['w'].dtype"),
    ("index == rows", _with(emb=IndexedSlices(np.array([10]), np.ones((1, 4), np.float32))), INVALID,
     "gradients['emb'].indices: index 10 is out of range [0, 10)"),
    ("negative index", _with(emb=IndexedSlices(np.array([-1]), np.ones((1, 4), np.float32))), INVALID,
     "gradients['emb'].indices: index -1"),
    ("float index", _with(emb=IndexedSlices(np.array([1.0]), np.ones((1, 4), np.float32))), INVALID,
     "gradients['emb'].index_dtype"),
    ("sparse rows of the wrong width", _with(emb=IndexedSlices(np.array([1]), np.ones((1, 5), np.float32))),
     INVALID, "gradients['emb'].shape: sparse rows must have shape [num_rows, 4], got [1, 5]"),
    ("NaN dense", _with(b=np.array([0, np.nan, 0, 0], np.float32)), INVALID, "gradients['b']: contains NaN or Inf"),
    ("Inf dense float16", _with(w=np.full((3, 5), np.inf, np.float16)), INVALID, "gradients['w']: contains NaN"),
    ("NaN sparse", _with(emb=IndexedSlices(np.array([2]), np.full((1, 4), np.nan, np.float32))), INVALID,
     "gradients['emb']: contains NaN or Inf"),
    ("empty push", {}, INVALID, "gradients: empty push"),
]


@pytest.mark.parametrize("grads,code,fragment", [case[1:] for case in BAD_PUSHES], ids=[c[0] for c in BAD_PUSHES])
def test_bad_push_is_refused_and_leaves_state_unchanged(opt, grads, code, fragment) -> None:
    before = snapshot(opt)
    expect_error(code, fragment, opt.push, grads)
    assert_same_state(before, snapshot(opt))


BAD_CONFIGS = [
    ("unknown key", {"learning_rat": 0.1}, "learning_rat"),
    ("legacy decay", {"decay": 0.1}, "decay"),
    ("clipnorm with global_clipnorm", {"clipnorm": 1.0, "global_clipnorm": 1.0}, "global_clipnorm"),
    ("zero learning rate", {"learning_rate": 0.0}, "learning_rate"),
    ("negative learning rate", {"learning_rate": -1e-3}, "learning_rate"),
    ("beta_1 = 1", {"beta_1": 1.0}, "beta_1"),
    ("negative beta_2", {"beta_2": -0.1}, "beta_2"),
    ("negative epsilon", {"epsilon": -1e-7}, "epsilon"),
    ("ema_momentum above 1", {"use_ema": True, "ema_momentum": 1.5}, "ema_momentum"),
    ("ema_momentum below 0", {"use_ema": True, "ema_momentum": -0.1}, "ema_momentum"),
    ("unknown schedule", {"learning_rate": {"class_name": "StepDecay", "config": {}}}, "StepDecay"),
    ("schedule with zero decay_steps",
     {"learning_rate": {"class_name": "ExponentialDecay",
                        "config": {"initial_learning_rate": 0.1, "decay_steps": 0, "decay_rate": 0.5}}},
     "decay_steps"),
    ("schedule with unknown argument",
     {"learning_rate": {"class_name": "ExponentialDecay",
                        "config": {"initial_learning_rate": 0.1, "decay_steps": 10, "decay_rate": 0.5, "foo": 1}}},
     "foo"),
    ("piecewise with mismatched lengths",
     {"learning_rate": {"class_name": "PiecewiseConstantDecay", "config": {"boundaries": [1, 2], "values": [0.1]}}},
     "values"),
]


@pytest.mark.parametrize("config,fragment", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_is_refused_and_creates_nothing(client: Client, opt, name: str, config, fragment) -> None:
    before = snapshot(opt)
    error = expect_error(INVALID, fragment, client.create_optimizer, name + "-new", PARAMS, config)
    assert "config" in error.details()
    assert name + "-new" not in [info.name for info in client.list_optimizers()]
    assert_same_state(before, snapshot(opt))


def test_duplicate_name_is_refused_and_keeps_the_first(client: Client, opt) -> None:
    before = snapshot(opt)
    expect_error(grpc.StatusCode.ALREADY_EXISTS, repr(opt.name), client.create_optimizer, opt.name,
                 {"w": np.zeros(2, np.float32)}, {})
    assert_same_state(before, snapshot(opt))


@pytest.mark.parametrize("call", ["push", "pull", "info", "finalize", "delete", "handle"])
def test_unknown_optimizer_is_not_found(client: Client, call: str) -> None:
    ghost = Optimizer(client, "no-such-optimizer")
    calls = {
        "push": lambda: ghost.push({"w": np.zeros(1, np.float32)}),
        "pull": ghost.pull,
        "info": ghost.info,
        "finalize": ghost.finalize,
        "delete": lambda: client.delete_optimizer("no-such-optimizer"),
        "handle": lambda: client.optimizer("no-such-optimizer"),
    }
    expect_error(grpc.StatusCode.NOT_FOUND, "'no-such-optimizer'", calls[call])


def test_sparse_gradient_with_mismatched_lengths_is_refused_by_the_client(opt) -> None:
    with pytest.raises(ValueError, match=r"gradients\['emb'\]: 2 indices for 1 rows"):
        opt.push(_with(emb=IndexedSlices(np.array([1, 2]), np.ones((1, 4), np.float32))))


def test_ema_pull_without_use_ema_is_a_failed_precondition(client: Client, name: str) -> None:
    opt = client.create_optimizer(name, {"w": np.ones(3, np.float32)}, {})
    expect_error(grpc.StatusCode.FAILED_PRECONDITION, "use_ema", opt.pull, ema=True)
    expect_error(grpc.StatusCode.FAILED_PRECONDITION, "amsgrad", opt.pull_slot, "vhat")
    client.delete_optimizer(name)


def test_pull_of_unknown_tensor_is_not_found(opt) -> None:
    expect_error(grpc.StatusCode.NOT_FOUND, "names['nope']", opt.pull, names=["nope"])


@pytest.mark.parametrize("bad_name", ["", "has space", "x" * 129, "slash/name", ".", "..", ".hidden", "-dash"])
def test_bad_optimizer_name_is_refused(client: Client, bad_name: str) -> None:
    expect_error(INVALID, "name:", client.create_optimizer, bad_name, {"w": np.ones(2, np.float32)})


def test_create_with_duplicate_tensor_or_no_tensors_is_refused(client: Client, name: str) -> None:
    expect_error(INVALID, "tensors: an optimizer needs at least one tensor", client.create_optimizer, name, {})
    stub = pb_grpc.OptimizerServiceStub(client._channel)
    spec = pb.TensorSpec(name="w", dtype=pb.DATA_TYPE_FLOAT32, shape=[1])
    header = pb.CreateOptimizerHeader(name=name, tensors=[spec, spec])
    messages = [pb.CreateOptimizerRequest(header=header), pb.CreateOptimizerRequest(chunk=b"\0" * 8)]
    expect_raw_error(INVALID, "tensors['w']: appears twice", stub.CreateOptimizer, iter(messages))


# Streams no well-behaved client sends: checked with the raw generated stub.

def expect_raw_error(code: grpc.StatusCode, fragment: str, method, request) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        method(request, timeout=30)
    assert caught.value.code() == code, caught.value.details()
    assert fragment in caught.value.details(), caught.value.details()


def _dense_push(opt_name: str, payload: list[bytes], w_shape=(3, 5), w_dtype=pb.DATA_TYPE_FLOAT32) -> list:
    specs = [
        pb.GradientSpec(name="w", dtype=w_dtype, shape=w_shape),
        pb.GradientSpec(name="emb", dtype=pb.DATA_TYPE_FLOAT32, shape=[10, 4]),
        pb.GradientSpec(name="b", dtype=pb.DATA_TYPE_FLOAT32, shape=[4]),
    ]
    return [pb.PushGradientsRequest(header=pb.PushHeader(optimizer=opt_name, gradients=specs))] + [
        pb.PushGradientsRequest(chunk=c) for c in payload
    ]


FULL = (15 + 40 + 4) * 4  # bytes of a whole dense push to PARAMS

BAD_STREAMS = [
    ("too few bytes", lambda n: _dense_push(n, [b"\0" * (FULL - 4)]), INVALID,
     "chunks: the stream ended after 232 of the 236 bytes"),
    ("too many bytes", lambda n: _dense_push(n, [b"\0" * 200, b"\0" * 40]), INVALID,
     "chunks: 240 bytes received, more than the 236"),
    ("chunk before header", lambda n: [pb.PushGradientsRequest(chunk=b"\0" * 4)] + _dense_push(n, [b"\0" * FULL]),
     INVALID, "header: the first message of PushGradients must be a header"),
    ("header twice", lambda n: _dense_push(n, [b"\0" * 4]) + _dense_push(n, [])[:1], INVALID, "header: sent twice"),
    ("empty stream", lambda n: [], INVALID, "empty stream"),
    ("unspecified dtype", lambda n: _dense_push(n, [b"\0" * FULL], w_dtype=pb.DATA_TYPE_UNSPECIFIED), INVALID,
     "gradients['w'].dtype: must be float32, float16 or bfloat16, got unspecified"),
    ("float64 dtype", lambda n: _dense_push(n, [b"\0" * FULL], w_dtype=pb.DATA_TYPE_FLOAT64), INVALID,
     "gradients['w'].dtype: must be float32, float16 or bfloat16, got float64"),
    ("negative dimension", lambda n: _dense_push(n, [], w_shape=(-3, -5)), INVALID, "gradients['w'].shape"),
    ("huge sparse row count", lambda n: [pb.PushGradientsRequest(header=pb.PushHeader(optimizer=n, gradients=[
        pb.GradientSpec(name="w", dtype=pb.DATA_TYPE_FLOAT32, shape=[3, 5]),
        pb.GradientSpec(name="emb", dtype=pb.DATA_TYPE_FLOAT32, sparse=True, shape=[2**30, 4],
                        index_dtype=pb.DATA_TYPE_INT64),
        pb.GradientSpec(name="b", dtype=pb.DATA_TYPE_FLOAT32, shape=[4])]))],
     grpc.StatusCode.RESOURCE_EXHAUSTED, "gradients:"),
]


@pytest.mark.parametrize("build,code,fragment", [c[1:] for c in BAD_STREAMS], ids=[c[0] for c in BAD_STREAMS])
def test_malformed_push_stream_is_refused_and_leaves_state_unchanged(client: Client, opt, build, code, fragment):
    stub = pb_grpc.OptimizerServiceStub(client._channel)
    before = snapshot(opt)
    expect_raw_error(code, fragment, stub.PushGradients, iter(build(opt.name)))
    assert_same_state(before, snapshot(opt))


@pytest.mark.parametrize("shapes,fragment", [
    ([[1 << 20, 1 << 20]], "tensors['w0'].shape: 4398046511104 bytes exceed this server's limit of 8589934592 per tensor"),
    ([[10 << 20]] * 2, "tensors: 83886080 bytes exceed this server's limit of 67108864 per request"),
], ids=["one huge tensor", "too many bytes in all"])
def test_create_larger_than_the_server_limits_is_resource_exhausted(client: Client, name: str, shapes, fragment):
    stub = pb_grpc.OptimizerServiceStub(client._channel)
    specs = [pb.TensorSpec(name=f"w{i}", dtype=pb.DATA_TYPE_FLOAT32, shape=shape) for i, shape in enumerate(shapes)]
    request = pb.CreateOptimizerRequest(header=pb.CreateOptimizerHeader(name=name, tensors=specs))
    expect_raw_error(grpc.StatusCode.RESOURCE_EXHAUSTED, fragment, stub.CreateOptimizer, iter([request]))


def test_float16_parameters_are_refused(client: Client, name: str) -> None:
    stub = pb_grpc.OptimizerServiceStub(client._channel)
    spec = pb.TensorSpec(name="w", dtype=pb.DATA_TYPE_FLOAT16, shape=[2])
    messages = [pb.CreateOptimizerRequest(header=pb.CreateOptimizerHeader(name=name, tensors=[spec])),
                pb.CreateOptimizerRequest(chunk=b"\0" * 4)]
    expect_raw_error(INVALID, "tensors['w'].dtype: parameters must be float32", stub.CreateOptimizer, iter(messages))


def test_refused_push_then_good_push_equals_good_push_alone(client: Client, opt, name: str) -> None:
    """A refused push leaves no trace in the moments: the next step is as if it never came."""
    twin = client.create_optimizer(name + "-twin", PARAMS, CONFIG)
    twin.push(good_grads())
    twin.push(good_grads(-0.5))
    expect_error(INVALID, "NaN", opt.push, _with(b=np.array([np.nan] * 4, np.float32)))
    opt.push(good_grads(2.0))
    twin.push(good_grads(2.0))
    assert_same_state(snapshot(twin), snapshot(opt))
    client.delete_optimizer(twin.name)
