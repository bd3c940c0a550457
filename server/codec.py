"""Translates wire messages into NumPy arrays and back, validating all it reads.

Every check on a request's shape, dtype, size and indices happens here, before
any state is touched; the messages name the offending field.
"""

import json
import re
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from optserve.wire.chunks import encode_stream
from optserve.wire.dtypes import ITEMSIZE, data_type_of, dtype_name
from optserve.wire.layout import ChunkBuffer
from optserve.server.errors import InvalidArgument, NotFound, ResourceExhausted
from optserve.server.modes import DEFAULT_SYNC_TIMEOUT, Gradient, PushResult, TrainingMode
from optserve.server.sharding import Shard, ShardNorms
from optserve.wire.placement import Piece, Placement

if TYPE_CHECKING:  # the optimizer module imports this one
    from optserve.server.optimizer import OptimizerInfo
    from optserve.server.shared_memory import Segment
    from optserve.server.traffic import ClientTraffic
from optserve.v1 import optserve_pb2 as pb

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # also a safe folder name in a data dir
MAX_TENSOR_NAME_BYTES = 1024  # UTF-8 bytes of a tensor name
GRADIENT_DTYPES = (pb.DATA_TYPE_FLOAT32, pb.DATA_TYPE_FLOAT16, pb.DATA_TYPE_BFLOAT16)
INDEX_DTYPES = (pb.DATA_TYPE_INT32, pb.DATA_TYPE_INT64)
NON_FINITE_POLICIES = {
    pb.NON_FINITE_POLICY_UNSPECIFIED: "refuse",
    pb.NON_FINITE_POLICY_REFUSE: "refuse",
    pb.NON_FINITE_POLICY_APPLY: "apply",
}

MODES = {pb.MODE_UNSPECIFIED: "async", pb.MODE_ASYNC: "async", pb.MODE_SYNC: "sync"}
AGGREGATIONS = {pb.AGGREGATION_UNSPECIFIED: "mean", pb.AGGREGATION_MEAN: "mean", pb.AGGREGATION_SUM: "sum"}
STATE_KINDS = {
    pb.STATE_KIND_UNSPECIFIED: "weights",
    pb.STATE_KIND_WEIGHTS: "weights",
    pb.STATE_KIND_EMA: "ema",
    pb.STATE_KIND_FIRST_MOMENT: "m",
    pb.STATE_KIND_SECOND_MOMENT: "v",
    pb.STATE_KIND_VHAT: "vhat",
}
# name -> wire value; the explicit value wins over UNSPECIFIED, which comes first in each table
_MODE_TO_WIRE, _AGGREGATION_TO_WIRE, _POLICY_TO_WIRE = (
    {name: value for value, name in table.items()} for table in (MODES, AGGREGATIONS, NON_FINITE_POLICIES))


@dataclass(frozen=True)
class CreateRequest:
    """A decoded CreateOptimizer stream."""

    name: str
    config: dict[str, Any]
    params: dict[str, np.ndarray]
    non_finite_policy: str  # "refuse" or "apply"
    training_mode: TrainingMode
    optimizer: str = ""  # the tf-keras class; "" means the serialized config's, else Adam
    shard: Shard | None = None  # set for one shard of a logical optimizer over several servers
    non_trainable: frozenset[str] = frozenset()  # tensors of non-trainable state: assigned by pushes, never stepped


def validate_name(name: str, field: str = "name") -> str:
    """Checks an optimizer resource name."""
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidArgument(
            f"{field}: must be 1-128 characters from [A-Za-z0-9._-] starting with a letter or digit, got {name!r}")
    return name


