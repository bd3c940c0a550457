"""The Python client: NumPy arrays in, NumPy arrays out, over gRPC.

Needs only grpcio, protobuf and NumPy; anything `np.asarray` accepts (NumPy,
JAX, PyTorch CPU tensors) can be sent. Every failure raises `OptserveError`,
which carries the gRPC status code and the server's message.
"""

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import grpc
import numpy as np

from optserve.client.wire import CHUNK_BYTES, ChunkBuffer, data_type_of, iter_chunks
from optserve.v1 import optserve_pb2 as pb
from optserve.v1 import optserve_pb2_grpc as pb_grpc

_NON_FINITE = {"refuse": pb.NON_FINITE_POLICY_REFUSE, "apply": pb.NON_FINITE_POLICY_APPLY}
_SLOTS = {"m": pb.STATE_KIND_FIRST_MOMENT, "v": pb.STATE_KIND_SECOND_MOMENT, "vhat": pb.STATE_KIND_VHAT}


class OptserveError(grpc.RpcError):
    """A failed call: `code()` is the grpc.StatusCode, `details()` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class IndexedSlices(NamedTuple):
    """A sparse gradient, as Keras's IndexedSlices: rows of a tensor's first axis.

    `values[i]` is the gradient of row `indices[i]`; duplicate indices are summed.
    """

    indices: Any  # int array-like, shape (n,)
    values: Any  # float array-like, shape (n, *tensor_shape[1:])


class Weights(dict):
    """Tensors by name, from one version of an optimizer."""

    def __init__(self, tensors: Mapping[str, np.ndarray], version: int, iterations: int):
        super().__init__(tensors)
        self.version = version
        self.iterations = iterations


@dataclass(frozen=True)
class OptimizerInfo:
    """An optimizer's metadata as the server reported it."""

    name: str
    iterations: int
    version: int
    config: dict[str, Any]  # Keras Adam arguments, defaults filled in
    tensors: dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, dtype)
    device: str
    non_finite_policy: str
    next_learning_rate: float

    @classmethod
    def from_wire(cls, info: pb.OptimizerInfo) -> "OptimizerInfo":
        policies = {v: k for k, v in _NON_FINITE.items()}
        return cls(
            name=info.name,
            iterations=info.iterations,
            version=info.version,
            config=json.loads(info.config_json),
            tensors={t.name: (tuple(t.shape), "float32") for t in info.tensors},
            device=info.device,
            non_finite_policy=policies.get(info.non_finite_policy, "refuse"),
            next_learning_rate=info.next_learning_rate,
        )


