"""Same-host segments: files under the shm dir that carry a client's gradients in and its weights out.

A segment is one file the server creates (O_CREAT|O_EXCL|O_NOFOLLOW, mode
0600, a random name) and maps shared: a random nonce in its first page, then
the gradient region and the weights region, page-aligned, each laid out as
`FlatLayout` lays out the optimizer's tensors. The name is unlinked once the
client first uses the session (or after UNLINK_AFTER seconds), so nobody else
can open it afterwards; the pages live on while the server and the client map
them.

Nothing in a segment is trusted. Where a step may read the gradient region in
place (an async optimizer without a write-ahead log or non-trainable tensors:
`Optimizer.reads_segments_in_place`), the push measures it there and the step
reads every value past its tensor's measured magnitude, a NaN included, as 0:
a client rewriting the bytes mid-push gets a gradient it did not mean, never a
non-finite state. Elsewhere a push copies the region into the server's own
buffer first, and every check, the log and the step read that copy. A client
that can open the file runs as the server's user (0600): it could also signal
the server, so its power to shrink the file under the server's mapping (a
SIGBUS) grants it nothing new; the size is still checked before each read.

Segments are bounded (count per optimizer, count in all, bytes in all: a
budget of their own, so idle segments never starve the pushes in flight) and freed when idle past the idle timeout, on close, when
their optimizer is deleted, and at shutdown. This module knows no gRPC.
"""

import contextlib
import errno
import logging
import mmap
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from optserve.server import parallel
from optserve.server.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from optserve.server.overflow import Magnitude, measure_flat
from optserve.wire.layout import FlatLayout

log = logging.getLogger("optserve.shared_memory")

PAGE = mmap.PAGESIZE
NONCE_BYTES = 32
UNLINK_AFTER = 5.0  # seconds a segment's name may stay in the shm dir before its first use
ORPHAN_AGE = 60.0  # seconds after which a segment file still named in the shm dir is a crashed server's
SESSION_PREFIX = "shm-"
FILE_PREFIX = "optserve-"


