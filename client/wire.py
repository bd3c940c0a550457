"""The wire format shared by client and server: dtypes and chunked byte streams.

A stream carries one header, then chunks whose bytes, concatenated, are the
tensors' raw little-endian bytes in header order (proto/optserve/v1). Senders
cut that byte string into chunks of at most CHUNK_BYTES; receivers write the
chunks into one preallocated buffer and view the tensors out of it.
"""

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from google.protobuf.message import Message

from optserve.v1 import optserve_pb2 as pb

CHUNK_BYTES = 1 << 20  # 1 MiB: fastest in measurements, far below gRPC's 4 MiB cap

_NUMPY_NAMES = {
    pb.DATA_TYPE_FLOAT32: "<f4",
    pb.DATA_TYPE_FLOAT16: "<f2",
    pb.DATA_TYPE_BFLOAT16: "bfloat16",
    pb.DATA_TYPE_FLOAT64: "<f8",
    pb.DATA_TYPE_INT32: "<i4",
    pb.DATA_TYPE_INT64: "<i8",
}
ITEMSIZE = {
    pb.DATA_TYPE_FLOAT32: 4,
    pb.DATA_TYPE_FLOAT16: 2,
    pb.DATA_TYPE_BFLOAT16: 2,
    pb.DATA_TYPE_FLOAT64: 8,
    pb.DATA_TYPE_INT32: 4,
    pb.DATA_TYPE_INT64: 8,
}


def dtype_name(data_type: int) -> str:
    """Short lower-case name of a DataType, for messages ("float32")."""
    if data_type not in pb.DataType.values():
        return f"unknown dtype {data_type}"
    return pb.DataType.Name(data_type).removeprefix("DATA_TYPE_").lower()


def numpy_dtype(data_type: int) -> np.dtype:
    """NumPy dtype of a DataType; bfloat16 needs ml_dtypes (a JAX dependency)."""
    name = _NUMPY_NAMES[data_type]
    if name == "bfloat16":
        import ml_dtypes  # only the server and bfloat16 senders need it

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def data_type_of(dtype: np.dtype) -> int:
    """DataType of a NumPy dtype; raises TypeError for one the wire lacks."""
    dtype = np.dtype(dtype)
    if dtype.name == "bfloat16":
        return pb.DATA_TYPE_BFLOAT16
    for data_type, name in _NUMPY_NAMES.items():
        if name != "bfloat16" and dtype.newbyteorder("<") == np.dtype(name):
            return data_type
    raise TypeError(f"dtype {dtype} cannot be sent; use float32, float16, bfloat16, int32 or int64")


def to_bfloat16(array: np.ndarray) -> np.ndarray:
    """Float values rounded to bfloat16 (nearest even): ml_dtypes' fast cast when it is installed
    (it comes with JAX), else `to_bfloat16_bits`, which gives the same bits as uint16."""
    try:
        import ml_dtypes
    except ImportError:
        return to_bfloat16_bits(array)
    return np.asarray(array, dtype=np.float32).astype(ml_dtypes.bfloat16)


def to_bfloat16_bits(array: np.ndarray, block: int = 1 << 16) -> np.ndarray:
    """The bfloat16 bit patterns (uint16) of float values, rounded to nearest even, NaN kept NaN.

    bfloat16 is the top half of a float32, so rounding is integer arithmetic on
    the float32 bits, done block by block in one small temporary (cache-sized,
    no page faults): no ml_dtypes needed.
    """
    bits = np.ascontiguousarray(array, dtype=np.float32).reshape(-1).view(np.uint32)
    out = np.empty(bits.size, np.uint16)
    scratch = np.empty(min(block, bits.size), np.uint32)
    for start in range(0, bits.size, block):
        part = bits[start:start + block]
        rounded = scratch[:len(part)]
        np.right_shift(part, 16, out=rounded)
        rounded &= 1  # the lowest kept bit: ties go to even
        rounded += 0x7FFF
        rounded += part
        rounded >>= 16
        out[start:start + len(part)] = rounded
    nan = np.isnan(np.asarray(array, dtype=np.float32).reshape(-1))
    if nan.any():  # rounding could carry a NaN's payload into infinity: keep it a quiet NaN
        out[nan] = (bits[nan] >> 16) | 0x0040
    return out.reshape(np.shape(array))


def as_little_endian(array: np.ndarray) -> np.ndarray:
    """The array as C-contiguous little-endian data, copied only when needed."""
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array


def iter_chunks(arrays: Iterable[np.ndarray], chunk_bytes: int = CHUNK_BYTES) -> Iterator[list[memoryview]]:
    """Cuts the arrays' bytes, back to back, into chunks of `chunk_bytes`, each a list of views.

    A chunk may span the end of one array and the start of the next; only the
    last chunk is shorter. Nothing is copied here.
    """
    pending: list[memoryview] = []
    pending_bytes = 0
    for array in arrays:
        view = memoryview(as_little_endian(array).reshape(-1).view(np.uint8))  # also for float16/bfloat16
        while len(view):
            take = min(len(view), chunk_bytes - pending_bytes)
            pending.append(view[:take])
            pending_bytes += take
            view = view[take:]
            if pending_bytes == chunk_bytes:
                yield pending
                pending, pending_bytes = [], 0
    if pending_bytes:
        yield pending


# Every streamed message (CreateOptimizerRequest, PushGradientsRequest, PullWeightsResponse) is
# `oneof part { Header header = 1; bytes chunk = 2; }`. These encode and decode them by hand, byte
# for byte as protobuf does, so that a chunk's bytes are copied once into its message when sent
# and not at all when received: protobuf would copy twice on each side.
_HEADER_KEY = b"\x0a"  # field 1, length-delimited
_CHUNK_KEY = b"\x12"  # field 2, length-delimited


