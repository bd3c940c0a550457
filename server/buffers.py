"""Receive buffers: grown as a stream's bytes arrive, charged to one budget, reused once their data is consumed.

A fresh 40 MB buffer costs more than filling it: the first touch of every new
page faults, and glibc maps and unmaps allocations that large each time. The
pool keeps the buffers of finished requests, so a steady stream of pushes
writes into warm memory, and JAX on the CPU adopts the aligned tensors without
copying them (a device array may then alias a pooled buffer).

A buffer belongs to the data it holds until that data is consumed, whatever
happens to the call that brought it: a `Lease` counts its holders (the call,
and a sync round that keeps the gradients after the call has ended) and goes
back to the pool only when the last one lets go. Nothing is reserved when a
header arrives: a lease maps memory as bytes arrive (anonymous mmap, grown in
place by mremap, so growing copies nothing), and every byte it maps is charged
to the server's `MemoryBudget` until the lease is released.
"""

import errno
import mmap
import os
import resource
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import numpy as np

from optserve.server.errors import ResourceExhausted

GRANULE = 1 << 20  # large buffer sizes are rounded up to this, so similar pushes share buffers
PAGE = mmap.PAGESIZE  # smaller ones to whole pages
POOL_BYTES = 2 << 30  # idle buffers kept for reuse, at most (and at most the budget)


class MemoryBudget:
    """Bytes that requests in flight (and the sync rounds holding their gradients) may hold at once."""

    def __init__(self, limit: int, on_change: Callable[[int], None] = lambda in_use: None):
        self.limit = limit
        self.in_use = 0
        self._on_change = on_change
        self._lock = threading.Lock()

    def charge(self, nbytes: int, field: str) -> None:
        """Takes `nbytes` from the budget; RESOURCE_EXHAUSTED (naming `field`) if they are not there."""
        with self._lock:
            if self.in_use + nbytes > self.limit:
                raise ResourceExhausted(
                    f"{field}: {nbytes} more bytes would exceed this server's limit of {self.limit} bytes held "
                    f"by requests in flight (max_inflight_bytes; {self.in_use} held now); retry later")
            self.in_use += nbytes
            self._on_change(self.in_use)

    def refund(self, nbytes: int) -> None:
        with self._lock:
            self.in_use -= nbytes
            self._on_change(self.in_use)


class BufferPool:
    """Idle mapped buffers by size, holding at most `max_bytes` of them, and the budget of those in use."""

    def __init__(self, budget: MemoryBudget, max_bytes: int = POOL_BYTES):
        self.budget = budget
        self.max_bytes = min(max_bytes, budget.limit)
        self._free: dict[int, list[mmap.mmap]] = {}
        self._pooled = 0
        self._lock = threading.Lock()

    def lease(self, field: str, reuse: bool = True, charged: bool = True) -> "Lease":
        """A lease that maps nothing yet; `field` names the request part in a refusal.

        `reuse` False: the buffer is never handed out again (its arrays may outlive the request).
        `charged` False: its bytes do not count against the budget.
        """
        return Lease(self, field, reuse, self.budget if charged else MemoryBudget(sys.maxsize))

    def _take(self, size: int) -> mmap.mmap | None:
        with self._lock:
            free = self._free.get(size)
            if not free:
                return None
            self._pooled -= size
            return free.pop()

    def _give(self, buffer: mmap.mmap) -> None:
        with self._lock:
            if self._pooled + len(buffer) <= self.max_bytes:
                self._free.setdefault(len(buffer), []).append(buffer)
                self._pooled += len(buffer)


