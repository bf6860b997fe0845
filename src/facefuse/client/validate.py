"""Check a gateway's FaceResult completely before the client writes anything from it.

The client trusts no field: every tensor's rank, sizes, dtype and byte count are checked (sizes
before decoding, so no shape can overflow or allocate), float values must be finite and of sane
magnitude, indices must point into their arrays, names that become file names come from a fixed
list, and strings are shortened to printable text. What passes is a plain ``CheckedFace`` of numpy
arrays; the writers never look at the message again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from google.protobuf.message import Message

from facefuse import wire
from facefuse.errors import FacefuseError, InvalidInputError
from facefuse.packs.base import SCALE_SOURCES
from facefuse.v1 import common_pb2, gateway_pb2

MAX_FACES = 1024  # faces per image
MAX_POINTS = 10_000  # landmarks per face
MAX_VERTICES = 200_000
MAX_TRIANGLES = 400_000
MAX_SAMPLES = 10_000
MAX_SHAPE = 3 * MAX_VERTICES  # coefficients, or xyz per vertex (open pack)
MAX_PIXEL_COORD = 1e6  # px; images are far smaller (the gateway's pixel limit)
MAX_MM = 1e5  # mm; a face is ~200 mm across
MAX_TEXT = 200  # characters kept of a name
MAX_MESSAGE = 2000  # characters kept of a status message
MAX_REGIONS = 64
BRANCHES = ("mica", "ofer")  # they become folder names: only these are accepted
RECONSTRUCTING = ("mica", "ofer", "fuse")

_FLOATS = (common_pb2.FLOAT32, common_pb2.FLOAT64, common_pb2.FLOAT16)
_INTEGERS = (common_pb2.INT32, common_pb2.INT64, common_pb2.UINT32, common_pb2.UINT16, common_pb2.INT16)
_BYTES = (common_pb2.UINT8,)


class InvalidResponseError(FacefuseError):
    """The gateway's answer breaks the protocol (bad id, index, tensor or value); nothing is written."""


FOCAL_SOURCES = ("exif", "default")
MAX_REPROJECTION_PX = 1e6


@dataclass(frozen=True)
class CheckedPosedFace:
    """The face as photographed (docs/posed-face.md): camera space mm, OpenCV axes, photo pixels."""

    expression: np.ndarray  # (K,)
    jaw_pose: np.ndarray  # (3,) rad
    global_pose: np.ndarray  # (3,) rad, model -> camera
    translation: np.ndarray  # (3,) mm
    camera_intrinsics: np.ndarray  # (3,3) px
    camera_extrinsics: np.ndarray  # (4,4)
    image_size: np.ndarray  # (2,) int32 width, height
    focal_source: str
    reprojection_error_px: float
    vertices: np.ndarray  # (V,3) camera mm, the reconstruction's triangles
    landmarks_px: np.ndarray  # (L,2)


@dataclass(frozen=True)
class CheckedReconstruction:
    method: str
    strategy: str
    confidence: float
    fallback: str
    topology: str = ""
    vertices: np.ndarray | None = None  # (V,3) mm
    faces: np.ndarray | None = None  # (F,3) indices into vertices
    uvs: np.ndarray | None = None  # (V,2)
    vertex_spread: np.ndarray | None = None  # (V,) mm
    shape: np.ndarray | None = None  # (D,)
    kpt7: np.ndarray | None = None  # (7,3) mm
    landmarks68: np.ndarray | None = None  # (68,3) mm
    samples: np.ndarray | None = None  # (N,D)
    sample_scores: np.ndarray | None = None  # (N,)
    visibility: dict[str, float] | None = None
    visibility_sources: list[str] = field(default_factory=list)
    visibility_unknown: list[str] = field(default_factory=list)  # regions a source could not judge
    scale_source: str = ""  # "iris" | "default" | "" (not reported)
    scale_confidence: float = 0.0  # [0, 1]
    posed: CheckedPosedFace | None = None


