"""The open pack on the package-shipped photos and hard variants of them: detection, size, identity.

Faces: skimage's astronaut, the six faces of insightface's t1.jpg, insightface's 112 px Tom Hanks crop
(enlarged 3x onto a grey canvas so the detector finds it). Variants of each photo:

* whole photo: ``original``, ``grayscale`` (luma copied to the 3 channels), ``rotated`` (25° in-plane,
  canvas expanded), ``flipped`` (mirror), ``noise`` (Gaussian, sd 8 grey levels, seed 0), ``downscaled``
  (0.6x), ``loose_crop`` (2x the face box);
* per face: ``tight_crop`` (the landmarks' bounding box + 4 %: a face-filling crop, as other pipelines
  produce), ``mouth_covered`` (skin-coloured patch over the lips + 6 px), ``eye_ring`` (eight
  skin-coloured finger-tip ellipses in a ring around the image-left eye, the eye itself left visible).

A face counts as found in a variant when a detection's nose tip lies within 0.3 face widths of where the
original's nose tip maps to. Reported, for the tree this script imports ``facefuse`` from:

* **detection rate** over all (face, variant) cases, and per variant;
* **outer-eye-corner distance** (mm, vertices 33-263 of the metric mesh): range over all found cases, and
  the per-face spread (max - min over that face's variants), median and max over faces;
* **identity distinctness**: between = mean RMS distance between different people's meshes (originals,
  rigidly aligned, so size counts; and similarity-aligned, shape only); within = mean RMS distance between
  a face's original mesh and its meshes from the photometric/geometric perturbations (grayscale, rotated,
  flipped (mirrored back), noise, downscaled, loose and tight crop); **ratio = between / within** (higher:
  people are told apart better than a photo's accidents move them).

``--before REF`` also runs this script on a git ref (checked out with ``git worktree add --detach`` into a
temporary folder, imported through PYTHONPATH in a subprocess) and writes both columns in one table.

    PYTHONPATH=src .venv/bin/python benchmarks/study_open_real.py [--before f4f12f7] [--out benchmarks/results]
        [--shape-fit FIT[:mirror|:plain]] [--also FIT[:mirror|:plain],...]
    FIT = facemesh | model | model+detail (OpenShapeBackend's shape_fit; :mirror / :plain turn mirror
    averaging on / off); only on trees that have those options.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

PHOTO_VARIANTS = ("original", "grayscale", "rotated", "flipped", "noise", "downscaled", "loose_crop")
FACE_VARIANTS = ("tight_crop", "mouth_covered", "eye_ring")
PERTURBATIONS = ("grayscale", "rotated", "flipped", "noise", "downscaled", "loose_crop", "tight_crop")
"""Variants that change the photo, not the face: a mesh should not move under them."""
OUTER_EYE = (33, 263)
ROTATION_DEG = 25.0


def photos() -> dict[str, np.ndarray]:
    import insightface
    import skimage.data
    from PIL import Image

    folder = Path(insightface.__file__).parent / "data" / "images"
    hanks = Image.open(folder / "Tom_Hanks_54745.png").convert("RGB").resize((336, 336), Image.Resampling.BICUBIC)
    canvas = np.full((536, 536, 3), 128, np.uint8)
    canvas[100:436, 100:436] = np.asarray(hanks)
    return {"astronaut": skimage.data.astronaut(), "t1": np.asarray(Image.open(folder / "t1.jpg").convert("RGB")),
            "hanks": canvas}


def _affine_apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return np.asarray(points, np.float64) @ matrix[:, :2].T + matrix[:, 2]


def photo_variant(image: np.ndarray, kind: str, box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(variant image, 2x3 affine map original pixel -> variant pixel)."""
    import cv2

    h, w = image.shape[:2]
    identity = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    if kind == "original":
        return image, identity
    if kind == "grayscale":
        luma = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        return np.repeat(np.clip(np.rint(luma), 0, 255).astype(np.uint8)[..., None], 3, axis=2), identity
    if kind == "rotated":
        matrix = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), ROTATION_DEG, 1.0)
        cos, sin = abs(matrix[0, 0]), abs(matrix[0, 1])
        new_w, new_h = int(np.ceil(h * sin + w * cos)), int(np.ceil(h * cos + w * sin))
        matrix[0, 2] += (new_w - w) / 2.0
        matrix[1, 2] += (new_h - h) / 2.0
        out = cv2.warpAffine(image, matrix, (new_w, new_h), flags=cv2.INTER_LINEAR, borderValue=(128, 128, 128))
        return out, matrix
    if kind == "flipped":
        return np.ascontiguousarray(image[:, ::-1]), np.array([[-1.0, 0, w - 1.0], [0, 1.0, 0]])
    if kind == "noise":
        noise = np.random.default_rng(0).normal(0.0, 8.0, image.shape)
        return np.clip(image + noise, 0, 255).astype(np.uint8), identity
    if kind == "downscaled":
        size = (round(w * 0.6), round(h * 0.6))
        out = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        return out, np.array([[size[0] / w, 0, 0], [0, size[1] / h, 0]])
    if kind in ("loose_crop", "tight_crop"):
        x0, y0, x1, y1 = box
        cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) / 2
        half *= 2.0 if kind == "loose_crop" else 1.04
        left, top = int(max(cx - half, 0)), int(max(cy - half, 0))
        right, bottom = int(min(cx + half, w)), int(min(cy + half, h))
        return np.ascontiguousarray(image[top:bottom, left:right]), np.array([[1.0, 0, -left], [0, 1.0, -top]])
    raise ValueError(kind)


