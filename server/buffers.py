"""Reuse of large receive buffers.

A fresh 40 MB buffer costs more than filling it: the first touch of every new
page faults, and glibc maps and unmaps allocations that large each time. The
pool hands out aligned buffers and takes them back after the push that used
them is done, so a steady stream of pushes writes into warm memory, and JAX
on the CPU adopts the aligned tensors without copying them.
"""

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from optserve.client.wire import aligned_empty

GRANULE = 1 << 20  # buffer sizes are rounded up to this, so similar pushes share buffers


class BufferPool:
    """Free aligned uint8 buffers by size, holding at most `max_bytes` of them."""

    def __init__(self, max_bytes: int = 2 << 30):
        self.max_bytes = max_bytes
        self._free: dict[int, list[np.ndarray]] = {}
        self._pooled = 0
        self._lock = threading.Lock()

    @contextmanager
    def lease(self, nbytes: int) -> Iterator[np.ndarray]:
        """A buffer of at least `nbytes` for the duration of the block; nothing may keep views of it after."""
        size = -(-nbytes // GRANULE) * GRANULE
        with self._lock:
            free = self._free.get(size)
            buffer = free.pop() if free else None
            if buffer is not None:
                self._pooled -= size
        if buffer is None:
            buffer = aligned_empty(size)
        try:
            yield buffer
        finally:
            with self._lock:
                if self._pooled + size <= self.max_bytes:
                    self._free.setdefault(size, []).append(buffer)
                    self._pooled += size