def decode_create(requests: Iterator[pb.CreateOptimizerRequest], max_bytes: int,
                  max_tensor_bytes: int, max_tensors: int,
                  into: Callable[[int, int], np.ndarray] | None = None) -> CreateRequest:
    """Reads a CreateOptimizer stream; refuses models over `max_bytes` or `max_tensors` tensors, and
    tensors over `max_tensor_bytes`.

    `into` supplies the receive buffer as the bytes arrive (see `_read_arrays`).
    """
    header, chunks = _split_stream(requests, "CreateOptimizer")
    name = validate_name(header.name)
    config = _decode_config(header.config_json)
    training_mode = decode_training_mode(header.training_mode)
    if not header.tensors:
        raise InvalidArgument("tensors: an optimizer needs at least one tensor")
    if len(header.tensors) > max_tensors:
        raise ResourceExhausted(f"tensors: {len(header.tensors)} tensors exceed this server's limit of {max_tensors} "
                                f"per optimizer")
    layout = []
    for index, spec in enumerate(header.tensors):
        if not spec.name:
            raise InvalidArgument("tensors: every tensor needs a non-empty name")
        _refuse_long_name(spec.name, f"tensors[{index}].name")
        field = f"tensors[{spec.name!r}]"
        if spec.dtype != pb.DATA_TYPE_FLOAT32:
            raise InvalidArgument(f"{field}.dtype: parameters must be float32, got {dtype_name(spec.dtype)}")
        shape = _shape(spec.shape, f"{field}.shape")
        if _nbytes(pb.DATA_TYPE_FLOAT32, shape) > max_tensor_bytes:
            raise ResourceExhausted(f"{field}.shape: {_nbytes(pb.DATA_TYPE_FLOAT32, shape)} bytes exceed this "
                                    f"server's limit of {max_tensor_bytes} per tensor")
        layout.append((spec.name, pb.DATA_TYPE_FLOAT32, shape))
    _refuse_duplicates([spec.name for spec in header.tensors], "tensors")
    arrays = _read_arrays(chunks, layout, max_bytes, "tensors", into)
    params = {tensor_name: array for (tensor_name, _, _), array in zip(layout, arrays)}
    if header.non_finite_policy not in NON_FINITE_POLICIES:
        raise InvalidArgument(f"non_finite_policy: unknown value {header.non_finite_policy}")
    non_trainable = frozenset(spec.name for spec in header.tensors if spec.non_trainable)
    if len(non_trainable) == len(header.tensors):
        raise InvalidArgument("tensors: every tensor is non_trainable; an optimizer needs a trainable one")
    shard = decode_shard(header.shard) if header.HasField("shard") else None
    if shard is not None and non_trainable:
        raise InvalidArgument("tensors: a shard of a logical optimizer over several servers keeps no non_trainable "
                              "tensors (not supported yet)")
    return CreateRequest(name, config, params, NON_FINITE_POLICIES[header.non_finite_policy], training_mode,
                         header.optimizer, shard, non_trainable)


def decode_shard(wire: pb.ShardDescription) -> Shard:
    """The domain form of a ShardDescription (checked against its tensors by the registry)."""
    for index, piece in enumerate(wire.pieces):
        _refuse_long_name(piece.name, f"shard.pieces[{index}].name")
        _refuse_long_name(piece.tensor, f"shard.pieces[{index}].tensor")
    pieces = tuple(Piece(p.name, p.tensor, p.shard, p.row_start, p.row_stop,
                         _shape(p.tensor_shape, f"shard.pieces[{i}].tensor_shape"))
                   for i, p in enumerate(wire.pieces))
    return Shard(wire.index, Placement(wire.count, wire.max_shard_bytes, pieces))


def shard_to_wire(shard: Shard) -> pb.ShardDescription:
    """The wire form of a Shard, with its digest."""
    table = shard.placement
    return pb.ShardDescription(
        index=shard.index, count=table.count, max_shard_bytes=table.max_shard_bytes, digest=shard.digest,
        pieces=[pb.ShardPiece(name=p.name, tensor=p.tensor, shard=p.shard, row_start=p.start, row_stop=p.stop,
                              tensor_shape=p.tensor_shape) for p in table.pieces])


def decode_norm_inputs(message: pb.PushHeader | pb.CommitRoundRequest) -> ShardNorms | None:
    """A push's or commit's norm_inputs, or None when it has none (checked against the optimizer by `sharding`)."""
    if not message.HasField("norm_inputs"):
        return None
    wire = message.norm_inputs
    return ShardNorms(wire.global_square_sum, dict(wire.tensor_square_sums))