@dataclass(frozen=True)
class CheckedFace:
    face_index: int
    num_faces: int
    seconds: float
    box: np.ndarray  # (4,) px
    score: float
    detector: str
    kps5: np.ndarray  # (5,2) px
    landmarks: np.ndarray | None = None  # (N,3) px
    crop112: np.ndarray | None = None
    crop224: np.ndarray | None = None
    reconstruction: CheckedReconstruction | None = None
    branches: tuple[tuple[str, CheckedReconstruction], ...] = ()
    found_by: str = ""  # facefuse.face.types.FOUND_BY, or "" when the gateway did not say


def text(value: str, limit: int = MAX_TEXT) -> str:
    """A server string made printable and short (it only ever lands inside JSON, never in a path)."""
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in value[: limit + 1])
    return cleaned if len(cleaned) <= limit else cleaned[:limit] + "..."


def check_numbers(result: gateway_pb2.FaceResult) -> None:
    """face_index and num_faces make sense on their own (-1 only for a whole-image status)."""
    index, count = result.face_index, result.num_faces
    if not 0 <= count <= MAX_FACES:
        raise InvalidResponseError(f"num_faces {count} is outside 0..{MAX_FACES}")
    if index == -1:
        if result.status.code == 0:
            raise InvalidResponseError("an OK result must name a face (face_index -1)")
        return
    if not 0 <= index < count:
        raise InvalidResponseError(f"face_index {index} is outside 0..{count - 1} (num_faces {count})")


def tensor(message: common_pb2.Tensor, name: str, shape: Sequence[int | None], dtypes: Sequence[int], *,
           max_dim: int, max_abs: float | None = None) -> np.ndarray:
    """Decode one tensor after checking its shape against ``shape`` (None: any size up to ``max_dim``)."""
    dims = list(message.shape)
    wanted = "(" + ", ".join("N" if s is None else str(s) for s in shape) + ")"
    if len(dims) != len(shape) or any(
        d < 0 or d > max_dim or (s is not None and d != s) for d, s in zip(dims, shape, strict=True)
    ):
        shown = tuple(dims[:8]) if len(dims) <= 8 else (*dims[:8], "...")
        raise InvalidResponseError(f"{name}: shape {shown}, expected {wanted} with sizes up to {max_dim}")
    try:
        array = wire.require(message, name, shape=shape, dtypes=dtypes)
    except InvalidInputError as exc:
        raise InvalidResponseError(str(exc)) from None
    if message.dtype in _FLOATS:
        if not np.isfinite(array).all():
            raise InvalidResponseError(f"{name}: has NaN or infinite values")
        if max_abs is not None and array.size and float(np.abs(array).max()) > max_abs:
            raise InvalidResponseError(f"{name}: values up to {float(np.abs(array).max()):.3g}, beyond {max_abs:g}")
    return array


def _number(value: float, name: str, low: float, high: float) -> float:
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidResponseError(f"{name}: {value!r} is not a finite number in [{low:g}, {high:g}]")
    return float(value)


def _optional(message: Message, field_name: str, name: str, shape: Sequence[int | None], dtypes: Sequence[int], *,
              max_dim: int, max_abs: float | None = None) -> np.ndarray | None:
    if not wire.has(message, field_name):
        return None
    return tensor(getattr(message, field_name), name, shape, dtypes, max_dim=max_dim, max_abs=max_abs)


def _required(message: Message, field_name: str, name: str, shape: Sequence[int | None], dtypes: Sequence[int], *,
              max_dim: int, max_abs: float | None = None) -> np.ndarray:
    array = _optional(message, field_name, name, shape, dtypes, max_dim=max_dim, max_abs=max_abs)
    if array is None:
        raise InvalidResponseError(f"{name}: missing")
    return array


