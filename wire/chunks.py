"""Chunked byte streams: one header message, then chunks whose bytes are the tensors' raw bytes in order.

Senders cut the tensors' little-endian bytes, back to back, into chunks of at
most CHUNK_BYTES (proto/optserve/v1); receivers write them into one buffer
(`optserve.wire.layout.ChunkBuffer`) and view the tensors out of it.
"""

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
from google.protobuf.message import Message

from optserve.wire.dtypes import as_little_endian

CHUNK_BYTES = 1 << 20  # 1 MiB: fastest in measurements, far below gRPC's 4 MiB cap


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
