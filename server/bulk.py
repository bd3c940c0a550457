"""Bulk channels: TCP connections beside gRPC that carry tensor bytes at the speed of the socket.

A client asks for one on OpenBulkChannel, an authenticated gRPC call (tokens
and mTLS are checked there as on every call), which issues a random channel id
and a one-use ticket good for TICKET_SECONDS. The client connects to this
listener (TLS when the server serves TLS, with its certificate; a client
certificate from the same CA under mTLS), sends the ticket and gets ACK: the
channel is bound. A wrong, expired or reused ticket, or silence for
HANDSHAKE_SECONDS, closes the connection having read nothing but the ticket's
bytes. Then each push or pull naming the channel moves one transfer on it
(`optserve.wire.frames`), received with `recv_into` straight into the pooled
receive buffer, the GIL released during each syscall. Any mismatch, short read
or error mid-transfer closes the channel: there is no resync. Connections
being handshaken and channels are bounded, per peer address and in all; idle
channels are closed.
"""

import hashlib
import logging
import secrets
import select
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterable

import numpy as np

from optserve.server.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from optserve.wire.frames import ACK, FRAME, TICKET_BYTES, recv_exactly, send_frame
from optserve.wire.layout import ChunkBuffer

log = logging.getLogger("optserve.bulk")

TICKET_SECONDS = 10.0  # a ticket not redeemed by then is void
HANDSHAKE_SECONDS = 5.0  # a new connection must finish TLS and send its ticket within this
IDLE_SECONDS = 300.0  # a channel unused this long is closed (clients reopen transparently)
MAX_CHANNELS = 256  # bound channels and tickets outstanding, server-wide
MAX_CHANNELS_PER_PEER = 64  # bound channels of one peer address
MAX_HANDSHAKES = 64  # connections not yet bound, server-wide (each holds a thread for HANDSHAKE_SECONDS at most)
MAX_HANDSHAKES_PER_PEER = 16
MAX_CHANNEL_ID = 64  # characters of a channel id that can be one of ours


class Channel:
    """One bound connection; one transfer at a time uses it."""

    def __init__(self, channel_id: str, sock: socket.socket, peer: str, io_timeout: float):
        self.id = channel_id
        self.sock = sock
        self.peer = peer
        self.io_timeout = io_timeout
        self.last_transfer = -1
        self.busy = False
        self.closed = False
        self.last_used = time.monotonic()

    def close(self) -> None:
        """Shuts the connection (waking a transfer blocked on it) and closes it; harmless twice."""
        if self.closed:
            return
        self.closed = True
        for step in (lambda: self.sock.shutdown(socket.SHUT_RDWR), self.sock.close):
            try:
                step()
            except OSError:
                pass


class Transfer:
    """One push's or pull's use of a channel: `receive` or `send`, then `end`, which closes it unless done."""

    def __init__(self, listener: "BulkListener", channel: Channel, number: int):
        self._listener = listener
        self.channel = channel
        self.number = number
        self.done = False
        self._ended = False

    def receive(self, buffer: ChunkBuffer) -> None:
        """Reads the frame, checks it against the header's transfer and size, and fills `buffer` from the socket."""
        sock = self.channel.sock
        with _socket_errors(self.channel):
            sock.settimeout(self.channel.io_timeout)
            head = recv_exactly(sock, FRAME.size)
            if len(head) < FRAME.size:
                raise InvalidArgument(f"bulk: the connection ended after {len(head)} of the frame's {FRAME.size} "
                                      "header bytes")
            number, length = FRAME.unpack(head)
            if number != self.number:
                raise InvalidArgument(f"bulk.transfer: the frame on the channel is transfer {number}, the header "
                                      f"names {self.number}")
            if length != buffer.total:
                raise InvalidArgument(f"bulk: the frame carries {length} bytes, the header declares {buffer.total}")
            buffer.fill(sock.recv_into)
        self.done = True

    def send(self, arrays: Iterable[np.ndarray]) -> None:
        """Sends the arrays as this transfer's frame."""
        with _socket_errors(self.channel):
            self.channel.sock.settimeout(self.channel.io_timeout)
            send_frame(self.channel.sock, self.number, arrays)
        self.done = True

    def end(self) -> None:
        """Gives the channel back for the next transfer, or closes it if this one did not complete; once."""
        if not self._ended:
            self._ended = True
            self._listener._end(self)


