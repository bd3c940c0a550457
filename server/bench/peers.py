"""The reference peers a transfer is held against, each served by a child process of the bench.

`RawGrpc` is a bare gRPC service of 1 MB `bytes` chunks (on grpc's thread-pool
server or on `grpc.aio`), `RawTcp` a raw TCP peer over loopback.
"""

import asyncio
import multiprocessing
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from optserve.wire.chunks import CHUNK_BYTES
from optserve.server.bench.common import CLIENT_TIMEOUT

RAW_SERVICE = "optserve.bench.Raw"  # the bare gRPC service: /optserve.bench.Raw/Push and /Pull
RAW_OPTIONS = [("grpc.max_receive_message_length", 16 << 20), ("grpc.max_send_message_length", 16 << 20)]
SERVER_MODELS = ("threads", "aio")  # grpc.server on a thread pool; grpc.aio.server on an event loop


class RawGrpc:
    """A bare gRPC service of 1 MB `bytes` chunks in a child process, and a client for it.

    Push is client-streaming (the server counts the bytes), Pull server-streaming
    (the server slices chunks off a buffer it holds); no protobuf, no copies
    beyond the one a `bytes` chunk needs. `model` picks the child's server:
    "threads" (`grpc.server` on a thread pool) or "aio" (`grpc.aio.server`);
    the client is the same blocking channel for both.
    """

    def __init__(self, model: str = "threads"):
        import grpc

        if model not in SERVER_MODELS:
            raise ValueError(f"server model {model!r}: expected one of {SERVER_MODELS}")
        self.model = model
        self.process, port = _start_child(_serve_raw_grpc, model)
        self._channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=RAW_OPTIONS)
        self._push = self._channel.stream_unary(f"/{RAW_SERVICE}/Push")
        self._pull = self._channel.unary_stream(f"/{RAW_SERVICE}/Pull")

    def push(self, array: np.ndarray) -> float:
        """Seconds to stream the array's bytes in 1 MB chunks and get the count back."""
        view = memoryview(array.reshape(-1).view(np.uint8))
        chunks = (bytes(view[i:i + CHUNK_BYTES]) for i in range(0, len(view), CHUNK_BYTES))
        started = time.perf_counter()
        reply = self._push(chunks, timeout=CLIENT_TIMEOUT)
        elapsed = time.perf_counter() - started
        if int.from_bytes(reply, "little") != len(view):
            raise RuntimeError("bare gRPC push: the server counted a different number of bytes")
        return elapsed

    def pull(self, nbytes: int) -> float:
        """Seconds to receive `nbytes` in 1 MB chunks."""
        started = time.perf_counter()
        received = sum(len(chunk) for chunk in self._pull(nbytes.to_bytes(8, "little"), timeout=CLIENT_TIMEOUT))
        elapsed = time.perf_counter() - started
        if received != nbytes:
            raise RuntimeError(f"bare gRPC pull: {received} of {nbytes} bytes")
        return elapsed

    def close(self) -> None:
        """Closes the channel and ends the child process."""
        self._channel.close()
        _stop_child(self.process)


class RawTcp:
    """A raw TCP peer over loopback in a child process: receives into, or sends from, a buffer."""

    def __init__(self):
        self.process, port = _start_child(_serve_raw_tcp)
        self._sock = socket.create_connection(("127.0.0.1", port))
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = np.zeros(0, np.uint8)

    def push(self, array: np.ndarray) -> float:
        """Seconds to send the array's bytes and get the peer's acknowledgement."""
        view = memoryview(array.reshape(-1).view(np.uint8))
        started = time.perf_counter()
        self._sock.sendall(b"P" + len(view).to_bytes(8, "little"))
        self._sock.sendall(view)
        if _recv_exact(self._sock, 1) != b"k":
            raise RuntimeError("raw TCP push: no acknowledgement")
        return time.perf_counter() - started

    def pull(self, nbytes: int) -> float:
        """Seconds to receive `nbytes` into a buffer (allocated and touched beforehand)."""
        if len(self._buffer) < nbytes:
            self._buffer = np.ones(nbytes, np.uint8)
        view = memoryview(self._buffer)[:nbytes]
        started = time.perf_counter()
        self._sock.sendall(b"G" + nbytes.to_bytes(8, "little"))
        _recv_into(self._sock, view)
        return time.perf_counter() - started

    def close(self) -> None:
        """Closes the connection and ends the child process."""
        self._sock.close()
        _stop_child(self.process)


