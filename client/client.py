"""The Python client: NumPy arrays in, NumPy arrays out, over gRPC.

Needs only grpcio, protobuf and NumPy; NumPy arrays, torch tensors, JAX arrays and
TensorFlow tensors can be sent (see `optserve.client.arrays`), in pytrees whose
paths name the tensors (see `optserve.client.trees`). Every failure raises
`OptserveError`, which carries the gRPC status code and the server's message.
"""

import json
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from optserve.client import attach, bulk, trees
from optserve.client.arrays import IndexedSlices, sparse_rows, to_numpy
from optserve.client.errors import InvalidArgumentError, OptserveError, protocol_error
from optserve.client.security import TLS, as_tls, make_channel
from optserve.client.shared_memory import LocalTransport
from optserve.client.weights import Weights
from optserve.wire.chunks import CHUNK_BYTES, encode_stream, stream_message_parser
from optserve.wire.dtypes import data_type_of, to_bfloat16
from optserve.wire.layout import ChunkBuffer
from optserve.v1 import optserve_pb2 as pb
from optserve.v1 import optserve_pb2_grpc as pb_grpc

_NON_FINITE = {"refuse": pb.NON_FINITE_POLICY_REFUSE, "apply": pb.NON_FINITE_POLICY_APPLY}
_MISSING = {"refuse": pb.MISSING_GRADIENTS_REFUSE, "skip": pb.MISSING_GRADIENTS_SKIP}
_SLOTS = {"m": pb.STATE_KIND_FIRST_MOMENT, "v": pb.STATE_KIND_SECOND_MOMENT, "vhat": pb.STATE_KIND_VHAT}
_MODES = {"async": pb.MODE_ASYNC, "sync": pb.MODE_SYNC}
_AGGREGATIONS = {"mean": pb.AGGREGATION_MEAN, "sum": pb.AGGREGATION_SUM}
RETRY_BACKOFF = 0.05  # seconds before the second try of a retryable call; doubles after each, with jitter
RETRY_BACKOFF_MAX = 1.0  # seconds between tries at most
RETRY_ATTEMPTS = 100  # tries at most; the client's timeout bounds them first
SERVICE_NAME = "optserve.v1.OptimizerService"
# How tensor bytes travel: "local" through shared memory (same host only), "network" through a bulk
# channel beside gRPC, "grpc" in the gRPC stream's chunks (the portable protocol of proto/), "auto"
# the fastest that works.
TRANSPORTS = ("auto", "local", "network", "grpc")
_CHANNEL_OPTIONS = [  # times in ms
    ("grpc.initial_reconnect_backoff_ms", 100),  # reconnect fast after a server restart
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 30_000),  # ping every 30 s to notice a dead server (the server allows 10 s)
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 16 << 20),  # chunks are 1 MiB: a generous cap
]
_READ_RETRY = frozenset({grpc.StatusCode.UNAVAILABLE})  # reads are safe to repeat
_PUSH_RETRY = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})  # with (worker_id, seq)


class PushResult(int):
    """The version whose weights first include a push's gradient (an int), with the rest of the answer."""

    iterations: int  # Adam steps applied at that version
    duplicate: bool  # a retry of an already accepted (worker_id, seq), answered, not applied again
    # a shard's two-phase sync round (see optserve.client.sharded): closed, waiting for its commit
    prepared: bool = False
    round_square_sums: pb.NormInputs | None = None  # that round's own sums of squares on the shard

    @classmethod
    def from_wire(cls, reply: pb.PushGradientsResponse) -> "PushResult":
        result = cls(reply.version)
        result.iterations, result.duplicate = reply.iterations, reply.duplicate
        result.prepared = reply.prepared
        result.round_square_sums = reply.round_square_sums if reply.HasField("round_square_sums") else None
        return result


