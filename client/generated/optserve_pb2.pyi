from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    DATA_TYPE_FLOAT32: _ClassVar[DataType]
    DATA_TYPE_FLOAT16: _ClassVar[DataType]
    DATA_TYPE_BFLOAT16: _ClassVar[DataType]
    DATA_TYPE_FLOAT64: _ClassVar[DataType]
    DATA_TYPE_INT32: _ClassVar[DataType]
    DATA_TYPE_INT64: _ClassVar[DataType]

class NonFinitePolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NON_FINITE_POLICY_UNSPECIFIED: _ClassVar[NonFinitePolicy]
    NON_FINITE_POLICY_REFUSE: _ClassVar[NonFinitePolicy]
    NON_FINITE_POLICY_APPLY: _ClassVar[NonFinitePolicy]

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[Mode]
    MODE_ASYNC: _ClassVar[Mode]
    MODE_SYNC: _ClassVar[Mode]

class Aggregation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGGREGATION_UNSPECIFIED: _ClassVar[Aggregation]
    AGGREGATION_MEAN: _ClassVar[Aggregation]
    AGGREGATION_SUM: _ClassVar[Aggregation]

class StateKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATE_KIND_UNSPECIFIED: _ClassVar[StateKind]
    STATE_KIND_WEIGHTS: _ClassVar[StateKind]
    STATE_KIND_EMA: _ClassVar[StateKind]
    STATE_KIND_FIRST_MOMENT: _ClassVar[StateKind]
    STATE_KIND_SECOND_MOMENT: _ClassVar[StateKind]
    STATE_KIND_VHAT: _ClassVar[StateKind]

class MissingGradients(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MISSING_GRADIENTS_UNSPECIFIED: _ClassVar[MissingGradients]
    MISSING_GRADIENTS_REFUSE: _ClassVar[MissingGradients]
    MISSING_GRADIENTS_SKIP: _ClassVar[MissingGradients]
DATA_TYPE_UNSPECIFIED: DataType
DATA_TYPE_FLOAT32: DataType
DATA_TYPE_FLOAT16: DataType
DATA_TYPE_BFLOAT16: DataType
DATA_TYPE_FLOAT64: DataType
DATA_TYPE_INT32: DataType
DATA_TYPE_INT64: DataType
NON_FINITE_POLICY_UNSPECIFIED: NonFinitePolicy
NON_FINITE_POLICY_REFUSE: NonFinitePolicy
NON_FINITE_POLICY_APPLY: NonFinitePolicy
MODE_UNSPECIFIED: Mode
MODE_ASYNC: Mode
MODE_SYNC: Mode
AGGREGATION_UNSPECIFIED: Aggregation
AGGREGATION_MEAN: Aggregation
AGGREGATION_SUM: Aggregation
STATE_KIND_UNSPECIFIED: StateKind
STATE_KIND_WEIGHTS: StateKind
STATE_KIND_EMA: StateKind
STATE_KIND_FIRST_MOMENT: StateKind
STATE_KIND_SECOND_MOMENT: StateKind
STATE_KIND_VHAT: StateKind
MISSING_GRADIENTS_UNSPECIFIED: MissingGradients
MISSING_GRADIENTS_REFUSE: MissingGradients
MISSING_GRADIENTS_SKIP: MissingGradients

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "non_trainable")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NON_TRAINABLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    non_trainable: bool
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., non_trainable: _Optional[bool] = ...) -> None: ...

class GradientSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "sparse", "index_dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    INDEX_DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    sparse: bool
    index_dtype: DataType
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., sparse: _Optional[bool] = ..., index_dtype: _Optional[_Union[DataType, str]] = ...) -> None: ...

class TrainingMode(_message.Message):
    __slots__ = ("mode", "num_workers", "backup_workers", "aggregation", "sync_timeout_seconds", "max_staleness")
    MODE_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    BACKUP_WORKERS_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    SYNC_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_FIELD_NUMBER: _ClassVar[int]
    mode: Mode
    num_workers: int
    backup_workers: int
    aggregation: Aggregation
    sync_timeout_seconds: float
    max_staleness: int
    def __init__(self, mode: _Optional[_Union[Mode, str]] = ..., num_workers: _Optional[int] = ..., backup_workers: _Optional[int] = ..., aggregation: _Optional[_Union[Aggregation, str]] = ..., sync_timeout_seconds: _Optional[float] = ..., max_staleness: _Optional[int] = ...) -> None: ...

