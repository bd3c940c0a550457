"""Aligned buffers of tensors: every tensor at a 64-byte-aligned offset of one buffer.

The same layout serves a stream's receive buffer (`ChunkBuffer`), an
optimizer's flat state (`FlatLayout`) and the shared-memory segments of the
same-host transport, so bytes move between them without reshuffling.
"""

import itertools
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from optserve.wire.dtypes import numpy_dtype

ALIGNMENT = 64  # bytes: JAX on the CPU adopts 64-byte-aligned NumPy arrays without copying them


def aligned_empty(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 buffer whose data starts at a multiple of ALIGNMENT."""
    raw = np.empty(nbytes + ALIGNMENT, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start:start + nbytes]


def padded_size(nbytes: int) -> int:
    """`nbytes` rounded up to a multiple of ALIGNMENT."""
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


class FlatLayout:
    """Float32 tensors in one flat buffer, each starting at an ALIGNMENT-aligned element offset.

    `offsets[name]` and `sizes[name]` count elements; `size` is the buffer's
    length in elements. Tensors keep the order of `shapes`. By default they
    lie back to back (`packed`: as a ChunkBuffer lays them out); `offsets` and
    `size` may place them further apart (the gaps are padding), in the same
    order, e.g. so that no small tensor straddles two devices' shards.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], offsets: Sequence[int] | None = None,
                 size: int | None = None):
        self.shapes = {name: tuple(shape) for name, shape in shapes.items()}
        self.sizes: dict[str, int] = {name: int(np.prod(shape, dtype=np.int64)) for name, shape in self.shapes.items()}
        packed = list(itertools.accumulate((padded_size(4 * n) // 4 for n in self.sizes.values()), initial=0))
        starts = packed[:-1] if offsets is None else [int(offset) for offset in offsets]
        if len(starts) != len(self.shapes):
            raise ValueError(f"offsets: {len(starts)} given for {len(self.shapes)} tensors")
        self.offsets: dict[str, int] = dict(zip(self.shapes, starts))
        end = 0
        for name, start in self.offsets.items():
            if start < end or start % (ALIGNMENT // 4):
                raise ValueError(f"offsets[{name!r}]: {start} overlaps the tensor before or is not aligned")
            end = start + padded_size(4 * self.sizes[name]) // 4
        self.size = end if size is None else int(size)
        if self.size < end or self.size % (ALIGNMENT // 4):
            raise ValueError(f"size: {self.size} elements do not hold the tensors ({end}) in aligned blocks")
        self.packed = starts == packed[:-1] and self.size == packed[-1]
        self.padded = self.size != sum(self.sizes.values())  # some elements belong to no tensor

    @property
    def nbytes(self) -> int:
        return 4 * self.size

    def views(self, flat: np.ndarray, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The tensors of `names` (default all) as views of `flat`, a float32 buffer of `size` elements."""
        return {name: flat[self.offsets[name]:self.offsets[name] + self.sizes[name]].reshape(self.shapes[name])
                for name in (self.shapes if names is None else names)}

    def _key(self) -> tuple:
        return tuple(self.shapes.items()), tuple(self.offsets.values()), self.size

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FlatLayout) and type(self) is type(other) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


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

    def fill(self, recv_into: Callable[[memoryview], int], end_error: type[Exception] | None = None) -> None:
        """Receives the rest of the bytes straight into each tensor's aligned slot, with no copy in between.

        `recv_into(view)` writes up to `len(view)` bytes at the start of `view`
        and returns how many (`socket.recv_into`: the syscall runs without the
        GIL); 0 means the peer closed, raised as `end_error` (default the
        overrun error). With `reserve`, the whole buffer is reserved first.
        """
        if self._reserve is not None and self.filled < self.total:
            self.data = None  # the buffer may move as it grows
            self.data = self._reserve(padded_bytes(self._sizes), padded_bytes(self._sizes))
        whole = slot = memoryview(self.data)
        try:
            while self.filled < self.total:
                while self.filled >= self._ends[self._tensor]:  # also skips empty tensors
                    self._tensor += 1
                size, offset = self._sizes[self._tensor], self.offsets[self._tensor]
                slot = whole[offset + size - (self._ends[self._tensor] - self.filled):offset + size]
                got = recv_into(slot)
                if not got:
                    raise (end_error or self._overrun_error)(
                        f"bulk: the connection ended after {self.filled} of the {self.total} bytes the header "
                        "declares")
                self.filled += got
        finally:
            slot.release()
            whole.release()  # no view may outlive the call: the buffer may move or go back to a pool

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
