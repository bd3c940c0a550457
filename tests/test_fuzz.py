"""Property-based fuzzing of the live server: hostile requests never crash it or change state.

Each example sends malformed or hostile requests over real gRPC, then checks that
(1) the call fails with an expected status and a message, never INTERNAL or UNKNOWN,
(2) the server still serves (the state check lists and reads optimizers), and
(3) every optimizer of this module is bit for bit as it was (weights, EMA, m, v, vhat,
iterations, version), and no optimizer appeared or vanished.
"""

import itertools
import json
import math
import os
import re
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator

import grpc
import ml_dtypes
import numpy as np
import pytest
from google.protobuf import message_factory
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from optserve.client import Client, IndexedSlices, InvalidArgumentError
from optserve.wire.chunks import stream_message_parser
from optserve.wire.dtypes import data_type_of
from optserve.server.engine import parse_config, pipeline
from optserve.server.launch import ServerProcess
from optserve.v1 import optserve_pb2 as pb
from optserve.v1 import optserve_pb2_grpc as pb_grpc

Code = grpc.StatusCode
TIMEOUT = 30  # seconds: the deadline of every call, so no example can hang

SHAPES = {"w": (3, 5), "emb": (10, 4), "b": (4,), "s": ()}
PARAMS = {name: np.linspace(-1, 1, math.prod(shape), dtype=np.float32).reshape(shape) for name, shape in SHAPES.items()}
CONFIG = {"learning_rate": 0.01, "amsgrad": True, "use_ema": True, "ema_momentum": 0.9}
FULL_BYTES = sum(a.nbytes for a in PARAMS.values())  # a dense float32 gradient for every tensor
FLOAT_TYPES = {pb.DATA_TYPE_FLOAT32: np.dtype(np.float32), pb.DATA_TYPE_FLOAT16: np.dtype(np.float16),
               pb.DATA_TYPE_BFLOAT16: np.dtype(ml_dtypes.bfloat16)}
INDEX_TYPES = {pb.DATA_TYPE_INT32: np.dtype(np.int32), pb.DATA_TYPE_INT64: np.dtype(np.int64)}
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # proto: CreateOptimizerHeader.name
TARGET = "test_fuzz-target"
SMALL = pb.TensorSpec(name="w", dtype=pb.DATA_TYPE_FLOAT32, shape=[2])  # the one tensor of a throwaway optimizer
_fresh = itertools.count()


def fuzz(max_examples: int) -> settings:
    """Settings bounded for CI: no deadline per example, nothing written to the repo."""
    return settings(max_examples=max_examples, deadline=None, database=None, derandomize=False,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def fresh_name() -> str:
    return f"test_fuzz-new-{next(_fresh)}"


# --- the module's optimizers and the state check -------------------------------


class World:
    """A client of the session's server and the optimizers that every example must leave alone."""

    def __init__(self, client: Client):
        self.client = client
        self.stub = pb_grpc.OptimizerServiceStub(client._channel)
        self.target = client.create_optimizer(TARGET, PARAMS, CONFIG)  # every slot exists
        self.target.push({name: np.full(shape, 0.5, np.float32) for name, shape in SHAPES.items()})
        self.target.push({name: np.full(shape, -0.25, np.float32) for name, shape in SHAPES.items()})
        self.plain = client.create_optimizer("test_fuzz-plain", PARAMS, {})  # no EMA, no vhat
        self.steps = client.create_optimizer("test_fuzz-steps", PARAMS, CONFIG)  # takes the valid pushes

    def names(self) -> list[str]:
        return [info.name for info in self.client.list_optimizers()]

    def state(self) -> dict:
        """Every optimizer's name; counters and state tensors (as raw bits) of target and plain."""
        state: dict = {"optimizers": tuple(self.names())}
        for opt, all_slots in [(self.target, True), (self.plain, False)]:
            info = opt.info()
            state[f"{opt.name}/iterations"], state[f"{opt.name}/version"] = info.iterations, info.version
            pulls = {"weights": opt.pull(), "m": opt.pull_slot("m"), "v": opt.pull_slot("v")}
            if all_slots:
                pulls.update(ema=opt.pull(ema=True), vhat=opt.pull_slot("vhat"))
            for kind, tensors in pulls.items():
                for name, array in tensors.items():
                    state[f"{opt.name}/{kind}/{name}"] = (array.dtype.str, array.shape, array.tobytes())
        return state

    def assert_unchanged(self, before: dict) -> None:
        after = self.state()
        changed = sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))
        assert not changed, f"changed by a refused request: {changed}"


@pytest.fixture(scope="module")
def world(server) -> Iterator[World]:
    """The module's optimizers on the session's server, created once and deleted at the end."""
    with Client(server.address, timeout=TIMEOUT) as client:
        made = World(client)
        yield made
        for opt in (made.target, made.plain, made.steps):
            client.delete_optimizer(opt.name)


def rpc_error(call: Callable[[], object]) -> grpc.RpcError | None:
    """The error a call ends with, or None when it succeeds."""
    try:
        call()
    except grpc.RpcError as err:
        return err
    return None


def assert_refused(err: grpc.RpcError | None, allowed: set[Code]) -> None:
    assert err is not None, "the server accepted the request"
    assert err.code() in allowed, f"{err.code().name}: {err.details()}"
    assert err.details(), f"{err.code().name} without a message"