def encode_stream(header: Message, arrays: Iterable[np.ndarray], chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The serialized messages of a stream: the header, then the arrays' bytes in chunks."""
    payload = header.SerializeToString()
    yield _HEADER_KEY + _varint(len(payload)) + payload
    for parts in iter_chunks(arrays, chunk_bytes):
        yield b"".join([_CHUNK_KEY, _varint(sum(len(part) for part in parts)), *parts])


class Chunk:
    """A received chunk message: `chunk` is a view into the received bytes (no copy)."""

    __slots__ = ("chunk",)

    def __init__(self, chunk: memoryview):
        self.chunk = chunk

    def WhichOneof(self, oneof: str) -> str:  # noqa: N802 (the protobuf message API)
        return "chunk"


def stream_message_parser(message_class: type[Message]) -> Callable[[bytes], Any]:
    """A gRPC deserializer for `message_class`: chunks as `Chunk` views, anything else through protobuf."""

    def parse(data: bytes) -> Any:
        if data[:1] == _CHUNK_KEY:
            size, offset = _read_varint(data, 1)
            if offset + size == len(data):
                return Chunk(memoryview(data)[offset:])
        return message_class.FromString(data)

    return parse


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: bytes, offset: int) -> tuple[int, int]:
    """(value, offset after it); a truncated varint gives a size that matches nothing."""
    value, shift = 0, 0
    while offset < len(data) and shift < 64:
        byte = data[offset]
        value |= (byte & 0x7F) << shift
        offset += 1
        if not byte & 0x80:
            return value, offset
        shift += 7
    return -1, offset


ALIGNMENT = 64  # bytes: JAX on the CPU adopts 64-byte-aligned NumPy arrays without copying them


def aligned_empty(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 buffer whose data starts at a multiple of ALIGNMENT."""
    raw = np.empty(nbytes + ALIGNMENT, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start:start + nbytes]


def padded_size(nbytes: int) -> int:
    """`nbytes` rounded up to a multiple of ALIGNMENT."""
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


class ChunkBuffer:
    """Receives a stream's chunks into one buffer, each tensor at an ALIGNMENT-aligned offset.

    `sizes` are the byte sizes of the tensors, in stream order. `buffer` (at
    least `padded_bytes(sizes)` long and aligned) is written into when given,
    so a caller can reuse it; else a fresh one is made. Or `reserve(extent,
    total)` supplies the buffer as the bytes arrive: it returns an aligned
    buffer of at least `extent` of the `total` bytes needed, possibly moved
    (the old one is dropped first), and is first called with extent 0.
    `overrun_error` is the exception class raised when the chunks overrun the
    declared size, so each side reports it with its own error type.
    """

    def __init__(self, sizes: Sequence[int], overrun_error: type[Exception], buffer: np.ndarray | None = None,
                 reserve: Callable[[int, int], np.ndarray] | None = None):
        self.offsets = [0]
        for size in sizes[:-1]:
            self.offsets.append(self.offsets[-1] + padded_size(size))
        self.total = sum(sizes)  # bytes the stream carries
        self._reserve = reserve
        if reserve is not None:
            self.data = reserve(0, padded_bytes(sizes))
        else:
            self.data = aligned_empty(padded_bytes(sizes)) if buffer is None else buffer
        self.filled = 0
        self._sizes = list(sizes)
        self._ends = list(itertools.accumulate(sizes))  # stream offset just past each tensor
        self._tensor = 0  # the tensor the next byte belongs to
        self._overrun_error = overrun_error

    def write(self, chunk: bytes) -> None:
        """Scatters one chunk into the tensors it covers; refuses bytes beyond the declared total."""
        end = self.filled + len(chunk)
        if end > self.total:
            raise self._overrun_error(f"chunks: {end} bytes received, more than the {self.total} the header declares")
        if self._reserve is not None and end > self.filled:
            extent = self._extent(end)
            if extent > len(self.data):
                self.data = None  # the buffer may move as it grows: no view of it may be left
                self.data = self._reserve(extent, padded_bytes(self._sizes))
        data = np.frombuffer(chunk, dtype=np.uint8)
        position = self.filled
        while len(data):
            while position >= self._ends[self._tensor]:  # also skips empty tensors
                self._tensor += 1
            start_in_tensor = position - (self._ends[self._tensor] - self._sizes[self._tensor])
            take = min(len(data), self._ends[self._tensor] - position)
            destination = self.offsets[self._tensor] + start_in_tensor
            self.data[destination:destination + take] = data[:take]
            data, position = data[take:], position + take
        self.filled = end

    def _extent(self, end: int) -> int:
        """Buffer bytes that hold the stream's first `end` bytes (end > 0), padding included."""
        tensor = self._tensor
        while end > self._ends[tensor]:
            tensor += 1
        return self.offsets[tensor] + end - (self._ends[tensor] - self._sizes[tensor])

    def view(self, index: int, data_type: int, shape: tuple[int, ...]) -> np.ndarray:
        """Tensor `index` as an array of `shape` elements of `data_type`."""
        dtype = numpy_dtype(data_type)
        count = int(np.prod(shape, dtype=np.int64))
        if count == 0:
            return np.zeros(shape, dtype=dtype)
        return np.frombuffer(self.data, dtype=dtype, count=count, offset=self.offsets[index]).reshape(shape)


def padded_bytes(sizes: Sequence[int]) -> int:
    """Buffer bytes a ChunkBuffer needs for tensors of these sizes."""
    return sum(padded_size(size) for size in sizes)