def _serve_raw_grpc(ports: Any, model: str) -> None:
    """Child process: the bare gRPC service (generic handlers, raw bytes in and out) on one server model."""
    import grpc

    handler = _raw_grpc_handler(model)
    if model == "aio":
        asyncio.run(_serve_aio(handler, ports))
        return
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[handler], options=RAW_OPTIONS)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    ports.put(port)
    server.wait_for_termination()


async def _serve_aio(handler: Any, ports: Any) -> None:
    import grpc

    server = grpc.aio.server(handlers=[handler], options=RAW_OPTIONS)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    ports.put(port)
    await server.wait_for_termination()


def _raw_grpc_handler(model: str) -> Any:
    """Push and Pull as plain functions for the thread pool, as coroutines for `grpc.aio`; the same bytes."""
    import grpc

    held = {"data": np.zeros(0, np.uint8)}

    def chunks_of(request: bytes) -> Iterator[bytes]:
        nbytes = int.from_bytes(request, "little")
        if len(held["data"]) < nbytes:
            held["data"] = np.ones(nbytes, np.uint8)
        view = memoryview(held["data"])[:nbytes]
        for start in range(0, nbytes, CHUNK_BYTES):
            yield bytes(view[start:start + CHUNK_BYTES])

    if model == "aio":
        async def push(chunks, context) -> bytes:
            total = 0
            async for chunk in chunks:
                total += len(chunk)
            return total.to_bytes(8, "little")

        async def pull(request: bytes, context):
            for chunk in chunks_of(request):
                yield chunk
    else:
        def push(chunks, context) -> bytes:
            return sum(len(chunk) for chunk in chunks).to_bytes(8, "little")

        def pull(request: bytes, context):
            yield from chunks_of(request)

    return grpc.method_handlers_generic_handler(RAW_SERVICE, {
        "Push": grpc.stream_unary_rpc_method_handler(push),
        "Pull": grpc.unary_stream_rpc_method_handler(pull),
    })


def _serve_raw_tcp(ports: Any) -> None:
    """Child process: one connection at a time; `P`+size receives that many bytes, `G`+size sends them."""
    listener = socket.create_server(("127.0.0.1", 0))
    ports.put(listener.getsockname()[1])
    buffer = np.zeros(0, np.uint8)
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while True:
                head = _recv_exact(conn, 9)
                if head is None:
                    break
                nbytes = int.from_bytes(head[1:], "little")
                if len(buffer) < nbytes:
                    buffer = np.ones(nbytes, np.uint8)
                view = memoryview(buffer)[:nbytes]
                if head[:1] == b"P":
                    _recv_into(conn, view)
                    conn.sendall(b"k")
                else:
                    conn.sendall(view)


def _recv_exact(sock: socket.socket, nbytes: int) -> bytes | None:
    data = bytearray(nbytes)
    got = 0
    while got < nbytes:
        n = sock.recv_into(memoryview(data)[got:])
        if n == 0:
            return None
        got += n
    return bytes(data)


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError(f"raw TCP: connection closed after {got} of {len(view)} bytes")
        got += n


def _start_child(target: Callable[..., None], *args: Any) -> tuple[Any, int]:
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no JAX, no inherited gRPC state
    ports = context.Queue()
    process = context.Process(target=target, args=(ports, *args), daemon=True)
    process.start()
    return process, ports.get(timeout=120)


def _stop_child(process: Any) -> None:
    process.terminate()
    process.join(10)