# --- building requests -----------------------------------------------------------


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at the positions `cuts`; a repeated position gives an empty chunk."""
    bounds = [0, *sorted(cuts), len(data)]
    return [data[start:end] for start, end in zip(bounds, bounds[1:])]


@st.composite
def splits(draw, data: bytes) -> list[bytes]:
    """`data` in random chunks, empty ones included."""
    return chunked(data, draw(st.lists(st.integers(0, len(data)), max_size=6)))


def encode(grads: dict) -> tuple[list[pb.GradientSpec], bytes]:
    """The specs and payload of a push of `grads` (arrays or IndexedSlices), in dict order."""
    specs, parts = [], []
    for name, grad in grads.items():
        if isinstance(grad, IndexedSlices):
            specs.append(pb.GradientSpec(name=name, dtype=data_type_of(grad.values.dtype), shape=grad.values.shape,
                                         sparse=True, index_dtype=data_type_of(grad.indices.dtype)))
            parts += [grad.indices, grad.values]
        else:
            specs.append(pb.GradientSpec(name=name, dtype=data_type_of(grad.dtype), shape=grad.shape))
            parts.append(grad)
    return specs, b"".join(np.ascontiguousarray(part).tobytes() for part in parts)


def push_call(stub, header: pb.PushHeader, chunks: list[bytes]) -> Callable[[], pb.PushGradientsResponse]:
    messages = [pb.PushGradientsRequest(header=header)] + [pb.PushGradientsRequest(chunk=c) for c in chunks]
    return lambda: stub.PushGradients(iter(messages), timeout=TIMEOUT)


def create_call(stub, header: pb.CreateOptimizerHeader, chunks: list[bytes]) -> Callable[[], pb.OptimizerInfo]:
    messages = [pb.CreateOptimizerRequest(header=header)] + [pb.CreateOptimizerRequest(chunk=c) for c in chunks]
    return lambda: stub.CreateOptimizer(iter(messages), timeout=TIMEOUT)


def param_specs() -> list[pb.TensorSpec]:
    return [pb.TensorSpec(name=n, dtype=pb.DATA_TYPE_FLOAT32, shape=a.shape) for n, a in PARAMS.items()]


def zero_grads() -> dict:
    return {name: np.zeros(shape, np.float32) for name, shape in SHAPES.items()}


# --- strategies ------------------------------------------------------------------

int32s = st.integers(-2**31, 2**31 - 1)
int64s = st.integers(-2**63, 2**63 - 1)
texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)  # any unicode protobuf can carry
dims = st.integers(0, 6) | st.integers(-4, -1) | st.sampled_from([2**31, 2**32 + 1, 2**62, 2**63 - 1]) | int64s
shapes = st.lists(dims, max_size=5) | st.lists(st.integers(0, 2), min_size=60, max_size=70)  # deep ranks too
tensor_names = st.sampled_from(list(SHAPES)) | texts


def enum_values(enum) -> st.SearchStrategy[int]:
    """Every value of a proto enum, and any other int32 (99, negatives)."""
    return st.sampled_from(enum.values()) | int32s


_BITS = {np.dtype(np.float32): (np.uint32, 0x7F800000), np.dtype(np.float16): (np.uint16, 0x7C00),
         np.dtype(ml_dtypes.bfloat16): (np.uint16, 0x7F80)}  # unsigned view and exponent mask of each float type


@st.composite
def finite_floats(draw, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """Random bit patterns of `dtype`: subnormals, signed zeros and extremes, but no NaN or Inf."""
    uint, exponent = _BITS[dtype]
    bits = draw(hnp.arrays(uint, shape))
    return np.where((bits & exponent) == exponent, bits & ~uint(exponent), bits).astype(uint).view(dtype)


@st.composite
def gradients(draw) -> dict:
    """Finite gradients for every tensor: dense or sparse, float32, float16 or bfloat16, in random order."""
    grads = {}
    for name in draw(st.permutations(list(SHAPES))):
        shape, dtype = SHAPES[name], draw(st.sampled_from(list(FLOAT_TYPES.values())))
        if shape and draw(st.booleans()):
            rows = draw(st.integers(0, 6))
            indices = draw(hnp.arrays(draw(st.sampled_from(list(INDEX_TYPES.values()))), rows,
                                      elements=st.integers(0, shape[0] - 1)))
            grads[name] = IndexedSlices(indices, draw(finite_floats(dtype, (rows, *shape[1:]))))
        else:
            grads[name] = draw(finite_floats(dtype, shape))
    return grads


@st.composite
def hostile_specs(draw) -> list[pb.GradientSpec]:
    """The specs of a valid push with up to three hostile edits: a field replaced, a spec dropped or repeated."""
    specs, _ = encode(draw(gradients()))
    fields = {"name": tensor_names, "dtype": enum_values(pb.DataType), "shape": shapes, "sparse": st.booleans(),
              "index_dtype": enum_values(pb.DataType)}
    for _ in range(draw(st.integers(0, 3))):
        if not specs:
            break
        spec = specs[draw(st.integers(0, len(specs) - 1))]
        edit = draw(st.sampled_from([*fields, "drop", "repeat"]))
        if edit == "drop":
            specs.remove(spec)
        elif edit == "repeat":
            specs.append(copy := pb.GradientSpec())
            copy.CopyFrom(spec)
        elif edit == "shape":
            spec.ClearField("shape")
            spec.shape.extend(draw(shapes))
        else:
            setattr(spec, edit, draw(fields[edit]))
    return specs


def declared_bytes(specs: list[pb.GradientSpec]) -> int | None:
    """The payload size the proto contract gives these specs, or None when the header itself is invalid."""
    if sorted(spec.name for spec in specs) != sorted(SHAPES):
        return None
    total = 0
    for spec in specs:
        shape, got = SHAPES[spec.name], tuple(spec.shape)
        if spec.dtype not in FLOAT_TYPES or any(d < 0 for d in got):
            return None
        itemsize = FLOAT_TYPES[spec.dtype].itemsize
        if not spec.sparse:
            if got != shape:
                return None
            total += itemsize * math.prod(shape)
        elif shape and len(got) == len(shape) and got[1:] == shape[1:] and spec.index_dtype in INDEX_TYPES:
            total += INDEX_TYPES[spec.index_dtype].itemsize * got[0] + itemsize * math.prod(got)
        else:
            return None
    return total


@st.composite
def payload_sizes(draw, declared: int | None, exact: bool) -> int:
    """Payload lengths around the declared size (truncated, overlong, or exactly it when `exact`), else small."""
    if declared is None or not 0 <= declared <= 4096:
        return draw(st.integers(0, 256))
    if exact and draw(st.booleans()):
        return declared
    size = draw(st.integers(0, declared + 16))
    return size + 1 if not exact and size == declared else size


# --- the properties --------------------------------------------------------------


@fuzz(80)
@given(data=st.data())
def test_random_push_headers_never_crash_or_change_state(world: World, data) -> None:
    """Hostile gradient specs (names, dtypes, shapes, sparse flags) with payloads of the wrong size are refused."""
    specs = data.draw(st.one_of(hostile_specs(), st.lists(st.builds(
        pb.GradientSpec, name=tensor_names, dtype=enum_values(pb.DataType), shape=shapes, sparse=st.booleans(),
        index_dtype=enum_values(pb.DataType)), max_size=5)), label="specs")
    size = data.draw(payload_sizes(declared_bytes(specs), exact=False), label="payload size")
    chunks = data.draw(splits(data.draw(st.binary(min_size=size, max_size=size))), label="chunks")
    extras = data.draw(st.just({}) | st.fixed_dictionaries(  # half the time, hostile exactly-once fields
        {"worker_id": texts | st.text(min_size=129, max_size=200), "seq": int64s, "base_version": int64s}))
    header = pb.PushHeader(optimizer=world.target.name, gradients=specs, **extras)
    before = world.state()
    assert_refused(rpc_error(push_call(world.stub, header, chunks)),
                   {Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.RESOURCE_EXHAUSTED})
    world.assert_unchanged(before)


FRAMING_FAULTS = ["empty stream", "chunk first", "blank message", "header twice", "truncated", "overlong"]


@st.composite
def broken_framing(draw, payload: bytes) -> list[tuple[str, bytes]]:
    """A header then `payload` in random chunks, with one framing fault: [("header" | "chunk" | "blank", bytes)]."""
    fault = draw(st.sampled_from(FRAMING_FAULTS))
    if fault == "empty stream":
        return []
    if fault == "truncated":
        payload = payload[:draw(st.integers(0, len(payload) - 1))]
    if fault == "overlong":
        payload += draw(st.binary(min_size=1, max_size=64))
    parts = [("header", b"")] + [("chunk", chunk) for chunk in draw(splits(payload))]
    if fault == "chunk first":
        parts.insert(0, ("chunk", draw(st.binary(max_size=16))))
    if fault == "header twice":
        parts.insert(draw(st.integers(1, len(parts))), ("header", b""))
    if fault == "blank message":  # a message with neither a header nor a chunk
        parts.insert(draw(st.integers(0, len(parts))), ("blank", b""))
    return parts


@fuzz(60)
@given(rpc=st.sampled_from(["push", "create"]), data=st.data())
def test_malformed_stream_framing_is_invalid_argument(world: World, rpc: str, data) -> None:
    """Empty streams, chunks before the header, a second header, blank messages, truncated or overlong bytes."""
    if rpc == "push":
        specs, payload = encode(data.draw(gradients(), label="gradients"))
        request, header = pb.PushGradientsRequest, pb.PushHeader(optimizer=world.target.name, gradients=specs)
        method = world.stub.PushGradients
    else:
        payload = b"".join(a.tobytes() for a in PARAMS.values())
        request, header = pb.CreateOptimizerRequest, pb.CreateOptimizerHeader(name=fresh_name(), tensors=param_specs())
        method = world.stub.CreateOptimizer
    messages = [{"header": request(header=header), "chunk": request(chunk=chunk), "blank": request()}[kind]
                for kind, chunk in data.draw(broken_framing(payload), label="stream")]
    before = world.state()
    assert_refused(rpc_error(lambda: method(iter(messages), timeout=TIMEOUT)), {Code.INVALID_ARGUMENT})
    world.assert_unchanged(before)


huge_dims = st.integers(2**31, 2**63 - 1) | st.sampled_from([2**31, 2**40, 2**61, 2**62, 2**63 - 1])


def emb_push_call(world: World, shape: list[int], sparse: bool, index_dtype: int,
                  junk: bytes) -> Callable[[], pb.PushGradientsResponse]:
    """A push to the target whose "emb" gradient declares `shape` (sparse or dense), followed by `junk`."""
    specs, _ = encode(zero_grads())
    emb = next(spec for spec in specs if spec.name == "emb")
    emb.sparse, emb.index_dtype = sparse, index_dtype
    emb.ClearField("shape")
    emb.shape.extend(shape)
    return push_call(world.stub, pb.PushHeader(optimizer=world.target.name, gradients=specs), [junk])


@st.composite
def huge_shapes(draw) -> list[int]:
    """Shapes with at least one dimension of 2**31 or more; small and zero dimensions besides."""
    shape = draw(st.lists(st.integers(0, 8) | huge_dims, min_size=1, max_size=4))
    shape[draw(st.integers(0, len(shape) - 1))] = draw(huge_dims)
    return shape


@fuzz(40)
@example(rpc="create", shape=[0, 2**62, 4], junk=b"")  # zero elements, yet numpy cannot hold the shape
@given(rpc=st.sampled_from(["create", "sparse rows", "sparse width", "dense"]), shape=huge_shapes(),
       junk=st.binary(max_size=64))
def test_huge_declared_sizes_are_refused_without_allocating(world: World, rpc: str, shape, junk) -> None:
    """Dimensions up to 2**63 - 1 are refused (RESOURCE_EXHAUSTED or INVALID_ARGUMENT) before any buffer is made.

    A shape with a zero dimension declares no bytes and may be accepted. The server runs in
    this process, so tracemalloc (which sees NumPy's buffers) bounds what it allocated.
    """
    name = fresh_name()
    if rpc == "create":
        call = create_call(world.stub, pb.CreateOptimizerHeader(
            name=name, tensors=[pb.TensorSpec(name="w", dtype=pb.DATA_TYPE_FLOAT32, shape=shape)]), [junk])
    else:
        declared = {"sparse rows": [shape[0], 4], "sparse width": [1, *shape], "dense": shape}[rpc]
        call = emb_push_call(world, declared, rpc != "dense", pb.DATA_TYPE_INT64, junk)
    before = world.state()
    tracemalloc.start()
    try:
        err = rpc_error(call)
        allocated = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert allocated < 16 << 20, f"the server allocated {allocated} bytes for a refused request"
    if err is None and rpc == "create" and 0 in shape:
        world.client.delete_optimizer(name)
    else:
        assert_refused(err, {Code.RESOURCE_EXHAUSTED, Code.INVALID_ARGUMENT})
    world.assert_unchanged(before)


@fuzz(30)
@example(rpc="create", elements=(64 << 20) // 4, junk=b"\0" * 64)  # the server's whole per-request limit
@given(rpc=st.sampled_from(["create", "sparse rows"]), elements=st.integers(1 << 16, (64 << 20) // 4),
       junk=st.binary(max_size=4096))
def test_large_declarations_commit_memory_only_for_the_bytes_that_arrive(world: World, rpc: str, elements: int,
                                                                         junk: bytes) -> None:
    """A header within the limits declaring up to 64 MiB, then a few bytes: the stream is refused as short (or
    over a limit) and the server mapped memory for the bytes that came, not for the declaration."""
    from optserve.server import buffers

    name = fresh_name()
    if rpc == "create":
        call = create_call(world.stub, pb.CreateOptimizerHeader(
            name=name, tensors=[pb.TensorSpec(name="w", dtype=pb.DATA_TYPE_FLOAT32, shape=[elements])]), [junk])
    else:
        call = emb_push_call(world, [elements // 4, 4], True, pb.DATA_TYPE_INT32, junk)
    mapped, fresh = [], buffers._mapped
    buffers._mapped = lambda size: (mapped.append(size), fresh(size))[1]
    before = world.state()
    tracemalloc.start()
    try:
        err = rpc_error(call)
        allocated = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        buffers._mapped = fresh
    assert allocated < 1 << 20, f"the server allocated {allocated} bytes for {len(junk)} bytes received"
    assert sum(mapped) <= 64 << 10, f"the server mapped {mapped} for {len(junk)} bytes received"
    assert_refused(err, {Code.RESOURCE_EXHAUSTED, Code.INVALID_ARGUMENT})
    world.assert_unchanged(before)


def valid_create(name: str, specs: list[pb.TensorSpec], payload_size: int, taken: list[str]) -> bool:
    """Whether the proto contract allows this create (limits aside)."""
    return bool(NAME_PATTERN.fullmatch(name) and name not in taken and specs
                and len({spec.name for spec in specs}) == len(specs)
                and all(spec.name and spec.dtype == pb.DATA_TYPE_FLOAT32 and min(spec.shape, default=0) >= 0
                        for spec in specs)
                and payload_size == sum(4 * math.prod(spec.shape) for spec in specs))


@st.composite
def create_requests(draw) -> tuple[str, list[tuple[str, int, list[int]]], list[bytes]]:
    """A name (fresh, taken or any unicode), tensors as (name, dtype, shape), and a payload near their size."""
    name = draw(st.builds(fresh_name) | st.just(TARGET) | texts)
    dtypes = st.just(pb.DATA_TYPE_FLOAT32) | enum_values(pb.DataType)
    tensors = draw(st.lists(st.tuples(texts, dtypes, shapes), max_size=4)
                   | st.just([("w", pb.DATA_TYPE_FLOAT32, [2, 3])]))
    size = draw(payload_sizes(sum(4 * math.prod(shape) for _, _, shape in tensors), exact=True))
    return name, tensors, draw(splits(draw(st.binary(min_size=size, max_size=size))))


@fuzz(60)
@example(request=("test_fuzz-deep", [("w", pb.DATA_TYPE_FLOAT32, [1] * 65)], [bytes(4)]))  # 4 bytes, 65 dimensions
@given(request=create_requests())
def test_random_create_requests_are_refused_or_create_exactly_that(world: World, request) -> None:
    """Random names (unicode, taken ones), tensor specs and payloads: a create the contract forbids is refused."""
    name, tensors, chunks = request
    specs = [pb.TensorSpec(name=tensor, dtype=dtype, shape=shape) for tensor, dtype, shape in tensors]
    before = world.state()
    err = rpc_error(create_call(world.stub, pb.CreateOptimizerHeader(name=name, tensors=specs), chunks))
    if err is None:
        size = sum(len(chunk) for chunk in chunks)
        assert valid_create(name, specs, size, list(before["optimizers"])), "accepted a forbidden create"
        assert world.client.optimizer(name).info().tensors == {n: (tuple(shape), "float32") for n, _, shape in tensors}
        world.client.delete_optimizer(name)
    else:
        assert_refused(err, {Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED, Code.ALREADY_EXISTS})
    world.assert_unchanged(before)


@st.composite
def non_finite_gradients(draw) -> dict:
    """Valid gradients with NaN (any payload) or ±Inf written into one tensor's values."""
    grads = draw(gradients())
    name = draw(st.sampled_from([n for n, g in grads.items() if np.size(getattr(g, "values", g))]))
    values = np.array(getattr(grads[name], "values", grads[name]))  # a writable copy
    uint, exponent = _BITS[values.dtype]
    flat = values.reshape(-1).view(uint)
    for position in draw(st.lists(st.integers(0, flat.size - 1), min_size=1, max_size=4)):
        flat[position] = draw(st.integers(0, np.iinfo(uint).max)) | exponent  # all exponent bits set: NaN or Inf
    grads[name] = grads[name]._replace(values=values) if isinstance(grads[name], IndexedSlices) else values
    return grads


@fuzz(40)
@given(grads=non_finite_gradients(), data=st.data())
def test_non_finite_gradients_are_refused_and_change_nothing(world: World, grads, data) -> None:
    """NaN or Inf in float32, float16 or bfloat16, dense or sparse: INVALID_ARGUMENT under the default policy."""
    specs, payload = encode(grads)
    header = pb.PushHeader(optimizer=world.target.name, gradients=specs)
    before = world.state()
    assert_refused(rpc_error(push_call(world.stub, header, data.draw(splits(payload)))), {Code.INVALID_ARGUMENT})
    world.assert_unchanged(before)


@st.composite
def bad_sparse_gradients(draw) -> IndexedSlices:
    """A sparse gradient for "emb" (10 x 4) with an index outside [0, 10) or rows of the wrong shape."""
    index_type = draw(st.sampled_from(list(INDEX_TYPES.values())))
    info = np.iinfo(index_type)
    if draw(st.booleans()):  # a bad index among good ones
        indices = draw(st.lists(st.integers(0, 9) | st.integers(info.min, info.max), max_size=5))
        bad = draw(st.integers(info.min, -1) | st.integers(10, info.max) | st.sampled_from([-1, 10]))
        indices.insert(draw(st.integers(0, len(indices))), bad)
        row_shape = [4]
    else:  # good indices, rows of another width or rank
        indices = draw(st.lists(st.integers(0, 9), max_size=5))
        row_shape = draw(st.lists(st.integers(0, 6), max_size=3).filter(lambda shape: shape != [4]))
    values_type = draw(st.sampled_from(list(FLOAT_TYPES.values())))
    values = draw(finite_floats(values_type, (len(indices), *row_shape)))
    return IndexedSlices(np.array(indices, index_type), values)


@fuzz(50)
@given(emb=bad_sparse_gradients(), data=st.data())
def test_bad_sparse_gradients_are_refused_and_change_nothing(world: World, emb, data) -> None:
    """Negative, too large or extreme int32/int64 indices, and mismatched row shapes: INVALID_ARGUMENT."""
    grads = zero_grads()
    grads["emb"] = emb
    specs, payload = encode(grads)
    header = pb.PushHeader(optimizer=world.target.name, gradients=specs)
    before = world.state()
    assert_refused(rpc_error(push_call(world.stub, header, data.draw(splits(payload)))), {Code.INVALID_ARGUMENT})
    world.assert_unchanged(before)


@fuzz(40)
@given(name=texts | st.from_regex(NAME_PATTERN, fullmatch=True),
       rpc=st.sampled_from(["get", "delete", "finalize", "save", "pull", "push"]))
def test_unknown_optimizer_names_are_not_found(world: World, name: str, rpc: str) -> None:
    """Any name, unicode included, that names no optimizer: NOT_FOUND (a push may say INVALID_ARGUMENT first)."""
    before = world.state()
    assume(name not in before["optimizers"])
    stub = world.stub
    specs, payload = encode(zero_grads())
    calls = {
        "get": lambda: stub.GetOptimizer(pb.GetOptimizerRequest(name=name), timeout=TIMEOUT),
        "delete": lambda: stub.DeleteOptimizer(pb.DeleteOptimizerRequest(name=name), timeout=TIMEOUT),
        "finalize": lambda: stub.FinalizeOptimizer(pb.FinalizeOptimizerRequest(name=name), timeout=TIMEOUT),
        "save": lambda: stub.SaveOptimizer(pb.SaveOptimizerRequest(name=name), timeout=TIMEOUT),
        "pull": lambda: list(stub.PullWeights(pb.PullWeightsRequest(optimizer=name), timeout=TIMEOUT)),
        "push": push_call(stub, pb.PushHeader(optimizer=name, gradients=specs), [payload]),
    }
    allowed = {Code.NOT_FOUND, Code.INVALID_ARGUMENT} if rpc == "push" else {Code.NOT_FOUND}
    assert_refused(rpc_error(calls[rpc]), allowed)
    world.assert_unchanged(before)


ADAM_KEYS = ["learning_rate", "beta_1", "beta_2", "epsilon", "amsgrad", "weight_decay", "exclude_from_weight_decay",
             "clipnorm", "global_clipnorm", "clipvalue", "use_ema", "ema_momentum", "ema_overwrite_frequency",
             "jit_compile", "name", "is_legacy_optimizer"]
SCHEDULES = ["ExponentialDecay", "PiecewiseConstantDecay", "PolynomialDecay", "InverseTimeDecay", "CosineDecay",
             "CosineDecayRestarts"]
SCHEDULE_ARGS = ["initial_learning_rate", "decay_steps", "first_decay_steps", "decay_rate", "staircase", "cycle",
                 "end_learning_rate", "power", "alpha", "warmup_target", "warmup_steps", "t_mul", "m_mul",
                 "boundaries", "values", "name"]
HOSTILE_LITERALS = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "-0.0", "5e-324", str(2**63), str(-2**64),
                    "1" * 5000, "[" * 50000 + "]" * 50000, '{"a": ' * 50000 + "0" + "}" * 50000]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | texts,  # floats: NaN and ±Infinity too
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3), max_leaves=8)
numbers = st.integers(-2**70, 2**70) | st.floats() | st.floats(0, 1)
schedules = st.fixed_dictionaries({
    "class_name": st.sampled_from(SCHEDULES) | texts,
    "config": st.dictionaries(st.sampled_from(SCHEDULE_ARGS) | texts,
                              numbers | st.booleans() | st.lists(numbers, max_size=4) | json_values, max_size=6)})
