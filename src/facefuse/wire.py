"""Conversion between arrays and the wire messages of ``protos/facefuse/v1``.

Tensors travel as raw little-endian C-order bytes with dtype and shape. Decoding adds no copy to the
``bytes`` object protobuf hands out: the array (or torch tensor) is a read-only view of it. Encoding
makes the one copy protobuf needs, and none before it when the array is already little-endian and
contiguous.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from google.protobuf.message import Message

from facefuse.errors import InvalidInputError
from facefuse.v1 import common_pb2

if TYPE_CHECKING:  # torch is imported lazily: the gateway image has no torch.
    import torch

    from facefuse.face.types import AlignedFace

try:  # bfloat16 has no numpy dtype; ml_dtypes provides one when installed.
    import ml_dtypes

    _NP_BFLOAT16: np.dtype | None = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - depends on the environment
    _NP_BFLOAT16 = None

DType = common_pb2.DType

_NUMPY_BY_WIRE: dict[common_pb2.DType, np.dtype] = {
    DType.FLOAT32: np.dtype("<f4"),
    DType.FLOAT64: np.dtype("<f8"),
    DType.FLOAT16: np.dtype("<f2"),
    DType.INT8: np.dtype("i1"),
    DType.INT16: np.dtype("<i2"),
    DType.INT32: np.dtype("<i4"),
    DType.INT64: np.dtype("<i8"),
    DType.UINT8: np.dtype("u1"),
    DType.UINT16: np.dtype("<u2"),
    DType.UINT32: np.dtype("<u4"),
    DType.UINT64: np.dtype("<u8"),
    DType.BOOL: np.dtype("?"),
}
if _NP_BFLOAT16 is not None:
    _NUMPY_BY_WIRE[DType.BFLOAT16] = _NP_BFLOAT16

_ITEMSIZE: dict[common_pb2.DType, int] = {k: v.itemsize for k, v in _NUMPY_BY_WIRE.items()} | {DType.BFLOAT16: 2}


def _torch_dtypes() -> dict[common_pb2.DType, torch.dtype]:
    import torch

    return {
        DType.FLOAT32: torch.float32, DType.FLOAT64: torch.float64, DType.FLOAT16: torch.float16,
        DType.BFLOAT16: torch.bfloat16, DType.INT8: torch.int8, DType.INT16: torch.int16,
        DType.INT32: torch.int32, DType.INT64: torch.int64, DType.UINT8: torch.uint8,
        DType.UINT16: torch.uint16, DType.UINT32: torch.uint32, DType.UINT64: torch.uint64,
        DType.BOOL: torch.bool,
    }


SUPPORTED_DTYPES: tuple[str, ...] = tuple(DType.Name(k) for k in _ITEMSIZE)
FLOAT_DTYPES: tuple[int, ...] = (DType.FLOAT32, DType.FLOAT64, DType.FLOAT16, DType.BFLOAT16)
MAX_NDIM = 8
MAX_DIM = 2**31 - 1
"""Bounds no facefuse tensor comes near; beyond them a shape is malformed (even with a zero-sized axis)."""


def _wire_dtype_of_numpy(dtype: np.dtype) -> common_pb2.DType:
    if _NP_BFLOAT16 is not None and dtype == _NP_BFLOAT16:
        return DType.BFLOAT16
    for wire, np_dtype in _NUMPY_BY_WIRE.items():
        if np_dtype.kind == dtype.kind and np_dtype.itemsize == dtype.itemsize and np_dtype != _NP_BFLOAT16:
            return wire
    raise InvalidInputError(f"dtype {dtype} cannot travel as a Tensor; supported: {', '.join(SUPPORTED_DTYPES)}")


def from_numpy(array: np.ndarray, unit: str = "") -> common_pb2.Tensor:
    """Encode an array (any byte order or layout) as a Tensor message."""
    array = np.asarray(array)
    wire = _wire_dtype_of_numpy(array.dtype)
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and np.little_endian is False):
        array = array.astype(array.dtype.newbyteorder("<"))
    data = np.ascontiguousarray(array).tobytes()
    return common_pb2.Tensor(dtype=wire, shape=list(array.shape), data=data, unit=unit)


def from_torch(tensor: torch.Tensor, unit: str = "") -> common_pb2.Tensor:
    """Encode a tensor (any device) as a Tensor message; bfloat16 and unsigned types included."""
    import torch

    wire_by_torch = {v: k for k, v in _torch_dtypes().items()}
    if tensor.dtype not in wire_by_torch:
        raise InvalidInputError(
            f"dtype {tensor.dtype} cannot travel as a Tensor; supported: {', '.join(SUPPORTED_DTYPES)}"
        )
    flat = tensor.detach().to("cpu").contiguous()
    data = flat.reshape(-1).view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return common_pb2.Tensor(dtype=wire_by_torch[tensor.dtype], shape=list(tensor.shape), data=data, unit=unit)


def _checked_shape(message: common_pb2.Tensor, name: str) -> tuple[int, ...]:
    """The shape, once dtype, rank, every dimension and the byte count agree (exact integer arithmetic:
    dimensions whose product overflows int64 are refused like any other mismatch)."""
    if message.dtype not in _ITEMSIZE:
        raise InvalidInputError(f"{name}: unsupported or missing dtype {message.dtype}")
    if len(message.shape) > MAX_NDIM:
        raise InvalidInputError(f"{name}: {len(message.shape)} dimensions; at most {MAX_NDIM} are accepted")
    shape = tuple(int(s) for s in message.shape)
    if any(s < 0 for s in shape):
        raise InvalidInputError(f"{name}: negative dimension in shape {shape}")
    if any(s > MAX_DIM for s in shape):
        raise InvalidInputError(f"{name}: dimension over {MAX_DIM} in shape {shape}")
    expected = math.prod(shape) * _ITEMSIZE[message.dtype]
    if len(message.data) != expected:
        raise InvalidInputError(
            f"{name}: {len(message.data)} bytes do not match dtype {DType.Name(message.dtype)} and shape {shape} "
            f"({expected} bytes expected)"
        )
    return shape


def require_finite(array: np.ndarray, name: str) -> np.ndarray:
    """Refuse NaN and infinities in a float array that a model or a fusion will consume."""
    is_bfloat16 = _NP_BFLOAT16 is not None and array.dtype == _NP_BFLOAT16
    if (array.dtype.kind == "f" or is_bfloat16) and not np.isfinite(
        array.astype(np.float32) if is_bfloat16 else array
    ).all():
        raise InvalidInputError(f"{name}: contains NaN or infinite values")
    return array


def to_numpy(message: common_pb2.Tensor, name: str = "tensor") -> np.ndarray:
    """A read-only array viewing the message's bytes (no copy)."""
    shape = _checked_shape(message, name)
    if message.dtype not in _NUMPY_BY_WIRE:
        raise InvalidInputError(f"{name}: {DType.Name(message.dtype)} has no numpy dtype here (install ml_dtypes)")
    return np.frombuffer(message.data, dtype=_NUMPY_BY_WIRE[message.dtype]).reshape(shape)