@dataclass(frozen=True)
class OptimizerInfo:
    """An optimizer's metadata as the server reported it."""

    name: str
    iterations: int
    version: int
    config: dict[str, Any]  # the class's Keras arguments, defaults filled in
    tensors: dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, dtype)
    device: str
    non_finite_policy: str
    next_learning_rate: float
    training_mode: dict[str, Any]  # mode, num_workers, backup_workers, aggregation, sync_timeout, max_staleness
    pending_gradients: int  # sync: gradients in the open round
    saved_version: int  # version of the newest checkpoint on disk; -1 without a data dir
    pushes_per_second: float  # accepted pushes per second over the last 10 seconds
    last_push_age: float | None  # seconds since the last accepted push; None before the first
    # connections that moved its tensors recently, most recent first: peer, transport ("grpc",
    # "shared_memory" or "bulk"), bytes_received, bytes_sent, last_seen_age (seconds)
    clients: tuple[dict[str, Any], ...] = ()
    optimizer: str = "Adam"  # the tf-keras class, e.g. "RMSprop"
    slots: tuple[str, ...] = ()  # the class's slots by tf-keras name, for `pull_slot`
    # a shard of a logical optimizer over several servers: index, count, digest, max_shard_bytes and
    # pieces [(name, tensor, shard, row_start, row_stop, tensor_shape)]; None for a one-server optimizer
    shard: dict[str, Any] | None = None
    shards: tuple["OptimizerInfo", ...] = ()  # a sharded client's info: each shard's own, in shard order
    non_trainable: tuple[str, ...] = ()  # tensors of non-trainable state (create_optimizer's `state`)

    @classmethod
    def from_wire(cls, info: pb.OptimizerInfo) -> "OptimizerInfo":
        policies = {v: k for k, v in _NON_FINITE.items()}
        mode = info.training_mode
        return cls(
            name=info.name,
            iterations=info.iterations,
            version=info.version,
            config=json.loads(info.config_json),
            tensors={t.name: (tuple(t.shape), "float32") for t in info.tensors},
            device=info.device,
            non_finite_policy=policies.get(info.non_finite_policy, "refuse"),
            next_learning_rate=info.next_learning_rate,
            training_mode={
                "mode": {v: k for k, v in _MODES.items()}.get(mode.mode, "async"),
                "num_workers": mode.num_workers,
                "backup_workers": mode.backup_workers,
                "aggregation": {v: k for k, v in _AGGREGATIONS.items()}.get(mode.aggregation, "mean"),
                "sync_timeout": mode.sync_timeout_seconds,
                "max_staleness": mode.max_staleness if mode.HasField("max_staleness") else None,
            },
            pending_gradients=info.pending_gradients,
            saved_version=info.saved_version,
            pushes_per_second=info.pushes_per_second,
            last_push_age=info.last_push_age_seconds if info.HasField("last_push_age_seconds") else None,
            clients=tuple({"peer": c.peer, "transport": c.transport, "bytes_received": c.bytes_received,
                           "bytes_sent": c.bytes_sent, "last_seen_age": c.last_seen_age_seconds}
                          for c in info.clients),
            optimizer=info.optimizer or "Adam",  # a server from before the family serves Adam only
            slots=tuple(info.slots),
            shard=_shard_from_wire(info.shard) if info.HasField("shard") else None,
            non_trainable=tuple(t.name for t in info.tensors if t.non_trainable),
        )


