"""The client's bulk channels: tensor bytes on a TCP connection beside the gRPC call that names them.

A `BulkPool` keeps one idle channel per caller that has used one (so
concurrent callers never share), opens new ones with OpenBulkChannel (the
gRPC call carries the token; the connection is TLS, with the client
certificate, whenever the server's is), discards a channel after any error and
opens another transparently. A server without bulk channels (FAILED_PRECONDITION
or UNIMPLEMENTED on OpenBulkChannel) or a listener out of reach makes the pool
answer None: the caller then sends the bytes in the gRPC stream.
"""

import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
import numpy as np

from optserve.client.security import TLS
from optserve.wire.chunks import encode_stream
from optserve.wire.frames import ACK, FRAME, recv_exactly, send_frame
from optserve.wire.layout import ChunkBuffer
from optserve.v1 import optserve_pb2 as pb

log = logging.getLogger("optserve.client")

MAX_IDLE = 8  # idle channels kept for reuse
CONNECT_SECONDS = 3.0  # a listener that does not answer by then is taken as unreachable (a port not published)
RETRY_SECONDS = 60.0  # after that, calls go in the gRPC stream for this long before a channel is tried again
_NO_BULK = frozenset({grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED})  # the server has none


class Connection:
    """One bound bulk channel; its transfers are numbered 0, 1, ..."""

    def __init__(self, sock: socket.socket, channel: str):
        self.sock = sock
        self.channel = channel
        self._next = 0
        self._sending = False
        self._aborted = False
        self._lock = threading.Lock()

    def next_transfer(self) -> int:
        number, self._next = self._next, self._next + 1
        return number

    def send(self, number: int, arrays: Sequence[np.ndarray], deadline: float) -> None:
        """Sends one transfer; `abort` from another thread (the call failed) makes it raise at once."""
        with self._lock:
            if self._aborted:
                raise ConnectionAbortedError("the call ended before its bytes were sent")
            self._sending = True
        try:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
            send_frame(self.sock, number, arrays)
        finally:
            with self._lock:
                self._sending = False

    def abort_send(self) -> None:
        """Stops a send in progress or to come (its call failed: the server will not read the bytes)."""
        with self._lock:
            self._aborted = True
            if self._sending:
                _shutdown(self.sock)

    def receive(self, number: int, buffer: ChunkBuffer, deadline: float) -> None:
        """Receives transfer `number` straight into `buffer`; ConnectionError for a bad frame or a closed channel."""
        self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
        head = recv_exactly(self.sock, FRAME.size)
        if len(head) < FRAME.size:
            raise ConnectionError(f"bulk: the channel closed after {len(head)} bytes of a frame header")
        got, length = FRAME.unpack(head)
        if got != number or length != buffer.total:
            raise ConnectionError(f"bulk: the server framed transfer {got} of {length} bytes, expected "
                                  f"transfer {number} of {buffer.total}")
        buffer.fill(self.sock.recv_into, ConnectionError)

    def stale(self) -> bool:
        """Whether the server closed the channel (it never sends unasked, so anything readable means closed)."""
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def close(self) -> None:
        _shutdown(self.sock)
        try:
            self.sock.close()
        except OSError:
            pass