configs = st.dictionaries(st.sampled_from(ADAM_KEYS) | texts,
                          numbers | st.booleans() | st.none() | json_values | schedules, max_size=5)
sizes = st.floats(1e-30, 1e30)
plausible_configs = st.fixed_dictionaries({}, optional={  # mostly valid, with edge values in range
    "learning_rate": sizes | schedules, "beta_1": st.floats(0, 1), "beta_2": st.floats(0, 1), "epsilon": sizes,
    "amsgrad": st.booleans(), "weight_decay": st.none() | sizes, "clipnorm": st.none() | sizes,
    "global_clipnorm": st.none() | sizes, "clipvalue": st.none() | sizes, "use_ema": st.booleans(),
    "ema_momentum": st.floats(0, 1), "ema_overwrite_frequency": st.none() | st.integers(0, 2**63 - 1),
    "jit_compile": st.booleans(), "exclude_from_weight_decay": st.lists(st.sampled_from(["w", "^$", ".*"]))})
config_texts = st.one_of(
    texts,  # rarely JSON
    json_values.map(json.dumps),  # JSON of any type
    configs.map(json.dumps),  # Adam keys with values of any type and size
    plausible_configs.map(json.dumps),
    st.builds("{{{}: {}}}".format, st.sampled_from(ADAM_KEYS).map(json.dumps), st.sampled_from(HOSTILE_LITERALS)),
)