class Client:
    """A connection to one optserve server (or, given a list of addresses or a "dns:///" name, to several).

    The constructor waits up to `timeout` seconds for the server to report
    SERVING on the gRPC health service (a server restoring its data dir reports
    NOT_SERVING); every call then gets `timeout` seconds. Calls safe to repeat
    (reads, and pushes with worker_id and seq) are retried with backoff on
    UNAVAILABLE, across a server restart, within that time.

    `tls` is None (plaintext), True (TLS checked against the system roots), the
    path of a CA PEM file, or a `TLS` (CA, client certificate and key for mTLS,
    server name override). `token` is sent as `authorization: Bearer <token>` on
    every call. A TLS handshake that fails (unknown CA, no client certificate)
    makes the constructor raise UNAVAILABLE once `timeout` runs out.

    `transport` (see TRANSPORTS) chooses how tensor bytes travel; "auto" takes
    shared memory when the server shares this host, else the bulk channel.

    `Client(["h0:50051", "h1:50051"])` and `Client("dns:///name:50051")` (every
    address of the name) return a `ShardedClient` (optserve.client.sharded):
    the same API over one logical optimizer spread over those servers.
    """

    def __new__(cls, address: "str | Sequence[str]" = "", *args: Any, **kwargs: Any):
        if cls is Client and (not isinstance(address, str) or address.startswith("dns:///")):
            from optserve.client.sharded import ShardedClient  # it builds on this module

            return ShardedClient(address, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, address: str, timeout: float = 30.0, *, chunk_bytes: int = CHUNK_BYTES,
                 tls: bool | str | TLS | None = None, token: str | None = None, transport: str = "auto"):
        if transport not in TRANSPORTS:
            raise InvalidArgumentError(f"transport: must be one of {list(TRANSPORTS)}, got {transport!r}")
        self.transport = transport
        self.address = address
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self._channel = make_channel(address, _CHANNEL_OPTIONS, as_tls(tls), token)
        self._stub = pb_grpc.OptimizerServiceStub(self._channel)
        self._bulk = None if transport not in ("auto", "network") else bulk.BulkPool(  # tensor bytes beside gRPC
            address, as_tls(tls),
            lambda timeout: self._stub.OpenBulkChannel(pb.OpenBulkChannelRequest(), timeout=timeout))
        # The tensor streams use the hand-made chunk encoding of optserve.wire (same bytes, fewer copies).
        path = f"/{SERVICE_NAME}/"
        self._create = self._channel.stream_unary(path + "CreateOptimizer", request_serializer=bytes,
                                                  response_deserializer=pb.OptimizerInfo.FromString)
        self._push = self._channel.stream_unary(path + "PushGradients", request_serializer=bytes,
                                                response_deserializer=pb.PushGradientsResponse.FromString)
        self._pull = self._channel.unary_stream(path + "PullWeights",
                                                request_serializer=pb.PullWeightsRequest.SerializeToString,
                                                response_deserializer=stream_message_parser(pb.PullWeightsResponse))
        # "auto" and "local": tensor bytes through shared memory when the server shares this host
        self._local = LocalTransport(self, required=transport == "local") if transport in ("auto", "local") else None
        try:
            self._wait_until_serving(timeout)
        except BaseException:
            self._channel.close()
            raise

    def create_optimizer(
        self, name: str, params: Any, config: Mapping[str, Any] | None = None, *,
        mode: str = "async", num_workers: int = 1, backup_workers: int = 0, aggregation: str = "mean",
        sync_timeout: float = 60.0, max_staleness: int | None = None, non_finite_policy: str = "refuse",
        optimizer: str | None = None, if_exists: str = "refuse", state: Any = None,
        shard: pb.ShardDescription | None = None,
    ) -> "Optimizer":
        """Creates an optimizer from initial weights and a tf-keras optimizer's arguments.

        `params` is a pytree of arrays (cast to float32), a flat dict of names
        or a nested one whose paths name the tensors (`optserve.client.trees`). `optimizer` is
        the tf-keras class ("SGD", "RMSprop", "Adagrad", "Adadelta", "Adam",
        "AdamW", "Adamax", "Nadam", "Ftrl", "Lion", "Adafactor"; default
        "Adam"); `config` takes its keyword arguments, its `get_config()`
        dict, or the optimizer as `tf_keras.optimizers.serialize(opt)` (or
        Keras 3's `keras.optimizers.serialize`) writes it, which names its
        class itself (then `optimizer` may be left out).
        `mode` "async" applies every push as one step (`max_staleness` bounds
        how many versions behind its `base_version` may be); "sync" applies one
        step per round of `num_workers` gradients (of `num_workers +
        backup_workers` workers), combined by `aggregation` ("mean" or "sum"),
        closing a round early `sync_timeout` seconds after its first gradient.
        `non_finite_policy` is "refuse" (NaN/Inf gradients are refused) or
        "apply" (as Keras: they reach the weights). `shard` makes it one shard
        of a logical optimizer (`params` its pieces); a ShardedClient sets it.
        "apply" (as Keras: they reach the weights).

        `if_exists` "refuse" answers ALREADY_EXISTS for a taken name; "attach"
        makes this create-if-missing (`optserve.client.attach`): the first worker
        creates, the others get a handle, and ALREADY_EXISTS names the first
        tensor shape, config key or mode setting in which the existing optimizer
        differs.

        `state`, a pytree like `params`, holds non-trainable state (BatchNorm
        moving statistics): kept and served with the weights (every pull has
        them), never stepped; `push(..., state=...)` replaces their values
        (sync: with the mean of the round's). Its paths may not be those of `params`.
        """
        for value, allowed, what in [(non_finite_policy, _NON_FINITE, "non_finite_policy"), (mode, _MODES, "mode"),
                                     (aggregation, _AGGREGATIONS, "aggregation"),
                                     (if_exists, {"refuse": 0, "attach": 1}, "if_exists")]:
            if value not in allowed:
                raise InvalidArgumentError(f"{what}: must be one of {sorted(allowed)}, got {value!r}")
        arrays = {key: _as_float32(value, f"params[{key!r}]") for key, value in trees.flatten(params, "params").items()}
        extra = {} if state is None else {key: _as_float32(value, f"state[{key!r}]")
                                          for key, value in trees.flatten(state, "state").items()}
        taken = [key for key in extra if key in arrays]
        if taken:
            raise InvalidArgumentError(f"state[{taken[0]!r}]: a tensor of params has that path already")
        arrays.update(extra)
        header = pb.CreateOptimizerHeader(
            name=name,
            config_json=json.dumps(dict(config or {})),
            tensors=[pb.TensorSpec(name=k, dtype=pb.DATA_TYPE_FLOAT32, shape=a.shape, non_trainable=k in extra)
                     for k, a in arrays.items()],
            non_finite_policy=_NON_FINITE[non_finite_policy],
            optimizer=optimizer or "",
            training_mode=pb.TrainingMode(
                mode=_MODES[mode], num_workers=num_workers, backup_workers=backup_workers,
                aggregation=_AGGREGATIONS[aggregation], sync_timeout_seconds=sync_timeout,
                max_staleness=max_staleness),
            shard=shard,
        )

        def create() -> None:
            self._call(self._create, lambda: encode_stream(header, arrays.values(), self.chunk_bytes))

        if if_exists == "refuse":
            create()
        else:
            settings = {"mode": mode, "num_workers": num_workers, "backup_workers": backup_workers,
                        "aggregation": aggregation, "sync_timeout": sync_timeout, "max_staleness": max_staleness,
                        "non_finite_policy": non_finite_policy, "non_trainable": tuple(extra)}
            if optimizer:
                settings["optimizer"] = optimizer
            attach.create_or_attach(create, Optimizer(self, name).info, {k: a.shape for k, a in arrays.items()},
                                    dict(config or {}), settings)
        return Optimizer(self, name)

    def optimizer(self, name: str) -> "Optimizer":
        """A handle to an existing optimizer; NOT_FOUND if there is none."""
        self._call(self._stub.GetOptimizer, lambda: pb.GetOptimizerRequest(name=name), retry=_READ_RETRY)
        return Optimizer(self, name)

    def list_optimizers(self) -> list[OptimizerInfo]:
        """Every optimizer on the server, sorted by name."""
        reply = self._call(self._stub.ListOptimizers, pb.ListOptimizersRequest, retry=_READ_RETRY)
        return [OptimizerInfo.from_wire(info) for info in reply.optimizers]

    def delete_optimizer(self, name: str) -> None:
        """Deletes an optimizer and its state."""
        self._call(self._stub.DeleteOptimizer, lambda: pb.DeleteOptimizerRequest(name=name))

    def close(self) -> None:
        """Closes the connection, freeing its shared-memory segments and bulk channels first."""
        if self._local is not None:
            self._local.close()
        if self._bulk is not None:
            self._bulk.close()
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _send_push(self, header: pb.PushHeader, arrays: list[np.ndarray], retry: frozenset) -> pb.PushGradientsResponse:
        """Sends one push by the client's transport; the answer, or OptserveError."""
        if self._local is not None:  # None from it: not on the server's host ("auto"), or a sparse push
            reply = self._local.push(header, arrays, retry)
            if reply is not None:
                return reply
        if self._bulk is not None and not self._bulk.disabled:
            reply = self._call(lambda _, **call: bulk.push(self._bulk, self._push, header, arrays, **call),
                               lambda: None, retry)
            if reply is not None:
                return reply
        return self._call(self._push, lambda: encode_stream(header, arrays, self.chunk_bytes), retry)

    def _fetch_pull(self, request: pb.PullWeightsRequest, into: "Weights | None", timeout: float | None,
                    copy: bool = True) -> "Weights":
        """Runs one pull by the client's transport (retried on UNAVAILABLE: reads are safe to repeat).

        `copy` False: through shared memory, the tensors are views of the segment, valid until the next pull.
        """
        if self._local is not None:
            weights = self._local.pull(request, _pulled_layout, into, timeout, copy)
            if weights is not None:
                return weights
        if self._bulk is not None and not self._bulk.disabled:
            weights = self._call(
                lambda _, **call: bulk.pull(self._bulk, self._pull, request, **call,
                                            read=lambda responses, receive: _read_weights(responses, into, receive),
                                            error=protocol_error),
                lambda: None, _READ_RETRY, timeout)
            if weights is not None:
                return weights
        return self._call(lambda req, **kwargs: _read_weights(self._pull(req, **kwargs), into),
                          lambda: request, _READ_RETRY, timeout)

    def _wait_until_serving(self, timeout: float) -> None:
        """Follows the health service (a stream, not polling) until the optimizer service is SERVING."""
        health = health_pb2_grpc.HealthStub(self._channel)
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        watch = health.Watch(request, timeout=timeout, wait_for_ready=True)
        try:
            for reply in watch:
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise OptserveError(grpc.StatusCode.UNAVAILABLE,
                                    f"server at {self.address} not serving after {timeout} s") from None
            raise OptserveError(err.code(), err.details()) from None
        finally:
            watch.cancel()  # ends the stream: it would hold a call slot on the server
        raise OptserveError(grpc.StatusCode.UNAVAILABLE, f"server at {self.address} stopped serving")

    def _call(self, method: Callable, make_request: Callable[[], Any], retry: frozenset = frozenset(),
              timeout: float | None = None) -> Any:
        """Calls `method` with a fresh request per try, retrying the codes in `retry` until `timeout` runs out."""
        deadline = time.monotonic() + (timeout or self.timeout)
        delay = RETRY_BACKOFF
        for _ in range(RETRY_ATTEMPTS):
            remaining = deadline - time.monotonic()
            try:
                return method(make_request(), timeout=max(remaining, 0.001), wait_for_ready=bool(retry))
            except OptserveError:  # the client's own refusal (or one already translated): as it is
                raise
            except grpc.RpcError as err:
                pause = delay * random.uniform(0.5, 1.5)
                if err.code() not in retry or deadline - time.monotonic() < pause:
                    raise OptserveError(err.code(), err.details()) from None
            time.sleep(pause)
            delay = min(delay * 2, RETRY_BACKOFF_MAX)
        raise OptserveError(grpc.StatusCode.UNAVAILABLE, f"gave up after {RETRY_ATTEMPTS} tries")