def _pages(nbytes: int) -> int:
    return -(-nbytes // PAGE) * PAGE


@dataclass(eq=False)
class Segment:
    """One open segment: its file, its mapping and the optimizer (object, not name) it belongs to."""

    session: str
    optimizer: object  # the Optimizer it was opened for; a new optimizer of the same name is another
    optimizer_name: str
    owner: str  # who opened it (a digest of the caller's credentials); others get NOT_FOUND
    layout: FlatLayout
    path: Path
    size: int
    nonce: bytes
    gradients_offset: int
    weights_offset: int
    fd: int
    mapping: mmap.mmap
    idle_timeout: float = 0.0  # seconds unused after which the server frees it
    last_used: float = field(default_factory=time.monotonic)
    opened: float = field(default_factory=time.monotonic)
    unlinked: bool = False
    busy: set[str] = field(default_factory=set)  # "push" and/or "pull" in progress

    def gradients_in_place(self, measure: bool = False, squares: bool = False,
                           ) -> tuple[np.ndarray, dict[str, Magnitude] | None]:
        """The gradient region itself, as float32 of layout.size (bytes the client can still change), and with
        `measure` each tensor's `Magnitude` taken from it in one pass."""
        region = self._region(self.gradients_offset).view(np.float32)
        return region, measure_flat(region, self.layout, squares) if measure else None

    def copy_gradients(self, reserve: Callable[[int, int], np.ndarray], measure: bool = False,
                       squares: bool = False) -> tuple[np.ndarray, dict[str, Magnitude] | None]:
        """The gradient region copied into a buffer from `reserve` (a Lease's), as float32 of layout.size, and
        with `measure` each tensor's `Magnitude` taken from the copy in the same pass (`measure_flat`).

        The copy releases the GIL, so concurrent pushes copy in parallel; one alone is split across the cores.
        """
        nbytes = self.layout.nbytes
        private = reserve(nbytes, nbytes)[:nbytes].view(np.float32)
        source = self._region(self.gradients_offset).view(np.float32)
        if not measure:
            parallel.copy(private, source)
            return private, None
        return private, measure_flat(source, self.layout, squares, into=private)

    def weights_into(self, nbytes: int) -> np.ndarray:
        """The start of the weights region, for a pull to copy `nbytes` into (`Optimizer.pull`'s `into`)."""
        if nbytes > self.layout.nbytes:  # a pull is never larger than every tensor
            raise InvalidArgument(f"shared_memory_session: a pull of {nbytes} bytes exceeds the weights region")
        return self._region(self.weights_offset)

    def _region(self, offset: int) -> np.ndarray:
        """A uint8 view of one region, after checking the file still has its size (and the segment is open)."""
        try:
            if os.fstat(self.fd).st_size < self.size:
                raise FailedPrecondition("shared_memory_session: the segment's file was shrunk; open a new one")
            return np.frombuffer(self.mapping, np.uint8, self.layout.nbytes, offset)
        except (OSError, ValueError):  # freed meanwhile (its optimizer deleted, the server stopping)
            raise NotFound("shared_memory_session: the segment was freed; open a new one") from None


class SegmentTable:
    """The open segments of one server, their limits, and the thread that frees idle ones."""

    def __init__(self, directory: str | None, idle_timeout: float, max_segments: int, max_per_optimizer: int,
                 max_bytes: int, on_count: Callable[[int], None] = lambda count: None):
        self.directory = Path(directory) if directory else None
        self.idle_timeout = idle_timeout
        self.max_segments = max_segments
        self.max_per_optimizer = max_per_optimizer
        self.max_bytes = max_bytes
        self.bytes = 0  # of the open segments
        self._on_count = on_count
        self._segments: dict[str, Segment] = {}
        self._opening: list[object] = []  # the optimizers of segments being made, counted against the limits
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None
        self._sweep_orphans()

    @property
    def count(self) -> int:
        return len(self._segments)

    def open(self, optimizer: object, name: str, shapes: dict[str, tuple[int, ...]], owner: str) -> Segment:
        """A new segment for `optimizer`; RESOURCE_EXHAUSTED past the limits, FAILED_PRECONDITION without a dir."""
        if self.directory is None or not self.directory.is_dir():
            raise FailedPrecondition(f"optimizer: this server has no shared memory (shm dir {self.directory} "
                                     "is not a directory); send tensors over the stream")
        layout = FlatLayout(shapes)
        gradients_offset = PAGE  # the nonce's page
        weights_offset = gradients_offset + _pages(layout.nbytes)
        size = weights_offset + _pages(layout.nbytes)
        with self._lock:  # the segment's share of the limits is taken first; the file is made outside the lock
            if len(self._segments) + len(self._opening) >= self.max_segments:
                raise ResourceExhausted(f"optimizer: this server holds its limit of {self.max_segments} "
                                        "shared-memory segments; close one or retry later")
            mine = sum(1 for s in self._segments.values() if s.optimizer is optimizer) + sum(
                1 for opening in self._opening if opening is optimizer)
            if mine >= self.max_per_optimizer:
                raise ResourceExhausted(f"optimizer: {name!r} holds its limit of {self.max_per_optimizer} "
                                        "shared-memory segments; close one or retry later")
            if self.bytes + size > self.max_bytes:
                raise ResourceExhausted(f"optimizer: a {size}-byte segment would exceed this server's limit of "
                                        f"{self.max_bytes} bytes of shared-memory segments (shm_max_bytes; "
                                        f"{self.bytes} held); close one or retry later")
            self.bytes += size
            self._opening.append(optimizer)
        try:
            segment = self._create(optimizer, name, layout, owner, size, gradients_offset, weights_offset)
        except BaseException:
            with self._lock:
                self.bytes -= size
                self._opening.remove(optimizer)
            raise
        with self._lock:
            self._opening.remove(optimizer)
            self._segments[segment.session] = segment
            self._on_count(len(self._segments))
        self._start_reaper()
        log.info("opened shared-memory segment %s for %r: %d bytes", segment.session, name, size)
        return segment

    @contextlib.contextmanager
    def use(self, session: str, optimizer: object, owner: str, purpose: str) -> Iterator[Segment]:
        """Holds a segment for one push or pull ("push"/"pull"); unlinks its name on first use.

        NOT_FOUND for an unknown, closed or expired session, or one another
        caller opened; INVALID_ARGUMENT for one of another optimizer; ABORTED
        while another call of the same purpose holds it.
        """
        with self._lock:
            segment = self._segments.get(session)
            if segment is None or not secrets.compare_digest(segment.owner, owner):
                raise NotFound(f"shared_memory_session: no open segment {session[:80]!r} (closed, expired or "
                               "never opened); open a new one")
            if segment.optimizer is not optimizer:
                raise InvalidArgument(f"shared_memory_session: the segment belongs to optimizer "
                                      f"{segment.optimizer_name!r}, not this one")
            if purpose in segment.busy:
                raise Aborted(f"shared_memory_session: another {purpose} on this segment is in progress; "
                              "one at a time per segment")
            segment.busy.add(purpose)
            self._unlink(segment)
        try:
            yield segment
        finally:
            with self._lock:
                segment.busy.discard(purpose)
                segment.last_used = time.monotonic()

    def close_session(self, session: str, owner: str) -> None:
        """Frees a segment now; NOT_FOUND if there is none of that caller's."""
        with self._lock:
            segment = self._segments.get(session)
            if segment is None or not secrets.compare_digest(segment.owner, owner):
                raise NotFound(f"session: no open segment {session[:80]!r}")
            self._free(segment)

    def forget(self, optimizer: object) -> None:
        """Frees every segment of a deleted optimizer."""
        with self._lock:
            for segment in [s for s in self._segments.values() if s.optimizer is optimizer]:
                self._free(segment)

    def close(self) -> None:
        """Frees every segment and stops the reaper (at shutdown)."""
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join()
        with self._lock:
            for segment in list(self._segments.values()):
                self._free(segment)

    def reap(self, now: float | None = None) -> None:
        """Unlinks names left unused past UNLINK_AFTER and frees segments idle past the idle timeout."""
        now = time.monotonic() if now is None else now
        with self._lock:
            for segment in list(self._segments.values()):
                if now - segment.opened >= min(UNLINK_AFTER, self.idle_timeout):
                    self._unlink(segment)
                if not segment.busy and now - segment.last_used >= self.idle_timeout:
                    log.info("freeing shared-memory segment %s of %r: idle for %.3g s", segment.session,
                             segment.optimizer_name, now - segment.last_used)
                    self._free(segment)

    def _create(self, optimizer: object, name: str, layout: FlatLayout, owner: str, size: int,
                gradients_offset: int, weights_offset: int) -> Segment:
        path = self.directory / f"{FILE_PREFIX}{secrets.token_hex(16)}"
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            try:
                os.posix_fallocate(fd, 0, size)  # the pages exist now: no SIGBUS later on a full tmpfs
            except OSError as err:
                if err.errno not in (errno.ENOSPC, errno.ENOMEM):
                    raise
                raise ResourceExhausted(f"optimizer: no room for a {size}-byte segment in {self.directory}") from None
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        nonce = secrets.token_bytes(NONCE_BYTES)
        mapping[:NONCE_BYTES] = nonce
        return Segment(SESSION_PREFIX + secrets.token_hex(16), optimizer, name, owner, layout, path, size, nonce,
                       gradients_offset, weights_offset, fd, mapping, self.idle_timeout)

    def _sweep_orphans(self) -> None:
        """Removes segment files a crashed server left named (every live server unlinks its own within UNLINK_AFTER)."""
        if self.directory is None or not self.directory.is_dir():
            return
        now = time.time()
        for path in self.directory.glob(FILE_PREFIX + "*"):
            with contextlib.suppress(OSError):
                info = path.lstat()
                if (len(path.name) == len(FILE_PREFIX) + 32 and path.is_file() and not path.is_symlink()
                        and info.st_uid == os.getuid() and now - info.st_mtime > ORPHAN_AGE):
                    path.unlink()
                    log.info("removed %s, a segment file left by a server that stopped without freeing it", path)

    def _unlink(self, segment: Segment) -> None:
        if not segment.unlinked:
            segment.unlinked = True
            segment.path.unlink(missing_ok=True)

    def _free(self, segment: Segment) -> None:
        """Under the lock: drops the segment; a call holding it keeps the mapping until its views go."""
        self._segments.pop(segment.session, None)
        self._unlink(segment)
        with contextlib.suppress(BufferError):  # a pull's arrays still view it: the GC unmaps it later
            segment.mapping.close()
        with contextlib.suppress(OSError):
            os.close(segment.fd)
        segment.fd = -1
        self.bytes -= segment.size
        self._on_count(len(self._segments))

    def _start_reaper(self) -> None:
        with self._lock:
            if self._reaper is not None or self._stop.is_set():
                return
            self._reaper = threading.Thread(target=self._reap_loop, name="optserve-shm-reaper", daemon=True)
            self._reaper.start()

    def _reap_loop(self) -> None:
        interval = max(0.05, min(1.0, self.idle_timeout / 4))
        while not self._stop.wait(interval):
            self.reap()