def push_result_to_wire(result: PushResult) -> pb.PushGradientsResponse:
    """The wire form of a push's (or a commit's) answer."""
    sums = result.round_square_sums
    return pb.PushGradientsResponse(
        version=result.version, iterations=result.iterations, duplicate=result.duplicate, prepared=result.prepared,
        round_square_sums=None if sums is None else pb.NormInputs(global_square_sum=sums.global_square_sum,
                                                                  tensor_square_sums=sums.tensor_square_sums))


def decode_training_mode(wire: pb.TrainingMode) -> TrainingMode:
    """The domain form of a TrainingMode, defaults filled and ranges checked."""
    if wire.mode not in MODES:
        raise InvalidArgument(f"training_mode.mode: unknown value {wire.mode}")
    if wire.aggregation not in AGGREGATIONS:
        raise InvalidArgument(f"training_mode.aggregation: unknown value {wire.aggregation}")
    return TrainingMode(
        mode=MODES[wire.mode],
        num_workers=wire.num_workers if wire.HasField("num_workers") else 1,
        backup_workers=wire.backup_workers,
        aggregation=AGGREGATIONS[wire.aggregation],
        sync_timeout=wire.sync_timeout_seconds if wire.HasField("sync_timeout_seconds") else DEFAULT_SYNC_TIMEOUT,
        max_staleness=wire.max_staleness if wire.HasField("max_staleness") else None,
    )


def training_mode_to_wire(mode: TrainingMode) -> pb.TrainingMode:
    """The wire form of a TrainingMode."""
    return pb.TrainingMode(
        mode=_MODE_TO_WIRE[mode.mode],
        num_workers=mode.num_workers,
        backup_workers=mode.backup_workers,
        aggregation=_AGGREGATION_TO_WIRE[mode.aggregation],
        sync_timeout_seconds=mode.sync_timeout,
        max_staleness=mode.max_staleness,
    )


def decode_state_kind(kind: int) -> str:
    """The domain name of a pull's StateKind: "weights", "ema" or a slot name (see `Optimizer.pull`)."""
    if kind not in STATE_KINDS:
        raise InvalidArgument(f"kind: unknown state kind {kind}")
    return STATE_KINDS[kind]


def decode_pull_kind(request: pb.PullWeightsRequest) -> str:
    """What a pull reads: its `slot` by tf-keras name, else its `kind`."""
    if not request.slot:
        return decode_state_kind(request.kind)
    if request.kind != pb.STATE_KIND_UNSPECIFIED:
        raise InvalidArgument("slot: set either slot or kind, not both")
    if request.slot in ("weights", "ema"):
        raise InvalidArgument(f"slot: {request.slot!r} is not a slot; use kind WEIGHTS or EMA")
    return request.slot


def info_to_wire(info: "OptimizerInfo", clients: Sequence["ClientTraffic"] = ()) -> pb.OptimizerInfo:
    """The wire form of an OptimizerInfo, with the connections that moved its tensors."""
    now = time.monotonic()
    return pb.OptimizerInfo(
        name=info.name,
        iterations=info.iterations,
        version=info.version,
        config_json=json.dumps(info.config),
        optimizer=info.optimizer,
        slots=info.slots,
        tensors=[pb.TensorSpec(name=n, dtype=pb.DATA_TYPE_FLOAT32, shape=s, non_trainable=n in info.non_trainable)
                 for n, s in info.shapes.items()],
        device=info.device,
        non_finite_policy=_POLICY_TO_WIRE[info.non_finite_policy],
        next_learning_rate=info.next_learning_rate,
        training_mode=training_mode_to_wire(info.training_mode),
        pending_gradients=info.pending_gradients,
        saved_version=info.saved_version,
        pushes_per_second=info.pushes_per_second,
        last_push_age_seconds=info.last_push_age,
        clients=[pb.ClientTraffic(peer=c.peer, transport=c.transport, bytes_received=c.bytes_received,
                                  bytes_sent=c.bytes_sent, last_seen_age_seconds=now - c.last_seen) for c in clients],
        shard=None if info.shard is None else shard_to_wire(info.shard),
        placement=pb.StatePlacement(
            flat_size=info.flat_size, tensor_offsets=info.tensor_offsets,
            slots=[pb.SlotPlacement(slot=kind, shards=[pb.StateShard(device=d, start=a, stop=b) for d, a, b in spans])
                   for kind, spans in (info.shards or {}).items()]),
    )


