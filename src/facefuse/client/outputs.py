"""Per-face output files and the ``results.jsonl`` log that makes runs resumable.

Every file is written atomically; the face's line in ``results.jsonl`` is appended (and flushed)
only after its files are complete, so an interrupted run leaves finished faces intact and a rerun
skips them. The log is compacted (last line per face wins) at the end of each run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from facefuse import wire
from facefuse.io.atomic import write_bytes_atomic, write_json_atomic, write_npy_atomic, write_npz_atomic, write_text_atomic
from facefuse.io.gltf import write_glb
from facefuse.io.meshes import heat_colors, write_obj, write_ply
from facefuse.render import render_preview
from facefuse.v1 import gateway_pb2

RESULTS = "results.jsonl"
DONE_CODES = {"OK", "NOT_FOUND"}


def code_name(code: int) -> str:
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status.name
    return str(code)


@dataclass
class ResultsLog:
    directory: Path
    lines: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def open(cls, directory: Path) -> "ResultsLog":
        log = cls(directory)
        path = directory / RESULTS
        if path.is_file():
            for raw in path.read_text().splitlines():
                try:
                    entry = json.loads(raw)
                    log.lines[(entry["image_id"], int(entry["face_index"]))] = entry
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line from an interrupted run
        return log

    def is_done(self, image_id: str, method: str) -> bool:
        entries = [e for (i, _), e in self.lines.items() if i == image_id and e.get("method") == method]
        if not entries:
            return False
        if any(e["status"] not in DONE_CODES for e in entries):
            return False
        if any(e["face_index"] == -1 for e in entries):
            return True
        expected = entries[0].get("num_faces", 0)
        indices = {e["face_index"] for e in entries}
        return indices == set(range(expected)) and all(_files_exist(self.directory, e) for e in entries)

    def append(self, entry: dict[str, Any]) -> None:
        self.lines[(entry["image_id"], int(entry["face_index"]))] = entry
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / RESULTS, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def compact(self) -> None:
        text = "".join(json.dumps(e, sort_keys=True) + "\n" for _, e in sorted(self.lines.items()))
        write_text_atomic(self.directory / RESULTS, text)


def _files_exist(directory: Path, entry: dict[str, Any]) -> bool:
    return all((directory / f).is_file() for f in entry.get("files", []))


def _png(path: Path, rgb: np.ndarray) -> Path:
    from PIL import Image
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="PNG")
    return write_bytes_atomic(path, buffer.getvalue())


def _face_window(shape: tuple[int, ...], box: np.ndarray) -> tuple[int, int, int, int]:
    """left, top, right, bottom of the face's neighbourhood (box centre, 1.6x its larger side)."""
    h, w = shape[:2]
    x1, y1, x2, y2 = box
    size = max(x2 - x1, y2 - y1) * 0.8
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return int(max(cx - size, 0)), int(max(cy - size, 0)), int(min(cx + size, w)), int(min(cy + size, h))


