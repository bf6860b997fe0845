"""Video inputs after the run: faces tracked across frames, one identity per person, smoothed pose, a video.

The frames went through the mesh as images (``inputs.py`` makes one item per processed frame). Here, per
video: the faces' boxes are tracked across frames (``tracking.track_boxes``); each track's neutral
meshes are fused into one identity (``identity.fuse_members``, the ``--identity-group`` fusion); where
the faces carry the posed outputs (``posed.py``), each track's head rotation, translation and expression
are smoothed over time with the One Euro filter (``tracking``), the track's posed mesh is rebuilt from
the fused identity and the smoothed values, and ``overlay.mp4`` shows it over the frames.

Rebuilding a posed mesh: with R, t the face's model -> camera pose, the posed mesh P taken back to
model space is M = Rᵀ(P − t); its expression part is D = M − N (N: that frame's neutral mesh). The
track's frame is then P' = R̃(I + D̃) + t̃, with I the fused identity and R̃, t̃, D̃ the smoothed rotation,
translation and expression offsets (D̃ smoothed as one vector whose speed is the per-vertex RMS).

Outputs under OUT/<video folder>/: ``video.json`` (the tracks, their frames and jitter before and after
smoothing), ``track_NN/`` (the fused identity's files, ``poses.npz`` raw and smoothed per frame) and
``overlay.mp4`` (every processed frame, at the source rate divided by ``--every``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial.transform import Rotation

from facefuse.client.identity import _inside, fuse_members, write_identity_files
from facefuse.client.inputs import InputItem, frame_reader
from facefuse.client.names import display, folder_name
from facefuse.client.outputs import ResultsLog
from facefuse.client.posed import PosedFace, load_posed
from facefuse.errors import FacefuseError
from facefuse.io.atomic import write_json_atomic, write_npz_atomic
from facefuse.io.meshes import read_mesh
from facefuse.io.video import video_info, write_video
from facefuse.render import composite, render_camera
from facefuse.tracking import (
    EXPRESSION_FILTER,
    ROTATION_FILTER,
    TRANSLATION_FILTER,
    rotation_jitter_deg,
    smooth_rotations,
    smooth_vectors,
    track_boxes,
    vector_jitter,
)

OVERLAY_OPACITY = 0.6
TRACK_COLOURS = [(0, 255, 0), (255, 128, 0), (0, 160, 255), (255, 0, 255), (255, 255, 0), (0, 255, 255)]


@dataclass
class TrackFrame:
    frame: int  # the video's frame index
    entry: dict[str, Any]  # the face's results.jsonl line
    box: np.ndarray
    posed: PosedFace | None = None
    smoothed: np.ndarray | None = None  # (V, 3) camera mm, after smoothing


@dataclass
class Track:
    number: int
    frames: list[TrackFrame] = field(default_factory=list)


@dataclass(frozen=True)
class SmoothedPoses:
    """Per posed frame of a track: raw and smoothed values, and the rebuilt posed meshes."""

    times_s: np.ndarray
    rotation_raw: np.ndarray
    rotation: np.ndarray
    translation_raw: np.ndarray
    translation: np.ndarray
    expression_raw: np.ndarray | None
    expression: np.ndarray | None
    vertices: list[np.ndarray]


def smooth_track(posed: list[PosedFace], times_s: np.ndarray, identity_mm: np.ndarray | None = None,
                 neutrals: list[np.ndarray] | None = None) -> SmoothedPoses:
    """Smooth one track's pose and expression over time and rebuild its posed meshes (see the module doc).

    Without ``identity_mm`` and ``neutrals`` (or when their vertex counts differ from the posed meshes')
    the whole model-space mesh is smoothed as the expression part.
    """
    rotation_raw = np.stack([p.rotation for p in posed])
    translation_raw = np.stack([p.translation for p in posed])
    model = np.stack([p.model_space() for p in posed])  # (T, V, 3)
    count = model.shape[1]
    usable = (identity_mm is not None and neutrals is not None and len(neutrals) == len(posed)
              and identity_mm.shape == (count, 3) and all(n.shape == (count, 3) for n in neutrals))
    base = np.asarray(identity_mm, np.float64) if usable and identity_mm is not None else np.zeros((count, 3))
    offsets = model - np.stack(neutrals) if usable and neutrals is not None else model
    rotation = smooth_rotations(rotation_raw, times_s, ROTATION_FILTER)
    translation = smooth_vectors(translation_raw, times_s, TRANSLATION_FILTER)
    # speed of the offsets as their per-vertex RMS: scale down by sqrt(V), filter, scale back (linear)
    root = np.sqrt(count)
    smoothed_offsets = smooth_vectors(offsets / root, times_s, EXPRESSION_FILTER) * root
    expressions = [p.expression for p in posed]
    expression_raw = expression = None
    if all(e is not None for e in expressions) and len({e.shape for e in expressions if e is not None}) == 1:
        expression_raw = np.stack([e for e in expressions if e is not None])
        expression = smooth_vectors(expression_raw, times_s, EXPRESSION_FILTER)
    matrices = Rotation.from_rotvec(rotation).as_matrix()
    vertices = [(base + d) @ m.T + t for d, m, t in zip(smoothed_offsets, matrices, translation, strict=True)]
    return SmoothedPoses(np.asarray(times_s, np.float64), rotation_raw, rotation, translation_raw, translation,
                         expression_raw, expression, vertices)


def _videos(items: list[InputItem]) -> dict[str, list[InputItem]]:
    """The video frames among the inputs, per video (by the video's own id), in frame order."""
    videos: dict[str, list[InputItem]] = {}
    for item in items:
        if item.frame >= 0 and not item.problem:
            videos.setdefault(item.image_id.rsplit("#", 1)[0], []).append(item)
    return {k: sorted(v, key=lambda i: i.frame) for k, v in videos.items()}


def _frame_faces(out: Path, log: ResultsLog, item: InputItem, method: str) -> list[dict[str, Any]]:
    entries = [e for e in log.entries(item, method) if e.get("status") == "OK" and int(e.get("face_index", -1)) >= 0
               and _inside(out, e.get("dir")) and isinstance(e.get("box"), list) and len(e["box"]) == 4]
    return sorted(entries, key=lambda e: int(e["face_index"]))


def write_video_outputs(out: Path, items: list[InputItem], method: str, *,
                        timings: list[float] | None = None) -> list[dict[str, Any]]:
    """Track, fuse, smooth and render every video among ``items`` (after their frames were processed).

    Returns one summary per video (also written as OUT/<video folder>/video.json). ``timings`` (when
    given) receives the seconds spent per output frame (smoothing shared out, plus rendering/encoding).
    """
    log = ResultsLog.open(out)
    summaries = []
    for video_id, frames in sorted(_videos(items).items()):
        try:
            summaries.append(_write_video(out, log, video_id, frames, method, timings))
        except (OSError, FacefuseError) as exc:  # e.g. a frame that decoded for the run but not now
            summaries.append({"video": display(video_id), "frames": len(frames), "tracks": [],
                              "error": f"the video step failed: {exc}"})
    return summaries


def _write_video(out: Path, log: ResultsLog, video_id: str, frames: list[InputItem], method: str,
                 timings: list[float] | None) -> dict[str, Any]:
    started = time.perf_counter()
    path = frames[0].path
    target = out / folder_name(video_id)
    info = video_info(path)
    per_frame = [_frame_faces(out, log, item, method) for item in frames]
    tracks: list[Track] = []
    for number, members in enumerate(track_boxes([np.array([e["box"] for e in faces], np.float64).reshape(-1, 4)
                                                   for faces in per_frame])):
        track = Track(number)
        for position, face_index in members:
            entry = per_frame[position][face_index]
            track.frames.append(TrackFrame(frames[position].frame, entry, np.asarray(entry["box"], np.float64),
                                           load_posed(out / entry["dir"])))
        tracks.append(track)
    summary_tracks = [_finish_track(out, target, track, info.fps) for track in tracks]
    by_frame: dict[int, list[tuple[int, TrackFrame]]] = {}
    for track in tracks:
        for tf in track.frames:
            by_frame.setdefault(tf.frame, []).append((track.number, tf))
    step = int(np.median(np.diff([i.frame for i in frames]))) if len(frames) > 1 else 1
    fps = info.fps / max(step, 1)
    setup = time.perf_counter() - started
    reader = frame_reader(path)
    frame_times: list[float] = []

    def rendered() -> Iterator[np.ndarray]:
        for item in frames:
            tick = time.perf_counter()
            picture = _draw_frame(reader.frame(item.frame), by_frame.get(item.frame, []))
            frame_times.append(time.perf_counter() - tick)
            yield picture

    tick = time.perf_counter()
    written = write_video(target / "overlay.mp4", rendered(), fps)
    encode = time.perf_counter() - tick - sum(frame_times)
    if timings is not None and frames:
        shared = (setup + max(encode, 0.0)) / len(frames)
        timings.extend(t + shared for t in frame_times)
    summary = {"video": display(video_id), "frames": len(frames), "fps": round(fps, 3), "every": step,
               "tracks": summary_tracks, "overlay": str(written.relative_to(out)),
               "seconds": round(time.perf_counter() - started, 3)}
    write_json_atomic(target / "video.json", summary)
    return summary


def _finish_track(out: Path, target: Path, track: Track, fps: float) -> dict[str, Any]:
    """Fuse the track's identity, smooth its posed frames, write track_NN/; returns its summary."""
    folder = target / f"track_{track.number:02d}"
    summary: dict[str, Any] = {"track": track.number, "frames": [tf.frame for tf in track.frames],
                               "dir": str(folder.relative_to(out))}
    identity = None
    neutrals: list[np.ndarray] | None = None
    members = [tf.entry for tf in track.frames if (out / tf.entry["dir"] / "mesh.ply").is_file()]
    if members:
        try:
            result, faces = fuse_members(out, members)
            write_identity_files(folder, result, faces)
            identity = result.vertices_mm.astype(np.float64)
            summary["identity_images"] = len(members)
            summary["spread_mm_mean"] = round(float(result.vertex_spread_mm.mean()), 4)
        except (OSError, ValueError, FacefuseError) as exc:
            summary["identity_error"] = str(exc)
    posed = [tf for tf in track.frames if tf.posed is not None]
    summary["posed_frames"] = len(posed)
    if not posed:
        return summary
    if identity is not None:
        try:
            neutrals = [read_mesh(out / tf.entry["dir"] / "mesh.ply")[0] for tf in posed]
        except (OSError, ValueError, FacefuseError):
            neutrals = None
    times = np.array([tf.frame for tf in posed], np.float64) / fps
    poses = smooth_track([tf.posed for tf in posed if tf.posed is not None], times, identity, neutrals)
    for tf, vertices in zip(posed, poses.vertices, strict=True):
        tf.smoothed = vertices
    arrays = {"frames": np.array([tf.frame for tf in posed], np.int64), "times_s": times,
              "global_pose_raw": poses.rotation_raw, "global_pose": poses.rotation,
              "translation_raw": poses.translation_raw, "translation": poses.translation}
    if poses.expression is not None and poses.expression_raw is not None:
        arrays |= {"expression_raw": poses.expression_raw, "expression": poses.expression}
    write_npz_atomic(folder / "poses.npz", {k: np.asarray(v, np.float32) if v.dtype.kind == "f" else v
                                            for k, v in arrays.items()})
    summary["jitter"] = {
        "rotation_deg_raw": round(rotation_jitter_deg(poses.rotation_raw), 4),
        "rotation_deg": round(rotation_jitter_deg(poses.rotation), 4),
        "translation_mm_raw": round(vector_jitter(poses.translation_raw), 4),
        "translation_mm": round(vector_jitter(poses.translation), 4),
    }
    return summary


def _draw_frame(rgb: np.ndarray, faces: list[tuple[int, TrackFrame]]) -> np.ndarray:
    """One output frame: every track's smoothed mesh over the frame, then its box and number."""
    import cv2

    meshes = [(tf.smoothed, tf.posed) for _, tf in faces if tf.smoothed is not None and tf.posed is not None]
    picture = rgb
    if meshes:
        offsets = np.cumsum([0] + [len(v) for v, _ in meshes[:-1]])
        vertices = np.concatenate([v for v, _ in meshes])
        triangles = np.concatenate([p.faces + o for (_, p), o in zip(meshes, offsets, strict=True)])
        rgba = render_camera(vertices, triangles, meshes[0][1].intrinsics, rgb.shape[1], rgb.shape[0])
        picture = composite(rgb, rgba, OVERLAY_OPACITY)
    picture = np.ascontiguousarray(picture.copy())
    thick = max(1, round(max(rgb.shape[:2]) / 400))
    for number, tf in faces:
        colour = TRACK_COLOURS[number % len(TRACK_COLOURS)]
        x1, y1, x2, y2 = (round(float(v)) for v in tf.box)
        cv2.rectangle(picture, (x1, y1), (x2, y2), colour, thick)
        cv2.putText(picture, f"#{number}", (x1, max(y1 - 4, 10)), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thick, colour,
                    thick, cv2.LINE_AA)
    return picture