def to_torch(message: common_pb2.Tensor, name: str = "tensor") -> torch.Tensor:
    """A CPU tensor sharing the message's bytes; treat it as read-only (clone before writing)."""
    import torch

    shape = _checked_shape(message, name)
    dtype = _torch_dtypes()[message.dtype]
    if not message.data:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        flat = torch.frombuffer(message.data, dtype=dtype)
    return flat.reshape(shape)


def require(message: common_pb2.Tensor, name: str, *, shape: Sequence[int | None],
            dtypes: Sequence[int] | None = FLOAT_DTYPES) -> np.ndarray:
    """Decode and check the shape (None = any size on that axis), dtype (floats unless told otherwise)
    and, for floats, finiteness of a request tensor."""
    array = to_numpy(message, name)
    if len(array.shape) != len(shape) or any(e is not None and e != a for e, a in zip(shape, array.shape, strict=True)):
        wanted = "(" + ", ".join("N" if s is None else str(s) for s in shape) + ")"
        raise InvalidInputError(f"{name}: shape {tuple(array.shape)}, expected {wanted}")
    if dtypes is not None and message.dtype not in dtypes:
        raise InvalidInputError(
            f"{name}: dtype {DType.Name(message.dtype)}, expected one of {[DType.Name(d) for d in dtypes]}"
        )
    return require_finite(array, name)


def has(message: Message, field: str) -> bool:
    """True when an optional message field is set and, for tensors, non-empty."""
    if not message.HasField(field):
        return False
    value = getattr(message, field)
    return not isinstance(value, common_pb2.Tensor) or value.dtype != DType.DTYPE_UNSPECIFIED


