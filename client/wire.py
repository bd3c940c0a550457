"""The wire format shared by client and server: dtypes and chunked byte streams.

A stream carries one header, then chunks whose bytes, concatenated, are the
tensors' raw little-endian bytes in header order (proto/optserve/v1). Senders
cut that byte string into chunks of at most CHUNK_BYTES; receivers write the
chunks into one preallocated buffer and view the tensors out of it.
"""

from collections.abc import Iterable, Iterator

import numpy as np

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


def as_little_endian(array: np.ndarray) -> np.ndarray:
    """The array as C-contiguous little-endian data, copied only when needed."""
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array


def iter_chunks(arrays: Iterable[np.ndarray], chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Cuts the arrays' bytes, back to back, into chunks of `chunk_bytes`.

    A chunk may span the end of one array and the start of the next; only the
    last chunk is shorter.
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
                yield b"".join(pending)
                pending, pending_bytes = [], 0
    if pending_bytes:
        yield b"".join(pending)


class ChunkBuffer:
    """Receives a stream's chunks into one preallocated byte buffer.

    `overrun_error` is the exception class raised when the chunks overrun the
    declared size, so each side reports it with its own error type.
    """

    def __init__(self, total_bytes: int, overrun_error: type[Exception]) -> None:
        self.data = np.empty(total_bytes, dtype=np.uint8)
        self.filled = 0
        self._overrun_error = overrun_error

    def write(self, chunk: bytes) -> None:
        """Appends one chunk; refuses bytes beyond the declared total."""
        end = self.filled + len(chunk)
        if end > len(self.data):
            raise self._overrun_error(
                f"chunks: {end} bytes received, more than the {len(self.data)} the header declares"
            )
        self.data[self.filled:end] = np.frombuffer(chunk, dtype=np.uint8)
        self.filled = end

    def view(self, offset: int, data_type: int, shape: tuple[int, ...]) -> np.ndarray:
        """An array viewing `shape` elements of `data_type` at `offset` of the buffer."""
        dtype = numpy_dtype(data_type)
        count = int(np.prod(shape, dtype=np.int64))
        if count == 0:
            return np.zeros(shape, dtype=dtype)
        return np.frombuffer(self.data, dtype=dtype, count=count, offset=offset).reshape(shape)