@fuzz(40)
@example(config_json='{"ema_overwrite_frequency": 2147483648, "use_ema": true}')  # accepted, then every push fails
@example(config_json='{"beta_1": ' + "1" * 5000 + "}")  # an integer literal longer than Python parses by default
@example(config_json="[" * 50000 + "]" * 50000)  # nesting deeper than the JSON decoder's recursion limit
@example(config_json='{"learning_rate": 3.06e16, "weight_decay": 1.11e22}')  # a valid config whose first step overflows
@given(config_json=config_texts)
def test_random_json_configs_are_refused_or_yield_a_working_optimizer(world: World, config_json: str) -> None:
    """Junk, wrong types, nested junk, NaN literals and huge numbers: INVALID_ARGUMENT, or an optimizer that steps
    (or, where the step would overflow, refuses it and keeps its state)."""
    name = fresh_name()
    before = world.state()
    header = pb.CreateOptimizerHeader(name=name, config_json=config_json, tensors=[SMALL])
    err = rpc_error(create_call(world.stub, header, [np.ones(2, np.float32).tobytes()]))
    if err is None:
        optimizer = world.client.optimizer(name)
        try:
            version = optimizer.push({"w": np.full(2, 0.5, np.float32)})
            assert version == 1, f"the first step of an accepted config gave version {version}"
        except InvalidArgumentError as refused:  # a huge learning rate may overflow: refused, state kept
            assert "non-finite" in refused.details(), refused
            assert optimizer.info().version == 0, "a refused step changed the version"
        finally:
            world.client.delete_optimizer(name)
    else:
        assert_refused(err, {Code.INVALID_ARGUMENT})
    world.assert_unchanged(before)