class Optimizer:
    """A handle to one optimizer on a server."""

    def __init__(self, client: Client, name: str):
        self.client = client
        self.name = name

    def push(self, grads: Any, *, worker_id: str = "", seq: int | None = None,
             base_version: int | None = None, wire_dtype: str | None = None, missing: str = "refuse",
             state: Any = None, norm_inputs: pb.NormInputs | None = None) -> PushResult:
        """Sends one gradient for every tensor (or some, with `missing="skip"`); returns the version that includes it.

        `grads` is a pytree like the parameters' (`optserve.client.trees`) holding,
        per tensor, an array of the tensor's shape (NumPy, torch, JAX, TensorFlow) or a
        sparse gradient: an `IndexedSlices` of this module, TensorFlow's
        `tf.IndexedSlices` or a torch sparse COO tensor (recognised by type; anything
        else, a dense torch tensor included, is dense). Float arrays go
        as float32, or as float16/bfloat16 if they are already; `wire_dtype`
        "float16" or "bfloat16" rounds every gradient to that type first
        (round to nearest even), halving the bytes (the server upcasts; its
        state stays float32). `worker_id` and `seq` (increasing per worker)
        make the push exactly-once: it is then retried on UNAVAILABLE or
        DEADLINE_EXCEEDED, and a retry the server has seen is answered, not
        applied again. `base_version` is the version the gradient was computed
        from (required in sync mode and with max_staleness). The answer comes
        once the step is applied (sync: when the round closes) and, on a server
        with a write-ahead log, durable. `missing="skip"` lets `grads` leave
        tensors out: as tf-keras does for a variable whose gradient is None,
        the step leaves them exactly as they are (weights, slots, EMA), while
        it still counts as one step; "refuse" (the default) makes the server
        refuse such a push. `norm_inputs` (on a shard) carries the other
        shards' sums of squares for the clip; a ShardedClient sets it.
        it still counts as one step; a None leaf in `grads` is such a tensor.
        "refuse" (the default) makes the server refuse such a push.

        `state` holds new values of non-trainable tensors (`create_optimizer`'s
        `state`), sent as float32 whatever `wire_dtype` says; they replace the
        old ones after the step (sync: the mean of the values the round's pushes
        carry). Tensors of state that a push leaves out stay as they are.
        """
        if missing not in _MISSING:
            raise InvalidArgumentError(f"missing: must be one of {sorted(_MISSING)}, got {missing!r}")
        if wire_dtype not in (None, "float32", "float16", "bfloat16"):
            raise InvalidArgumentError(f"wire_dtype: must be float32, float16 or bfloat16, got {wire_dtype!r}")
        specs, arrays = [], []
        for name, grad in trees.flatten(grads, "gradients").items():
            if grad is None:  # a tensor without a gradient (an unused layer), as frameworks give it
                if missing == "skip":
                    continue
                raise InvalidArgumentError(f"gradients[{name!r}]: is None (no gradient); push with missing='skip' "
                                           "to leave such tensors as they are")
            sparse = sparse_rows(grad)
            data_type, values = _wire_values(grad if sparse is None else sparse.values, wire_dtype,
                                             f"gradients[{name!r}]")
            if sparse is None:
                specs.append(pb.GradientSpec(name=name, dtype=data_type, shape=values.shape))
                arrays.append(values)
                continue
            indices = np.asarray(sparse.indices)
            if indices.ndim != 1 or values.ndim < 1 or len(indices) != len(values):
                rows = values.shape[0] if values.ndim else 0
                raise InvalidArgumentError(f"gradients[{name!r}]: {indices.size} indices for {rows} rows;"
                                           " IndexedSlices needs 1-D indices, one per row of values")
            specs.append(pb.GradientSpec(name=name, dtype=data_type, shape=values.shape, sparse=True,
                                         index_dtype=_data_type(indices.dtype, f"gradients[{name!r}].indices")))
            arrays += [indices, values]
        for name, value in ({} if state is None else trees.flatten(state, "state")).items():
            if any(spec.name == name for spec in specs):
                raise InvalidArgumentError(f"state[{name!r}]: also in gradients; a tensor takes a gradient or a value")
            values = _as_float32(value, f"state[{name!r}]")
            specs.append(pb.GradientSpec(name=name, dtype=pb.DATA_TYPE_FLOAT32, shape=values.shape))
            arrays.append(values)
        header = pb.PushHeader(optimizer=self.name, gradients=specs, worker_id=worker_id, seq=seq,
                               base_version=base_version, missing=_MISSING[missing], norm_inputs=norm_inputs)
        retry = _PUSH_RETRY if worker_id and seq is not None else frozenset()
        return PushResult.from_wire(self.client._send_push(header, arrays, retry))

    def pull(self, ema: bool = False, names: Iterable[str] = (), *, min_version: int | None = None,
             timeout: float | None = None, into: Weights | None = None, copy: bool = True, like: Any = None) -> Any:
        """The current weights (or, with `ema=True`, their moving average), a `Weights` or, with `like`, a tree.

        `names` picks a subset of tensors; all of them when empty. Every tensor
        comes from one version, reported as `.version`. With `min_version`, the
        server first waits (up to `timeout` seconds, default the client's)
        until the optimizer reaches that version; DEADLINE_EXCEEDED if it does not.

        `into`, an earlier pull's result with the same tensors, is overwritten
        with the new values instead of allocating fresh memory (a large fresh
        buffer costs a page fault per 4 KiB on first touch); its arrays and
        the returned ones share that memory. A pull that fails part way leaves
        `into` partly overwritten. InvalidArgumentError (a ValueError) if the tensors differ.

        `copy=False` skips the one copy out of a same-host segment: the
        returned tensors are then views of it, overwritten by this client's
        next pull of this optimizer (over the stream it changes nothing).

        `like`, a pytree of arrays (the parameters as given to create, or any
        subtree of them), pulls the tensors its paths name and returns them in
        its structure, each leaf of its leaf's type, dtype and device (torch,
        JAX, TensorFlow or NumPy; `Weights.as_tree`). Its version is not kept:
        `w = opt.pull(); w.as_tree(like)` has both.
        """
        if like is not None:
            if names:
                raise InvalidArgumentError("names: give names or like, not both (like's paths name the tensors)")
            names = list(trees.flatten(like, "like"))
        weights = self._pull(pb.STATE_KIND_EMA if ema else pb.STATE_KIND_WEIGHTS, names, min_version, timeout, into,
                             copy)
        return weights if like is None else weights.as_tree(like)

    def gradient_buffers(self) -> dict[str, np.ndarray]:
        """Writable float32 arrays, one per tensor, to compute gradients into: a push of exactly these copies nothing.

        Over shared memory they are views of this optimizer's segment, whose
        bytes the next push sends (another push of other arrays overwrites
        them); without one (another host, transport "network"), plain arrays.
        """
        local = self.client._local
        views = None if local is None else local.gradient_buffers(self.name)
        if views is None:
            return {name: np.zeros(shape, np.float32) for name, (shape, _) in self.info().tensors.items()}
        return views

    def pull_slot(self, slot: str, names: Iterable[str] = ()) -> Weights:
        """One slot of the optimizer's class by its tf-keras name (`info().slots`).

        Adam: "m" (first moment), "v" (second) or "vhat" (AMSGrad max); SGD "m";
        RMSprop "velocity", "momentum", "average_gradient"; Adagrad
        "accumulator"; Adadelta "accumulated_grad", "accumulated_delta_var";
        Adamax "m", "u"; Nadam "m", "v"; Ftrl "accumulator", "linear"; Lion
        "m"; Adafactor "r", "c" (tensors of rank >= 2 only), "v".
        FAILED_PRECONDITION for a slot the class does not keep.
        """
        if not isinstance(slot, str) or not slot or slot in ("weights", "ema"):
            raise InvalidArgumentError(f"slot: must be a slot's tf-keras name, got {slot!r}")
        if slot in _SLOTS:  # Adam's own kinds, which every server understands
            return self._pull(_SLOTS[slot], names)
        return self._pull(pb.STATE_KIND_UNSPECIFIED, names, slot=slot)

    def _pull(self, kind: int, names: Iterable[str], min_version: int | None = None,
              timeout: float | None = None, into: Weights | None = None, copy: bool = True, slot: str = "") -> Weights:
        if into is not None and getattr(into, "_buffer", None) is None:
            raise InvalidArgumentError("into: must be the Weights returned by an earlier pull (with copy=True)")
        request = pb.PullWeightsRequest(optimizer=self.name, kind=kind, names=list(names), min_version=min_version,
                                        slot=slot)
        return self.client._fetch_pull(request, into, timeout, copy)

    def info(self) -> OptimizerInfo:
        """Iterations, version, config with defaults, tensor shapes and device."""
        return OptimizerInfo.from_wire(self.client._call(
            self.client._stub.GetOptimizer, lambda: pb.GetOptimizerRequest(name=self.name), _READ_RETRY))

    def save(self) -> int:
        """Writes a checkpoint now (the server needs --data-dir); returns the version saved."""
        return self.client._call(self.client._stub.SaveOptimizer, lambda: pb.SaveOptimizerRequest(name=self.name),
                                 _READ_RETRY).version

    def finalize(self) -> OptimizerInfo:
        """Copies the EMA into the weights (Keras `finalize_variable_values`)."""
        return OptimizerInfo.from_wire(self.client._call(
            self.client._stub.FinalizeOptimizer, lambda: pb.FinalizeOptimizerRequest(name=self.name)))

    def __repr__(self) -> str:
        return f"Optimizer({self.name!r} at {self.client.address})"


