"""Per-face output files and the ``results.jsonl`` log that makes runs resumable.

Every file is written atomically; the face's line in ``results.jsonl`` is appended (and flushed)
only after its files are complete, so an interrupted run leaves finished faces intact and a rerun
skips them. The log is compacted (last line per face wins) at the end of each run.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from facefuse.client.inputs import InputItem
from facefuse.client.names import display
from facefuse.client.posed import PosedFace, load_posed, posed_from_reconstruction
from facefuse.client.validate import CheckedFace, CheckedPosedFace, CheckedReconstruction
from facefuse.io.atomic import (
    write_bytes_atomic,
    write_json_atomic,
    write_npy_atomic,
    write_npz_atomic,
    write_text_atomic,
)
from facefuse.io.gltf import write_glb
from facefuse.io.meshes import write_obj, write_ply, write_textured_obj
from facefuse.render import overlay as mesh_overlay
from facefuse.render import render_preview, render_uncertainty, spread_colors

RESULTS = "results.jsonl"
EXTRAS = ("crop112.png", "crop224.png", "kps5.npy", "samples.npz", "mesh_uncertainty.ply")
"""Files ``reconstruct`` writes only with ``--all-files`` (``detect`` always writes its crops and points)."""
DONE_CODES = {"OK"}
"""Lines a rerun skips. NOT_FOUND is not among them: a rerun (e.g. with a lower --det-thresh) looks again."""


def code_name(code: int) -> str:
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status.name
    return str(code)


LEGACY = "legacy:"  # lines of runs before folder keys: matched by image id


def _input_key(entry: dict[str, Any]) -> str:
    return entry.get("key") or LEGACY + str(entry["image_id"])


@dataclass
class ResultsLog:
    """``results.jsonl``: one line per face (or per failed input), grouped by the input's folder key."""

    directory: Path
    lines: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)  # input key -> face index -> line
    shared_legacy_dirs: set[str] = field(default_factory=set)

    @classmethod
    def open(cls, directory: Path) -> ResultsLog:
        log = cls(directory)
        path = directory / RESULTS
        if path.is_file():
            for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    entry = json.loads(raw)
                    log.lines.setdefault(_input_key(entry), {})[int(entry["face_index"])] = entry
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue  # a torn last line from an interrupted run
        owners: dict[str, set[str]] = {}
        for key, faces in log.lines.items():
            for entry in faces.values():
                if key.startswith(LEGACY) and isinstance(entry.get("dir"), str):
                    owners.setdefault(entry["dir"].split("/")[0], set()).add(key)
        # Older runs named folders after the id with characters replaced: where two ids shared a folder,
        # one overwrote the other, so neither counts as done.
        log.shared_legacy_dirs = {folder for folder, keys in owners.items() if len(keys) > 1}
        return log

    def entries(self, item: InputItem, method: str) -> list[dict[str, Any]]:
        """This input's lines for ``method``: its own, else those an older run wrote under its id."""
        own = [e for e in self.lines.get(item.key, {}).values() if e.get("method") == method]
        if own:
            return own
        legacy = [e for e in self.lines.get(LEGACY + item.name, {}).values() if e.get("method") == method]
        if any(str(e.get("dir", "")).split("/")[0] in self.shared_legacy_dirs for e in legacy):
            return []
        return legacy

    def is_done(self, item: InputItem, method: str) -> bool:
        entries = self.entries(item, method)
        if not entries:
            return False
        if any(e.get("status") not in DONE_CODES for e in entries):
            return False
        if any(e["face_index"] == -1 for e in entries):
            return True
        expected = entries[0].get("num_faces", 0)
        indices = {e["face_index"] for e in entries}
        return indices == set(range(expected)) and all(_files_exist(self.directory, e) for e in entries)

    def forget(self, item: InputItem, method: str) -> None:
        """Drop an input's lines for ``method`` before it is processed again."""
        for key in (item.key, LEGACY + item.name):
            faces = self.lines.get(key, {})
            for index in [i for i, e in faces.items() if e.get("method") == method]:
                del faces[index]

    def append(self, entry: dict[str, Any]) -> None:
        self.lines.setdefault(_input_key(entry), {})[int(entry["face_index"])] = entry
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / RESULTS, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def compact(self) -> None:
        text = "".join(json.dumps(faces[index], sort_keys=True) + "\n"
                       for _, faces in sorted(self.lines.items()) for index in sorted(faces))
        write_text_atomic(self.directory / RESULTS, text)


