"""The client's same-host path: tensor bytes through a segment the server maps too, not through gRPC.

On a client's first push or pull of an optimizer (transport "auto" or "local"),
`LocalTransport` asks the server for a segment (OpenSharedMemory), opens the
file it names and checks the nonce there: a missing file or another nonce means
the server is on another host (or in another mount namespace). A push copies the
arrays into the segment's gradient region (nothing, for arrays that already are
its views: `gradient_buffers`) and sends the header alone; a pull asks the server
to write the weights into the weights region, then copies them out (or, with
`copy=False`, returns views of it, valid until the next pull).
"""

import mmap
import os
import stat
import threading
from collections.abc import Callable

import grpc
import numpy as np

from optserve.client.errors import OptserveError, protocol_error
from optserve.client.weights import Weights
from optserve.wire.chunks import encode_stream
from optserve.wire.layout import ALIGNMENT, ChunkBuffer, FlatLayout, aligned_empty, padded_bytes
from optserve.v1 import optserve_pb2 as pb

MIN_NONCE_BYTES = 16
MAX_SEGMENTS = 4  # per optimizer and client: calls beyond this many at once go by the stream
NOT_SAME_HOST = "not_same_host"  # a segment this client cannot use, and will not ask for again
_FALL_BACK = frozenset({grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.FAILED_PRECONDITION})  # no shm there
_OPEN_RETRY = frozenset({grpc.StatusCode.UNAVAILABLE})  # a lost reply leaks a segment until its idle timeout


class ClientSegment:
    """One mapped segment: its session, layout, regions and the locks that keep one push and one pull on it."""

    def __init__(self, reply: pb.SharedMemorySegment):
        self.session = reply.session
        self.layout = FlatLayout({t.name: tuple(t.shape) for t in reply.tensors})
        _check_regions(reply, self.layout.nbytes)
        fd = os.open(reply.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)  # FileNotFoundError: another host
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size < reply.size:
                raise ValueError(f"{reply.path} is not the segment the server made")
            self._mapping = mmap.mmap(fd, reply.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)  # the mapping keeps the pages
        if self._mapping[:len(reply.nonce)] != reply.nonce:
            self.close()
            raise ValueError(f"{reply.path} holds another nonce: a file of another host")
        nbytes = self.layout.nbytes
        self.gradients = np.frombuffer(self._mapping, np.float32, self.layout.size, reply.gradients_offset)
        self.weights = np.frombuffer(self._mapping, np.uint8, nbytes, reply.weights_offset)
        self.push_lock = threading.Lock()
        self.pull_lock = threading.Lock()

    def lock(self, purpose: str) -> threading.Lock:
        """The lock of "push" or "pull": one call of each kind at a time on a segment."""
        return self.push_lock if purpose == "push" else self.pull_lock

    def gradient_views(self) -> dict[str, np.ndarray]:
        """Writable float32 views of the gradient region, one per tensor in layout order."""
        return self.layout.views(self.gradients)

    def write_gradients(self, header: pb.PushHeader, arrays: list[np.ndarray]) -> bool:
        """Copies a push's arrays into the gradient region; False when the push does not fit it (sparse, not float32)."""
        if self.gradients is None or len(header.gradients) != len(arrays):  # closed meanwhile, or sparse
            return False
        views = self.gradient_views()
        for spec, array in zip(header.gradients, arrays):
            view = views.get(spec.name)
            if (spec.sparse or spec.dtype != pb.DATA_TYPE_FLOAT32 or view is None
                    or tuple(spec.shape) != view.shape or array.shape != view.shape):
                return False
        if header.missing != pb.MISSING_GRADIENTS_SKIP and set(views) != {spec.name for spec in header.gradients}:
            return False  # the server refuses it: let the stream carry it, for the usual answer
        # another tensor's view (or part of the region) would be overwritten before it is read: copy it aside
        arrays = [array.copy() if not _is_view(array, views[spec.name]) and np.may_share_memory(array, self.gradients)
                  else array for spec, array in zip(header.gradients, arrays)]
        for spec, array in zip(header.gradients, arrays):
            view = views[spec.name]
            if not _is_view(array, view):  # a gradient computed in place needs no copy
                np.copyto(view, array)
        return True

    def read(self, header: pb.PullHeader, sizes: list[int], copy: bool, buffer: np.ndarray | None) -> tuple:
        """The pulled tensors from the weights region: copied into `buffer` (or a fresh one), or views of it."""
        total = padded_bytes(sizes)
        if total > len(self.weights):
            raise ValueError(f"the pull declares {total} bytes, the weights region holds {len(self.weights)}")
        if copy:
            buffer = aligned_empty(total) if buffer is None else buffer
            np.copyto(buffer[:total], self.weights[:total])
        else:
            buffer = self.weights
        return ChunkBuffer(sizes, ValueError, buffer), buffer if copy else None

    def close(self) -> None:
        """Unmaps the segment, unless arrays still view it (then the garbage collector does, later)."""
        self.gradients = self.weights = None
        try:
            self._mapping.close()
        except BufferError:
            pass