def valid_mode(mode: pb.TrainingMode, policy: int) -> bool:
    """Whether the proto contract allows this mode and non-finite policy."""
    workers = mode.num_workers if mode.HasField("num_workers") else 1
    timeout = mode.sync_timeout_seconds if mode.HasField("sync_timeout_seconds") else 60.0
    return (mode.mode in pb.Mode.values() and mode.aggregation in pb.Aggregation.values()
            and policy in pb.NonFinitePolicy.values() and workers >= 1 and mode.backup_workers >= 0 and timeout > 0
            and (mode.mode == pb.MODE_SYNC or workers == 1)
            and (not mode.HasField("max_staleness") or mode.max_staleness >= 0))


@fuzz(40)
@given(mode=st.builds(pb.TrainingMode, mode=enum_values(pb.Mode), num_workers=st.none() | int32s | st.integers(0, 3),
                      backup_workers=int32s | st.integers(0, 2), aggregation=enum_values(pb.Aggregation),
                      sync_timeout_seconds=st.none() | st.floats(), max_staleness=st.none() | int64s),
       policy=enum_values(pb.NonFinitePolicy))
def test_random_training_modes_are_refused_or_accepted_cleanly(world: World, mode, policy: int) -> None:
    """Out-of-range enums, negative counts, NaN/Inf/negative timeouts: INVALID_ARGUMENT, never INTERNAL."""
    name = fresh_name()
    header = pb.CreateOptimizerHeader(name=name, tensors=[SMALL], training_mode=mode, non_finite_policy=policy)
    before = world.state()
    err = rpc_error(create_call(world.stub, header, [bytes(8)]))
    if err is None:
        assert valid_mode(mode, policy), "accepted a training mode the contract forbids"
        world.client.optimizer(name)
        world.client.delete_optimizer(name)
    else:
        assert_refused(err, {Code.INVALID_ARGUMENT})
    world.assert_unchanged(before)


