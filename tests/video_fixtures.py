"""A synthetic video of a head with pose noise, and the face folders a run with the posed outputs would
write for its frames (the posed-face contract, docs/video.md): shared by tests/unit/test_video.py and
benchmarks/bench_video.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from facefuse.assets.synthetic.flame import synthetic_flame_mesh
from facefuse.io.video import write_video
from facefuse.render import composite, render_camera

FPS = 25.0
FACE_TOWARD_CAMERA = Rotation.from_euler("x", 180, degrees=True)  # model y up, z to viewer -> OpenCV y down, z ahead


def noisy_static_pose(count: int, seed: int, angle_noise_deg: float = 1.0, shift_noise_mm: float = 2.0):
    rng = np.random.default_rng(seed)
    truth = Rotation.from_euler("y", 20, degrees=True) * FACE_TOWARD_CAMERA
    noise = Rotation.from_rotvec(np.deg2rad(angle_noise_deg) * rng.normal(size=(count, 3)) / np.sqrt(3))
    rotations = (truth * noise).as_rotvec()
    translations = np.array([10.0, -5.0, 600.0]) + shift_noise_mm * rng.normal(size=(count, 3)) / np.sqrt(3)
    return truth, rotations, translations


def camera(size: int, focal: float = 450.0) -> np.ndarray:
    return np.array([[focal, 0, size / 2], [0, focal, size / 2], [0, 0, 1]])


def posed_mesh(template: np.ndarray, rotvec: np.ndarray, translation: np.ndarray) -> np.ndarray:
    return template @ Rotation.from_rotvec(rotvec).as_matrix().T + translation


def synthetic_video_run(tmp_path: Path, count: int, *, second_face_from: int | None = None, size: int = 192,
                        mesh_size: str = "small"):
    """A static head with pose noise rendered into a video, and the face folders a run with the
    posed outputs would have written for its frames (the contract in docs/video.md)."""
    from facefuse.client.inputs import collect_inputs
    from facefuse.client.outputs import ResultsLog, status_entry
    from facefuse.io.atomic import write_npz_atomic
    from facefuse.io.meshes import write_obj, write_ply

    vertices, faces = synthetic_flame_mesh(mesh_size)
    template = vertices * 1000.0
    k = camera(size, focal=450.0 * size / 192)
    _, rotations, translations = noisy_static_pose(count, seed=3)
    rng = np.random.default_rng(4)
    heads = [(rotations, translations)]
    if second_face_from is not None:
        shifted = translations + np.array([0.0, 0.0, 300.0])
        heads.append((rotations, shifted + np.array([-400.0, 0.0, 0.0])))
    frames = []
    posed_per_frame = []
    for t in range(count):
        present = [h for i, h in enumerate(heads) if i == 0 or t >= (second_face_from or 0)]
        meshes = [posed_mesh(template, r[t], s[t]) for r, s in present]
        background = np.full((size, size, 3), 90, np.uint8)
        skin = np.tile([[210, 120, 90]], (len(template) * len(meshes), 1)).astype(np.uint8)  # the overlay is grey
        rgba = render_camera(np.concatenate(meshes), np.concatenate([faces + i * len(template)
                                                                     for i in range(len(meshes))]), k, size, size,
                             colors=skin)
        frames.append(composite(background, rgba, 1.0))
        posed_per_frame.append([(m, r[t], s[t]) for m, (r, s) in zip(meshes, present, strict=True)])
    video = write_video(tmp_path / "clip.mp4", frames, fps=FPS)
    items = collect_inputs([str(video)], every_n_frames=1)
    out = tmp_path / "out"
    log = ResultsLog.open(out)
    for item, posed in zip(items, posed_per_frame, strict=True):
        for index, (mesh, rotvec, shift) in enumerate(posed):
            face_dir = Path(item.key) / f"face_{index:02d}"
            target = out / face_dir
            write_ply(target / "mesh.ply", template + rng.normal(scale=0.3, size=template.shape), faces)
            write_obj(target / "mesh_posed.obj", mesh, faces)
            write_npz_atomic(target / "params.npz", {
                "global_pose": rotvec.astype(np.float32), "translation": shift.astype(np.float32),
                "camera_intrinsics": k.astype(np.float32), "expression": rng.normal(size=10).astype(np.float32),
                "image_size": np.array([size, size])})
            uv = mesh @ k.T
            uv = uv[:, :2] / uv[:, 2:]
            entry = status_entry(item, "fuse", "OK", "", face_index=index, num_faces=len(posed))
            entry.update(box=[*uv.min(axis=0).tolist(), *uv.max(axis=0).tolist()], dir=str(face_dir),
                         files=[str(face_dir / "mesh.ply")])
            log.append(entry)
    return out, items, frames
