"""Predictions and branches as arrays, and the resumable cache of both."""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facefuse import wire
from facefuse.errors import InvalidInputError
from facefuse.io.atomic import (
    write_npz_atomic,
)
from facefuse.v1 import common_pb2, gateway_pb2


@dataclass
class Prediction:
    """One predicted face: mesh in mm, its 7 NoW points (mm), the shape coefficients."""

    vertices: np.ndarray  # (V, 3) float32 mm
    faces: np.ndarray  # (F, 3) int32
    kpt7: np.ndarray  # (7, 3) float32 mm
    topology: str
    shape: np.ndarray  # (K,) float32
    landmarks68: np.ndarray | None = None  # (68, 3) mm (flame pack)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"vertices": self.vertices, "faces": self.faces, "kpt7": self.kpt7, "shape": self.shape,
               "topology": np.array(self.topology)}
        if self.landmarks68 is not None:
            out["landmarks68"] = self.landmarks68
        return out

    @classmethod
    def from_arrays(cls, data: Any, prefix: str = "") -> Prediction:
        lmk = f"{prefix}landmarks68"
        return cls(np.asarray(data[f"{prefix}vertices"], np.float32), np.asarray(data[f"{prefix}faces"], np.int32),
                   np.asarray(data[f"{prefix}kpt7"], np.float32), str(data[f"{prefix}topology"]),
                   np.asarray(data[f"{prefix}shape"], np.float32),
                   np.asarray(data[lmk], np.float32) if lmk in data else None)

    @classmethod
    def from_message(cls, shape: common_pb2.Tensor, mesh: common_pb2.Mesh, kpt7: common_pb2.Tensor,
                     landmarks68: common_pb2.Tensor | None, what: str) -> Prediction:
        if not wire.has(mesh, "vertices") or not wire.has(mesh, "faces"):
            raise InvalidInputError(f"{what}: the result has no mesh")
        if kpt7 is None or not kpt7.shape:
            raise InvalidInputError(f"{what}: the result has no 7 NoW points (kpt7)")
        lmk = wire.to_numpy(landmarks68) if landmarks68 is not None and landmarks68.shape else None
        return cls(
            np.asarray(wire.to_numpy(mesh.vertices), np.float32),
            np.asarray(wire.to_numpy(mesh.faces), np.int32),
            np.asarray(wire.to_numpy(kpt7), np.float32).reshape(7, 3),
            mesh.topology,
            np.asarray(wire.to_numpy(shape), np.float32) if shape.shape else np.zeros(0, np.float32),
            None if lmk is None else np.asarray(lmk, np.float32),
        )


@dataclass
class Branches:
    """What one gateway pass returns that re-fusion needs: MICA, OFER's samples + scores, visibility."""

    mica: Prediction
    samples: np.ndarray  # (N, K) float32
    scores: np.ndarray  # (N,) float32
    visibility_regions: dict[str, float]
    visibility_sources: tuple[str, ...]
    box: np.ndarray  # (4,) px of the face used
    kps5: np.ndarray  # (5, 2) px
    visibility_per_vertex: np.ndarray | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        out = {f"mica_{k}": v for k, v in self.mica.arrays().items()}
        names = sorted(self.visibility_regions)
        out.update({"samples": self.samples, "scores": self.scores, "box": self.box, "kps5": self.kps5,
                    "visibility_names": np.array(names, dtype=str),
                    "visibility_values": np.array([self.visibility_regions[n] for n in names], np.float32),
                    "visibility_sources": np.array(list(self.visibility_sources), dtype=str)})
        if self.visibility_per_vertex is not None:
            out["visibility_per_vertex"] = self.visibility_per_vertex
        return out

    @classmethod
    def from_arrays(cls, data: Any) -> Branches:
        names = [str(n) for n in data["visibility_names"]]
        values = np.asarray(data["visibility_values"], np.float32)
        return cls(Prediction.from_arrays(data, "mica_"), np.asarray(data["samples"], np.float32),
                   np.asarray(data["scores"], np.float32), {n: float(v) for n, v in zip(names, values, strict=True)},
                   tuple(str(s) for s in data["visibility_sources"]), np.asarray(data["box"], np.float32),
                   np.asarray(data["kps5"], np.float32),
                   np.asarray(data["visibility_per_vertex"], np.float32) if "visibility_per_vertex" in data else None)

    def visibility_message(self) -> common_pb2.Visibility | None:
        if not self.visibility_regions and not self.visibility_sources and self.visibility_per_vertex is None:
            return None
        message = common_pb2.Visibility(regions=self.visibility_regions, sources=list(self.visibility_sources))
        if self.visibility_per_vertex is not None:
            message.per_vertex.CopyFrom(wire.from_numpy(self.visibility_per_vertex))
        return message


