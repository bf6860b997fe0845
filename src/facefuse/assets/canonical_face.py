"""MediaPipe's canonical face model (Apache-2.0), read from the model store's verified bytes.

The store's ``canonical_face_metadata`` entry is ``geometry_pipeline_metadata_landmarks.binarypb`` from
the npm package ``@mediapipe/face_mesh``: a serialised ``mediapipe.face_geometry.GeometryPipelineMetadata``
protobuf. It is decoded here with a minimal wire-format reader (no generated code, no protobuf
dependency). Field numbers (facts of MediaPipe's ``geometry_pipeline_metadata.proto`` / ``mesh_3d.proto``):

* GeometryPipelineMetadata: 1 ``canonical_mesh`` (Mesh3d), 2 ``procrustes_landmark_basis`` (repeated
  WeightedLandmarkRef), 3 ``input_source`` (enum);
* Mesh3d: 1 ``vertex_type`` (0 = VERTEX_PT: x, y, z, u, v per vertex), 2 ``primitive_type``
  (0 = TRIANGLE), 3 ``vertex_buffer`` (repeated float), 4 ``index_buffer`` (repeated uint32);
* WeightedLandmarkRef: 1 ``landmark_id`` (uint32), 2 ``weight`` (float).

Repeated scalars are accepted packed or unpacked (proto2 writes them unpacked). Positions are in
centimetres in the file and returned in millimetres. Axes: x toward the viewer's right (the subject's
left), y up, z toward the viewer; the vertex ids are the FaceMesh landmark ids.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facefuse.errors import AssetError

TOPOLOGY = "mediapipe468"
NUM_VERTICES = 468
NUM_TRIANGLES = 898
CM_TO_MM = 10.0
STORE_NAME = "canonical_face_metadata"

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


@dataclass(frozen=True)
class CanonicalFace:
    """The canonical (mean adult) face: vertex ids are FaceMesh landmark ids."""

    vertices_mm: np.ndarray  # (468, 3) float64
    uvs: np.ndarray  # (468, 2) float32, in [0, 1]
    faces: np.ndarray  # (898, 3) int32
    landmark_ids: np.ndarray  # (P,) int64: Procrustes basis landmarks
    landmark_weights: np.ndarray  # (P,) float64, > 0
    topology: str = TOPOLOGY

    def procrustes_weights(self) -> np.ndarray:
        """(468,) weights: the Procrustes basis weight of each landmark, 0 for the others."""
        weights = np.zeros(NUM_VERTICES)
        np.add.at(weights, self.landmark_ids, self.landmark_weights)
        return weights


Records = list[tuple[int, int, int | bytes]]
"""Decoded protobuf fields: (field number, wire type, int for varints or the raw bytes)."""


class _Reader:
    """Protocol-buffer wire format: (field number, wire type, value) records of one message."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.what = what

    def _varint(self, pos: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            if pos >= len(self.data):
                raise AssetError(f"{self.what}: truncated varint at byte {pos}")
            byte = self.data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value, pos
            shift += 7
            if shift > 63:
                raise AssetError(f"{self.what}: varint longer than 10 bytes at byte {pos}")

    def fields(self) -> Records:
        out: Records = []
        pos = 0
        while pos < len(self.data):
            key, pos = self._varint(pos)
            number, wire = key >> 3, key & 7
            if number == 0:
                raise AssetError(f"{self.what}: field number 0 at byte {pos}")
            if wire == _VARINT:
                value, pos = self._varint(pos)
                out.append((number, wire, value))
            elif wire in (_FIXED32, _FIXED64):
                size = 4 if wire == _FIXED32 else 8
                if pos + size > len(self.data):
                    raise AssetError(f"{self.what}: truncated fixed-width field {number} at byte {pos}")
                out.append((number, wire, self.data[pos:pos + size]))
                pos += size
            elif wire == _LENGTH:
                length, pos = self._varint(pos)
                if pos + length > len(self.data):
                    raise AssetError(f"{self.what}: field {number} claims {length} bytes, only "
                                     f"{len(self.data) - pos} left")
                out.append((number, wire, self.data[pos:pos + length]))
                pos += length
            else:
                raise AssetError(f"{self.what}: unsupported wire type {wire} (field {number}) at byte {pos}")
        return out


def _payloads(records: Records, number: int, wire: int) -> list[bytes]:
    """The bytes of every length-delimited or fixed-width ``number`` field written with ``wire``."""
    return [v for n, w, v in records if n == number and w == wire and isinstance(v, bytes)]


def _varints(records: Records, number: int) -> list[int]:
    return [v for n, w, v in records if n == number and w == _VARINT and isinstance(v, int)]


def _repeated_floats(records: Records, number: int, what: str) -> np.ndarray:
    chunks: list[bytes] = []
    for field, wire, value in records:
        if field != number:
            continue
        if wire == _LENGTH and isinstance(value, bytes) and len(value) % 4:  # packed
            raise AssetError(f"{what}: packed float field {number} has {len(value)} bytes, not a multiple of 4")
        if wire in (_FIXED32, _LENGTH) and isinstance(value, bytes):
            chunks.append(value)
        else:
            raise AssetError(f"{what}: field {number} should hold floats, found wire type {wire}")
    return np.frombuffer(b"".join(chunks), dtype="<f4").astype(np.float64)


def _repeated_uints(records: Records, number: int, what: str) -> np.ndarray:
    values: list[int] = []
    for field, wire, value in records:
        if field != number:
            continue
        if isinstance(value, int):  # wire type varint
            values.append(value)
        elif wire == _LENGTH:  # packed varints
            reader = _Reader(value, what)
            pos = 0
            while pos < len(value):
                item, pos = reader._varint(pos)
                values.append(item)
        else:
            raise AssetError(f"{what}: field {number} should hold uint32 values, found wire type {wire}")
    return np.asarray(values, dtype=np.int64)


def parse_canonical_face(data: bytes, source: str = "canonical face metadata") -> CanonicalFace:
    """Decode and validate a GeometryPipelineMetadata message (see the module docstring)."""
    top = _Reader(bytes(data), source).fields()
    meshes = _payloads(top, 1, _LENGTH)
    if len(meshes) != 1:
        raise AssetError(f"{source}: expected one canonical_mesh (field 1), found {len(meshes)}")
    mesh = _Reader(meshes[0], f"{source} canonical_mesh").fields()
    for number, name in ((1, "vertex_type"), (2, "primitive_type")):
        kinds = _varints(mesh, number)
        if any(k != 0 for k in kinds):
            raise AssetError(f"{source}: {name} is {kinds[0]}, expected 0 (VERTEX_PT / TRIANGLE)")
    buffer = _repeated_floats(mesh, 3, source)
    indices = _repeated_uints(mesh, 4, source)
    if buffer.size != NUM_VERTICES * 5:
        raise AssetError(f"{source}: vertex_buffer holds {buffer.size} floats, expected {NUM_VERTICES} "
                         f"x 5 = {NUM_VERTICES * 5}")
    if indices.size != NUM_TRIANGLES * 3:
        raise AssetError(f"{source}: index_buffer holds {indices.size} indices, expected {NUM_TRIANGLES} "
                         f"x 3 = {NUM_TRIANGLES * 3}")
    if not np.all(np.isfinite(buffer)):
        raise AssetError(f"{source}: vertex_buffer contains NaN or infinite values")
    if indices.max() >= NUM_VERTICES:
        raise AssetError(f"{source}: index_buffer refers to vertex {int(indices.max())}, but there are {NUM_VERTICES}")
    vertex = buffer.reshape(NUM_VERTICES, 5)
    uvs = vertex[:, 3:5]
    if uvs.min() < -1e-6 or uvs.max() > 1 + 1e-6:
        raise AssetError(f"{source}: texture coordinates outside [0, 1] ({uvs.min():.3g} .. {uvs.max():.3g})")
    faces = indices.reshape(NUM_TRIANGLES, 3)
    if np.any((faces[:, 0] == faces[:, 1]) | (faces[:, 1] == faces[:, 2]) | (faces[:, 0] == faces[:, 2])):
        raise AssetError(f"{source}: index_buffer holds degenerate triangles")
    ids, weights = [], []
    for value in _payloads(top, 2, _LENGTH):
        ref = _Reader(value, f"{source} procrustes_landmark_basis").fields()
        lid = _varints(ref, 1)
        wgt = _payloads(ref, 2, _FIXED32)
        if len(lid) != 1 or len(wgt) != 1:
            raise AssetError(f"{source}: a procrustes_landmark_basis entry lacks landmark_id or weight")
        ids.append(lid[0])
        weights.append(struct.unpack("<f", wgt[0])[0])
    ids_arr, weights_arr = np.asarray(ids, np.int64), np.asarray(weights, np.float64)
    if ids_arr.size == 0:
        raise AssetError(f"{source}: no procrustes_landmark_basis entries (field 2)")
    if ids_arr.max() >= NUM_VERTICES or not np.all(np.isfinite(weights_arr)) or np.any(weights_arr <= 0):
        raise AssetError(f"{source}: procrustes_landmark_basis has ids outside [0, "
                         f"{NUM_VERTICES}) or non-positive weights")
    vertices = vertex[:, :3] * CM_TO_MM
    vertices.setflags(write=False)
    return CanonicalFace(vertices_mm=vertices, uvs=uvs.astype(np.float32), faces=faces.astype(np.int32),
                         landmark_ids=ids_arr, landmark_weights=weights_arr)


_CACHE: dict[Path, CanonicalFace] = {}
_LOCK = threading.Lock()


def load_canonical_face(store=None) -> CanonicalFace:
    """The canonical face from the model store (fetched from the npm registry on first use), parsed once per process."""
    from facefuse.assets.store import ModelStore

    store = store if store is not None else ModelStore()
    path = store.path(STORE_NAME)
    with _LOCK:
        if path not in _CACHE:
            _CACHE[path] = parse_canonical_face(path.read_bytes(), str(path))
        return _CACHE[path]
