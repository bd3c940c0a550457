"""Framework arrays, read by their type: PyTorch, JAX, TensorFlow and NumPy values to NumPy, and back.

No framework is imported here unless the value itself comes from it: its class's
module (`type(x).__module__`) says which, so a plain NumPy client never loads torch,
JAX or TensorFlow. Sparse gradients are recognised by class, never by duck typing
(every `torch.Tensor` has `indices()` and `values()` methods).
"""

import sys
from typing import Any, NamedTuple

import numpy as np

from optserve.client.errors import InvalidArgumentError


class IndexedSlices(NamedTuple):
    """A sparse gradient, as Keras's IndexedSlices: rows of a tensor's first axis.

    `values[i]` is the gradient of row `indices[i]`; duplicate indices are summed.
    """

    indices: Any  # int array-like, shape (n,)
    values: Any  # float array-like, shape (n, *tensor_shape[1:])


def framework_of(value: Any) -> str:
    """"torch", "jax", "tensorflow" or "numpy" (anything else), from the top package of the value's class."""
    package = type(value).__module__.split(".")[0]
    if package in ("jax", "jaxlib"):
        return "jax"
    return package if package in ("torch", "tensorflow") else "numpy"


def sparse_rows(value: Any) -> IndexedSlices | None:
    """The rows of a sparse gradient, or None for a dense one.

    Sparse are: this module's IndexedSlices, TensorFlow's `tf.IndexedSlices` (by
    class; TensorFlow is not imported) and a torch sparse COO tensor with one
    sparse dimension (`nn.Embedding(sparse=True)` gives those), coalesced first.
    Other torch sparse layouts go dense.
    """
    if isinstance(value, IndexedSlices):
        return value
    if any(cls.__name__ == "IndexedSlices" and cls.__module__.split(".")[0] == "tensorflow"
           for cls in type(value).__mro__):
        return IndexedSlices(to_numpy(value.indices), to_numpy(value.values))
    if framework_of(value) == "torch":
        torch = sys.modules["torch"]
        if isinstance(value, torch.Tensor) and value.layout == torch.sparse_coo and value.sparse_dim() == 1:
            rows = value.detach().coalesce()
            return IndexedSlices(rows.indices()[0].cpu().numpy(), _torch_dense(rows.values()))
    return None


def to_numpy(value: Any) -> np.ndarray:
    """A NumPy array of the value's data (no copy where the framework allows it).

    torch tensors are detached and brought to the CPU (requiring grad or not,
    sparse ones densified); JAX arrays and TensorFlow eager tensors and variables
    are read through `np.asarray`. A symbolic value (a tracer, a graph tensor) has
    no data and raises InvalidArgumentError in the caller's field.
    """
    if framework_of(value) == "torch":
        torch = sys.modules["torch"]
        if isinstance(value, torch.Tensor):
            return _torch_dense(value.to_dense() if value.layout != torch.strided else value)
    return np.asarray(value)


def _torch_dense(tensor: Any) -> np.ndarray:
    """A strided torch tensor as NumPy: detached, on the CPU; bfloat16 as ml_dtypes' bfloat16 when installed."""
    torch = sys.modules["torch"]
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:  # NumPy has no bfloat16: its bits, viewed as ml_dtypes' type or widened
        try:
            import ml_dtypes
        except ImportError:
            return tensor.float().numpy(force=True)
        return tensor.view(torch.int16).numpy(force=True).view(ml_dtypes.bfloat16)
    return tensor.numpy(force=True)


def like(array: np.ndarray, example: Any, field: str) -> Any:
    """`array` as the type of `example` (torch tensor, JAX array, TF tensor, NumPy), with its dtype and device.

    A torch tensor shares the array's memory when it is already on the CPU and
    of float32; other types are copied by their framework.
    """
    if hasattr(example, "shape") and tuple(example.shape) != array.shape:
        raise InvalidArgumentError(f"{field}: has shape {tuple(example.shape)}, the optimizer's tensor "
                                   f"{array.shape}")
    framework = framework_of(example)
    if framework == "torch":
        torch = sys.modules["torch"]
        if isinstance(example, torch.Tensor):
            tensor = torch.from_numpy(array if array.flags.writeable else array.copy())
            return tensor.to(device=example.device, dtype=example.dtype)
    if framework == "jax":
        import jax  # loaded already: the example is a JAX array

        return jax.device_put(np.asarray(array, dtype=example.dtype), getattr(example, "sharding", None))
    if framework == "tensorflow":
        import tensorflow as tf  # loaded already: the example is a TensorFlow value

        return tf.convert_to_tensor(array, dtype=example.dtype)
    if isinstance(example, np.ndarray):
        return array.astype(example.dtype, copy=False)
    return array