def check_posed(posed: common_pb2.PosedFace, name: str, num_vertices: int | None) -> CheckedPosedFace:
    """A posed face is complete and consistent: a proper camera, a rigid [R | t], vertices for the mesh."""
    if num_vertices is None:
        raise InvalidResponseError(f"{name}: sent without a mesh")
    intrinsics = _required(posed, "camera_intrinsics", f"{name}.camera_intrinsics", (3, 3), _FLOATS, max_dim=3,
                           max_abs=MAX_PIXEL_COORD)
    if not (intrinsics[0, 0] > 0 and intrinsics[1, 1] > 0 and intrinsics[1, 0] == 0 and intrinsics[2, 0] == 0
            and intrinsics[2, 1] == 0 and intrinsics[2, 2] == 1):
        raise InvalidResponseError(f"{name}.camera_intrinsics: not a pinhole K (positive focal, last row 0 0 1)")
    extrinsics = _required(posed, "camera_extrinsics", f"{name}.camera_extrinsics", (4, 4), _FLOATS, max_dim=4,
                           max_abs=MAX_MM)
    rotation = extrinsics[:3, :3].astype(np.float64)
    if not (np.allclose(extrinsics[3], [0, 0, 0, 1]) and np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-3)
            and np.linalg.det(rotation) > 0):
        raise InvalidResponseError(f"{name}.camera_extrinsics: not a rigid [R | t] (rotation, last row 0 0 0 1)")
    translation = _required(posed, "translation", f"{name}.translation", (3,), _FLOATS, max_dim=3, max_abs=MAX_MM)
    if not np.allclose(translation, extrinsics[:3, 3], atol=1e-2):
        raise InvalidResponseError(f"{name}.translation: differs from the extrinsics' t")
    size = _required(posed, "image_size", f"{name}.image_size", (2,), _INTEGERS, max_dim=2)
    if not (0 < int(size[0]) <= MAX_PIXEL_COORD and 0 < int(size[1]) <= MAX_PIXEL_COORD):
        raise InvalidResponseError(f"{name}.image_size: {size.tolist()} is not a photo's width and height")
    if posed.focal_source not in FOCAL_SOURCES:
        raise InvalidResponseError(
            f"{name}.focal_source: {text(posed.focal_source)!r}; expected one of {FOCAL_SOURCES}"
        )
    error = _number(posed.reprojection_error_px, f"{name}.reprojection_error_px", 0.0, MAX_REPROJECTION_PX)
    return CheckedPosedFace(
        expression=_required(posed, "expression", f"{name}.expression", (None,), _FLOATS, max_dim=MAX_SHAPE,
                             max_abs=MAX_MM),
        jaw_pose=_required(posed, "jaw_pose", f"{name}.jaw_pose", (3,), _FLOATS, max_dim=3, max_abs=4.0),
        global_pose=_required(posed, "global_pose", f"{name}.global_pose", (3,), _FLOATS, max_dim=3, max_abs=4.0),
        translation=translation, camera_intrinsics=intrinsics, camera_extrinsics=extrinsics,
        image_size=np.asarray(size, np.int32), focal_source=posed.focal_source, reprojection_error_px=error,
        vertices=_required(posed, "vertices", f"{name}.vertices", (num_vertices, 3), _FLOATS, max_dim=MAX_VERTICES,
                           max_abs=MAX_MM),
        landmarks_px=_required(posed, "landmarks_px", f"{name}.landmarks_px", (None, 2), _FLOATS, max_dim=MAX_POINTS,
                               max_abs=MAX_PIXEL_COORD),
    )