def branches_from_result(result: gateway_pb2.FaceResult) -> Branches:
    """The branches of a ``fuse`` + ``save_branches`` result."""
    by_name = {b.name: b.reconstruction for b in result.branches}
    rec = result.reconstruction
    if "mica" not in by_name:
        detail = f" ({rec.fallback})" if rec.fallback else ""
        raise InvalidInputError(f"{result.image_id}: the gateway returned no mica branch{detail}")
    mica = by_name["mica"]
    if not wire.has(rec, "samples"):
        raise InvalidInputError(f"{result.image_id}: the gateway returned no OFER samples")
    samples = np.asarray(wire.to_numpy(rec.samples), np.float32)
    scores = np.asarray(wire.to_numpy(rec.sample_scores), np.float32) if wire.has(rec, "sample_scores") \
        else np.zeros(len(samples), np.float32)
    face = result.face
    vis = rec.visibility if rec.HasField("visibility") else None
    return Branches(
        mica=Prediction.from_message(
            mica.shape, mica.mesh, mica.kpt7, mica.landmarks68, f"{result.image_id} mica branch"
        ),
        samples=samples,
        scores=scores,
        visibility_regions={k: float(v) for k, v in (vis.regions.items() if vis is not None else [])},
        visibility_sources=tuple(vis.sources) if vis is not None else (),
        box=np.array([face.box.x1, face.box.y1, face.box.x2, face.box.y2], np.float32),
        kps5=np.asarray(wire.to_numpy(face.kps5), np.float32)
        if wire.has(face, "kps5")
        else np.zeros((5, 2), np.float32),
        visibility_per_vertex=np.asarray(wire.to_numpy(vis.per_vertex), np.float32)
        if vis is not None and wire.has(vis, "per_vertex")
        else None,
    )


class BenchCache:
    """npz files under ``root``, one per (kind, key); keys hash everything that changes the content."""

    def __init__(self, root: Path, fingerprint: str) -> None:
        self.root = Path(root)
        self.fingerprint = fingerprint

    def key(self, data: bytes, *, box: Sequence[float] | None, mask: np.ndarray | None,
            settings: dict[str, Any] | None) -> str:
        digest = hashlib.sha256()
        digest.update(hashlib.sha256(data).digest())
        digest.update(json.dumps({"box": None if box is None else [round(float(v), 3) for v in box],
                                  "settings": settings, "mesh": self.fingerprint}, sort_keys=True).encode())
        if mask is not None:
            digest.update(hashlib.sha256(np.ascontiguousarray(mask, np.uint8).tobytes()).digest())
        return digest.hexdigest()[:32]

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / f"{key}.npz"

    def load(self, kind: str, key: str) -> dict[str, np.ndarray] | None:
        path = self.path(kind, key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError, zlib.error):
            return None  # a damaged cache file is recomputed

    def store(self, kind: str, key: str, arrays: dict[str, np.ndarray]) -> None:
        write_npz_atomic(self.path(kind, key), arrays)