def _files_exist(directory: Path, entry: dict[str, Any]) -> bool:
    return all(isinstance(f, str) and (directory / f).is_file() for f in entry.get("files", []))


def status_entry(item: InputItem, method: str, status: str, message: str, *, face_index: int = -1,
                 num_faces: int = 0) -> dict[str, Any]:
    """A results.jsonl line; names come from the client's own input, never from the gateway."""
    return {"key": item.key, "image_id": item.name, "input": display(str(item.path)), "face_index": face_index,
            "num_faces": num_faces, "status": status, "message": message, "method": method, "files": []}


def _png(path: Path, rgb: np.ndarray) -> Path:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="PNG")
    return write_bytes_atomic(path, buffer.getvalue())


Draw = Callable[[Path, Callable[[], np.ndarray]], None]
"""draw(path, render): write the PNG of ``render()`` at ``path`` and list it among the face's files."""


class PreviewWriter:
    """Renders the preview images (preview.png, uncertainty.png, the mesh overlay) off the result path.

    With ``workers`` > 0 they are rendered and written on a thread pool (numpy releases the GIL in the
    renderer's array work) while the client goes on reading results; at most ``pending`` wait at once
    (``draw`` blocks beyond that), so memory stays bounded however fast results come. The file is
    listed in the face's results.jsonl line right away; one that fails is taken off that line in
    ``close`` (with a warning), and one an interrupted run never wrote makes ``is_done`` redo the face.
    """

    def __init__(self, workers: int = 2, pending: int = 8) -> None:
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="facefuse-preview") if workers > 0 else None
        self._slots = threading.BoundedSemaphore(max(pending, 1))
        self._failures: list[tuple[list[str], str, str]] = []
        self._lock = threading.Lock()

    def draw_for(self, out: Path, files: list[str]) -> Draw:
        """A ``draw`` for one face whose listed files are ``files`` (paths relative to ``out``)."""

        def draw(path: Path, render: Callable[[], np.ndarray]) -> None:
            relative = str(path.relative_to(out))
            if self._pool is None:
                _png(path, render())
                files.append(relative)
                return
            files.append(relative)
            self._slots.acquire()
            future = self._pool.submit(_write_png, path, render)
            future.add_done_callback(lambda done: self._finished(done, files, relative))

        return draw

    def _finished(self, future: Future[None], files: list[str], relative: str) -> None:
        self._slots.release()
        error = future.exception()
        if error is not None:
            with self._lock:
                self._failures.append((files, relative, f"{type(error).__name__}: {error}"))

    def close(self) -> int:
        """Wait for every image; take the failed ones off their faces' lines; returns how many failed."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        with self._lock:
            failures, self._failures = self._failures, []
        for files, relative, message in failures:
            if relative in files:
                files.remove(relative)
            print(f"facefuse: warning: {display(relative)} could not be written: {message}", file=sys.stderr)
        return len(failures)


def _write_png(path: Path, render: Callable[[], np.ndarray]) -> None:
    _png(path, render())


def _draw_inline(out: Path, files: list[str]) -> Draw:
    def draw(path: Path, render: Callable[[], np.ndarray]) -> None:
        _png(path, render())
        files.append(str(path.relative_to(out)))

    return draw


def _face_window(shape: tuple[int, ...], box: np.ndarray) -> tuple[int, int, int, int]:
    """left, top, right, bottom of the face's neighbourhood (box centre, 1.6x its larger side)."""
    h, w = shape[:2]
    x1, y1, x2, y2 = box
    size = max(x2 - x1, y2 - y1) * 0.8
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return int(max(cx - size, 0)), int(max(cy - size, 0)), int(min(cx + size, w)), int(min(cy + size, h))