def split_push(requests: Iterator[pb.PushGradientsRequest]) -> tuple[pb.PushHeader, Iterator]:
    """The push header, checked, and the rest of the stream (the chunks) unread."""
    header, chunks = _split_stream(requests, "PushGradients")
    validate_name(header.optimizer, "optimizer")
    if len(header.worker_id) > 128:
        raise InvalidArgument(f"worker_id: at most 128 characters, got {len(header.worker_id)}")
    if header.HasField("seq") and header.seq < 0:
        raise InvalidArgument(f"seq: must be >= 0, got {header.seq}")
    if header.HasField("base_version") and header.base_version < 0:
        raise InvalidArgument(f"base_version: must be >= 0, got {header.base_version}")
    return header, chunks


def decode_gradients(
    header: pb.PushHeader, chunks: Iterator, shapes: Mapping[str, tuple[int, ...]], max_bytes: int,
    into: Callable[[int, int], np.ndarray] | None = None, receive: Callable[[ChunkBuffer], None] | None = None,
    optional: Collection[str] = (),
) -> dict[str, Gradient]:
    """Reads a push's gradients, checked against the optimizer's tensor shapes.

    `into` supplies the buffer the gradients are received into (see `_read_arrays`);
    `receive`, when the bytes come by another path than the chunks, fills it.
    `optional` tensors (non-trainable state) may be left out of any push.
    """
    _check_gradient_names(header, shapes, optional)
    layout = []  # (name, dtype, shape) of each byte range, in stream order
    for spec in header.gradients:
        layout.extend(_gradient_layout(spec, shapes[spec.name]))
    arrays_iter = iter(_read_arrays(chunks, layout, max_bytes, "gradients", into, receive))
    grads: dict[str, Gradient] = {}
    for spec in header.gradients:
        if not spec.sparse:
            grads[spec.name] = next(arrays_iter)
            continue
        indices, rows = next(arrays_iter), next(arrays_iter)
        _check_indices(indices, shapes[spec.name][0], f"gradients[{spec.name!r}].indices")
        grads[spec.name] = (indices, rows)
    return grads


def check_segment_push(header: pb.PushHeader, shapes: Mapping[str, tuple[int, ...]],
                       optional: Collection[str] = ()) -> None:
    """Checks the header of a push from a same-host segment: every gradient dense float32 of its tensor's shape.

    (The segment's gradient region holds nothing else, each tensor at its `FlatLayout` offset.)
    """
    _check_gradient_names(header, shapes, optional)
    for spec in header.gradients:
        field = f"gradients[{spec.name!r}]"
        if spec.sparse:
            raise InvalidArgument(f"{field}.sparse: a push from shared memory carries dense gradients only; "
                                  "send sparse ones in the stream")
        if spec.dtype != pb.DATA_TYPE_FLOAT32:
            raise InvalidArgument(f"{field}.dtype: a push from shared memory carries float32 only, got "
                                  f"{dtype_name(spec.dtype)}")
        _gradient_layout(spec, shapes[spec.name])  # the shape, checked as for a push in the stream


_MISSING_FROM_WIRE = {pb.MISSING_GRADIENTS_UNSPECIFIED: "refuse", pb.MISSING_GRADIENTS_REFUSE: "refuse",
                      pb.MISSING_GRADIENTS_SKIP: "skip"}


def missing_policy(header: pb.PushHeader) -> str:
    """What the push does with the tensors it has no gradient for: "refuse" or "skip"."""
    if header.missing not in _MISSING_FROM_WIRE:
        raise InvalidArgument(f"missing: unknown value {header.missing}; use REFUSE or SKIP")
    return _MISSING_FROM_WIRE[header.missing]