def read_pull(stub, request: pb.PullWeightsRequest, timeout: float) -> None:
    """Reads a whole pull and checks its framing: one header, then exactly the declared float32 bytes."""
    header, *chunks = stub.PullWeights(request, timeout=timeout)
    assert header.WhichOneof("part") == "header" and all(c.WhichOneof("part") == "chunk" for c in chunks)
    wanted = list(request.names) or list(SHAPES)
    assert [(t.name, tuple(t.shape), t.dtype) for t in header.header.tensors] == [
        (n, SHAPES[n], pb.DATA_TYPE_FLOAT32) for n in wanted]
    assert sum(len(c.chunk) for c in chunks) == 4 * sum(math.prod(SHAPES[n]) for n in wanted)


@fuzz(60)
@given(all_slots=st.booleans(), kind=enum_values(pb.StateKind), names=st.lists(tensor_names, max_size=5),
       min_version=st.none() | st.integers(-3, 4) | int64s)
def test_random_pulls_are_refused_cleanly_or_read_a_whole_snapshot(world: World, all_slots, kind, names,
                                                                    min_version) -> None:
    """Random kinds, names (unknown, repeated, unicode) and min_versions: the right refusal, or a whole pull."""
    opt = world.target if all_slots else world.plain
    before = world.state()
    faults = set()
    if kind not in pb.StateKind.values():
        faults.add(Code.INVALID_ARGUMENT)
    elif not all_slots and kind in (pb.STATE_KIND_EMA, pb.STATE_KIND_VHAT):
        faults.add(Code.FAILED_PRECONDITION)
    if any(name not in SHAPES for name in names):
        faults.add(Code.NOT_FOUND)
    if len(set(names)) != len(names):
        faults.add(Code.INVALID_ARGUMENT)
    if min_version is not None and min_version > before[f"{opt.name}/version"]:
        faults.add(Code.DEADLINE_EXCEEDED)  # waits for a version that never comes: a short deadline
    request = pb.PullWeightsRequest(optimizer=opt.name, kind=kind, names=names, min_version=min_version)
    err = rpc_error(lambda: read_pull(world.stub, request, 0.2 if Code.DEADLINE_EXCEEDED in faults else TIMEOUT))
    if faults:
        assert_refused(err, faults)
    else:
        assert err is None, f"{err.code().name}: {err.details()}"
    world.assert_unchanged(before)


def hold_open(messages: list, release: threading.Event) -> Iterator:
    """Yields the messages, then keeps the stream open (never half-closes) until `release` is set."""
    yield from messages
    release.wait(TIMEOUT)