class BulkPool:
    """Bulk channels to one server, opened on demand with `open_channel(timeout)` (OpenBulkChannel)."""

    def __init__(self, address: str, tls: TLS | None, open_channel: Callable[[float], pb.BulkChannel]):
        self._host = host_of(address)
        self._tls = tls
        self._open_channel = open_channel
        self._idle: list[Connection] = []
        self._lock = threading.Lock()
        self.disabled = self._host is None  # no bulk channel to be had: the stream carries the bytes
        self._retry_at = 0.0  # time.monotonic() before which no channel is tried (the listener was unreachable)
        self.opened = 0  # channels opened, for tests

    def checkout(self, timeout: float) -> Connection | None:
        """An idle channel or a new one; None when the server has none or its listener cannot be reached."""
        with self._lock:
            while self._idle:
                connection = self._idle.pop()
                if not connection.stale():
                    return connection
                connection.close()
            if self.disabled or time.monotonic() < self._retry_at:
                return None
        try:
            reply = self._open_channel(timeout)
        except grpc.RpcError as err:
            if err.code() in _NO_BULK:
                log.info("the server has no bulk channels (%s); tensor bytes go in the gRPC stream", err.details())
                self.disabled = True
                return None
            if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                return None  # this call goes in the stream
            raise
        try:
            connection = self._connect(reply, min(timeout, CONNECT_SECONDS))
        except (OSError, ValueError) as err:  # not answering (a container's unpublished port), refused, TLS failed
            self._retry_at = time.monotonic() + RETRY_SECONDS
            log.warning("cannot open a bulk channel to %s:%d (%s); tensor bytes go in the gRPC stream for the "
                        "next %g s", self._host, reply.port, err, RETRY_SECONDS)
            return None
        self.opened += 1
        return connection

    def checkin(self, connection: Connection) -> None:
        """Returns a channel whose last transfer completed."""
        with self._lock:
            if len(self._idle) < MAX_IDLE:
                self._idle.append(connection)
                return
        connection.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def _connect(self, reply: pb.BulkChannel, timeout: float) -> Connection:
        deadline = time.monotonic() + timeout
        sock = socket.create_connection((self._host, reply.port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if reply.tls:
                sock = _tls_context(self._tls or TLS()).wrap_socket(
                    sock, server_hostname=(self._tls.server_name if self._tls else None) or self._host)
            sock.sendall(reply.ticket)
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            if recv_exactly(sock, len(ACK)) != ACK:
                raise ConnectionError("the server closed the connection instead of binding the channel")
        except BaseException:
            sock.close()
            raise
        return Connection(sock, reply.channel)


def push(pool: BulkPool, method: Any, header: pb.PushHeader, arrays: Sequence[np.ndarray], timeout: float,
         wait_for_ready: bool) -> pb.PushGradientsResponse | None:
    """One push with its bytes on a channel: the call (the header alone) in flight while the bytes go.

    None when no channel is to be had. A channel the server has closed (idle,
    restarted) is replaced once; nothing was applied then, so that is safe.
    """
    deadline = time.monotonic() + timeout
    for attempt in range(2):
        connection = pool.checkout(max(deadline - time.monotonic(), 0.001))
        if connection is None:
            return None
        sent, number = _naming_transfer(header, connection)
        call = method.future(encode_stream(sent, ()), timeout=max(deadline - time.monotonic(), 0.001),
                             wait_for_ready=wait_for_ready)
        # A refusal (before or while the server reads) must not leave the send blocked on a channel nobody reads.
        call.add_done_callback(lambda done: None if done.code() == grpc.StatusCode.OK else connection.abort_send())
        broken = False
        try:
            connection.send(number, arrays, deadline)
        except OSError:  # the server closed the channel: its status says why
            broken = True
        try:
            reply = call.result()
        except grpc.RpcError as err:
            connection.close()
            if attempt == 0 and _channel_gone(err):
                continue
            raise
        if broken:
            connection.close()
        else:
            pool.checkin(connection)
        return reply
    raise AssertionError("unreachable")


def pull(pool: BulkPool, method: Any, request: pb.PullWeightsRequest, timeout: float, wait_for_ready: bool,
         read: Callable[[Iterator, Callable[[ChunkBuffer], None]], Any], error: Callable[[str], Exception]) -> Any:
    """One pull with its bytes on a channel: `read(responses, receive)` reads the header, `receive` the bytes.

    None when no channel is to be had; a channel the server has closed is
    replaced once. A channel that fails mid-transfer raises the call's status
    when the server ended it with one, else `error(message)`.
    """
    deadline = time.monotonic() + timeout
    for attempt in range(2):
        connection = pool.checkout(max(deadline - time.monotonic(), 0.001))
        if connection is None:
            return None
        sent, number = _naming_transfer(request, connection)
        responses = method(sent, timeout=max(deadline - time.monotonic(), 0.001), wait_for_ready=wait_for_ready)
        try:
            result = read(responses, lambda buffer: _receive(connection, number, buffer, deadline, responses, error))
        except grpc.RpcError as err:
            connection.close()
            if attempt == 0 and _channel_gone(err):
                continue
            raise
        except BaseException:
            connection.close()
            responses.cancel()
            raise
        pool.checkin(connection)
        return result
    raise AssertionError("unreachable")


def _naming_transfer(message: Any, connection: Connection) -> tuple[Any, int]:
    """A copy of a PushHeader or PullWeightsRequest naming the connection's next transfer, and its number."""
    number = connection.next_transfer()
    sent = type(message)()
    sent.CopyFrom(message)
    sent.bulk.channel, sent.bulk.transfer = connection.channel, number
    return sent, number


def _receive(connection: Connection, number: int, buffer: ChunkBuffer, deadline: float, responses: Any,
             error: Callable[[str], Exception]) -> None:
    """The pull's bytes; if the channel fails, the call's own status (the server's reason) when it has one."""
    try:
        connection.receive(number, buffer, deadline)
    except OSError as err:
        connection.close()
        for _ in responses:  # raises the call's status when the server ended it with one
            pass
        raise error(str(err) if type(err) is ConnectionError else f"bulk: the channel failed ({err})") from None


def _channel_gone(err: grpc.RpcError) -> bool:
    """The server no longer knows the channel (closed idle, or the server restarted)."""
    return err.code() == grpc.StatusCode.NOT_FOUND and (err.details() or "").startswith("bulk.channel:")


def host_of(address: str) -> str | None:
    """The host of a gRPC target "host:port" ("[v6]:port", "ipv4:", "dns:///" prefixes too); None if not one."""
    for prefix in ("dns:///", "ipv4:", "ipv6:"):
        if address.startswith(prefix):
            address = address[len(prefix):]
    if "," in address or "/" in address or address.startswith(("unix:", "unix-abstract:", "vsock:")):
        return None
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _tls_context(tls: TLS) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=None if tls.ca is None else str(tls.ca))
    if tls.cert is not None:
        context.load_cert_chain(str(tls.cert), None if tls.key is None else str(tls.key))
    return context


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