class OptimizerInfo(_message.Message):
    __slots__ = ("name", "iterations", "version", "config_json", "tensors", "device", "non_finite_policy", "next_learning_rate", "training_mode", "pending_gradients", "saved_version", "pushes_per_second", "last_push_age_seconds", "clients", "optimizer", "slots", "shard", "placement")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    NON_FINITE_POLICY_FIELD_NUMBER: _ClassVar[int]
    NEXT_LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    TRAINING_MODE_FIELD_NUMBER: _ClassVar[int]
    PENDING_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    SAVED_VERSION_FIELD_NUMBER: _ClassVar[int]
    PUSHES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    LAST_PUSH_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    name: str
    iterations: int
    version: int
    config_json: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    device: str
    non_finite_policy: NonFinitePolicy
    next_learning_rate: float
    training_mode: TrainingMode
    pending_gradients: int
    saved_version: int
    pushes_per_second: float
    last_push_age_seconds: float
    clients: _containers.RepeatedCompositeFieldContainer[ClientTraffic]
    optimizer: str
    slots: _containers.RepeatedScalarFieldContainer[str]
    shard: ShardDescription
    placement: StatePlacement
    def __init__(self, name: _Optional[str] = ..., iterations: _Optional[int] = ..., version: _Optional[int] = ..., config_json: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., device: _Optional[str] = ..., non_finite_policy: _Optional[_Union[NonFinitePolicy, str]] = ..., next_learning_rate: _Optional[float] = ..., training_mode: _Optional[_Union[TrainingMode, _Mapping]] = ..., pending_gradients: _Optional[int] = ..., saved_version: _Optional[int] = ..., pushes_per_second: _Optional[float] = ..., last_push_age_seconds: _Optional[float] = ..., clients: _Optional[_Iterable[_Union[ClientTraffic, _Mapping]]] = ..., optimizer: _Optional[str] = ..., slots: _Optional[_Iterable[str]] = ..., shard: _Optional[_Union[ShardDescription, _Mapping]] = ..., placement: _Optional[_Union[StatePlacement, _Mapping]] = ...) -> None: ...

class ClientTraffic(_message.Message):
    __slots__ = ("peer", "transport", "bytes_received", "bytes_sent", "last_seen_age_seconds")
    PEER_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    peer: str
    transport: str
    bytes_received: int
    bytes_sent: int
    last_seen_age_seconds: float
    def __init__(self, peer: _Optional[str] = ..., transport: _Optional[str] = ..., bytes_received: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., last_seen_age_seconds: _Optional[float] = ...) -> None: ...

class CreateOptimizerHeader(_message.Message):
    __slots__ = ("name", "config_json", "tensors", "non_finite_policy", "training_mode", "optimizer", "shard")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    NON_FINITE_POLICY_FIELD_NUMBER: _ClassVar[int]
    TRAINING_MODE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    name: str
    config_json: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    non_finite_policy: NonFinitePolicy
    training_mode: TrainingMode
    optimizer: str
    shard: ShardDescription
    def __init__(self, name: _Optional[str] = ..., config_json: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., non_finite_policy: _Optional[_Union[NonFinitePolicy, str]] = ..., training_mode: _Optional[_Union[TrainingMode, _Mapping]] = ..., optimizer: _Optional[str] = ..., shard: _Optional[_Union[ShardDescription, _Mapping]] = ...) -> None: ...

class CreateOptimizerRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: CreateOptimizerHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[CreateOptimizerHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class GetOptimizerRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListOptimizersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListOptimizersResponse(_message.Message):
    __slots__ = ("optimizers",)
    OPTIMIZERS_FIELD_NUMBER: _ClassVar[int]
    optimizers: _containers.RepeatedCompositeFieldContainer[OptimizerInfo]
    def __init__(self, optimizers: _Optional[_Iterable[_Union[OptimizerInfo, _Mapping]]] = ...) -> None: ...

class DeleteOptimizerRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteOptimizerResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PushHeader(_message.Message):
    __slots__ = ("optimizer", "gradients", "worker_id", "seq", "base_version", "shared_memory_session", "bulk", "missing", "norm_inputs")
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_SESSION_FIELD_NUMBER: _ClassVar[int]
    BULK_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    NORM_INPUTS_FIELD_NUMBER: _ClassVar[int]
    optimizer: str
    gradients: _containers.RepeatedCompositeFieldContainer[GradientSpec]
    worker_id: str
    seq: int
    base_version: int
    shared_memory_session: str
    bulk: BulkTransfer
    missing: MissingGradients
    norm_inputs: NormInputs
    def __init__(self, optimizer: _Optional[str] = ..., gradients: _Optional[_Iterable[_Union[GradientSpec, _Mapping]]] = ..., worker_id: _Optional[str] = ..., seq: _Optional[int] = ..., base_version: _Optional[int] = ..., shared_memory_session: _Optional[str] = ..., bulk: _Optional[_Union[BulkTransfer, _Mapping]] = ..., missing: _Optional[_Union[MissingGradients, str]] = ..., norm_inputs: _Optional[_Union[NormInputs, _Mapping]] = ...) -> None: ...

class BulkTransfer(_message.Message):
    __slots__ = ("channel", "transfer")
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_FIELD_NUMBER: _ClassVar[int]
    channel: str
    transfer: int
    def __init__(self, channel: _Optional[str] = ..., transfer: _Optional[int] = ...) -> None: ...

class PushGradientsRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class PushGradientsResponse(_message.Message):
    __slots__ = ("version", "iterations", "duplicate", "prepared", "round_square_sums")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    PREPARED_FIELD_NUMBER: _ClassVar[int]
    ROUND_SQUARE_SUMS_FIELD_NUMBER: _ClassVar[int]
    version: int
    iterations: int
    duplicate: bool
    prepared: bool
    round_square_sums: NormInputs
    def __init__(self, version: _Optional[int] = ..., iterations: _Optional[int] = ..., duplicate: _Optional[bool] = ..., prepared: _Optional[bool] = ..., round_square_sums: _Optional[_Union[NormInputs, _Mapping]] = ...) -> None: ...

class PullWeightsRequest(_message.Message):
    __slots__ = ("optimizer", "kind", "names", "min_version", "shared_memory_session", "bulk", "slot")
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    MIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_SESSION_FIELD_NUMBER: _ClassVar[int]
    BULK_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    optimizer: str
    kind: StateKind
    names: _containers.RepeatedScalarFieldContainer[str]
    min_version: int
    shared_memory_session: str
    bulk: BulkTransfer
    slot: str
    def __init__(self, optimizer: _Optional[str] = ..., kind: _Optional[_Union[StateKind, str]] = ..., names: _Optional[_Iterable[str]] = ..., min_version: _Optional[int] = ..., shared_memory_session: _Optional[str] = ..., bulk: _Optional[_Union[BulkTransfer, _Mapping]] = ..., slot: _Optional[str] = ...) -> None: ...

class PullHeader(_message.Message):
    __slots__ = ("version", "iterations", "tensors")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    version: int
    iterations: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    def __init__(self, version: _Optional[int] = ..., iterations: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ...) -> None: ...

class PullWeightsResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PullHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[PullHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class FinalizeOptimizerRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class SaveOptimizerRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class SaveOptimizerResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class OpenSharedMemoryRequest(_message.Message):
    __slots__ = ("optimizer",)
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    optimizer: str
    def __init__(self, optimizer: _Optional[str] = ...) -> None: ...

class SharedMemorySegment(_message.Message):
    __slots__ = ("session", "path", "size", "nonce", "gradients_offset", "weights_offset", "tensors", "idle_timeout_seconds")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    GRADIENTS_OFFSET_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_OFFSET_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session: str
    path: str
    size: int
    nonce: bytes
    gradients_offset: int
    weights_offset: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    idle_timeout_seconds: float
    def __init__(self, session: _Optional[str] = ..., path: _Optional[str] = ..., size: _Optional[int] = ..., nonce: _Optional[bytes] = ..., gradients_offset: _Optional[int] = ..., weights_offset: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., idle_timeout_seconds: _Optional[float] = ...) -> None: ...

class CloseSharedMemoryRequest(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: str
    def __init__(self, session: _Optional[str] = ...) -> None: ...

class CloseSharedMemoryResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OpenBulkChannelRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BulkChannel(_message.Message):
    __slots__ = ("channel", "ticket", "port", "tls")
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    TLS_FIELD_NUMBER: _ClassVar[int]
    channel: str
    ticket: bytes
    port: int
    tls: bool
    def __init__(self, channel: _Optional[str] = ..., ticket: _Optional[bytes] = ..., port: _Optional[int] = ..., tls: _Optional[bool] = ...) -> None: ...

class ShardPiece(_message.Message):
    __slots__ = ("name", "tensor", "shard", "row_start", "row_stop", "tensor_shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    ROW_START_FIELD_NUMBER: _ClassVar[int]
    ROW_STOP_FIELD_NUMBER: _ClassVar[int]
    TENSOR_SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    tensor: str
    shard: int
    row_start: int
    row_stop: int
    tensor_shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., tensor: _Optional[str] = ..., shard: _Optional[int] = ..., row_start: _Optional[int] = ..., row_stop: _Optional[int] = ..., tensor_shape: _Optional[_Iterable[int]] = ...) -> None: ...

class ShardDescription(_message.Message):
    __slots__ = ("index", "count", "pieces", "max_shard_bytes", "digest")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    PIECES_FIELD_NUMBER: _ClassVar[int]
    MAX_SHARD_BYTES_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    index: int
    count: int
    pieces: _containers.RepeatedCompositeFieldContainer[ShardPiece]
    max_shard_bytes: int
    digest: str
    def __init__(self, index: _Optional[int] = ..., count: _Optional[int] = ..., pieces: _Optional[_Iterable[_Union[ShardPiece, _Mapping]]] = ..., max_shard_bytes: _Optional[int] = ..., digest: _Optional[str] = ...) -> None: ...

class NormInputs(_message.Message):
    __slots__ = ("global_square_sum", "tensor_square_sums")
    class TensorSquareSumsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    GLOBAL_SQUARE_SUM_FIELD_NUMBER: _ClassVar[int]
    TENSOR_SQUARE_SUMS_FIELD_NUMBER: _ClassVar[int]
    global_square_sum: float
    tensor_square_sums: _containers.ScalarMap[str, float]
    def __init__(self, global_square_sum: _Optional[float] = ..., tensor_square_sums: _Optional[_Mapping[str, float]] = ...) -> None: ...

class CommitRoundRequest(_message.Message):
    __slots__ = ("optimizer", "version", "norm_inputs")
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NORM_INPUTS_FIELD_NUMBER: _ClassVar[int]
    optimizer: str
    version: int
    norm_inputs: NormInputs
    def __init__(self, optimizer: _Optional[str] = ..., version: _Optional[int] = ..., norm_inputs: _Optional[_Union[NormInputs, _Mapping]] = ...) -> None: ...

class StatePlacement(_message.Message):
    __slots__ = ("flat_size", "tensor_offsets", "slots")
    FLAT_SIZE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    flat_size: int
    tensor_offsets: _containers.RepeatedScalarFieldContainer[int]
    slots: _containers.RepeatedCompositeFieldContainer[SlotPlacement]
    def __init__(self, flat_size: _Optional[int] = ..., tensor_offsets: _Optional[_Iterable[int]] = ..., slots: _Optional[_Iterable[_Union[SlotPlacement, _Mapping]]] = ...) -> None: ...

class SlotPlacement(_message.Message):
    __slots__ = ("slot", "shards")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    slot: str
    shards: _containers.RepeatedCompositeFieldContainer[StateShard]
    def __init__(self, slot: _Optional[str] = ..., shards: _Optional[_Iterable[_Union[StateShard, _Mapping]]] = ...) -> None: ...

class StateShard(_message.Message):
    __slots__ = ("device", "start", "stop")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    device: str
    start: int
    stop: int
    def __init__(self, device: _Optional[str] = ..., start: _Optional[int] = ..., stop: _Optional[int] = ...) -> None: ...