def mesh_message(vertices_mm: np.ndarray, faces: np.ndarray, topology: str, *,
                 colors: np.ndarray | None = None, uvs: np.ndarray | None = None) -> common_pb2.Mesh:
    mesh = common_pb2.Mesh(
        vertices=from_numpy(np.asarray(vertices_mm, dtype=np.float32), unit="mm"),
        faces=from_numpy(np.asarray(faces, dtype=np.int32)),
        topology=topology,
    )
    if colors is not None:
        mesh.vertex_colors.CopyFrom(from_numpy(np.asarray(colors, dtype=np.uint8)))
    if uvs is not None:
        mesh.uvs.CopyFrom(from_numpy(np.asarray(uvs, dtype=np.float32)))
    return mesh


def face_message(
    face: AlignedFace, index: int, image_size: tuple[int, int], *, with_crops: bool = True
) -> common_pb2.Face:
    """The wire form of an aligned face: what the gateway sends to every model service."""
    det = face.detection
    message = common_pb2.Face(
        index=index,
        box=common_pb2.Box(x1=float(det.box[0]), y1=float(det.box[1]), x2=float(det.box[2]), y2=float(det.box[3]),
                           score=det.score),
        kps5=from_numpy(det.kps5, unit="px"),
        detector=det.detector,
        image_size=from_numpy(np.asarray(image_size, dtype=np.int32)),
        score=det.score,
        found_by=det.found_by,
    )
    if det.landmarks is not None:
        message.landmarks.CopyFrom(from_numpy(det.landmarks, unit="px"))
    if det.iris is not None:
        message.iris.CopyFrom(from_numpy(det.iris, unit="px"))
    if with_crops:
        message.crop112.CopyFrom(from_numpy(face.crop112))
        message.arcface_blob.CopyFrom(from_numpy(face.arcface_blob))
        message.crop224.CopyFrom(from_numpy(face.crop224))
        message.crop_box224.CopyFrom(from_numpy(face.crop_box224))
        if face.farl_input is not None:
            message.farl_input.CopyFrom(from_numpy(face.farl_input))
    return message


def aligned_face_from_message(message: common_pb2.Face, name: str = "face") -> AlignedFace:
    """Decode and check a Face sent to a model service."""
    from facefuse.face.types import AlignedFace, Detection

    if not has(message, "arcface_blob"):
        raise InvalidInputError(f"{name}: arcface_blob is missing (the gateway sends aligned crops)")
    box = message.box
    numbers = {"box.x1": box.x1, "box.y1": box.y1, "box.x2": box.x2, "box.y2": box.y2, "box.score": box.score,
               "score": message.score}
    for field_name, value in numbers.items():
        if not math.isfinite(value):
            raise InvalidInputError(f"{name}.{field_name}: {value} is not a finite number")
    landmarks = require(message.landmarks, f"{name}.landmarks", shape=(None, 3)) if has(message, "landmarks") else None
    detection = Detection(
        box=np.array([box.x1, box.y1, box.x2, box.y2], np.float32),
        score=message.score or box.score,
        kps5=require(message.kps5, f"{name}.kps5", shape=(5, 2))
        if has(message, "kps5")
        else np.zeros((5, 2), np.float32),
        landmarks=landmarks,
        detector=message.detector,
        iris=require(message.iris, f"{name}.iris", shape=(2, 3)) if has(message, "iris") else None,
    )
    f32, u8 = [DType.FLOAT32], [DType.UINT8]
    return AlignedFace(
        detection=detection,
        crop112=require(message.crop112, f"{name}.crop112", shape=(112, 112, 3), dtypes=u8)
        if has(message, "crop112")
        else np.zeros((112, 112, 3), np.uint8),
        crop224=require(message.crop224, f"{name}.crop224", shape=(224, 224, 3), dtypes=u8)
        if has(message, "crop224")
        else np.zeros((224, 224, 3), np.uint8),
        crop_box224=require(message.crop_box224, f"{name}.crop_box224", shape=(224, 224, 3), dtypes=f32)
        if has(message, "crop_box224")
        else np.zeros((224, 224, 3), np.float32),
        arcface_blob=require(message.arcface_blob, f"{name}.arcface_blob", shape=(3, 112, 112), dtypes=f32),
        farl_input=require(message.farl_input, f"{name}.farl_input", shape=(3, 224, 224), dtypes=f32)
        if has(message, "farl_input")
        else None,
    )
