from facefuse.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FuseRequest(_message.Message):
    __slots__ = ("strategy", "options", "mica_shape", "samples", "scores", "visibility", "mica_vertices", "sample_vertices", "topology", "pose_fit")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    MICA_SHAPE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    VISIBILITY_FIELD_NUMBER: _ClassVar[int]
    MICA_VERTICES_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_VERTICES_FIELD_NUMBER: _ClassVar[int]
    TOPOLOGY_FIELD_NUMBER: _ClassVar[int]
    POSE_FIT_FIELD_NUMBER: _ClassVar[int]
    strategy: str
    options: _containers.ScalarMap[str, float]
    mica_shape: _common_pb2.Tensor
    samples: _common_pb2.Tensor
    scores: _common_pb2.Tensor
    visibility: _common_pb2.Visibility
    mica_vertices: _common_pb2.Tensor
    sample_vertices: _common_pb2.Tensor
    topology: str
    pose_fit: _common_pb2.PoseFitInput
    def __init__(self, strategy: _Optional[str] = ..., options: _Optional[_Mapping[str, float]] = ..., mica_shape: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., samples: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., scores: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., visibility: _Optional[_Union[_common_pb2.Visibility, _Mapping]] = ..., mica_vertices: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., sample_vertices: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., topology: _Optional[str] = ..., pose_fit: _Optional[_Union[_common_pb2.PoseFitInput, _Mapping]] = ...) -> None: ...

class FuseResponse(_message.Message):
    __slots__ = ("shape", "mesh", "vertex_spread", "confidence", "strategy", "landmarks68", "kpt7", "posed")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    MESH_FIELD_NUMBER: _ClassVar[int]
    VERTEX_SPREAD_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    LANDMARKS68_FIELD_NUMBER: _ClassVar[int]
    KPT7_FIELD_NUMBER: _ClassVar[int]
    POSED_FIELD_NUMBER: _ClassVar[int]
    shape: _common_pb2.Tensor
    mesh: _common_pb2.Mesh
    vertex_spread: _common_pb2.Tensor
    confidence: float
    strategy: str
    landmarks68: _common_pb2.Tensor
    kpt7: _common_pb2.Tensor
    posed: _common_pb2.PosedFace
    def __init__(self, shape: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., mesh: _Optional[_Union[_common_pb2.Mesh, _Mapping]] = ..., vertex_spread: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., confidence: _Optional[float] = ..., strategy: _Optional[str] = ..., landmarks68: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., kpt7: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., posed: _Optional[_Union[_common_pb2.PosedFace, _Mapping]] = ...) -> None: ...

class ListStrategiesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListStrategiesResponse(_message.Message):
    __slots__ = ("names", "default_strategy")
    NAMES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_STRATEGY_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    default_strategy: str
    def __init__(self, names: _Optional[_Iterable[str]] = ..., default_strategy: _Optional[str] = ...) -> None: ...