def skin_colour(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Mean colour of the cheeks (around landmarks 50 and 280)."""
    patches = []
    for index in (50, 280):
        x, y = np.rint(landmarks[index, :2]).astype(int)
        patches.append(image[max(y - 3, 0):y + 4, max(x - 3, 0):x + 4].reshape(-1, 3))
    return np.concatenate(patches).mean(axis=0)


def face_variant(image: np.ndarray, kind: str, landmarks: np.ndarray) -> np.ndarray:
    import cv2

    out = image.copy()
    colour = tuple(float(c) for c in skin_colour(image, landmarks))
    if kind == "mouth_covered":
        lips = landmarks[[61, 291, 0, 17, 185, 409, 375, 146], :2]
        x0, y0 = np.floor(lips.min(0) - 6).astype(int)
        x1, y1 = np.ceil(lips.max(0) + 6).astype(int)
        cv2.rectangle(out, (int(x0), int(y0)), (int(x1), int(y1)), colour, thickness=-1)
        return out
    if kind == "eye_ring":
        centre = landmarks[[33, 133], :2].mean(axis=0)
        eye_width = float(np.linalg.norm(landmarks[33, :2] - landmarks[133, :2]))
        radius = 1.0 * eye_width
        for angle in np.linspace(0.0, 2 * np.pi, 8, endpoint=False):
            tip = centre + radius * np.array([np.cos(angle), np.sin(angle)])
            axes = (max(int(0.28 * eye_width), 2), max(int(0.18 * eye_width), 2))
            cv2.ellipse(out, (round(float(tip[0])), round(float(tip[1]))), axes, float(np.degrees(angle)), 0, 360,
                        colour, thickness=-1)
        return out
    raise ValueError(kind)


def _rms(a: np.ndarray, b: np.ndarray, scale: bool) -> float:
    from facefuse.geometry import umeyama

    aligned = umeyama(a, b, scale=None if scale else 1.0).apply(a)
    return float(np.sqrt(((aligned - b) ** 2).sum(axis=1).mean()))


def measure(shape_fit: str | None) -> dict[str, Any]:
    """Every number of the study for the facefuse this process imports.

    ``shape_fit``: None = the backend's defaults; else ``FIT`` or ``FIT:mirror`` / ``FIT:plain`` (the
    OpenShapeBackend shape_fit, with mirror averaging on / off), for trees that have those options."""
    import facefuse
    from facefuse.assets.store import ModelStore
    from facefuse.face.frontend import FaceFrontEnd
    from facefuse.models.gpmm import MIRROR, mirror_map
    from facefuse.packs.open import load_open_shape_backend

    store = ModelStore()
    front_end = FaceFrontEnd.from_assets(None, store)
    if shape_fit is None:
        backend = load_open_shape_backend("cpu", store)
    else:
        fit, _, mirror_option = shape_fit.partition(":")
        options: dict[str, Any] = {"shape_fit": fit}
        if mirror_option:
            options["mirror_average"] = mirror_option == "mirror"
        backend = load_open_shape_backend("cpu", store, **options)
    mirror = mirror_map(backend.canonical.vertices_mm)

    def meshes(image: np.ndarray) -> list[tuple[Any, np.ndarray]]:
        out = []
        for detection in front_end.detect(image):
            assert detection.landmarks is not None  # the open front end gives the 468 points
            detection.iris = front_end.estimate_iris(image, detection.landmarks).as_detection_iris()
            (result,) = backend.predict([front_end.align(image, detection)])
            out.append((detection, result.vertices_mm.astype(np.float64)))
        return out

    def find(found, nose: np.ndarray, width: float):
        best = min(found, key=lambda f: np.linalg.norm(f[0].kps5[2] - nose), default=None)
        if best is None or np.linalg.norm(best[0].kps5[2] - nose) > 0.3 * width:
            return None
        return best[1]

    cases: list[dict[str, Any]] = []
    originals: dict[str, np.ndarray] = {}
    within: dict[str, list[float]] = {}
    within_shape: dict[str, list[float]] = {}
    for photo, image in photos().items():
        references = meshes(image)
        names = [f"{photo}{k}" if photo == "t1" else photo for k in range(len(references))]
        for name, (_, vertices) in zip(names, references, strict=True):
            originals[name] = vertices
        for kind in PHOTO_VARIANTS + FACE_VARIANTS:
            per_photo = kind in PHOTO_VARIANTS and kind not in ("loose_crop",)
            shared = meshes(photo_variant(image, kind, np.zeros(4))[0]) if per_photo else []
            for name, (detection, reference) in zip(names, references, strict=True):
                box = np.asarray(detection.box, np.float64)
                lm = np.asarray(detection.landmarks, np.float64)
                if kind in FACE_VARIANTS:
                    if kind == "tight_crop":
                        lo, hi = lm[:, :2].min(0), lm[:, :2].max(0)
                        variant, matrix = photo_variant(image, kind, np.concatenate([lo, hi]))
                    else:
                        variant, matrix = face_variant(image, kind, lm), np.array([[1.0, 0, 0], [0, 1.0, 0]])
                    found = meshes(variant)
                elif kind == "loose_crop":
                    variant, matrix = photo_variant(image, kind, box)
                    found = meshes(variant)
                else:
                    variant, matrix = photo_variant(image, kind, box)
                    found = shared
                scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
                nose = _affine_apply(matrix, detection.kps5[2][None])[0]
                vertices = find(found, nose, float(detection.width) * scale)
                case: dict[str, Any] = {"face": name, "variant": kind, "found": vertices is not None}
                if vertices is not None:
                    if kind == "flipped":  # the mirror person: mirror back before comparing
                        vertices = (vertices * MIRROR)[mirror]
                    case["eye_mm"] = float(np.linalg.norm(vertices[OUTER_EYE[0]] - vertices[OUTER_EYE[1]]))
                    if kind in PERTURBATIONS:
                        case["rms_to_original_mm"] = _rms(vertices, reference, scale=False)
                        within.setdefault(name, []).append(case["rms_to_original_mm"])
                        case["shape_rms_to_original_mm"] = _rms(vertices, reference, scale=True)
                        within_shape.setdefault(name, []).append(case["shape_rms_to_original_mm"])
                cases.append(case)

    names = sorted(originals)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    between = float(np.mean([_rms(originals[a], originals[b], scale=False) for a, b in pairs]))
    between_shape = float(np.mean([_rms(originals[a], originals[b], scale=True) for a, b in pairs]))
    within_mean = float(np.mean([np.mean(v) for v in within.values()]))
    within_shape_mean = float(np.mean([np.mean(v) for v in within_shape.values()]))
    no_flip: dict[str, list[float]] = {}
    for c in cases:
        if "shape_rms_to_original_mm" in c and c["variant"] != "flipped":
            no_flip.setdefault(c["face"], []).append(c["shape_rms_to_original_mm"])
    within_shape_no_flip = float(np.mean([np.mean(v) for v in no_flip.values()]))
    spreads = {}
    for name in names:
        eyes = [c["eye_mm"] for c in cases if c["face"] == name and "eye_mm" in c]
        spreads[name] = float(max(eyes) - min(eyes)) if eyes else float("nan")
    eyes_all = [c["eye_mm"] for c in cases if "eye_mm" in c]
    per_variant = {kind: float(np.mean([c["found"] for c in cases if c["variant"] == kind]))
                   for kind in PHOTO_VARIANTS + FACE_VARIANTS}
    return {
        "facefuse": str(Path(facefuse.__file__).resolve().parent),
        "shape_fit": getattr(backend, "shape_fit", "facemesh (no option)")
        + (" + mirror average" if getattr(backend, "mesh", None) is not None else ""),
        "faces": names,
        "detection_rate": float(np.mean([c["found"] for c in cases])),
        "detected_cases": f"{sum(c['found'] for c in cases)}/{len(cases)}",
        "detection_rate_per_variant": per_variant,
        "eye_mm_min": float(min(eyes_all)), "eye_mm_max": float(max(eyes_all)),
        "eye_spread_median_mm": float(np.nanmedian(list(spreads.values()))),
        "eye_spread_max_mm": float(np.nanmax(list(spreads.values()))),
        "eye_spread_per_face_mm": spreads,
        "between_rms_mm": between, "within_rms_mm": within_mean, "ratio": between / within_mean,
        "between_shape_rms_mm": between_shape, "within_shape_rms_mm": within_shape_mean,
        "ratio_shape": between_shape / within_shape_mean,
        "ratio_shape_no_flip": between_shape / within_shape_no_flip,
        "within_shape_per_variant_mm": {
            kind: float(np.mean([c["shape_rms_to_original_mm"] for c in cases
                                 if c["variant"] == kind and "shape_rms_to_original_mm" in c] or [np.nan]))
            for kind in PERTURBATIONS},
        "within_rms_per_face_mm": {k: float(np.mean(v)) for k, v in within.items()},
        "cases": cases,
    }


ROWS = (
    ("detection rate", lambda r: f"{r['detection_rate']:.2f} ({r['detected_cases']})"),
    *((f"detection rate: {k}", lambda r, k=k: f"{r['detection_rate_per_variant'][k]:.2f}")
      for k in PHOTO_VARIANTS + FACE_VARIANTS),
    ("outer-eye-corner distance, range over all cases (mm)", lambda r: f"{r['eye_mm_min']:.1f}-{r['eye_mm_max']:.1f}"),
    ("outer-eye-corner spread per face, median / max (mm)",
     lambda r: f"{r['eye_spread_median_mm']:.1f} / {r['eye_spread_max_mm']:.1f}"),
    ("between people, rigid RMS (mm)", lambda r: f"{r['between_rms_mm']:.2f}"),
    ("same face under perturbations, rigid RMS (mm)", lambda r: f"{r['within_rms_mm']:.2f}"),
    ("**distinctness ratio** (between / within)", lambda r: f"**{r['ratio']:.2f}**"),
    ("between people, shape only (similarity) RMS (mm)", lambda r: f"{r['between_shape_rms_mm']:.2f}"),
    ("same face, shape only RMS (mm)", lambda r: f"{r['within_shape_rms_mm']:.2f}"),
    ("**distinctness ratio, shape only**", lambda r: f"**{r['ratio_shape']:.2f}**"),
    ("distinctness ratio, shape only, without the flipped copy",
     lambda r: f"{r['ratio_shape_no_flip']:.2f}" if "ratio_shape_no_flip" in r else "-"),
    *((f"same face, shape only RMS (mm): {k}",
       lambda r, k=k: f"{r['within_shape_per_variant_mm'][k]:.2f}" if "within_shape_per_variant_mm" in r else "-")
      for k in PERTURBATIONS),
)


def table(columns: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| measure | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for label, cell in ROWS:
        lines.append(f"| {label} | " + " | ".join(cell(r) for r in columns.values()) + " |")
    return lines


def run_on_ref(ref: str, shape_fit: str | None) -> dict[str, Any]:
    """Check ``ref`` out into a temporary worktree and run this script there in a subprocess."""
    repo = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="facefuse-before-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", "--quiet", str(tree), ref], check=True)
        try:
            out = Path(tmp) / "before.json"
            env = {**os.environ, "PYTHONPATH": str(tree / "src")}
            command = [sys.executable, str(Path(__file__).resolve()), "--json-only", str(out)]
            if shape_fit is not None:
                command += ["--shape-fit", shape_fit]
            subprocess.run(command, check=True, env=env, cwd=str(tree))
            return json.loads(out.read_text())
        finally:
            subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--before", default=None, help="git ref to measure as 'before' (e.g. f4f12f7)")
    parser.add_argument("--shape-fit", default=None, help="OpenShapeBackend shape_fit for the current tree")
    parser.add_argument("--also", default="", help="comma-separated extra FIT[:mirror|:plain] columns")
    parser.add_argument("--json-only", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.json_only:
        Path(args.json_only).write_text(json.dumps(measure(args.shape_fit)))
        return
    columns: dict[str, dict[str, Any]] = {}
    if args.before:
        columns[f"before ({args.before})"] = run_on_ref(args.before, None)
    after = measure(args.shape_fit)
    columns[f"after (shape_fit {after['shape_fit']})"] = after
    for extra in filter(None, args.also.split(",")):
        columns[extra] = measure(extra)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    lines = ["# Open pack on the shipped photos and their variants", "",
             f"Faces: {', '.join(after['faces'])}; variants: {', '.join(PHOTO_VARIANTS + FACE_VARIANTS)}; "
             f"{machine}. See benchmarks/study_open_real.py for the definitions.", "", *table(columns)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_real.md").write_text("\n".join(lines) + "\n")
    (out / "open_real.json").write_text(json.dumps({"machine": machine, "columns": columns}, indent=1) + "\n")
    print("\n".join(lines))
    print("wrote", out / "open_real.md")


if __name__ == "__main__":
    main()
