from facefuse.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PredictRequest(_message.Message):
    __slots__ = ("faces", "return_mesh", "return_landmarks")
    FACES_FIELD_NUMBER: _ClassVar[int]
    RETURN_MESH_FIELD_NUMBER: _ClassVar[int]
    RETURN_LANDMARKS_FIELD_NUMBER: _ClassVar[int]
    faces: _containers.RepeatedCompositeFieldContainer[_common_pb2.Face]
    return_mesh: bool
    return_landmarks: bool
    def __init__(self, faces: _Optional[_Iterable[_Union[_common_pb2.Face, _Mapping]]] = ..., return_mesh: _Optional[bool] = ..., return_landmarks: _Optional[bool] = ...) -> None: ...

class ShapePrediction(_message.Message):
    __slots__ = ("shape", "identity", "mesh", "landmarks68", "kpt7", "scale_source", "scale_confidence")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    MESH_FIELD_NUMBER: _ClassVar[int]
    LANDMARKS68_FIELD_NUMBER: _ClassVar[int]
    KPT7_FIELD_NUMBER: _ClassVar[int]
    SCALE_SOURCE_FIELD_NUMBER: _ClassVar[int]
    SCALE_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    shape: _common_pb2.Tensor
    identity: _common_pb2.Tensor
    mesh: _common_pb2.Mesh
    landmarks68: _common_pb2.Tensor
    kpt7: _common_pb2.Tensor
    scale_source: str
    scale_confidence: float
    def __init__(self, shape: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., identity: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., mesh: _Optional[_Union[_common_pb2.Mesh, _Mapping]] = ..., landmarks68: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., kpt7: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., scale_source: _Optional[str] = ..., scale_confidence: _Optional[float] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("predictions", "backend")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[ShapePrediction]
    backend: _common_pb2.BackendInfo
    def __init__(self, predictions: _Optional[_Iterable[_Union[ShapePrediction, _Mapping]]] = ..., backend: _Optional[_Union[_common_pb2.BackendInfo, _Mapping]] = ...) -> None: ...
