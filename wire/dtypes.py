"""Element types of tensor bytes: the wire's DataType codes, their NumPy dtypes and sizes, bfloat16 rounding."""

import numpy as np

# The wire's DataType numbers (proto/optserve/v1, enum DataType); the log format stores them too.
FLOAT32, FLOAT16, BFLOAT16, FLOAT64, INT32, INT64 = 1, 2, 3, 4, 5, 6
_NAMES = {FLOAT32: "float32", FLOAT16: "float16", BFLOAT16: "bfloat16", FLOAT64: "float64", INT32: "int32",
          INT64: "int64"}

_NUMPY_NAMES = {
    FLOAT32: "<f4",
    FLOAT16: "<f2",
    BFLOAT16: "bfloat16",
    FLOAT64: "<f8",
    INT32: "<i4",
    INT64: "<i8",
}
ITEMSIZE = {
    FLOAT32: 4,
    FLOAT16: 2,
    BFLOAT16: 2,
    FLOAT64: 8,
    INT32: 4,
    INT64: 8,
}


def dtype_name(data_type: int) -> str:
    """Short lower-case name of a DataType, for messages ("float32")."""
    return _NAMES.get(data_type, "unspecified" if data_type == 0 else f"unknown dtype {data_type}")


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
        return BFLOAT16
    for data_type, name in _NUMPY_NAMES.items():
        if name != "bfloat16" and dtype.newbyteorder("<") == np.dtype(name):
            return data_type
    raise TypeError(f"dtype {dtype} cannot be sent; use float32, float16, bfloat16, int32 or int64")


def to_bfloat16(array: np.ndarray) -> np.ndarray:
    """Float values rounded to bfloat16 (nearest even): ml_dtypes' fast cast when it is installed
    (it comes with JAX), else `to_bfloat16_bits`, which gives the same bits as uint16."""
    try:
        import ml_dtypes
    except ImportError:
        return to_bfloat16_bits(array)
    return np.asarray(array, dtype=np.float32).astype(ml_dtypes.bfloat16)


def to_bfloat16_bits(array: np.ndarray, block: int = 1 << 16) -> np.ndarray:
    """The bfloat16 bit patterns (uint16) of float values, rounded to nearest even, NaN kept NaN.

    bfloat16 is the top half of a float32, so rounding is integer arithmetic on
    the float32 bits, done block by block in one small temporary (cache-sized,
    no page faults): no ml_dtypes needed.
    """
    bits = np.ascontiguousarray(array, dtype=np.float32).reshape(-1).view(np.uint32)
    out = np.empty(bits.size, np.uint16)
    scratch = np.empty(min(block, bits.size), np.uint32)
    for start in range(0, bits.size, block):
        part = bits[start:start + block]
        rounded = scratch[:len(part)]
        np.right_shift(part, 16, out=rounded)
        rounded &= 1  # the lowest kept bit: ties go to even
        rounded += 0x7FFF
        rounded += part
        rounded >>= 16
        out[start:start + len(part)] = rounded
    nan = np.isnan(np.asarray(array, dtype=np.float32).reshape(-1))
    if nan.any():  # rounding could carry a NaN's payload into infinity: keep it a quiet NaN
        out[nan] = (bits[nan] >> 16) | 0x0040
    return out.reshape(np.shape(array))


def as_little_endian(array: np.ndarray) -> np.ndarray:
    """The array as C-contiguous little-endian data, copied only when needed."""
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array
