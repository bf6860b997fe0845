from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    INT8: _ClassVar[DType]
    INT16: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT64: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    UINT16: _ClassVar[DType]
    UINT32: _ClassVar[DType]
    UINT64: _ClassVar[DType]
    BOOL: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT64: DType
FLOAT16: DType
BFLOAT16: DType
INT8: DType
INT16: DType
INT32: DType
INT64: DType
UINT8: DType
UINT16: DType
UINT32: DType
UINT64: DType
BOOL: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "unit")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    unit: str
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., unit: _Optional[str] = ...) -> None: ...

class Mesh(_message.Message):
    __slots__ = ("vertices", "faces", "topology", "vertex_colors", "uvs")
    VERTICES_FIELD_NUMBER: _ClassVar[int]
    FACES_FIELD_NUMBER: _ClassVar[int]
    TOPOLOGY_FIELD_NUMBER: _ClassVar[int]
    VERTEX_COLORS_FIELD_NUMBER: _ClassVar[int]
    UVS_FIELD_NUMBER: _ClassVar[int]
    vertices: Tensor
    faces: Tensor
    topology: str
    vertex_colors: Tensor
    uvs: Tensor
    def __init__(self, vertices: _Optional[_Union[Tensor, _Mapping]] = ..., faces: _Optional[_Union[Tensor, _Mapping]] = ..., topology: _Optional[str] = ..., vertex_colors: _Optional[_Union[Tensor, _Mapping]] = ..., uvs: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("x1", "y1", "x2", "y2", "score")
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    X2_FIELD_NUMBER: _ClassVar[int]
    Y2_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    x1: float
    y1: float
    x2: float
    y2: float
    score: float
    def __init__(self, x1: _Optional[float] = ..., y1: _Optional[float] = ..., x2: _Optional[float] = ..., y2: _Optional[float] = ..., score: _Optional[float] = ...) -> None: ...

class Face(_message.Message):
    __slots__ = ("index", "box", "kps5", "landmarks", "detector", "crop112", "arcface_blob", "crop224", "farl_input", "image_size", "crop_box224", "score", "iris", "found_by")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    KPS5_FIELD_NUMBER: _ClassVar[int]
    LANDMARKS_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_FIELD_NUMBER: _ClassVar[int]
    CROP112_FIELD_NUMBER: _ClassVar[int]
    ARCFACE_BLOB_FIELD_NUMBER: _ClassVar[int]
    CROP224_FIELD_NUMBER: _ClassVar[int]
    FARL_INPUT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    CROP_BOX224_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    IRIS_FIELD_NUMBER: _ClassVar[int]
    FOUND_BY_FIELD_NUMBER: _ClassVar[int]
    index: int
    box: Box
    kps5: Tensor
    landmarks: Tensor
    detector: str
    crop112: Tensor
    arcface_blob: Tensor
    crop224: Tensor
    farl_input: Tensor
    image_size: Tensor
    crop_box224: Tensor
    score: float
    iris: Tensor
    found_by: str
    def __init__(self, index: _Optional[int] = ..., box: _Optional[_Union[Box, _Mapping]] = ..., kps5: _Optional[_Union[Tensor, _Mapping]] = ..., landmarks: _Optional[_Union[Tensor, _Mapping]] = ..., detector: _Optional[str] = ..., crop112: _Optional[_Union[Tensor, _Mapping]] = ..., arcface_blob: _Optional[_Union[Tensor, _Mapping]] = ..., crop224: _Optional[_Union[Tensor, _Mapping]] = ..., farl_input: _Optional[_Union[Tensor, _Mapping]] = ..., image_size: _Optional[_Union[Tensor, _Mapping]] = ..., crop_box224: _Optional[_Union[Tensor, _Mapping]] = ..., score: _Optional[float] = ..., iris: _Optional[_Union[Tensor, _Mapping]] = ..., found_by: _Optional[str] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class BackendInfo(_message.Message):
    __slots__ = ("service", "backend", "pack", "placeholder", "ready", "message", "device", "details")
    class DetailsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PACK_FIELD_NUMBER: _ClassVar[int]
    PLACEHOLDER_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    service: str
    backend: str
    pack: str
    placeholder: bool
    ready: bool
    message: str
    device: str
    details: _containers.ScalarMap[str, str]
    def __init__(self, service: _Optional[str] = ..., backend: _Optional[str] = ..., pack: _Optional[str] = ..., placeholder: _Optional[bool] = ..., ready: _Optional[bool] = ..., message: _Optional[str] = ..., device: _Optional[str] = ..., details: _Optional[_Mapping[str, str]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Visibility(_message.Message):
    __slots__ = ("regions", "per_vertex", "sources", "unknown")
    class RegionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    PER_VERTEX_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    regions: _containers.ScalarMap[str, float]
    per_vertex: Tensor
    sources: _containers.RepeatedScalarFieldContainer[str]
    unknown: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, regions: _Optional[_Mapping[str, float]] = ..., per_vertex: _Optional[_Union[Tensor, _Mapping]] = ..., sources: _Optional[_Iterable[str]] = ..., unknown: _Optional[_Iterable[str]] = ...) -> None: ...

class PosedFace(_message.Message):
    __slots__ = ("expression", "jaw_pose", "global_pose", "translation", "camera_intrinsics", "camera_extrinsics", "image_size", "focal_source", "reprojection_error_px", "vertices", "landmarks_px")
    EXPRESSION_FIELD_NUMBER: _ClassVar[int]
    JAW_POSE_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_POSE_FIELD_NUMBER: _ClassVar[int]
    TRANSLATION_FIELD_NUMBER: _ClassVar[int]
    CAMERA_INTRINSICS_FIELD_NUMBER: _ClassVar[int]
    CAMERA_EXTRINSICS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    FOCAL_SOURCE_FIELD_NUMBER: _ClassVar[int]
    REPROJECTION_ERROR_PX_FIELD_NUMBER: _ClassVar[int]
    VERTICES_FIELD_NUMBER: _ClassVar[int]
    LANDMARKS_PX_FIELD_NUMBER: _ClassVar[int]
    expression: Tensor
    jaw_pose: Tensor
    global_pose: Tensor
    translation: Tensor
    camera_intrinsics: Tensor
    camera_extrinsics: Tensor
    image_size: Tensor
    focal_source: str
    reprojection_error_px: float
    vertices: Tensor
    landmarks_px: Tensor
    def __init__(self, expression: _Optional[_Union[Tensor, _Mapping]] = ..., jaw_pose: _Optional[_Union[Tensor, _Mapping]] = ..., global_pose: _Optional[_Union[Tensor, _Mapping]] = ..., translation: _Optional[_Union[Tensor, _Mapping]] = ..., camera_intrinsics: _Optional[_Union[Tensor, _Mapping]] = ..., camera_extrinsics: _Optional[_Union[Tensor, _Mapping]] = ..., image_size: _Optional[_Union[Tensor, _Mapping]] = ..., focal_source: _Optional[str] = ..., reprojection_error_px: _Optional[float] = ..., vertices: _Optional[_Union[Tensor, _Mapping]] = ..., landmarks_px: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class PoseFitInput(_message.Message):
    __slots__ = ("landmarks", "image_size", "focal_px", "focal_source")
    LANDMARKS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    FOCAL_PX_FIELD_NUMBER: _ClassVar[int]
    FOCAL_SOURCE_FIELD_NUMBER: _ClassVar[int]
    landmarks: Tensor
    image_size: Tensor
    focal_px: float
    focal_source: str
    def __init__(self, landmarks: _Optional[_Union[Tensor, _Mapping]] = ..., image_size: _Optional[_Union[Tensor, _Mapping]] = ..., focal_px: _Optional[float] = ..., focal_source: _Optional[str] = ...) -> None: ...