class Lease:
    """One receive buffer: it grows to the bytes that arrive and is freed when its last holder releases it.

    The call that creates it holds it (as a context manager, or until `release`);
    `retain` adds a holder, for data kept after the call ends.
    """

    def __init__(self, pool: BufferPool, field: str, reuse: bool, budget: MemoryBudget):
        self._pool = pool
        self._budget = budget
        self._field = field
        self._reuse = reuse
        self._buffer: mmap.mmap | None = None
        self._capacity = 0  # bytes mapped and charged to the budget
        self._holders = 1
        self._lock = threading.Lock()

    def reserve(self, extent: int, total: int) -> np.ndarray:
        """An aligned uint8 view of at least `extent` bytes of a buffer that will hold `total` bytes.

        Grows the buffer (doubling, up to `total`) and charges the growth to the
        budget; a view from an earlier call must be dropped first, as the buffer
        may move. RESOURCE_EXHAUSTED over the budget or when memory runs out.
        """
        final = _rounded(total)
        if final > self._budget.limit:
            raise ResourceExhausted(
                f"{self._field}: {total} bytes exceed this server's limit of {self._budget.limit} bytes held "
                f"by requests in flight (max_inflight_bytes)")
        if extent > self._capacity and not (self._buffer is None and self._take_warm(final)):
            self._grow(min(final, max(_rounded(extent), 2 * self._capacity)))
        if self._buffer is None:
            return np.empty(0, np.uint8)
        return np.frombuffer(self._buffer, np.uint8)

    def retain(self) -> Callable[[], None]:
        """Adds a holder; returns its release function (calling it more than once releases once)."""
        with self._lock:
            assert self._holders > 0, "retain after the last release"
            self._holders += 1
        released = threading.Event()

        def release() -> None:
            if not released.is_set():
                released.set()
                self.release()

        return release

    def release(self) -> None:
        """Lets go of one hold; the last one refunds the budget and returns the buffer to the pool."""
        with self._lock:
            self._holders -= 1
            if self._holders:
                return
            buffer, self._buffer = self._buffer, None
        self._budget.refund(self._capacity)
        if buffer is not None and self._reuse:
            self._pool._give(buffer)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: TracebackType | None) -> None:
        self.release()

    def _take_warm(self, size: int) -> bool:
        """Takes a pooled buffer of the final size, if one is free and the budget has room for it."""
        if not self._reuse:
            return False
        buffer = self._pool._take(size)
        if buffer is None:
            return False
        try:
            self._budget.charge(size, self._field)
        except ResourceExhausted:
            self._pool._give(buffer)
            return False
        self._buffer, self._capacity = buffer, size
        return True

    def _grow(self, size: int) -> None:
        self._budget.charge(size - self._capacity, self._field)
        try:
            if self._buffer is None:
                self._buffer = _mapped(size)
            else:
                try:
                    self._buffer.resize(size)  # mremap: the pages move, no byte is copied
                except (BufferError, SystemError):  # still viewed, or no mremap here: copy into a new map
                    grown = _mapped(size)
                    grown[:self._capacity] = self._buffer[:self._capacity]
                    self._buffer = grown
        except (MemoryError, OSError) as err:
            self._budget.refund(size - self._capacity)
            if isinstance(err, OSError) and err.errno != errno.ENOMEM:
                raise
            raise ResourceExhausted(f"{self._field}: the server is out of memory for {size} bytes "
                                    f"({self._capacity} held); retry later") from None
        self._capacity = size


def _mapped(size: int) -> mmap.mmap:
    """Fresh private anonymous memory (a shared mapping could not grow: its pages beyond the start fault)."""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)


def _rounded(nbytes: int) -> int:
    """The mapped size for `nbytes`: whole pages, and whole granules from one granule on."""
    unit = GRANULE if nbytes >= GRANULE else PAGE
    return -(-nbytes // unit) * unit


def default_inflight_bytes() -> int:
    """Half the memory this process may use: the least of physical RAM, the cgroup limit and RLIMIT_AS."""
    limits = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            limits.append(int(text))
    address_space = resource.getrlimit(resource.RLIMIT_AS)[0]
    if address_space != resource.RLIM_INFINITY:
        limits.append(address_space)
    return min(limits) // 2