def check_reconstruction(rec: gateway_pb2.Reconstruction, name: str) -> CheckedReconstruction:
    vertices = faces = uvs = spread = None
    if rec.HasField("mesh"):
        mesh = rec.mesh
        vertices = tensor(
            mesh.vertices, f"{name}.mesh.vertices", (None, 3), _FLOATS, max_dim=MAX_VERTICES, max_abs=MAX_MM
        )
        faces = tensor(mesh.faces, f"{name}.mesh.faces", (None, 3), _INTEGERS, max_dim=MAX_TRIANGLES)
        if len(vertices) < 3 or len(faces) < 1:
            raise InvalidResponseError(
                f"{name}.mesh: {len(vertices)} vertices and {len(faces)} triangles, too few for a mesh"
            )
        if faces.size and (int(faces.min()) < 0 or int(faces.max()) >= len(vertices)):
            raise InvalidResponseError(f"{name}.mesh.faces: indices outside 0..{len(vertices) - 1}")
        count = len(vertices)
        uvs = _optional(mesh, "uvs", f"{name}.mesh.uvs", (count, 2), _FLOATS, max_dim=MAX_VERTICES, max_abs=MAX_MM)
        spread = _optional(
            rec, "vertex_spread", f"{name}.vertex_spread", (count,), _FLOATS, max_dim=MAX_VERTICES, max_abs=MAX_MM
        )
        if spread is not None and spread.size and float(spread.min()) < 0:
            raise InvalidResponseError(f"{name}.vertex_spread: negative spread")
    elif wire.has(rec, "vertex_spread"):
        raise InvalidResponseError(f"{name}.vertex_spread: sent without a mesh")
    shape = _optional(rec, "shape", f"{name}.shape", (None,), _FLOATS, max_dim=MAX_SHAPE, max_abs=MAX_MM)
    samples = _optional(rec, "samples", f"{name}.samples", (None, None if shape is None else len(shape)), _FLOATS,
                        max_dim=max(MAX_SAMPLES, MAX_SHAPE), max_abs=MAX_MM)
    if samples is not None and len(samples) > MAX_SAMPLES:
        raise InvalidResponseError(f"{name}.samples: {len(samples)} samples, more than {MAX_SAMPLES}")
    scores = _optional(rec, "sample_scores", f"{name}.sample_scores", (None if samples is None else len(samples),),
                       _FLOATS, max_dim=MAX_SAMPLES, max_abs=1e9)
    if scores is not None and samples is None:
        raise InvalidResponseError(f"{name}.sample_scores: sent without samples")
    visibility, sources, unknown = None, [], []
    if rec.scale_source not in ("", *SCALE_SOURCES):
        raise InvalidResponseError(f"{name}.scale_source: {text(rec.scale_source)!r}; expected one of {SCALE_SOURCES}")
    scale_confidence = _number(rec.scale_confidence, f"{name}.scale_confidence", 0.0, 1.0)
    if not rec.scale_source and scale_confidence != 0.0:
        raise InvalidResponseError(f"{name}.scale_confidence: set without a scale_source")
    if rec.HasField("visibility"):
        regions = rec.visibility.regions
        if len(regions) > MAX_REGIONS or len(rec.visibility.sources) > MAX_REGIONS:
            raise InvalidResponseError(f"{name}.visibility: more than {MAX_REGIONS} regions or sources")
        visibility = {text(k): _number(v, f"{name}.visibility[{text(k)}]", 0.0, 1.0) for k, v in regions.items()}
        sources = [text(s) for s in rec.visibility.sources]
        if len(rec.visibility.unknown) > MAX_REGIONS:
            raise InvalidResponseError(f"{name}.visibility.unknown: more than {MAX_REGIONS} regions")
        unknown = [text(s) for s in rec.visibility.unknown]
        if any(u not in visibility for u in unknown):
            raise InvalidResponseError(f"{name}.visibility.unknown: names a region it does not report")
    elif len(rec.visibility.unknown):
        raise InvalidResponseError(f"{name}.visibility.unknown: sent without a visibility")
    return CheckedReconstruction(
        method=text(rec.method),
        strategy=text(rec.strategy),
        confidence=_number(rec.confidence, f"{name}.confidence", -1e9, 1e9),
        fallback=text(rec.fallback, MAX_MESSAGE),
        topology=text(rec.mesh.topology) if rec.HasField("mesh") else "",
        vertices=vertices,
        faces=faces,
        uvs=uvs,
        vertex_spread=spread,
        shape=shape,
        kpt7=_optional(rec, "kpt7", f"{name}.kpt7", (7, 3), _FLOATS, max_dim=7, max_abs=MAX_MM),
        landmarks68=_optional(rec, "landmarks68", f"{name}.landmarks68", (68, 3), _FLOATS, max_dim=68, max_abs=MAX_MM),
        samples=samples,
        sample_scores=scores,
        visibility=visibility,
        visibility_sources=sources,
        visibility_unknown=unknown,
        scale_source=rec.scale_source,
        scale_confidence=scale_confidence,
        posed=check_posed(rec.posed, f"{name}.posed", None if vertices is None else len(vertices))
        if rec.HasField("posed") else None,
    )


