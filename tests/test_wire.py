"""The chunked wire format: chunk boundaries, large tensors, and every accepted dtype."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from optserve.client import Client, IndexedSlices
from optserve.wire.chunks import CHUNK_BYTES, encode_stream, iter_chunks, stream_message_parser
from optserve.wire.layout import ALIGNMENT, ChunkBuffer
from optserve.v1 import optserve_pb2 as pb


@pytest.mark.parametrize("sizes", [[0], [1], [CHUNK_BYTES], [CHUNK_BYTES + 1], [3, CHUNK_BYTES - 3, 5],
                                   [CHUNK_BYTES // 2] * 5, [0, 7, 0]])
def test_chunks_are_full_except_the_last_and_carry_every_byte_in_order(sizes: list[int]) -> None:
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    chunks = [b"".join(parts) for parts in iter_chunks(arrays)]
    assert all(len(c) == CHUNK_BYTES for c in chunks[:-1])
    assert all(0 < len(c) <= CHUNK_BYTES for c in chunks)
    assert b"".join(chunks) == b"".join(a.tobytes() for a in arrays)


@pytest.mark.parametrize("chunk_size", [1, 3, 64, 1000])
def test_chunk_buffer_places_each_tensor_aligned_whatever_the_chunk_boundaries(chunk_size: int) -> None:
    rng = np.random.default_rng(3)
    sizes = [5, 0, 64, 130, 0, 1, 77]
    parts = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    stream = b"".join(p.tobytes() for p in parts)
    buffer = ChunkBuffer(sizes, ValueError)
    for start in range(0, len(stream), chunk_size):
        buffer.write(stream[start:start + chunk_size])
    assert buffer.filled == buffer.total == sum(sizes)
    for index, part in enumerate(parts):
        np.testing.assert_array_equal(buffer.view(index, pb.DATA_TYPE_INT32, (0,)).shape, (0,))
        got = buffer.data[buffer.offsets[index]:buffer.offsets[index] + len(part)]
        np.testing.assert_array_equal(got, part)
        assert buffer.data[buffer.offsets[index]:].ctypes.data % ALIGNMENT == 0


def test_a_reused_buffer_leaks_nothing_of_the_previous_push_into_the_next() -> None:
    shared = np.full(256, 0xAB, np.uint8)  # what the last push left behind
    buffer = ChunkBuffer([8, 8], ValueError, shared)
    buffer.write(np.arange(4, dtype="<f4").tobytes())
    np.testing.assert_array_equal(buffer.view(0, pb.DATA_TYPE_FLOAT32, (2,)), [0, 1])
    np.testing.assert_array_equal(buffer.view(1, pb.DATA_TYPE_FLOAT32, (2,)), [2, 3])


@pytest.mark.parametrize("sizes", [[], [0], [5], [CHUNK_BYTES + 3, 7], [127, 128, 300]])
def test_hand_made_stream_encoding_is_byte_for_byte_protobuf(sizes: list[int]) -> None:
    """Other clients use protobuf: the fast path must produce and accept exactly its bytes."""
    rng = np.random.default_rng(6)
    arrays = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    header = pb.PushHeader(optimizer="m", gradients=[pb.GradientSpec(name="w", dtype=pb.DATA_TYPE_FLOAT32)])
    encoded = list(encode_stream(header, arrays, chunk_bytes=100))
    protobuf = [pb.PushGradientsRequest(header=header).SerializeToString()] + [
        pb.PushGradientsRequest(chunk=b"".join(parts)).SerializeToString() for parts in iter_chunks(arrays, 100)]
    assert encoded == protobuf
    parse = stream_message_parser(pb.PushGradientsRequest)
    parsed = [parse(message) for message in protobuf]
    assert parsed[0].WhichOneof("part") == "header" and parsed[0].header == header
    assert all(p.WhichOneof("part") == "chunk" for p in parsed[1:])
    assert b"".join(bytes(p.chunk) for p in parsed[1:]) == b"".join(a.tobytes() for a in arrays)


def test_chunk_buffer_refuses_bytes_beyond_the_declared_size() -> None:
    buffer = ChunkBuffer([8], ValueError)
    buffer.write(b"\1" * 6)
    with pytest.raises(ValueError, match="10 bytes received, more than the 8"):
        buffer.write(b"\2" * 4)
    assert buffer.filled == 6


def test_big_endian_arrays_travel_as_little_endian() -> None:
    big = np.arange(4, dtype=">f4")
    assert b"".join(b"".join(parts) for parts in iter_chunks([big])) == np.arange(4, dtype="<f4").tobytes()


def test_tensors_larger_than_a_chunk_round_trip_exactly(client: Client, name: str) -> None:
    rng = np.random.default_rng(1)
    params = {"big": rng.normal(size=(1024, 1500)).astype(np.float32),  # ~5.9 MiB: six chunks
              "odd": rng.normal(size=(7, 3)).astype(np.float32),
              "scalar": np.float32(2.5)}
    opt = client.create_optimizer(name, params, {"learning_rate": 1e-3})
    pulled = opt.pull()
    for key, value in params.items():
        np.testing.assert_array_equal(pulled[key], value)
    assert pulled["scalar"].shape == ()
    assert opt.pull(names=["odd", "scalar"]).keys() == {"odd", "scalar"}
    client.delete_optimizer(name)


def test_float16_bfloat16_and_jax_gradients_equal_their_float32_upcast(client: Client, name: str) -> None:
    rng = np.random.default_rng(2)
    init = {"a": rng.normal(size=(5, 4)).astype(np.float32), "emb": rng.normal(size=(6, 3)).astype(np.float32)}
    low = {"a": rng.normal(size=(5, 4)).astype(ml_dtypes.bfloat16),
           "emb": IndexedSlices(np.array([1, 4, 1], np.int32), rng.normal(size=(3, 3)).astype(np.float16))}
    full = {"a": low["a"].astype(np.float32),
            "emb": IndexedSlices(low["emb"].indices.astype(np.int64), low["emb"].values.astype(np.float32))}
    opt_low = client.create_optimizer(name + "-low", init, {"learning_rate": 0.01})
    opt_full = client.create_optimizer(name + "-full", init, {"learning_rate": 0.01})
    opt_low.push(low)
    opt_full.push(full)
    opt_low.push({"a": jnp.ones((5, 4)), "emb": np.zeros((6, 3), np.float64)})  # JAX and float64 arrays
    opt_full.push({"a": np.ones((5, 4), np.float32), "emb": np.zeros((6, 3), np.float32)})
    for key in init:
        np.testing.assert_array_equal(opt_low.pull()[key], opt_full.pull()[key])
    client.delete_optimizer(opt_low.name)
    client.delete_optimizer(opt_full.name)


def test_bfloat16_rounding_matches_ml_dtypes_bit_for_bit() -> None:
    from optserve.wire.dtypes import to_bfloat16_bits

    rng = np.random.default_rng(4)
    special = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, 3.4e38, -3.4e38, 1e-40, -1e-45, 1.00390625,
                        1.01171875, 65504.0, np.finfo(np.float32).max], np.float32)
    values = np.concatenate([special, rng.normal(size=10_000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 10_000)])
    want = values.astype(ml_dtypes.bfloat16).view(np.uint16)
    np.testing.assert_array_equal(to_bfloat16_bits(values), want)
    nan = to_bfloat16_bits(np.array([np.nan, -np.nan], np.float32)).view(ml_dtypes.bfloat16)
    assert np.isnan(nan.astype(np.float32)).all()


@pytest.mark.parametrize("wire_dtype,cast", [("bfloat16", ml_dtypes.bfloat16), ("float16", np.float16)])
def test_push_with_a_half_width_wire_equals_pushing_the_rounded_gradient(client: Client, name: str, wire_dtype,
                                                                      cast) -> None:
    rng = np.random.default_rng(5)
    init = {"a": rng.normal(size=(6, 5)).astype(np.float32), "emb": rng.normal(size=(4, 2)).astype(np.float32)}
    grads = {"a": rng.normal(size=(6, 5)).astype(np.float32),
             "emb": IndexedSlices(np.array([0, 3, 0]), rng.normal(size=(3, 2)).astype(np.float32))}
    rounded = {"a": grads["a"].astype(cast), "emb": IndexedSlices(grads["emb"].indices, grads["emb"].values.astype(cast))}
    wired = client.create_optimizer(name + "-wire", init, {"learning_rate": 0.01})
    manual = client.create_optimizer(name + "-manual", init, {"learning_rate": 0.01})
    wired.push(grads, wire_dtype=wire_dtype)
    manual.push(rounded)
    for key in init:
        np.testing.assert_array_equal(wired.pull()[key], manual.pull()[key])
    client.delete_optimizer(wired.name)
    client.delete_optimizer(manual.name)


def test_pull_into_an_earlier_pull_overwrites_its_buffer_with_the_new_weights(client: Client, name: str) -> None:
    init = {"a": np.zeros((300, 1000), np.float32), "b": np.zeros(7, np.float32), "c": np.zeros(0, np.float32)}
    opt = client.create_optimizer(name, init, {"learning_rate": 0.5})
    reused = opt.pull()
    opt.push({"a": np.ones((300, 1000), np.float32), "b": -np.ones(7, np.float32), "c": np.zeros(0, np.float32)})
    fresh = opt.pull()
    pulled = opt.pull(into=reused)
    assert pulled.version == fresh.version == 1
    for tensor in init:
        np.testing.assert_array_equal(pulled[tensor], fresh[tensor])
        np.testing.assert_array_equal(reused[tensor], fresh[tensor])  # the same memory, overwritten
    assert np.shares_memory(pulled["a"], reused["a"]) and not np.shares_memory(pulled["a"], fresh["a"])
    only_b = opt.pull(names=["b"])
    before = reused["a"].copy()
    with pytest.raises(ValueError, match="into: holds tensors"):
        opt.pull(names=["b"], into=reused)  # other tensors: refused before a byte is written
    np.testing.assert_array_equal(reused["a"], before)
    with pytest.raises(ValueError, match="into: must be the Weights returned by an earlier pull"):
        opt.pull(into={"b": np.zeros(7, np.float32)})
    np.testing.assert_array_equal(opt.pull(names=["b"], into=only_b)["b"], fresh["b"])
    client.delete_optimizer(name)


def test_the_shared_dtype_codes_are_the_protos() -> None:
    """optserve.wire spells the DataType numbers out (no protobuf import); they must be the proto's."""
    from optserve.wire import dtypes

    for name in ("float32", "float16", "bfloat16", "float64", "int32", "int64"):
        assert getattr(dtypes, name.upper()) == getattr(pb, f"DATA_TYPE_{name.upper()}")
        assert dtypes.dtype_name(getattr(pb, f"DATA_TYPE_{name.upper()}")) == name
    assert dtypes.dtype_name(pb.DATA_TYPE_UNSPECIFIED) == "unspecified"


DOMAIN_MODULES = ["registry", "optimizer", "modes", "storage", "overflow", "patterns", "buffers", "engine"]


def test_domain_code_imports_neither_the_generated_protos_nor_the_client() -> None:
    """Layering: the server's domain modules (and the shared wire package) see no transport code."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    files = [root / "wire"] + [root / "server" / f"{m}.py" for m in DOMAIN_MODULES if m != "engine"]
    files = [f for path in files + [root / "server" / "engine"] for f in ([path] if path.is_file() else path.glob("*.py"))]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith(("optserve.v1", "optserve.client", "grpc", "google.protobuf")) or (
                    path.parent.name == "wire" and name == "google.protobuf.message"), f"{path.name} imports {name}"