class LocalTransport:
    """A client's segments, a few per optimizer (one per concurrent call), opened on first use.

    A call takes a segment no other call of its kind (push, pull) holds; when
    every one is held, it opens another, up to MAX_SEGMENTS, and beyond them
    goes by the stream: a sync round's pushes from threads of one client never
    wait for each other.
    """

    def __init__(self, client, required: bool):
        self._client = client
        self._required = required  # transport "local": an error where "auto" falls back
        self._segments: dict[str, list[ClientSegment] | str] = {}  # or NOT_SAME_HOST
        self._lock = threading.Lock()

    def push(self, header: pb.PushHeader, arrays: list[np.ndarray], retry: frozenset) -> pb.PushGradientsResponse | None:
        """Sends a push through a segment; None when it must go by the stream (sparse, or no segment free)."""
        for attempt in range(2):  # a session the server forgot (restart, idle timeout) is reopened once
            segment = self._acquire(header.optimizer, "push")
            if segment is None:
                return None
            try:
                if not segment.write_gradients(header, arrays):
                    return None
                sent = pb.PushHeader()
                sent.CopyFrom(header)
                sent.shared_memory_session = segment.session
                return self._client._call(self._client._push, lambda: encode_stream(sent, ()), retry)
            except OptserveError as err:
                if _busy(err):  # the server still holds it for an earlier try of this push: the stream
                    return None
                if attempt or not _forgotten(err):
                    raise
            finally:
                segment.push_lock.release()
            self._drop(header.optimizer, segment)
        return None

    def pull(self, request: pb.PullWeightsRequest, check: Callable, into, timeout: float | None,
             copy: bool):
        """Runs a pull through a segment; None when there is none free. `check(header, into)` gives the sizes."""
        for attempt in range(2):
            segment = self._acquire(request.optimizer, "pull")
            if segment is None:
                return None
            sent = pb.PullWeightsRequest()
            sent.CopyFrom(request)
            sent.shared_memory_session = segment.session
            try:
                header = self._client._call(_header_only(self._client._pull), lambda: sent,
                                            frozenset({grpc.StatusCode.UNAVAILABLE}), timeout)
                shapes, sizes = check(header, into)
                try:
                    slots, buffer = segment.read(header, sizes, copy, None if into is None else into._buffer)
                except ValueError as err:
                    raise protocol_error(str(err)) from None
                tensors = {spec.name: slots.view(i, spec.dtype, shape)
                           for i, (spec, shape) in enumerate(zip(header.tensors, shapes))}
                return Weights(tensors, header.version, header.iterations, buffer)
            except OptserveError as err:
                if _busy(err):
                    return None
                if attempt or not _forgotten(err):
                    raise
            finally:
                segment.pull_lock.release()
            self._drop(request.optimizer, segment)
        return None

    def _acquire(self, optimizer: str, purpose: str) -> ClientSegment | None:
        """A segment of `optimizer` whose `purpose` lock this thread now holds, opened if all are held; or None."""
        with self._lock:
            pool = self._segments.get(optimizer, [])
            if pool == NOT_SAME_HOST:
                return None
            for segment in pool:
                if segment.lock(purpose).acquire(blocking=False):
                    return segment
            if len(pool) >= MAX_SEGMENTS:
                return None
            segment = self._open(optimizer)
            if segment is None:
                return None
            segment.lock(purpose).acquire()
            self._segments[optimizer] = [*pool, segment]
            return segment

    def _drop(self, optimizer: str, segment: ClientSegment) -> None:
        """Forgets a segment the server forgot; its mapping goes with the last array that views it."""
        with self._lock:
            pool = self._segments.get(optimizer)
            if isinstance(pool, list) and segment in pool:
                self._segments[optimizer] = [s for s in pool if s is not segment]

    def gradient_buffers(self, optimizer: str) -> dict[str, np.ndarray] | None:
        """Views of the gradient region of the optimizer's first segment; None without one."""
        with self._lock:
            pool = self._segments.get(optimizer)
        if not isinstance(pool, list) or not pool:
            segment = self._acquire(optimizer, "push")
            if segment is None:
                return None
            segment.push_lock.release()
            return segment.gradient_views()
        return pool[0].gradient_views()

    def close(self) -> None:
        """Frees every segment on the server (best effort) and unmaps it here."""
        with self._lock:
            segments, self._segments = self._segments, {}
        for segment in (s for pool in segments.values() if isinstance(pool, list) for s in pool):
            try:
                self._client._stub.CloseSharedMemory(pb.CloseSharedMemoryRequest(session=segment.session),
                                                     timeout=min(self._client.timeout, 5.0))
            except grpc.RpcError:
                pass  # the server frees it after its idle timeout
            segment.close()

    def _open(self, optimizer: str) -> ClientSegment | None:
        """A new segment, or None (and, where it cannot work, NOT_SAME_HOST remembered); "local" raises instead."""

        try:
            reply = self._client._call(self._client._stub.OpenSharedMemory,
                                       lambda: pb.OpenSharedMemoryRequest(optimizer=optimizer), _OPEN_RETRY)
        except OptserveError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                raise  # no such optimizer: the push or pull would say the same
            if err.code() in _FALL_BACK:
                return self._unusable(optimizer, f"the server offers no shared memory ({err.details()})")
            if self._required:
                raise
            return None  # RESOURCE_EXHAUSTED, UNAVAILABLE: the stream this time, a segment next time
        try:
            return ClientSegment(reply)
        except (OSError, ValueError) as err:
            try:
                self._client._stub.CloseSharedMemory(pb.CloseSharedMemoryRequest(session=reply.session),
                                                     timeout=min(self._client.timeout, 5.0))
            except grpc.RpcError:
                pass
            return self._unusable(optimizer, f"cannot map the server's segment {reply.path} ({err}); the server "
                                             "is not on this host, or not in this mount namespace")

    def _unusable(self, optimizer: str, why: str) -> None:
        """Under the lock: "local" raises; "auto" remembers the stream is the way."""

        if self._required:
            raise OptserveError(grpc.StatusCode.FAILED_PRECONDITION,
                                f"transport 'local' needs shared memory with the server at {self._client.address}: "
                                f"{why}; use transport 'auto' or 'network'")
        self._segments[optimizer] = NOT_SAME_HOST
        return None