def settled(world: World, rpc: str, name: str, before: dict, wait: float = 0.5) -> dict:
    """The state once a cancelled call's handler is done: its effect, if any, lands within milliseconds."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if rpc == "create" and name in world.names():
            break
        if rpc == "push" and world.target.info().version != before[f"{TARGET}/version"]:
            break
        time.sleep(0.02)
    return world.state()


@fuzz(25)
@given(rpc=st.sampled_from(["push", "create"]), sent=st.integers(0, FULL_BYTES), data=st.data(),
       delay=st.floats(0, 0.05))
def test_calls_cancelled_mid_stream_change_nothing_or_apply_whole(world: World, rpc: str, sent: int, data,
                                                                  delay: float) -> None:
    """A client that sends a header and some bytes, then cancels before closing the stream, leaves no trace.

    Once every byte is sent, a cancel is like a lost reply: gRPC's Python server
    can see the stream end before it learns of the cancel (its receive callback
    marks the stream closed, the cancel arrives a moment later), so the call may
    take effect, but only whole. This happened in about 1 of 10 such calls here.
    """
    specs, payload = encode(zero_grads())
    chunks = data.draw(splits(payload[:sent]), label="chunks")
    name = fresh_name()
    if rpc == "push":
        request, method = pb.PushGradientsRequest, world.stub.PushGradients
        header = pb.PushHeader(optimizer=world.target.name, gradients=specs)
    else:
        request, method = pb.CreateOptimizerRequest, world.stub.CreateOptimizer
        header = pb.CreateOptimizerHeader(name=name, tensors=param_specs())
    messages = [request(header=header)] + [request(chunk=chunk) for chunk in chunks]
    before = world.state()
    release = threading.Event()
    future = method.future(hold_open(messages, release), timeout=TIMEOUT)
    time.sleep(delay)
    cancelled = future.cancel()
    release.set()
    assert cancelled and future.code() == Code.CANCELLED, "the call ended before the client cancelled it"
    if sent < FULL_BYTES:
        world.assert_unchanged(before)
        return
    after = settled(world, rpc, name, before)
    if after == before:
        return
    changed = {key for key in before.keys() | after.keys() if before.get(key) != after.get(key)}
    if rpc == "create":  # the whole optimizer, with the zeros that were sent
        assert changed == {"optimizers"} and set(after["optimizers"]) - set(before["optimizers"]) == {name}
        created = world.client.optimizer(name).pull()
        for tensor, shape in SHAPES.items():
            np.testing.assert_array_equal(created[tensor], np.zeros(shape, np.float32))
        world.client.delete_optimizer(name)
    else:  # exactly one step on the target, nothing elsewhere
        assert all(key.startswith(f"{TARGET}/") for key in changed), changed
        versions = [(state[f"{TARGET}/version"], state[f"{TARGET}/iterations"]) for state in (before, after)]
        assert versions[1] == (versions[0][0] + 1, versions[0][1] + 1)


def keras_step_stays_finite(opt, grads: dict) -> bool:
    """Whether the engine's step (the server's checked one) from the optimizer's current state keeps it finite."""
    slots = {"params": opt.pull(), "m": opt.pull_slot("m"), "v": opt.pull_slot("v"), "vhat": opt.pull_slot("vhat"),
             "ema": opt.pull(ema=True)}
    state = pipeline.restore(opt.info().iterations, slots)
    device = {name: pipeline.sparse_grad(np.asarray(g.indices), np.asarray(g.values)) if isinstance(g, IndexedSlices)
              else np.asarray(g) for name, g in grads.items()}
    _, finite = pipeline.make_checked_step(parse_config(CONFIG), list(SHAPES))(state, device)
    return bool(np.asarray(finite).all())


@fuzz(25)
@given(grads=gradients(), data=st.data())
def test_valid_pushes_with_random_finite_gradients_bump_the_version_by_one(world: World, grads, data) -> None:
    """Finite values of any magnitude (subnormals too), dense or sparse, any float dtype, chunked anyhow: one step,
    unless that step would make the state non-finite: then INVALID_ARGUMENT and no change (policy "refuse")."""
    specs, payload = encode(grads)
    before = world.steps.info()
    stays_finite = keras_step_stays_finite(world.steps, grads)
    call = push_call(world.stub, pb.PushHeader(optimizer=world.steps.name, gradients=specs),
                     data.draw(splits(payload), label="chunks"))
    if not stays_finite:
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == Code.INVALID_ARGUMENT and "non-finite" in caught.value.details()
        after = world.steps.info()
        assert (after.version, after.iterations) == (before.version, before.iterations)
        return
    reply = call()
    assert (reply.version, reply.iterations, reply.duplicate) == (before.version + 1, before.iterations + 1, False)
    after = world.steps.info()
    assert (after.version, after.iterations) == (before.version + 1, before.iterations + 1)
    assert all(np.isfinite(array).all() for array in world.steps.pull().values())


# --- undecodable protobuf ------------------------------------------------------------

def _methods() -> dict[str, tuple[type, bool, bool]]:
    """Every method the server serves: path -> (request class, request streaming, response streaming)."""
    methods = {}
    for file, service in [(pb.DESCRIPTOR, "OptimizerService"), (health_pb2.DESCRIPTOR, "Health"),
                          (reflection_pb2.DESCRIPTOR, "ServerReflection")]:
        descriptor = file.services_by_name[service]
        for method in descriptor.methods:
            methods[f"/{descriptor.full_name}/{method.name}"] = (
                message_factory.GetMessageClass(method.input_type), method.client_streaming, method.server_streaming)
    return methods


METHODS = _methods()


def undecodable(request_class: type, data: bytes) -> bool:
    """Whether the server's parser for `request_class` refuses `data` (tensor streams parse chunks by hand)."""
    parse = request_class.FromString
    if request_class in (pb.CreateOptimizerRequest, pb.PushGradientsRequest):
        parse = stream_message_parser(request_class)
    try:
        parse(data)
    except DecodeError:
        return True
    return False


# Bytes protobuf refuses: a truncated length or varint, field number 0, wire types 6 and 7, a stray end-group.
garbage = st.one_of(
    st.tuples(st.sampled_from([b"\x0a", b"\x12", b"\x1a"]), st.integers(2, 2**20), st.binary(max_size=8)).map(
        lambda t: t[0] + bytes(encode_varint(t[1])) + t[2]),
    st.tuples(st.sampled_from([b"\x00", b"\x06", b"\x07", b"\x0e", b"\x0f", b"\x0c", b"\x08\xff"]),
              st.binary(max_size=16)).map(b"".join),
    st.binary(min_size=1, max_size=64),
)


def encode_varint(value: int) -> bytearray:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return out


def send_raw(channel: grpc.Channel, method: str, messages: list[bytes]) -> grpc.RpcError | None:
    """Sends `messages` (one for a unary request) as they are, with identity serializers."""
    _, request_streaming, response_streaming = METHODS[method]
    kind = {(False, False): channel.unary_unary, (True, False): channel.stream_unary,
            (False, True): channel.unary_stream, (True, True): channel.stream_stream}[request_streaming,
                                                                                     response_streaming]
    call = kind(method)
    request = iter(messages) if request_streaming else messages[0]
    if response_streaming:
        return rpc_error(lambda: list(call(request, timeout=TIMEOUT)))
    return rpc_error(lambda: call(request, timeout=TIMEOUT))