def overlay(image: np.ndarray, box: np.ndarray, kps5: np.ndarray, landmarks: np.ndarray | None,
            window_pixels: np.ndarray | None = None) -> np.ndarray:
    """The face's neighbourhood with its box, 5 points and landmarks drawn (over ``window_pixels``, the
    neighbourhood already drawn on, e.g. the mesh overlay, when given)."""
    import cv2

    x1, y1, x2, y2 = box
    left, top, right, bottom = _face_window(image.shape, box)
    base = image[top:bottom, left:right] if window_pixels is None else window_pixels
    canvas = np.ascontiguousarray(base.copy())
    scale = max(canvas.shape[:2]) / 512.0 if max(canvas.shape[:2]) > 0 else 1.0
    thick = max(1, round(2 * scale))
    cv2.rectangle(canvas, (int(x1 - left), int(y1 - top)), (int(x2 - left), int(y2 - top)), (0, 255, 0), thick)
    if landmarks is not None:
        for x, y in landmarks[:, :2]:
            cv2.circle(canvas, (int(x - left), int(y - top)), max(1, thick // 2), (0, 200, 255), -1)
    colours = [(255, 0, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255)]
    for (x, y), colour in zip(kps5, colours, strict=False):
        cv2.circle(canvas, (int(x - left), int(y - top)), thick * 2, colour, -1)
    return canvas


def visibility_overlay(
    image: np.ndarray, box: np.ndarray, landmarks: np.ndarray, regions: dict[str, float]
) -> np.ndarray:
    """The face with each region's outline coloured by its visibility: green seen, red hidden."""
    import cv2

    from facefuse.fusion.visibility import region_polygon

    canvas = overlay(image, box, np.zeros((0, 2)), None)
    left, top, _, _ = _face_window(image.shape, box)
    thick = max(1, round(max(canvas.shape[:2]) / 256))
    for name, value in regions.items():
        try:
            polygon = region_polygon(name, landmarks)
        except (KeyError, ValueError):
            continue
        colour = (int(255 * (1 - value)), int(255 * value), 0)
        points = np.round(polygon[:, :2] - [left, top]).astype(np.int32)
        cv2.polylines(canvas, [points], True, colour, thick)
    return canvas


def posed_overlay(image: np.ndarray, box: np.ndarray, kps5: np.ndarray, posed: PosedFace) -> np.ndarray:
    """overlay.png of a posed face: the mesh as photographed, shaded, over the face's neighbourhood of the
    photo (60 % opacity), with the detected box and 5 points on top."""
    window = _face_window(image.shape, box)
    drawn = mesh_overlay(image, posed.vertices_cam_mm, posed.faces, posed.intrinsics, window=window)
    return overlay(image, box, kps5, None, window_pixels=drawn)


def write_face(out: Path, key: str, face: CheckedFace, image: np.ndarray | None, *,
               all_files: bool = False, previews: PreviewWriter | None = None,
               preview: bool = True) -> dict[str, Any]:
    """Write one checked face's files under OUT/<key>/face_NN; returns its results.jsonl fields.

    A reconstruction leaves out the files in EXTRAS unless ``all_files``. The rendered images go through
    ``previews`` (a worker pool) when given, else are drawn here; ``preview=False`` (``--no-preview``)
    skips preview.png and uncertainty.png. overlay.png is the posed mesh over the photo when the face
    has one (mesh_posed + camera, see client/posed.py), else the detection drawn on the photo.

    ``key`` is the input's own folder name (``InputItem.key``) and the face index was range-checked,
    so every path stays inside ``out``.
    """
    face_dir = Path(key) / f"face_{face.face_index:02d}"
    target = out / face_dir
    files: list[str] = []
    draw = previews.draw_for(out, files) if previews is not None else _draw_inline(out, files)

    def keep(path: Path) -> None:
        files.append(str(path.relative_to(out)))

    def wanted(name: str) -> bool:
        return all_files or face.reconstruction is None or name not in EXTRAS

    if face.crop112 is not None and wanted("crop112.png"):
        keep(_png(target / "crop112.png", face.crop112))
    if face.crop224 is not None and wanted("crop224.png"):
        keep(_png(target / "crop224.png", face.crop224))
    if wanted("kps5.npy"):
        keep(write_npy_atomic(target / "kps5.npy", face.kps5))
    if face.landmarks is not None:
        keep(write_npy_atomic(target / "landmarks.npy", face.landmarks))
    if image is not None and face.reconstruction is None:
        keep(_png(target / "overlay.png", overlay(image, face.box, face.kps5, face.landmarks)))
    entry: dict[str, Any] = {"box": [round(float(v), 2) for v in face.box], "score": round(face.score, 4),
                             "detector": face.detector}
    if face.found_by:
        entry["found_by"] = face.found_by  # detector | second_chance | zoom_out | whole_image (docs/open-pack.md)
    rec = face.reconstruction
    if rec is not None:
        colors = _landmark_colors(image, face.landmarks)
        photo = (image, face.landmarks) if image is not None and face.landmarks is not None else None
        entry.update(write_reconstruction(target, rec, keep, colors, photo, wanted, draw=draw, preview=preview))
        if image is not None:
            posed = posed_from_reconstruction(rec) or load_posed(target)
            if posed is not None:
                pixels = image
                draw(target / "overlay.png", lambda: posed_overlay(pixels, face.box, face.kps5, posed))
            else:
                keep(_png(target / "overlay.png", overlay(image, face.box, face.kps5, face.landmarks)))
        if (
            rec.visibility is not None
            and image is not None
            and face.landmarks is not None
            and len(face.landmarks) >= 468
        ):
            keep(
                _png(
                    target / "visibility_overlay.png",
                    visibility_overlay(image, face.box, face.landmarks, rec.visibility),
                )
            )
        for name, branch in face.branches:
            write_reconstruction(target / f"branch_{name}", branch, keep, colors, photo, wanted, draw=draw,
                                 preview=preview)
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


def write_reconstruction(target: Path, rec: CheckedReconstruction, keep: Callable[[Path], None],
                         photo_colors: np.ndarray | None = None,
                         photo: tuple[np.ndarray, np.ndarray] | None = None,
                         wanted: Callable[[str], bool] = lambda _name: True, *, draw: Draw | None = None,
                         preview: bool = True) -> dict[str, Any]:
    """The reconstruction's files; ``photo`` (image, 468 landmarks) gives a 468-point mesh its texture,
    ``wanted(file name)`` says whether an optional file (EXTRAS) is written; ``draw`` writes the rendered
    images (default: here and now), ``preview=False`` leaves preview.png and uncertainty.png out."""
    if draw is None:
        def draw(path: Path, render: Callable[[], np.ndarray]) -> None:
            keep(_png(path, render()))

    info: dict[str, Any] = {"strategy": rec.strategy or rec.method}
    if rec.method != "mica":  # MICA alone has no confidence measure; fused and sampled results do
        info["confidence"] = round(rec.confidence, 4)
    if rec.fallback:
        info["fallback"] = rec.fallback
    scale: dict[str, Any] = {}
    if rec.scale_source:  # where the metric scale came from (open pack): iris or the default size
        scale = {"scale_source": rec.scale_source, "scale_confidence": round(rec.scale_confidence, 4)}
        info.update(scale)
    if rec.visibility is not None:
        visibility = {k: round(v, 3) for k, v in sorted(rec.visibility.items())}
        keep(write_json_atomic(target / "visibility.json", {"regions": visibility, "sources": rec.visibility_sources,
                                                            "unknown": rec.visibility_unknown}))
        info["visibility"] = visibility
        if rec.visibility_unknown:
            info["visibility_unknown"] = list(rec.visibility_unknown)
    params: dict[str, np.ndarray] = {}
    vertices, faces = rec.vertices, rec.faces
    if vertices is not None and faces is not None:
        colors = photo_colors if rec.topology == "mediapipe468" and photo_colors is not None \
            and len(photo_colors) == len(vertices) else None
        texture = _photo_texture(rec, photo) if colors is not None else None
        if texture is not None and rec.uvs is not None:
            for path in write_textured_obj(target / "mesh.obj", vertices, faces, rec.uvs, texture):
                keep(path)
            keep(write_glb(target / "mesh.glb", vertices, faces, uvs=rec.uvs, texture=texture))
        else:
            keep(write_obj(target / "mesh.obj", vertices, faces))
            keep(write_glb(target / "mesh.glb", vertices, faces, colors=colors))
        keep(write_ply(target / "mesh.ply", vertices, faces, colors))
        if preview:
            draw(target / "preview.png", lambda: render_preview(vertices, faces, colors=colors))
        info["topology"] = rec.topology
        info["units"] = "mm"
        if rec.vertex_spread is not None:
            keep(write_npy_atomic(target / "uncertainty.npy", rec.vertex_spread))
            spread = rec.vertex_spread
            if preview:
                draw(target / "uncertainty.png", lambda: render_uncertainty(vertices, faces, spread))
            if wanted("mesh_uncertainty.ply"):
                keep(write_ply(target / "mesh_uncertainty.ply", vertices, faces, spread_colors(rec.vertex_spread)))
            info["spread_mm_mean"] = round(float(np.mean(rec.vertex_spread)), 4) if rec.vertex_spread.size else 0.0
    flame = rec.topology == "flame2020" or vertices is None
    if rec.shape is not None:
        keep(write_npy_atomic(target / "shape.npy", rec.shape))
        params["shape"] = rec.shape
        if flame and rec.posed is None:  # the neutral FLAME shape: expression and pose are zero by construction
            params["expression"] = np.zeros(100, np.float32)
            params["pose"] = np.zeros(15, np.float32)
    posed_units: dict[str, str] = {}
    if rec.posed is not None and faces is not None:
        posed_units = write_posed(target, rec.posed, faces, keep, params, info)
    for name, points in (("kpt7", rec.kpt7), ("kpt68", rec.landmarks68)):
        if points is not None:
            keep(write_npy_atomic(target / f"{name}.npy", points))
    if rec.samples is not None and wanted("samples.npz"):
        scores = rec.sample_scores if rec.sample_scores is not None else np.zeros(len(rec.samples), np.float32)
        keep(write_npz_atomic(target / "samples.npz", {"shapes": rec.samples, "scores": scores}))
    if params:
        keep(write_npz_atomic(target / "params.npz", params))
        keep(
            write_json_atomic(
                target / "params.json",
                {
                    "model": "FLAME 2020" if flame else f"{rec.topology} (open pack)",
                    "units": {
                        "vertices": "mm",
                        "shape": "FLAME coefficients"
                        if flame
                        else "mm displacement from the canonical face, xyz per vertex",
                        **posed_units,
                    },
                    "method": rec.method,
                    "strategy": rec.strategy or rec.method,
                    **scale,
                    **({"focal_source": rec.posed.focal_source,
                        "reprojection_error_px": round(rec.posed.reprojection_error_px, 3)}
                       if rec.posed is not None and posed_units else {}),
                    **{k: [float(x) for x in v.ravel()] for k, v in params.items()},
                },
            )
        )
    return info


def write_posed(target: Path, posed: CheckedPosedFace, faces: np.ndarray, keep: Callable[[Path], None],
                params: dict[str, np.ndarray], info: dict[str, Any]) -> dict[str, str]:
    """mesh_posed.obj/.glb (camera space, mm, OpenCV axes) and the posed parameters (docs/posed-face.md);
    returns the units params.json states for them."""
    keep(write_obj(target / "mesh_posed.obj", posed.vertices, faces))
    keep(write_glb(target / "mesh_posed.glb", posed.vertices, faces))
    params.update(expression=posed.expression, jaw_pose=posed.jaw_pose, global_pose=posed.global_pose,
                  translation=posed.translation, camera_intrinsics=posed.camera_intrinsics,
                  camera_extrinsics=posed.camera_extrinsics, image_size=posed.image_size)
    info["reprojection_error_px"] = round(posed.reprojection_error_px, 3)
    info["focal_source"] = posed.focal_source
    return {"expression": "FLAME expression coefficients" if len(posed.expression) <= 400
            else "mm residual from the neutral mesh, xyz per vertex",
            "jaw_pose": "axis-angle rad", "global_pose": "axis-angle rad, model -> camera",
            "translation": "mm", "camera_intrinsics": "px", "camera_extrinsics": "model mm -> camera mm",
            "image_size": "px (width, height)", "camera": "OpenCV: x right, y down, z forward"}


def _photo_texture(rec: CheckedReconstruction, photo: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray | None:
    """The open pack's texture from the photo (its 468 vertices are the landmarks); None for other meshes."""
    if photo is None or rec.uvs is None or rec.faces is None or rec.topology != "mediapipe468":
        return None
    from facefuse.fusion.visibility import landmark_visibility
    from facefuse.texture import photo_texture

    image, landmarks = photo
    if len(landmarks) < 468 or rec.uvs.shape[0] != 468:
        return None
    visibility = landmark_visibility(landmarks, rec.visibility) if rec.visibility else None
    texture, _ = photo_texture(image, landmarks[:468, :2], rec.faces, rec.uvs, visibility)
    return texture


def summarize(entries: Iterable[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry["status"]] = counts.get(entry["status"], 0) + 1
    return counts