def _shard_from_wire(shard: pb.ShardDescription) -> dict[str, Any]:
    """An OptimizerInfo's shard description as plain data (see OptimizerInfo.shard)."""
    pieces = [(p.name, p.tensor, p.shard, p.row_start, p.row_stop, tuple(p.tensor_shape)) for p in shard.pieces]
    return {"index": shard.index, "count": shard.count, "digest": shard.digest,
            "max_shard_bytes": shard.max_shard_bytes, "pieces": pieces}


def _pulled_layout(header: pb.PullHeader, into: Weights | None) -> tuple[list[tuple[int, ...]], list[int]]:
    """The shapes and byte sizes of a pull's tensors; InvalidArgumentError if `into` holds others."""
    shapes = [tuple(t.shape) for t in header.tensors]
    if into is not None:
        pulled = [(t.name, shape) for t, shape in zip(header.tensors, shapes)]
        if pulled != [(name, array.shape) for name, array in into.items()]:
            raise InvalidArgumentError(
                f"into: holds tensors {[(n, a.shape) for n, a in into.items()]}, the pull sent {pulled}")
    return shapes, [4 * int(np.prod(shape, dtype=np.int64)) for shape in shapes]


def _read_weights(responses: Iterator[pb.PullWeightsResponse], into: Weights | None = None,
                  receive: Callable[[ChunkBuffer], None] | None = None) -> Weights:
    """A pull's tensors: the header, then the bytes from the chunks, or from `receive(buffer)` (a bulk channel)."""
    header = next(responses).header
    try:
        shapes, nbytes = _pulled_layout(header, into)
    except InvalidArgumentError:
        responses.cancel()
        raise
    buffer = ChunkBuffer(nbytes, protocol_error, None if into is None else into._buffer)
    if receive is not None:
        receive(buffer)
    for message in responses:
        buffer.write(message.chunk)
    if buffer.filled != buffer.total:
        raise protocol_error(f"pull ended after {buffer.filled} of {buffer.total} bytes")
    tensors = {spec.name: buffer.view(i, spec.dtype, shape)
               for i, (spec, shape) in enumerate(zip(header.tensors, shapes))}
    return Weights(tensors, header.version, header.iterations, buffer.data)