def overlay(image: np.ndarray, box: np.ndarray, kps5: np.ndarray, landmarks: np.ndarray | None) -> np.ndarray:
    """The face's neighbourhood with its box, 5 points and landmarks drawn."""
    import cv2

    x1, y1, x2, y2 = box
    left, top, right, bottom = _face_window(image.shape, box)
    canvas = np.ascontiguousarray(image[top:bottom, left:right].copy())
    scale = max(canvas.shape[:2]) / 512.0 if max(canvas.shape[:2]) > 0 else 1.0
    thick = max(1, int(round(2 * scale)))
    cv2.rectangle(canvas, (int(x1 - left), int(y1 - top)), (int(x2 - left), int(y2 - top)), (0, 255, 0), thick)
    if landmarks is not None:
        for x, y in landmarks[:, :2]:
            cv2.circle(canvas, (int(x - left), int(y - top)), max(1, thick // 2), (0, 200, 255), -1)
    colours = [(255, 0, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255)]
    for (x, y), colour in zip(kps5, colours):
        cv2.circle(canvas, (int(x - left), int(y - top)), thick * 2, colour, -1)
    return canvas


def visibility_overlay(image: np.ndarray, box: np.ndarray, landmarks: np.ndarray, regions: dict[str, float]) -> np.ndarray:
    """The face with each region's outline coloured by its visibility: green seen, red hidden."""
    import cv2

    from facefuse.fusion.visibility import region_polygon

    canvas = overlay(image, box, np.zeros((0, 2)), None)
    left, top, _, _ = _face_window(image.shape, box)
    thick = max(1, int(round(max(canvas.shape[:2]) / 256)))
    for name, value in regions.items():
        try:
            polygon = region_polygon(name, landmarks)
        except (KeyError, ValueError):
            continue
        colour = (int(255 * (1 - value)), int(255 * value), 0)
        points = np.round(polygon[:, :2] - [left, top]).astype(np.int32)
        cv2.polylines(canvas, [points], True, colour, thick)
    return canvas


def write_face(out: Path, key: str, result: gateway_pb2.FaceResult, image: np.ndarray | None,
               *, method: str) -> dict[str, Any]:
    """Write one face's files; returns its results.jsonl entry (files relative to ``out``)."""
    face_dir = Path(key) / f"face_{result.face_index:02d}"
    target = out / face_dir
    files: list[str] = []

    def keep(path: Path) -> None:
        files.append(str(path.relative_to(out)))

    face = result.face
    box = np.array([face.box.x1, face.box.y1, face.box.x2, face.box.y2], np.float32)
    kps5 = wire.to_numpy(face.kps5) if wire.has(face, "kps5") else np.zeros((5, 2), np.float32)
    landmarks = wire.to_numpy(face.landmarks) if wire.has(face, "landmarks") else None
    if wire.has(face, "crop112"):
        keep(_png(target / "crop112.png", wire.to_numpy(face.crop112)))
    if wire.has(face, "crop224"):
        keep(_png(target / "crop224.png", wire.to_numpy(face.crop224)))
    keep(write_npy_atomic(target / "kps5.npy", kps5))
    if landmarks is not None:
        keep(write_npy_atomic(target / "landmarks.npy", landmarks))
    if image is not None:
        keep(_png(target / "overlay.png", overlay(image, box, kps5, landmarks)))
    entry: dict[str, Any] = {
        "box": [round(float(v), 2) for v in box], "score": round(float(face.score or face.box.score), 4),
        "detector": face.detector,
    }
    if result.HasField("reconstruction"):
        colors = _landmark_colors(image, landmarks)
        entry.update(write_reconstruction(out, target, result.reconstruction, keep, colors))
        rec = result.reconstruction
        if rec.HasField("visibility") and image is not None and landmarks is not None and len(landmarks) >= 468:
            keep(_png(target / "visibility_overlay.png", visibility_overlay(image, box, landmarks, dict(rec.visibility.regions))))
        for branch in result.branches:
            write_reconstruction(out, target / f"branch_{branch.name}", branch.reconstruction, keep, colors)
    entry["files"] = files
    entry["dir"] = str(face_dir)
    return entry


def _landmark_colors(image: np.ndarray | None, landmarks: np.ndarray | None) -> np.ndarray | None:
    """Photo colours at the 468 FaceMesh points: the vertex colours of a mediapipe468 mesh."""
    if image is None or landmarks is None or len(landmarks) < 468:
        return None
    h, w = image.shape[:2]
    xy = np.rint(landmarks[:468, :2]).astype(int)
    return image[np.clip(xy[:, 1], 0, h - 1), np.clip(xy[:, 0], 0, w - 1)].astype(np.uint8)


def write_reconstruction(out: Path, target: Path, rec: gateway_pb2.Reconstruction, keep: Any,
                         photo_colors: np.ndarray | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {"strategy": rec.strategy or rec.method}
    if rec.method != "mica":  # MICA alone has no confidence measure; fused and sampled results do
        info["confidence"] = round(float(rec.confidence), 4)
    if rec.fallback:
        info["fallback"] = rec.fallback
    if rec.HasField("visibility"):
        visibility = {k: round(float(v), 3) for k, v in sorted(rec.visibility.regions.items())}
        keep(write_json_atomic(target / "visibility.json", {"regions": visibility, "sources": list(rec.visibility.sources)}))
        info["visibility"] = visibility
    params: dict[str, np.ndarray] = {}
    if wire.has(rec, "mesh"):
        vertices = wire.to_numpy(rec.mesh.vertices)
        faces = wire.to_numpy(rec.mesh.faces)
        colors = photo_colors if rec.mesh.topology == "mediapipe468" and photo_colors is not None \
            and len(photo_colors) == len(vertices) else None
        uvs = wire.to_numpy(rec.mesh.uvs) if wire.has(rec.mesh, "uvs") else None
        keep(write_obj(target / "mesh.obj", vertices, faces))
        keep(write_ply(target / "mesh.ply", vertices, faces, colors))
        keep(write_glb(target / "mesh.glb", vertices, faces, colors=colors, uvs=uvs))
        keep(_png(target / "preview.png", render_preview(vertices, faces, colors=colors)))
        info["topology"] = rec.mesh.topology
        info["units"] = "mm"
        if wire.has(rec, "vertex_spread"):
            spread = wire.to_numpy(rec.vertex_spread)
            keep(write_npy_atomic(target / "uncertainty.npy", spread))
            keep(write_ply(target / "mesh_uncertainty.ply", vertices, faces, heat_colors(spread)))
            info["spread_mm_mean"] = round(float(np.mean(spread)), 4) if spread.size else 0.0
    flame = rec.mesh.topology == "flame2020" or not wire.has(rec, "mesh")
    if wire.has(rec, "shape"):
        shape = wire.to_numpy(rec.shape)
        keep(write_npy_atomic(target / "shape.npy", shape))
        params["shape"] = shape
        if flame:  # the neutral FLAME shape: expression and pose are zero by construction
            params["expression"] = np.zeros(100, np.float32)
            params["pose"] = np.zeros(15, np.float32)
    for name, field_name in (("kpt7", "kpt7"), ("kpt68", "landmarks68")):
        if wire.has(rec, field_name):
            keep(write_npy_atomic(target / f"{name}.npy", wire.to_numpy(getattr(rec, field_name))))
    if wire.has(rec, "samples"):
        samples = wire.to_numpy(rec.samples)
        scores = wire.to_numpy(rec.sample_scores) if wire.has(rec, "sample_scores") else np.zeros(len(samples), np.float32)
        keep(write_npz_atomic(target / "samples.npz", {"shapes": samples, "scores": scores}))
    if params:
        keep(write_npz_atomic(target / "params.npz", params))
        keep(write_json_atomic(target / "params.json", {
            "model": "FLAME 2020" if flame else f"{rec.mesh.topology} (open pack)",
            "units": {"vertices": "mm", "shape": "FLAME coefficients" if flame else "mm displacement from the canonical face, xyz per vertex"},
            "method": rec.method, "strategy": rec.strategy or rec.method,
            **{k: [float(x) for x in v.ravel()] for k, v in params.items()},
        }))
    return info


def image_error_entry(result: gateway_pb2.FaceResult, method: str, input_path: str) -> dict[str, Any]:
    return {"image_id": result.image_id, "input": input_path, "face_index": result.face_index,
            "num_faces": result.num_faces, "status": code_name(result.status.code), "message": result.status.message,
            "method": method, "files": []}


def summarize(entries: Iterable[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry["status"]] = counts.get(entry["status"], 0) + 1
    return counts