def _check_gradient_names(header: pb.PushHeader, shapes: Mapping[str, tuple[int, ...]],
                          optional: Collection[str] = ()) -> None:
    """A push names each tensor of the optimizer at most once, and nothing else: every one but the `optional`
    ones, unless `missing` is SKIP."""
    skip = missing_policy(header) == "skip"
    if not header.gradients:
        raise InvalidArgument("gradients: empty push; send a gradient for at least one tensor" if skip
                              else "gradients: empty push; send one gradient for every tensor")
    for index, spec in enumerate(header.gradients):  # no tensor has such a name
        _refuse_long_name(spec.name, f"gradients[{index}].name")
    names = [spec.name for spec in header.gradients]
    _refuse_duplicates(names, "gradients")
    for name in names:
        if name not in shapes:
            raise NotFound(f"gradients[{name!r}]: optimizer {header.optimizer!r} has no tensor {name!r}")
    missing = [name for name in shapes if name not in set(names) and name not in optional]
    if missing and not skip:
        raise InvalidArgument(f"gradients: missing {missing}; every push carries a gradient for every tensor "
                              "(or sets missing SKIP to leave those tensors as they are)")


def segment_to_wire(segment: "Segment") -> pb.SharedMemorySegment:
    """The wire form of a same-host segment, for the client to map."""
    return pb.SharedMemorySegment(
        session=segment.session, path=str(segment.path), size=segment.size, nonce=segment.nonce,
        gradients_offset=segment.gradients_offset, weights_offset=segment.weights_offset,
        tensors=[pb.TensorSpec(name=n, dtype=pb.DATA_TYPE_FLOAT32, shape=s) for n, s in segment.layout.shapes.items()],
        idle_timeout_seconds=segment.idle_timeout)


def encode_pull(version: int, iterations: int, tensors: Sequence[tuple[str, np.ndarray]],
                chunks: bool = True) -> Iterator[bytes]:
    """A PullWeights stream, serialized: the header, then (unless `chunks` is False) the tensors' bytes in chunks."""
    specs = [pb.TensorSpec(name=name, dtype=data_type_of(array.dtype), shape=array.shape) for name, array in tensors]
    header = pb.PullHeader(version=version, iterations=iterations, tensors=specs)
    return encode_stream(header, (array for _, array in tensors) if chunks else ())


def _split_stream(requests: Iterator, rpc: str) -> tuple[Any, Iterator]:
    first = next(requests, None)
    if first is None:
        raise InvalidArgument(f"{rpc}: empty stream; the first message must be a header")
    if first.WhichOneof("part") != "header":
        raise InvalidArgument(f"header: the first message of {rpc} must be a header, got a chunk")
    return first.header, requests


def _read_arrays(chunks: Iterator, layout: Sequence, max_bytes: int, field: str,
                 into: Callable[[int, int], np.ndarray] | None = None,
                 receive: Callable[[ChunkBuffer], None] | None = None) -> list[np.ndarray]:
    """Receives the arrays of `layout`, (name, dtype, shape) each, from the chunks.

    `into(extent, total)` supplies the (aligned) buffer to write into as the bytes
    arrive (`ChunkBuffer`'s `reserve`), so a header alone commits no memory; else
    a fresh buffer of the declared size is made. With `receive`, the stream
    carries no chunks and `receive(buffer)` fills the buffer instead.
    """
    sizes = [_nbytes(dtype, shape) for _, dtype, shape in layout]
    total = sum(sizes)
    if total > max_bytes:
        raise ResourceExhausted(f"{field}: {total} bytes exceed this server's limit of {max_bytes} per request")
    buffer = ChunkBuffer(sizes, InvalidArgument, reserve=into)
    for message in chunks:
        if message.WhichOneof("part") != "chunk":
            raise InvalidArgument("header: sent twice; only the first message may be a header")
        if receive is not None:
            raise InvalidArgument("chunks: the header names a bulk transfer, so the stream must be the header alone")
        buffer.write(message.chunk)
    if receive is not None:
        receive(buffer)
    if buffer.filled != total:
        short = _tensor_at(buffer.filled, layout)
        raise InvalidArgument(
            f"chunks: the stream ended after {buffer.filled} of the {total} bytes the header declares"
            f" (tensor {short!r} is incomplete)"
        )
    return [buffer.view(index, dtype, shape) for index, (_, dtype, shape) in enumerate(layout)]