class Client:
    """A connection to one optserve server.

    The constructor waits up to `timeout` seconds for the server to accept
    connections; every call then gets `timeout` seconds as its deadline.
    """

    def __init__(self, address: str, timeout: float = 30.0, *, chunk_bytes: int = CHUNK_BYTES):
        self.address = address
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self._channel = grpc.insecure_channel(address)
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            self._channel.close()
            raise OptserveError(grpc.StatusCode.UNAVAILABLE, f"server at {address} not reachable after {timeout} s")
        self._stub = pb_grpc.OptimizerServiceStub(self._channel)

    def create_optimizer(
        self, name: str, params: Mapping[str, Any], config: Mapping[str, Any] | None = None,
        *, non_finite_policy: str = "refuse",
    ) -> "Optimizer":
        """Creates an optimizer from initial weights and Keras Adam arguments.

        `params` maps tensor names to arrays (cast to float32); `config` takes
        any tf-keras `Adam` keyword argument, or an `Adam.get_config()` dict.
        `non_finite_policy` is "refuse" (NaN/Inf gradients are refused) or
        "apply" (as Keras: they reach the weights).
        """
        if non_finite_policy not in _NON_FINITE:
            raise ValueError(f"non_finite_policy must be one of {sorted(_NON_FINITE)}, got {non_finite_policy!r}")
        arrays = {key: _as_float32(value) for key, value in params.items()}
        header = pb.CreateOptimizerHeader(
            name=name,
            config_json=json.dumps(dict(config or {})),
            tensors=[pb.TensorSpec(name=k, dtype=pb.DATA_TYPE_FLOAT32, shape=a.shape) for k, a in arrays.items()],
            non_finite_policy=_NON_FINITE[non_finite_policy],
        )
        messages = self._stream(pb.CreateOptimizerRequest, header, arrays.values())
        self._call(self._stub.CreateOptimizer, messages)
        return Optimizer(self, name)

    def optimizer(self, name: str) -> "Optimizer":
        """A handle to an existing optimizer; NOT_FOUND if there is none."""
        self._call(self._stub.GetOptimizer, pb.GetOptimizerRequest(name=name))
        return Optimizer(self, name)

    def list_optimizers(self) -> list[OptimizerInfo]:
        """Every optimizer on the server, sorted by name."""
        reply = self._call(self._stub.ListOptimizers, pb.ListOptimizersRequest())
        return [OptimizerInfo.from_wire(info) for info in reply.optimizers]

    def delete_optimizer(self, name: str) -> None:
        """Deletes an optimizer and its state."""
        self._call(self._stub.DeleteOptimizer, pb.DeleteOptimizerRequest(name=name))

    def close(self) -> None:
        """Closes the connection."""
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _stream(self, message_type: type, header: Any, arrays: Iterable[np.ndarray]) -> Iterator:
        yield message_type(header=header)
        for chunk in iter_chunks(arrays, self.chunk_bytes):
            yield message_type(chunk=chunk)

    def _call(self, method: Callable, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as err:
            raise OptserveError(err.code(), err.details()) from None


class Optimizer:
    """A handle to one optimizer on a server."""

    def __init__(self, client: Client, name: str):
        self.client = client
        self.name = name

    def push(self, grads: Mapping[str, Any]) -> int:
        """Applies one Adam step; returns the version it produced.

        `grads` holds a gradient for every tensor: an array of the tensor's
        shape, or an `IndexedSlices` (any object with `indices` and `values`).
        Float arrays go as float32, or as float16/bfloat16 if they are already.
        """
        specs, arrays = [], []
        for name, grad in grads.items():
            if hasattr(grad, "indices") and hasattr(grad, "values"):
                indices = np.asarray(grad.indices)
                values = _as_gradient(grad.values)
                if indices.ndim != 1 or values.ndim < 1 or len(indices) != len(values):
                    rows = values.shape[0] if values.ndim else 0
                    raise ValueError(f"gradients[{name!r}]: {indices.size} indices for {rows} rows;"
                                     " IndexedSlices needs 1-D indices, one per row of values")
                specs.append(pb.GradientSpec(name=name, dtype=data_type_of(values.dtype), shape=values.shape,
                                             sparse=True, index_dtype=data_type_of(indices.dtype)))
                arrays += [indices, values]
            else:
                values = _as_gradient(grad)
                specs.append(pb.GradientSpec(name=name, dtype=data_type_of(values.dtype), shape=values.shape))
                arrays.append(values)
        header = pb.PushHeader(optimizer=self.name, gradients=specs)
        messages = self.client._stream(pb.PushGradientsRequest, header, arrays)
        return self.client._call(self.client._stub.PushGradients, messages).version

    def pull(self, ema: bool = False, names: Iterable[str] = ()) -> Weights:
        """The current weights (or, with `ema=True`, their moving average).

        `names` picks a subset of tensors; all of them when empty. Every tensor
        comes from the same version, reported as `.version`.
        """
        return self._pull(pb.STATE_KIND_EMA if ema else pb.STATE_KIND_WEIGHTS, names)

    def pull_slot(self, slot: str, names: Iterable[str] = ()) -> Weights:
        """Adam's state: slot "m" (first moment), "v" (second) or "vhat" (AMSGrad max)."""
        if slot not in _SLOTS:
            raise ValueError(f"slot must be one of {sorted(_SLOTS)}, got {slot!r}")
        return self._pull(_SLOTS[slot], names)

    def _pull(self, kind: int, names: Iterable[str]) -> Weights:
        request = pb.PullWeightsRequest(optimizer=self.name, kind=kind, names=list(names))
        try:
            return _read_weights(self.client._stub.PullWeights(request, timeout=self.client.timeout))
        except grpc.RpcError as err:
            raise OptserveError(err.code(), err.details()) from None

    def info(self) -> OptimizerInfo:
        """Iterations, version, config with defaults, tensor shapes and device."""
        return OptimizerInfo.from_wire(self.client._call(self.client._stub.GetOptimizer,
                                                         pb.GetOptimizerRequest(name=self.name)))

    def finalize(self) -> OptimizerInfo:
        """Copies the EMA into the weights (Keras `finalize_variable_values`)."""
        return OptimizerInfo.from_wire(self.client._call(self.client._stub.FinalizeOptimizer,
                                                         pb.FinalizeOptimizerRequest(name=self.name)))

    def __repr__(self) -> str:
        return f"Optimizer({self.name!r} at {self.client.address})"


def _read_weights(responses: Iterator[pb.PullWeightsResponse]) -> Weights:
    header = next(responses).header
    shapes = [tuple(t.shape) for t in header.tensors]
    nbytes = [4 * int(np.prod(shape, dtype=np.int64)) for shape in shapes]
    buffer = ChunkBuffer(sum(nbytes), _protocol_error)
    for message in responses:
        buffer.write(message.chunk)
    if buffer.filled != len(buffer.data):
        raise _protocol_error(f"pull ended after {buffer.filled} of {len(buffer.data)} bytes")
    tensors, offset = {}, 0
    for spec, shape, size in zip(header.tensors, shapes, nbytes):
        tensors[spec.name] = buffer.view(offset, spec.dtype, shape)
        offset += size
    return Weights(tensors, header.version, header.iterations)


def _protocol_error(message: str) -> OptserveError:
    return OptserveError(grpc.StatusCode.DATA_LOSS, message)


def _as_float32(value: Any) -> np.ndarray:
    return np.asarray(value, dtype=np.float32)


def _as_gradient(value: Any) -> np.ndarray:
    """Float64 and Python numbers become float32; every other dtype is sent as it is."""
    array = np.asarray(value)
    if array.dtype == np.float64:
        return array.astype(np.float32)
    return array
