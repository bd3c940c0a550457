"""The client: sparse gradients recognised by type, and its own refusals as OptserveError INVALID_ARGUMENT."""

import grpc
import numpy as np
import pytest

from optserve.client import Client, IndexedSlices, InvalidArgumentError, OptserveError
from tests.conftest import stepped_weights

PARAMS = {"w": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3), "emb": np.ones((4, 2), np.float32)}
DENSE = {"w": np.full((2, 3), 0.25, np.float32), "emb": np.full((4, 2), -0.5, np.float32)}


class TensorLike:
    """Like a torch.Tensor: `indices()` and `values()` methods (for sparse layouts), and `__array__`."""

    def __init__(self, array: np.ndarray):
        self._array = array

    def indices(self):
        raise RuntimeError("indices() of a dense tensor")

    def values(self):
        raise RuntimeError("values() of a dense tensor")

    def __array__(self, dtype=None, copy=None):
        return self._array if dtype is None else self._array.astype(dtype)


def _tf_indexed_slices_class() -> type:
    """A class that stands where TensorFlow keeps its IndexedSlices (TF itself is not installed here)."""
    cls = type("IndexedSlices", (), {"__init__": lambda self, values, indices: (
        setattr(self, "values", values), setattr(self, "indices", indices)) and None})
    cls.__module__ = "tensorflow.python.framework.indexed_slices"
    return cls


def _pushed_weights(client: Client, name: str, grads: dict) -> dict:
    return stepped_weights(client, name, PARAMS, grads)


def test_tensor_with_indices_and_values_methods_goes_dense(client: Client, name: str) -> None:
    want = _pushed_weights(client, name + "-np", DENSE)
    got = _pushed_weights(client, name, {k: TensorLike(v) for k, v in DENSE.items()})
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])


def test_torch_tensor_goes_dense(client: Client, name: str) -> None:
    torch = pytest.importorskip("torch")
    want = _pushed_weights(client, name + "-np", DENSE)
    got = _pushed_weights(client, name, {k: torch.from_numpy(v.copy()) for k, v in DENSE.items()})
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])


def test_tensorflow_indexed_slices_is_sparse_by_class(client: Client, name: str) -> None:
    rows, indices = np.full((2, 2), -0.5, np.float32), np.array([1, 3])
    want = _pushed_weights(client, name + "-own", {"w": DENSE["w"], "emb": IndexedSlices(indices, rows)})
    got = _pushed_weights(client, name, {"w": DENSE["w"], "emb": _tf_indexed_slices_class()(rows, indices)})
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    assert got["emb"][0].tolist() == PARAMS["emb"][0].tolist()  # row 0 had no gradient: sparse, not dense


@pytest.mark.parametrize("call,fragment", [
    (lambda opt: opt.push({"w": DENSE["w"], "emb": IndexedSlices(np.array([1, 2]), np.ones((1, 2)))}),
     "gradients['emb']: 2 indices for 1 rows"),
    (lambda opt: opt.push({"w": np.array([object()] * 6).reshape(2, 3), "emb": DENSE["emb"]}),
     "gradients['w'].dtype: dtype object cannot be sent"),
    (lambda opt: opt.push(DENSE, wire_dtype="float8"), "wire_dtype: must be"),
    (lambda opt: opt.pull_slot(""), "slot: must be a slot's tf-keras name"),
    (lambda opt: opt.pull(into={"w": np.zeros((2, 3), np.float32)}), "into: must be the Weights"),
    (lambda opt: opt.pull(names=["w"], into=opt.pull()), "into: holds tensors"),
    (lambda opt: opt.client.create_optimizer(opt.name + "x", PARAMS, mode="lockstep"), "mode: must be one of"),
    (lambda opt: opt.client.create_optimizer(opt.name + "x", {"w": "abc"}), "params['w']: cannot be read"),
], ids=["sparse rows and indices disagree", "object dtype", "wire_dtype", "slot", "into", "into other tensors", "mode",
     "params"])
def test_client_side_refusals_are_invalid_argument(client: Client, name: str, call, fragment) -> None:
    opt = client.create_optimizer(name, PARAMS)
    try:
        with pytest.raises(OptserveError) as caught:
            call(opt)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fragment in caught.value.details(), caught.value.details()
        assert isinstance(caught.value, InvalidArgumentError) and isinstance(caught.value, ValueError)
        assert opt.info().version == 0
    finally:
        client.delete_optimizer(name)
