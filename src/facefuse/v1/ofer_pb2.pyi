from facefuse.v1 import common_pb2 as _common_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SampleRequest(_message.Message):
    __slots__ = ("face", "num_samples", "steps", "mode", "seed", "chunk_size", "start_shape", "start_t0", "guide_shape", "guide_strength", "visibility")
    FACE_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    START_SHAPE_FIELD_NUMBER: _ClassVar[int]
    START_T0_FIELD_NUMBER: _ClassVar[int]
    GUIDE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    GUIDE_STRENGTH_FIELD_NUMBER: _ClassVar[int]
    VISIBILITY_FIELD_NUMBER: _ClassVar[int]
    face: _common_pb2.Face
    num_samples: int
    steps: int
    mode: str
    seed: int
    chunk_size: int
    start_shape: _common_pb2.Tensor
    start_t0: int
    guide_shape: _common_pb2.Tensor
    guide_strength: float
    visibility: _common_pb2.Visibility
    def __init__(self, face: _Optional[_Union[_common_pb2.Face, _Mapping]] = ..., num_samples: _Optional[int] = ..., steps: _Optional[int] = ..., mode: _Optional[str] = ..., seed: _Optional[int] = ..., chunk_size: _Optional[int] = ..., start_shape: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., start_t0: _Optional[int] = ..., guide_shape: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., guide_strength: _Optional[float] = ..., visibility: _Optional[_Union[_common_pb2.Visibility, _Mapping]] = ...) -> None: ...

class SampleChunk(_message.Message):
    __slots__ = ("offset", "shapes", "total")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SHAPES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    offset: int
    shapes: _common_pb2.Tensor
    total: int
    def __init__(self, offset: _Optional[int] = ..., shapes: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., total: _Optional[int] = ...) -> None: ...

class RankRequest(_message.Message):
    __slots__ = ("face", "candidates", "visibility")
    FACE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    VISIBILITY_FIELD_NUMBER: _ClassVar[int]
    face: _common_pb2.Face
    candidates: _common_pb2.Tensor
    visibility: _common_pb2.Visibility
    def __init__(self, face: _Optional[_Union[_common_pb2.Face, _Mapping]] = ..., candidates: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., visibility: _Optional[_Union[_common_pb2.Visibility, _Mapping]] = ...) -> None: ...

class RankResponse(_message.Message):
    __slots__ = ("scores",)
    SCORES_FIELD_NUMBER: _ClassVar[int]
    scores: _common_pb2.Tensor
    def __init__(self, scores: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...