def _tensor_at(offset: int, layout: Sequence) -> str:
    for name, dtype, shape in layout:
        offset -= _nbytes(dtype, shape)
        if offset < 0:
            return name
    return layout[-1][0]


def _gradient_layout(spec: pb.GradientSpec, shape: tuple[int, ...]) -> list:
    """The (name, dtype, shape) byte ranges one gradient sends, after checking its header."""
    field = f"gradients[{spec.name!r}]"
    if spec.dtype not in GRADIENT_DTYPES:
        raise InvalidArgument(f"{field}.dtype: must be float32, float16 or bfloat16, got {dtype_name(spec.dtype)}")
    got = _shape(spec.shape, f"{field}.shape")
    if not spec.sparse:
        if got != shape:
            raise InvalidArgument(f"{field}.shape: expected {list(shape)}, got {list(got)}")
        return [(spec.name, spec.dtype, shape)]
    if not shape:
        raise InvalidArgument(f"{field}.sparse: a scalar tensor has no rows to index")
    if len(got) != len(shape) or got[1:] != shape[1:]:
        raise InvalidArgument(
            f"{field}.shape: sparse rows must have shape [num_rows, {', '.join(map(str, shape[1:]))}], got {list(got)}"
        )
    if spec.index_dtype not in INDEX_DTYPES:
        raise InvalidArgument(f"{field}.index_dtype: must be int32 or int64, got {dtype_name(spec.index_dtype)}")
    return [(spec.name, spec.index_dtype, got[:1]), (spec.name, spec.dtype, got)]


def _check_indices(indices: np.ndarray, rows: int, field: str) -> None:
    bad = (indices < 0) | (indices >= rows)
    if bad.any():
        raise InvalidArgument(f"{field}: index {int(indices[bad][0])} is out of range [0, {rows})")


MAX_RANK = 32  # dimensions of a tensor; NumPy holds 64, XLA fewer
MAX_DIM = 2**31 - 1  # elements along one dimension (JAX indexes with int32)


def _shape(dims: Sequence[int], field: str) -> tuple[int, ...]:
    if len(dims) > MAX_RANK:
        raise InvalidArgument(f"{field}: at most {MAX_RANK} dimensions, got {len(dims)}")
    if any(not 0 <= d <= MAX_DIM for d in dims):
        raise InvalidArgument(f"{field}: every dimension must be in [0, 2**31), got {list(dims)}")
    return tuple(int(d) for d in dims)


def _nbytes(dtype: int, shape: tuple[int, ...]) -> int:
    return ITEMSIZE[dtype] * int(np.prod(shape, dtype=object))


def _refuse_long_name(name: str, field: str) -> None:
    """Refuses a tensor name over MAX_TENSOR_NAME_BYTES, echoing only its start (never 70 KB in a status)."""
    size = len(name.encode())
    if size > MAX_TENSOR_NAME_BYTES:
        raise InvalidArgument(f"{field}: at most {MAX_TENSOR_NAME_BYTES} bytes of UTF-8, got {size} ({name[:40]!r}...)")


def _refuse_duplicates(names: Sequence[str], field: str) -> None:
    seen = set()
    for name in names:
        if name in seen:
            raise InvalidArgument(f"{field}[{name!r}]: appears twice")
        seen.add(name)


def _decode_config(config_json: str) -> dict[str, Any]:
    if not config_json:
        return {}
    try:
        config = json.loads(config_json)
    except (ValueError, RecursionError) as err:  # ValueError: bad JSON or an integer of over 4300 digits
        raise InvalidArgument(f"config_json: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise InvalidArgument(f"config_json: must be a JSON object, got {type(config).__name__}")
    return config
