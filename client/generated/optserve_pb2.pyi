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

class StateKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATE_KIND_UNSPECIFIED: _ClassVar[StateKind]
    STATE_KIND_WEIGHTS: _ClassVar[StateKind]
    STATE_KIND_EMA: _ClassVar[StateKind]
    STATE_KIND_FIRST_MOMENT: _ClassVar[StateKind]
    STATE_KIND_SECOND_MOMENT: _ClassVar[StateKind]
    STATE_KIND_VHAT: _ClassVar[StateKind]
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
STATE_KIND_UNSPECIFIED: StateKind
STATE_KIND_WEIGHTS: StateKind
STATE_KIND_EMA: StateKind
STATE_KIND_FIRST_MOMENT: StateKind
STATE_KIND_SECOND_MOMENT: StateKind
STATE_KIND_VHAT: StateKind

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

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

class OptimizerInfo(_message.Message):
    __slots__ = ("name", "iterations", "version", "config_json", "tensors", "device", "non_finite_policy", "next_learning_rate")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    NON_FINITE_POLICY_FIELD_NUMBER: _ClassVar[int]
    NEXT_LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    name: str
    iterations: int
    version: int
    config_json: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    device: str
    non_finite_policy: NonFinitePolicy
    next_learning_rate: float
    def __init__(self, name: _Optional[str] = ..., iterations: _Optional[int] = ..., version: _Optional[int] = ..., config_json: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., device: _Optional[str] = ..., non_finite_policy: _Optional[_Union[NonFinitePolicy, str]] = ..., next_learning_rate: _Optional[float] = ...) -> None: ...

class CreateOptimizerHeader(_message.Message):
    __slots__ = ("name", "config_json", "tensors", "non_finite_policy")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    NON_FINITE_POLICY_FIELD_NUMBER: _ClassVar[int]
    name: str
    config_json: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    non_finite_policy: NonFinitePolicy
    def __init__(self, name: _Optional[str] = ..., config_json: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., non_finite_policy: _Optional[_Union[NonFinitePolicy, str]] = ...) -> None: ...

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
    __slots__ = ("optimizer", "gradients")
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    optimizer: str
    gradients: _containers.RepeatedCompositeFieldContainer[GradientSpec]
    def __init__(self, optimizer: _Optional[str] = ..., gradients: _Optional[_Iterable[_Union[GradientSpec, _Mapping]]] = ...) -> None: ...

class PushGradientsRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class PushGradientsResponse(_message.Message):
    __slots__ = ("version", "iterations")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    version: int
    iterations: int
    def __init__(self, version: _Optional[int] = ..., iterations: _Optional[int] = ...) -> None: ...

class PullWeightsRequest(_message.Message):
    __slots__ = ("optimizer", "kind", "names")
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    optimizer: str
    kind: StateKind
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, optimizer: _Optional[str] = ..., kind: _Optional[_Union[StateKind, str]] = ..., names: _Optional[_Iterable[str]] = ...) -> None: ...

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
