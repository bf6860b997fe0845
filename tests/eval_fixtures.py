"""Synthetic NoW data for tests and benchmarks: head-like meshes, scans made from them, the layout.

The "head" is an ellipsoid with a nose and brow bumps (so alignment has a unique answer), the
"scan" of a subject is the same surface subdivided (its vertices lie exactly on the surface) and
moved by a known similarity transform, and the 7 landmarks are mesh vertices at face-like places.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import trimesh

from facefuse.eval.now import CHALLENGES, write_pp_landmarks

LANDMARK_DIRECTIONS = np.array(
    [  # 7 NoW landmarks as (x, y) on the front of the head, z from the surface
        [-0.45, 0.25],  # 0 right-eye outer corner (subject's right = image left)
        [-0.15, 0.25],  # 1 right-eye inner corner
        [0.15, 0.25],  # 2 left-eye inner corner
        [0.45, 0.25],  # 3 left-eye outer corner
        [0.0, -0.08],  # 4 nose bottom
        [-0.25, -0.35],  # 5 mouth right corner
        [0.25, -0.35],  # 6 mouth left corner
    ]
)


def head_mesh(subdivisions: int = 4, radii: tuple[float, float, float] = (75.0, 95.0, 85.0)) -> trimesh.Trimesh:
    """A closed, asymmetric, head-sized surface in millimetres (face towards +z)."""
    sphere = trimesh.creation.icosphere(subdivisions=subdivisions, radius=1.0)
    unit = sphere.vertices / np.linalg.norm(sphere.vertices, axis=1, keepdims=True)
    x, y, z = unit.T
    bump = (
        0.18 * np.exp(-((x / 0.12) ** 2 + ((y + 0.02) / 0.2) ** 2)) * (z > 0)  # nose
        + 0.05 * np.exp(-((x + 0.3) ** 2 + (y - 0.35) ** 2) / 0.02) * (z > 0)  # brows, uneven
        + 0.03 * np.exp(-((x - 0.3) ** 2 + (y - 0.38) ** 2) / 0.03) * (z > 0)
        + 0.04 * np.exp(-((y + 0.5) ** 2) / 0.05) * (z > 0)  # chin
    )
    vertices = unit * (1.0 + bump)[:, None] * np.asarray(radii)
    return trimesh.Trimesh(vertices, sphere.faces, process=False)


def mesh_landmarks(mesh: trimesh.Trimesh) -> np.ndarray:
    """7 landmark positions: the front-facing vertex nearest each face-like direction."""
    v = np.asarray(mesh.vertices)
    front = v[:, 2] > 0
    ext = np.abs(v).max(axis=0)
    out = []
    for dx, dy in LANDMARK_DIRECTIONS:
        target = np.array([dx * ext[0], dy * ext[1]])
        d = np.linalg.norm(v[:, :2] - target, axis=1) + np.where(front, 0.0, 1e9)
        out.append(v[int(np.argmin(d))])
    return np.asarray(out)


def random_similarity(rng: np.random.Generator, scale: float | None = None) -> tuple[float, np.ndarray, np.ndarray]:
    """A random (scale, rotation, translation)."""
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    rot = np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )
    s = float(rng.uniform(0.5, 2.0)) if scale is None else scale
    return s, rot, rng.normal(0, 50, size=3)


def apply(points: np.ndarray, s: float, rot: np.ndarray, t: np.ndarray) -> np.ndarray:
    return s * np.asarray(points) @ rot.T + t


def write_obj(path: Path, vertices: np.ndarray, faces: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    trimesh.Trimesh(vertices, faces, process=False).export(path)


@dataclass
class NowFixture:
    root: Path  # dataset folder given to --dataset
    predictions: Path
    images: list[str]  # image list entries
    missing: list[str]  # entries without a prediction
    subjects: list[str]


def make_now_dataset(
    tmp: Path,
    *,
    n_subjects: int = 2,
    images_per_challenge: int = 1,
    scan_subdivisions: int = 1,
    head_subdivisions: int = 3,
    missing: int = 1,
    seed: int = 0,
    pred_unit: str = "mm",
    layout: str = "final_release_version",
) -> NowFixture:
    """Write a NoW-shaped dataset plus predictions that are exact copies of the scanned surface.

    Each prediction is the subject's head in its own random pose (scale 1/unit factor, so the
    metrical variant sees the true size), with landmarks perturbed by 1 mm so the refinement has
    work to do. The last ``missing`` images get no prediction.
    """
    rng = np.random.default_rng(seed)
    root = tmp / "now"
    base = root / "NoW_Dataset" / "final_release_version" if layout == "final_release_version" else root
    preds = tmp / "preds"
    unit_scale = {"mm": 1.0, "cm": 0.1, "m": 0.001}[pred_unit]
    entries: list[str] = []
    subjects = []
    for s_idx in range(n_subjects):
        subject = f"FaMoS_1804{s_idx:02d}_0{s_idx}000_TA"
        subjects.append(subject)
        radii = (75.0 + 4 * s_idx, 95.0 - 3 * s_idx, 85.0 + 2 * s_idx)
        head = head_mesh(head_subdivisions, radii)
        lmk = mesh_landmarks(head)
        scan_v, scan_f = np.asarray(head.vertices), np.asarray(head.faces)
        for _ in range(scan_subdivisions):
            scan_v, scan_f = trimesh.remesh.subdivide(scan_v, scan_f)
        s, rot, t = random_similarity(rng, scale=1.0)
        write_obj(base / "scans" / subject / "natural_head_rotation.000001.obj", apply(scan_v, s, rot, t), scan_f)
        (base / "scans_lmks_onlypp" / subject).mkdir(parents=True, exist_ok=True)
        write_pp_landmarks(
            base / "scans_lmks_onlypp" / subject / "natural_head_rotation.000001_picked_points.pp",
            apply(lmk, s, rot, t),
        )
        for challenge in CHALLENGES.values():
            for k in range(images_per_challenge):
                name = f"IMG_{s_idx:02d}{k:02d}{len(entries):02d}.jpg"
                entries.append(f"{subject}/{challenge}/{name}")
                img_dir = base / "iphone_pictures" / subject / challenge
                img_dir.mkdir(parents=True, exist_ok=True)
                from PIL import Image

                Image.fromarray(rng.integers(0, 255, size=(48, 32, 3), dtype=np.uint8)).save(img_dir / name)
                box_dir = base / "detected_face" / subject / challenge
                box_dir.mkdir(parents=True, exist_ok=True)
                np.save(
                    box_dir / name.replace(".jpg", ".npy"),
                    {"left": 4, "top": 6, "right": 28, "bottom": 40},
                    allow_pickle=True,
                )
                ps, prot, pt = random_similarity(rng, scale=unit_scale)
                out_dir = preds / subject / challenge
                write_obj(out_dir / name.replace(".jpg", ".obj"), apply(head.vertices, ps, prot, pt), head.faces)
                noisy = lmk + rng.normal(0, 1.0, size=lmk.shape)
                np.save(out_dir / name.replace(".jpg", ".npy"), apply(noisy, ps, prot, pt))
    gone = entries[len(entries) - missing :] if missing else []
    for entry in gone:
        subject, challenge, name = entry.split("/")
        for ext in (".obj", ".npy"):
            (preds / subject / challenge / name.replace(".jpg", ext)).unlink()
    base.mkdir(parents=True, exist_ok=True)
    (base / "imagepathsvalidation.txt").write_text("\n".join(entries) + "\n", encoding="utf-8")
    return NowFixture(root, preds, entries, gone, subjects)