@fuzz(120)
@given(method=st.sampled_from(sorted(METHODS)), junk=garbage, valid_first=st.booleans())
def test_undecodable_protobuf_is_invalid_argument_for_every_method(world: World, caplog, method: str, junk: bytes,
                                                                   valid_first: bool) -> None:
    request_class, request_streaming, _ = METHODS[method]
    assume(undecodable(request_class, junk))
    messages = [junk]
    if request_streaming and valid_first:  # a stream whose second message is the bad one
        first = {"/optserve.v1.OptimizerService/PushGradients": pb.PushGradientsRequest(
            header=pb.PushHeader(optimizer=TARGET, gradients=encode(dict(PARAMS))[0])),
                 "/optserve.v1.OptimizerService/CreateOptimizer": pb.CreateOptimizerRequest(
            header=pb.CreateOptimizerHeader(name=fresh_name(), tensors=[SMALL]))}.get(method, request_class())
        messages = [first.SerializeToString(), junk]
    before = world.state()
    caplog.clear()
    err = send_raw(world.client._channel, method, messages)
    assert err is not None and err.code() == Code.INVALID_ARGUMENT, (err and err.code(), err and err.details())
    assert (f"requests[{len(messages) - 1}]: " if request_streaming else "request: ") in err.details()
    assert "undecodable protobuf message" in err.details()
    assert "Exception deserializing" not in caplog.text and "Traceback" not in caplog.text
    world.assert_unchanged(before)


def test_undecodable_protobuf_leaves_no_traceback_in_a_server_process_log() -> None:
    with ServerProcess([], log=open(os.devnull, "w")) as process, grpc.insecure_channel(process.address) as channel:
        for method in sorted(METHODS):
            for junk in (b"\x0a\xff\xff", b"\x12\x05ab", b"\x07", b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"):
                err = send_raw(channel, method, [junk])
                assert err is not None and err.code() == Code.INVALID_ARGUMENT, (method, junk, err and err.details())
                assert "undecodable protobuf message" in err.details(), (method, junk, err.details())
        Client(process.address, timeout=TIMEOUT).close()  # still serving
    log = "".join(process.lines)
    assert "Exception deserializing" not in log and "Traceback" not in log, log


# --- names of every character class, and weight-decay patterns as Keras matches them ---

tensor_name_texts = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=40) | st.sampled_from(
    ["x", "x.npy", "x.npy.npy", "a\0b", "a", "\0", "meta", "params/x", "../x", "m/0", " ", "\n", "名前", "🙂"])


@fuzz(40)
@example(names=["x", "x.npy"])
@example(names=["a\0b", "a"])
@given(names=st.lists(tensor_name_texts, min_size=1, max_size=4, unique=True))
def test_any_tensor_names_are_kept_exactly(world: World, names: list[str]) -> None:
    """Tensor names of every character class are distinct tensors: created, pushed and pulled by exactly that name."""
    params = {tensor: np.full((2,), index, np.float32) for index, tensor in enumerate(names)}
    opt = world.client.create_optimizer(fresh_name(), params, {"learning_rate": 0.5})
    try:
        assert list(opt.info().tensors) == names
        opt.push({tensor: np.full((2,), index + 1, np.float32) for index, tensor in enumerate(names)})
        pulled = opt.pull()
        assert list(pulled) == names
        for index, tensor in enumerate(names):  # Adam's first step moves each weight by -lr, whatever its gradient
            np.testing.assert_allclose(pulled[tensor], np.full((2,), index - 0.5, np.float32), rtol=0, atol=1e-5)
    finally:
        world.client.delete_optimizer(opt.name)


decay_pattern_parts = st.sampled_from(["a", "b", "k", ".", "*", "+", "?", "|", "(", ")", "[ab]", "^", "$", "\\d",
                                       "{2}", "kernel", "bias", "/", "\\", "[", "0"])
decay_patterns = st.lists(decay_pattern_parts, min_size=1, max_size=7).map("".join)
decayed_names = st.text(alphabet="ab/0kernelbias_.", min_size=1, max_size=12)


@fuzz(40)
@example(patterns=["bias"], names=["dense/bias", "dense/kernel"])
@example(patterns=["("], names=["a"])
@example(patterns=["a.b", "^k"], names=["a.b", "axb", "kernel", "bk"])
@given(patterns=st.lists(decay_patterns, min_size=1, max_size=3), names=st.lists(decayed_names, min_size=1, max_size=4,
                                                                                 unique=True))
def test_weight_decay_patterns_exclude_exactly_what_re_search_finds(world: World, patterns: list[str],
                                                                   names: list[str]) -> None:
    """`exclude_from_weight_decay` means Keras's `re.search`; a pattern `re` cannot compile is INVALID_ARGUMENT.

    With zero gradients Adam moves nothing, so after one step a weight is decayed
    (1 - lr * wd) exactly when no pattern is found in its name.
    """
    config = {"learning_rate": 0.1, "weight_decay": 0.5, "exclude_from_weight_decay": patterns}
    params = {tensor: np.ones((2,), np.float32) for tensor in names}
    try:
        compiled = [re.compile(pattern) for pattern in patterns]
    except re.error:
        before = world.state()
        assert_refused(rpc_error(lambda: world.client.create_optimizer(fresh_name(), params, config)),
                       {Code.INVALID_ARGUMENT})
        world.assert_unchanged(before)
        return
    opt = world.client.create_optimizer(fresh_name(), params, config)
    try:
        opt.push({tensor: np.zeros((2,), np.float32) for tensor in names})
        pulled = opt.pull()
        for tensor in names:
            excluded = any(pattern.search(tensor) for pattern in compiled)
            expected = np.float32(1) if excluded else np.float32(1) - np.float32(1) * np.float32(0.5) * np.float32(0.1)
            assert pulled[tensor][0] == expected, (tensor, patterns, excluded, pulled[tensor])
    finally:
        world.client.delete_optimizer(opt.name)