class _socket_errors:
    """Turns a socket's failure mid-transfer into a clear status; the caller's `end` closes the channel."""

    def __init__(self, channel: Channel):
        self._channel = channel

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> bool:
        if error is None or not isinstance(error, OSError):
            return False
        if isinstance(error, (socket.timeout, TimeoutError)):
            raise DeadlineExceeded(f"bulk: no bytes moved on the channel for {self._channel.io_timeout:g} s; "
                                   "it is closed") from None
        raise InvalidArgument(f"bulk: the channel failed mid-transfer ({error}); it is closed") from None


class BulkListener:
    """The bulk port: issues tickets, binds connections that present one, and lends channels to transfers."""

    def __init__(self, host: str, port: int, ssl_context: ssl.SSLContext | None, io_timeout: float = 30.0):
        self._ssl = ssl_context
        self._io_timeout = io_timeout
        self._sock = socket.create_server((host.strip("[]"), port), family=_family(host), backlog=128)
        self._sock.settimeout(0.5)  # the accept loop checks for close this often
        self.port = self._sock.getsockname()[1]
        self.tls = ssl_context is not None
        self._lock = threading.Lock()
        self._tickets: dict[bytes, tuple[str, float]] = {}  # sha256(ticket) -> (channel id, expiry)
        self._channels: dict[str, Channel] = {}
        self._per_peer: Counter[str] = Counter()  # bound channels per peer address
        self._handshakes: Counter[str] = Counter()  # connections not yet bound, per peer address
        self._stop = threading.Event()
        threading.Thread(target=self._accept_loop, name="optserve-bulk-accept", daemon=True).start()
        threading.Thread(target=self._sweep_loop, name="optserve-bulk-sweep", daemon=True).start()

    def issue(self) -> tuple[str, bytes]:
        """A new channel id and its one-use ticket; RESOURCE_EXHAUSTED when the server has its limit of channels."""
        with self._lock:
            self._expire(time.monotonic())
            if len(self._channels) + len(self._tickets) >= MAX_CHANNELS:
                raise ResourceExhausted(f"bulk: the server has {MAX_CHANNELS} bulk channels open or opening, its "
                                        "limit; retry later or send the bytes in the stream")
            channel_id, ticket = secrets.token_hex(16), secrets.token_bytes(TICKET_BYTES)
            self._tickets[hashlib.sha256(ticket).digest()] = (channel_id, time.monotonic() + TICKET_SECONDS)
        return channel_id, ticket

    def take(self, channel_id: str, number: int) -> Transfer:
        """The channel for one transfer numbered `number`, all its own until `end`.

        NOT_FOUND for a channel that is not open (closed idle, or never ours);
        a channel busy with another transfer, or a number not above the last
        one, is closed (its bytes can no longer be told apart) and refused.
        """
        if len(channel_id) > MAX_CHANNEL_ID:
            raise InvalidArgument(f"bulk.channel: at most {MAX_CHANNEL_ID} characters, got {len(channel_id)}")
        with self._lock:
            channel = self._channels.get(channel_id)
            if channel is None or channel.closed:
                raise NotFound(f"bulk.channel: no open bulk channel {channel_id!r} (closed, or never opened); "
                               "open a new one")
            if channel.busy:
                self._drop(channel)
                raise FailedPrecondition("bulk.channel: busy with another transfer, so both fail and the channel "
                                         "is closed; use one channel per concurrent call")
            if number <= channel.last_transfer:
                self._drop(channel)
                raise InvalidArgument(f"bulk.transfer: must be above the channel's last transfer "
                                      f"{channel.last_transfer}, got {number}; the channel is closed")
            channel.busy, channel.last_transfer = True, number
        return Transfer(self, channel, number)

    def open_channels(self) -> int:
        """Bound channels now."""
        with self._lock:
            return len(self._channels)

    def handshakes(self) -> int:
        """Connections accepted and not yet bound or closed."""
        with self._lock:
            return sum(self._handshakes.values())

    def close(self) -> None:
        """Stops accepting and closes every channel (on shutdown)."""
        self._stop.set()
        with self._lock:
            for channel in list(self._channels.values()):
                self._drop(channel)
        try:
            self._sock.close()
        except OSError:
            pass

    def _end(self, transfer: Transfer) -> None:
        with self._lock:
            channel = transfer.channel
            if not transfer.done:
                self._drop(channel)
            channel.busy, channel.last_used = False, time.monotonic()

    def _drop(self, channel: Channel) -> None:
        """Closes a channel and forgets it (under the lock)."""
        channel.close()
        if self._channels.get(channel.id) is channel:
            del self._channels[channel.id]
            self._per_peer[channel.peer] -= 1
            if not self._per_peer[channel.peer]:
                del self._per_peer[channel.peer]

    def _expire(self, now: float) -> None:
        for key in [key for key, (_, expiry) in self._tickets.items() if expiry < now]:
            del self._tickets[key]

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, address = self._sock.accept()
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.05)  # out of file descriptors, say: try again shortly
                continue
            peer = address[0]
            with self._lock:
                over = (sum(self._handshakes.values()) >= MAX_HANDSHAKES
                        or self._handshakes[peer] >= MAX_HANDSHAKES_PER_PEER)
                if not over:
                    self._handshakes[peer] += 1
            if over:
                log.info("closed a bulk connection from %s: too many connections without a ticket yet", peer)
                _close(sock)
                continue
            threading.Thread(target=self._handshake, args=(sock, peer), name="optserve-bulk-handshake",
                             daemon=True).start()

    def _handshake(self, sock: socket.socket, peer: str) -> None:
        """TLS, then the ticket, within HANDSHAKE_SECONDS; binds the channel or closes the connection."""
        bound = False
        try:
            deadline = time.monotonic() + HANDSHAKE_SECONDS
            sock.settimeout(HANDSHAKE_SECONDS)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._ssl is not None:
                sock = self._ssl.wrap_socket(sock, server_side=True)
            ticket = b""
            while len(ticket) < TICKET_BYTES:  # each read bounded by what is left of the deadline
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                part = recv_exactly(sock, TICKET_BYTES - len(ticket))
                if not part:
                    break
                ticket += part
            bound = self._bind(ticket, sock, peer)
        except (OSError, ValueError) as err:  # timeouts, resets, failed TLS handshakes
            log.info("closed a bulk connection from %s before its ticket: %s", peer, err)
        finally:
            with self._lock:
                self._handshakes[peer] -= 1
                if not self._handshakes[peer]:
                    del self._handshakes[peer]
            if not bound:
                _close(sock)

    def _bind(self, ticket: bytes, sock: socket.socket, peer: str) -> bool:
        with self._lock:
            entry = self._tickets.pop(hashlib.sha256(ticket).digest(), None) if len(ticket) == TICKET_BYTES else None
            if entry is None or entry[1] < time.monotonic():
                log.warning("closed a bulk connection from %s: no valid ticket (wrong, expired or used)", peer)
                return False
            if self._per_peer[peer] >= MAX_CHANNELS_PER_PEER:
                log.warning("closed a bulk connection from %s: it has %d channels, the limit", peer,
                            MAX_CHANNELS_PER_PEER)
                return False
            channel = Channel(entry[0], sock, peer, self._io_timeout)
            self._channels[channel.id] = channel
            self._per_peer[peer] += 1
        try:
            sock.sendall(ACK)
        except OSError:
            with self._lock:
                self._drop(channel)
        return True

    def _sweep_loop(self) -> None:
        while not self._stop.wait(1.0):
            now = time.monotonic()
            with self._lock:
                self._expire(now)
                idle = [channel for channel in self._channels.values() if not channel.busy]
                ended = _readable(idle)  # a client sends nothing unasked: readable means it closed (or misbehaves)
                for channel in idle:
                    if channel in ended or now - channel.last_used > IDLE_SECONDS:
                        log.info("closed bulk channel from %s: %s", channel.peer,
                                 "closed by its client" if channel in ended else f"idle for {IDLE_SECONDS:g} s")
                        self._drop(channel)


def _readable(channels: list[Channel]) -> set[Channel]:
    """The channels whose sockets have something to read (or have ended), without blocking."""
    poller = select.poll()
    by_fd = {}
    for channel in channels:
        try:
            fd = channel.sock.fileno()
        except OSError:
            continue
        if fd >= 0:
            by_fd[fd] = channel
            poller.register(fd, select.POLLIN)
    return {by_fd[fd] for fd, _ in poller.poll(0) if fd in by_fd}


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