def _check_regions(reply: pb.SharedMemorySegment, nbytes: int) -> None:
    """ValueError unless both regions are aligned, apart, past the nonce and inside the file."""
    regions = sorted([(reply.gradients_offset, "gradients_offset"), (reply.weights_offset, "weights_offset")])
    if len(reply.nonce) < MIN_NONCE_BYTES:
        raise ValueError(f"nonce: {len(reply.nonce)} bytes, fewer than {MIN_NONCE_BYTES}")
    if regions[0][0] < len(reply.nonce) or regions[1][0] < regions[0][0] + nbytes or regions[1][0] + nbytes > reply.size:
        raise ValueError(f"the regions of {nbytes} bytes at {reply.gradients_offset} and {reply.weights_offset} do "
                         f"not fit apart in {reply.size} bytes after the nonce")
    for offset, field in regions:
        if offset % ALIGNMENT:
            raise ValueError(f"{field}: {offset} is not a multiple of {ALIGNMENT}")


def _busy(err) -> bool:
    """The server still runs another call on the segment (one this client gave up on)."""
    return err.code() == grpc.StatusCode.ABORTED and err.details().startswith("shared_memory_session")


def _forgotten(err) -> bool:
    """The server no longer knows the session (restarted, freed it when idle): reopen once."""
    return err.code() == grpc.StatusCode.NOT_FOUND and err.details().startswith("shared_memory_session")


def _header_only(pull: Callable) -> Callable:
    """A pull whose reply is the header alone (the bytes are in the segment)."""

    def call(request, **kwargs) -> pb.PullHeader:
        responses = pull(request, **kwargs)
        header = next(responses).header
        for message in responses:
            raise protocol_error(f"a pull through shared memory sent a {message.WhichOneof('part')} after its header")
        return header

    return call


def _is_view(array: np.ndarray, view: np.ndarray) -> bool:
    """Whether `array` is exactly `view`'s memory (same start, shape and layout): no copy is needed."""
    return (isinstance(array, np.ndarray) and array.dtype == view.dtype and array.shape == view.shape
            and array.flags.c_contiguous and array.__array_interface__["data"][0] == view.__array_interface__["data"][0])
