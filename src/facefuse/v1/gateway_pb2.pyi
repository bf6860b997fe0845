from facefuse.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProcessOptions(_message.Message):
    __slots__ = ("method", "strategy", "selection", "num_samples", "steps", "sampler_mode", "seed", "save_branches", "strategy_options", "boxes", "return_crops", "visibility_off", "det_thresh", "neutral_only")
    class StrategyOptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    METHOD_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_MODE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SAVE_BRANCHES_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    BOXES_FIELD_NUMBER: _ClassVar[int]
    RETURN_CROPS_FIELD_NUMBER: _ClassVar[int]
    VISIBILITY_OFF_FIELD_NUMBER: _ClassVar[int]
    DET_THRESH_FIELD_NUMBER: _ClassVar[int]
    NEUTRAL_ONLY_FIELD_NUMBER: _ClassVar[int]
    method: str
    strategy: str
    selection: str
    num_samples: int
    steps: int
    sampler_mode: str
    seed: int
    save_branches: bool
    strategy_options: _containers.ScalarMap[str, float]
    boxes: _containers.RepeatedCompositeFieldContainer[_common_pb2.Box]
    return_crops: bool
    visibility_off: _containers.RepeatedScalarFieldContainer[str]
    det_thresh: float
    neutral_only: bool
    def __init__(self, method: _Optional[str] = ..., strategy: _Optional[str] = ..., selection: _Optional[str] = ..., num_samples: _Optional[int] = ..., steps: _Optional[int] = ..., sampler_mode: _Optional[str] = ..., seed: _Optional[int] = ..., save_branches: _Optional[bool] = ..., strategy_options: _Optional[_Mapping[str, float]] = ..., boxes: _Optional[_Iterable[_Union[_common_pb2.Box, _Mapping]]] = ..., return_crops: _Optional[bool] = ..., visibility_off: _Optional[_Iterable[str]] = ..., det_thresh: _Optional[float] = ..., neutral_only: _Optional[bool] = ...) -> None: ...

class ImageChunk(_message.Message):
    __slots__ = ("image_id", "data", "last", "options", "mask")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    data: bytes
    last: bool
    options: ProcessOptions
    mask: _common_pb2.Tensor
    def __init__(self, image_id: _Optional[str] = ..., data: _Optional[bytes] = ..., last: _Optional[bool] = ..., options: _Optional[_Union[ProcessOptions, _Mapping]] = ..., mask: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class Reconstruction(_message.Message):
    __slots__ = ("method", "strategy", "shape", "mesh", "landmarks68", "kpt7", "vertex_spread", "confidence", "samples", "sample_scores", "visibility", "fallback", "scale_source", "scale_confidence", "posed")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    MESH_FIELD_NUMBER: _ClassVar[int]
    LANDMARKS68_FIELD_NUMBER: _ClassVar[int]
    KPT7_FIELD_NUMBER: _ClassVar[int]
    VERTEX_SPREAD_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_SCORES_FIELD_NUMBER: _ClassVar[int]
    VISIBILITY_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    SCALE_SOURCE_FIELD_NUMBER: _ClassVar[int]
    SCALE_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    POSED_FIELD_NUMBER: _ClassVar[int]
    method: str
    strategy: str
    shape: _common_pb2.Tensor
    mesh: _common_pb2.Mesh
    landmarks68: _common_pb2.Tensor
    kpt7: _common_pb2.Tensor
    vertex_spread: _common_pb2.Tensor
    confidence: float
    samples: _common_pb2.Tensor
    sample_scores: _common_pb2.Tensor
    visibility: _common_pb2.Visibility
    fallback: str
    scale_source: str
    scale_confidence: float
    posed: _common_pb2.PosedFace
    def __init__(self, method: _Optional[str] = ..., strategy: _Optional[str] = ..., shape: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., mesh: _Optional[_Union[_common_pb2.Mesh, _Mapping]] = ..., landmarks68: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., kpt7: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., vertex_spread: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., confidence: _Optional[float] = ..., samples: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., sample_scores: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., visibility: _Optional[_Union[_common_pb2.Visibility, _Mapping]] = ..., fallback: _Optional[str] = ..., scale_source: _Optional[str] = ..., scale_confidence: _Optional[float] = ..., posed: _Optional[_Union[_common_pb2.PosedFace, _Mapping]] = ...) -> None: ...

class Branch(_message.Message):
    __slots__ = ("name", "reconstruction")
    NAME_FIELD_NUMBER: _ClassVar[int]
    RECONSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    reconstruction: Reconstruction
    def __init__(self, name: _Optional[str] = ..., reconstruction: _Optional[_Union[Reconstruction, _Mapping]] = ...) -> None: ...

class FaceResult(_message.Message):
    __slots__ = ("image_id", "face_index", "num_faces", "status", "face", "reconstruction", "branches", "seconds")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    FACE_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_FACES_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    FACE_FIELD_NUMBER: _ClassVar[int]
    RECONSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    BRANCHES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    face_index: int
    num_faces: int
    status: _common_pb2.Status
    face: _common_pb2.Face
    reconstruction: Reconstruction
    branches: _containers.RepeatedCompositeFieldContainer[Branch]
    seconds: float
    def __init__(self, image_id: _Optional[str] = ..., face_index: _Optional[int] = ..., num_faces: _Optional[int] = ..., status: _Optional[_Union[_common_pb2.Status, _Mapping]] = ..., face: _Optional[_Union[_common_pb2.Face, _Mapping]] = ..., reconstruction: _Optional[_Union[Reconstruction, _Mapping]] = ..., branches: _Optional[_Iterable[_Union[Branch, _Mapping]]] = ..., seconds: _Optional[float] = ...) -> None: ...

class GatewayInfo(_message.Message):
    __slots__ = ("front_end", "backends")
    FRONT_END_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    front_end: str
    backends: _containers.RepeatedCompositeFieldContainer[_common_pb2.BackendInfo]
    def __init__(self, front_end: _Optional[str] = ..., backends: _Optional[_Iterable[_Union[_common_pb2.BackendInfo, _Mapping]]] = ...) -> None: ...