def _as_float32(value: Any, field: str) -> np.ndarray:
    try:
        return np.asarray(to_numpy(value), dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise InvalidArgumentError(f"{field}: cannot be read as a float32 array ({err})") from None


def _data_type(dtype: np.dtype, field: str) -> int:
    try:
        return data_type_of(dtype)
    except TypeError as err:
        raise InvalidArgumentError(f"{field}.dtype: {err}") from None


def _wire_values(value: Any, wire_dtype: str | None, field: str) -> tuple[int, np.ndarray]:
    """The DataType and array a gradient travels as.

    Float64 and Python numbers become float32; with `wire_dtype`, floats are
    rounded to it (bfloat16 without ml_dtypes travels as its raw uint16 bits);
    any other dtype is sent as it is, for the server to judge.
    """
    try:
        array = to_numpy(value)
    except (TypeError, ValueError) as err:  # a symbolic tensor (a tracer, a graph tensor) has no data to send
        raise InvalidArgumentError(f"{field}: cannot be read as an array ({type(value).__name__}: {err})") from None
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    if wire_dtype == "bfloat16" and array.dtype.kind == "f" and array.dtype.name != "bfloat16":
        return pb.DATA_TYPE_BFLOAT16, to_bfloat16(array)
    if wire_dtype == "float16" and array.dtype.kind == "f":
        array = array.astype(np.float16)
    return _data_type(array.dtype, field), array