@dataclass(frozen=True)
class PosedMesh:
    """What drawing the face over its photo needs: camera-space vertices (mm), triangles, K, photo size."""

    vertices: np.ndarray  # (V,3) mm, OpenCV camera axes
    faces: np.ndarray  # (F,3)
    intrinsics: np.ndarray  # (3,3) px
    image_size: tuple[int, int]  # (width, height)


def posed_mesh(rec: CheckedReconstruction) -> PosedMesh | None:
    """The posed mesh of a checked reconstruction, or None without a posed fit (docs/posed-face.md)."""
    if rec.posed is None or rec.faces is None:
        return None
    width, height = (int(v) for v in rec.posed.image_size)
    return PosedMesh(rec.posed.vertices, rec.faces, rec.posed.camera_intrinsics, (width, height))


def check_face(result: gateway_pb2.FaceResult, method: str) -> CheckedFace:
    """Everything the writers need from an OK face result, checked; raises InvalidResponseError."""
    check_numbers(result)
    face = result.face
    if not result.HasField("face"):
        raise InvalidResponseError("an OK result without its face")
    box = np.array([_number(v, "face.box", -MAX_PIXEL_COORD, MAX_PIXEL_COORD)
                    for v in (face.box.x1, face.box.y1, face.box.x2, face.box.y2)], np.float32)
    kps5 = _optional(face, "kps5", "face.kps5", (5, 2), _FLOATS, max_dim=5, max_abs=MAX_PIXEL_COORD)
    reconstruction = None
    branches: list[tuple[str, CheckedReconstruction]] = []
    if method in RECONSTRUCTING:
        if not result.HasField("reconstruction"):
            raise InvalidResponseError(f"method {method}: an OK result without its reconstruction")
        reconstruction = check_reconstruction(result.reconstruction, "reconstruction")
        if reconstruction.vertices is None:
            raise InvalidResponseError(f"method {method}: the reconstruction has no mesh")
        for branch in result.branches:
            if branch.name not in BRANCHES:
                raise InvalidResponseError(f"branch {text(branch.name)!r}: expected one of {BRANCHES}")
            if any(branch.name == seen for seen, _ in branches):
                raise InvalidResponseError(f"branch {branch.name} sent twice")
            branches.append((branch.name, check_reconstruction(branch.reconstruction, f"branch {branch.name}")))
    elif result.HasField("reconstruction") or len(result.branches):
        raise InvalidResponseError(f"method {method}: a reconstruction was not asked for")
    return CheckedFace(
        face_index=result.face_index,
        num_faces=result.num_faces,
        seconds=_number(result.seconds, "seconds", 0.0, 1e7),
        box=box,
        score=_number(face.score or face.box.score, "face.score", -1e9, 1e9),
        detector=text(face.detector),
        kps5=np.zeros((5, 2), np.float32) if kps5 is None else kps5,
        landmarks=_optional(
            face, "landmarks", "face.landmarks", (None, 3), _FLOATS, max_dim=MAX_POINTS, max_abs=MAX_PIXEL_COORD
        ),
        crop112=_optional(face, "crop112", "face.crop112", (112, 112, 3), _BYTES, max_dim=112),
        crop224=_optional(face, "crop224", "face.crop224", (224, 224, 3), _BYTES, max_dim=224),
        reconstruction=reconstruction,
        branches=tuple(branches),
        found_by=_found_by(face.found_by),
    )


def _found_by(value: str) -> str:
    """One of the known ways a face is found (docs/open-pack.md), or empty; anything else breaks the protocol."""
    from facefuse.face.types import FOUND_BY

    if value and value not in FOUND_BY:
        raise InvalidResponseError(f"face.found_by {text(value)!r} is not one of {FOUND_BY}")
    return value
