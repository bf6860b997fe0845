"""Binary glTF 2.0 (.glb) meshes: positions, normals, vertex colours, texture coordinates, indices.

Layout (glTF 2.0 specification): a 12-byte header (magic "glTF", version 2, total length), a JSON chunk
(padded with spaces to 4 bytes) and a BIN chunk (padded with zeros), each with its length and type. One
mesh, one triangle primitive. glTF lengths are metres, so millimetre vertices are divided by 1000.
UVs are written as given: glTF's texture origin is the image's top-left corner (v grows downward),
which is the MediaPipe canonical face's convention too. Written atomically (facefuse.io.atomic).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from facefuse.errors import InvalidInputError
from facefuse.io.atomic import write_bytes_atomic

MAGIC = 0x46546C67  # "glTF"
CHUNK_JSON = 0x4E4F534A
CHUNK_BIN = 0x004E4942
FLOAT, UNSIGNED_BYTE, UNSIGNED_INT = 5126, 5121, 5125
ARRAY_BUFFER, ELEMENT_ARRAY_BUFFER = 34962, 34963
TRIANGLES = 4
MM_TO_M = 1e-3


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals (+z for a vertex no triangle uses)."""
    v = np.asarray(vertices, dtype=np.float64)
    tri = v[faces]
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normals = np.zeros_like(v)
    for k in range(3):
        np.add.at(normals, faces[:, k], cross)
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    return np.where(length > 1e-12, normals / np.maximum(length, 1e-12), np.array([0.0, 0.0, 1.0]))


def _pad(data: bytes, fill: bytes) -> bytes:
    return data + fill * (-len(data) % 4)


def glb_bytes(vertices_mm: np.ndarray, faces: np.ndarray, colors: np.ndarray | None = None,
              uvs: np.ndarray | None = None, name: str = "face") -> bytes:
    """The .glb file's bytes (see the module docstring)."""
    v = np.asarray(vertices_mm, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    if v.ndim != 2 or v.shape[1] != 3 or v.shape[0] == 0 or not np.all(np.isfinite(v)):
        raise InvalidInputError(f"glb: vertices must be finite (V, 3), got {v.shape}")
    if f.ndim != 2 or f.shape[1] != 3 or f.shape[0] == 0 or f.min() < 0 or f.max() >= v.shape[0]:
        raise InvalidInputError(f"glb: faces must be (F, 3) indices into {v.shape[0]} vertices, got {f.shape}")
    positions = (v * MM_TO_M).astype("<f4")
    arrays: list[tuple[str, np.ndarray, int, str, bool, int]] = [
        ("POSITION", positions, FLOAT, "VEC3", False, ARRAY_BUFFER),
        ("NORMAL", vertex_normals(v, f).astype("<f4"), FLOAT, "VEC3", False, ARRAY_BUFFER),
    ]
    if colors is not None:
        c = np.asarray(colors)
        if c.ndim != 2 or c.shape[0] != v.shape[0] or c.shape[1] not in (3, 4):
            raise InvalidInputError(f"glb: colors must be (V, 3|4), got {c.shape}")
        if c.dtype.kind == "f":
            c = np.rint(np.clip(c, 0.0, 1.0) * 255.0)
        arrays.append(
            ("COLOR_0", np.clip(c, 0, 255).astype(np.uint8), UNSIGNED_BYTE, f"VEC{c.shape[1]}", True, ARRAY_BUFFER)
        )
    if uvs is not None:
        t = np.asarray(uvs, dtype=np.float64)
        if t.shape != (v.shape[0], 2) or not np.all(np.isfinite(t)):
            raise InvalidInputError(f"glb: uvs must be finite ({v.shape[0]}, 2), got {t.shape}")
        arrays.append(("TEXCOORD_0", t.astype("<f4"), FLOAT, "VEC2", False, ARRAY_BUFFER))
    arrays.append(("indices", f.astype("<u4").reshape(-1), UNSIGNED_INT, "SCALAR", False, ELEMENT_ARRAY_BUFFER))

    binary = b""
    views, accessors, attributes = [], [], {}
    for k, (key, data, component, kind, normalized, target) in enumerate(arrays):
        raw = np.ascontiguousarray(data).tobytes()
        views.append({"buffer": 0, "byteOffset": len(binary), "byteLength": len(raw), "target": target})
        accessor = {"bufferView": k, "componentType": component, "count": int(data.shape[0]), "type": kind}
        if normalized:
            accessor["normalized"] = True
        if key == "POSITION":
            accessor["min"] = data.min(axis=0).astype(float).tolist()
            accessor["max"] = data.max(axis=0).astype(float).tolist()
        accessors.append(accessor)
        if key != "indices":
            attributes[key] = k
        binary = _pad(binary + raw, b"\x00")
    document = {
        "asset": {"version": "2.0", "generator": "facefuse"},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0, "name": name}],
        "meshes": [
            {
                "name": name,
                "primitives": [
                    {"attributes": attributes, "indices": len(arrays) - 1, "mode": TRIANGLES, "material": 0}
                ],
            }
        ],
        "materials": [
            {
                "name": "skin",
                "doubleSided": True,
                "pbrMetallicRoughness": {
                    "baseColorFactor": [1.0, 1.0, 1.0, 1.0],
                    "metallicFactor": 0.0,
                    "roughnessFactor": 0.9,
                },
            }
        ],
        "buffers": [{"byteLength": len(binary)}],
        "bufferViews": views,
        "accessors": accessors,
    }
    json_chunk = _pad(json.dumps(document, separators=(",", ":")).encode("utf-8"), b" ")
    total = 12 + 8 + len(json_chunk) + 8 + len(binary)
    return (struct.pack("<III", MAGIC, 2, total) + struct.pack("<II", len(json_chunk), CHUNK_JSON) + json_chunk
            + struct.pack("<II", len(binary), CHUNK_BIN) + binary)


def write_glb(path: str | Path, vertices_mm: np.ndarray, faces: np.ndarray, colors: np.ndarray | None = None,
              uvs: np.ndarray | None = None) -> Path:
    """Write a .glb atomically; positions in metres (glTF's unit)."""
    return write_bytes_atomic(path, glb_bytes(vertices_mm, faces, colors, uvs))
