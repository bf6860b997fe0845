"""The NoW benchmark protocol, built in: read the dataset layout, align, measure, report.

Per image (as in the official ``now_evaluation`` code): crop the subject's ground-truth scan to a
ball around the face centre defined by its 7 picked landmarks; align the predicted mesh to the scan
by similarity Procrustes on the 7 landmark pairs; refine that alignment (rotation, translation and
scale, or rotation and translation only in the metrical variant, where the scale is the mesh unit's)
by minimising the sum of squared unsigned distances from the cropped scan vertices to the predicted
surface; the errors are those distances. Statistics are taken over all per-vertex errors of all
evaluated images together, overall and per challenge.

Differences from the official code, on purpose: distances are exact point-to-triangle distances
(``facefuse.eval.geometry``); the refinement is a Levenberg-Marquardt solver on the same objective
(not chumpy's dogleg); in the metrical variant the initial translation is the one optimal for the
fixed scale (the refinement removes the difference); missing predictions are reported and left out
instead of stopping the run.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import multiprocessing
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from facefuse.errors import AssetError, FacefuseError, InvalidInputError, LimitExceededError
from facefuse.eval.geometry import TriangleMeshDistance
from facefuse.eval.procrustes import similarity_procrustes
from facefuse.geometry import SimilarityTransform

CHALLENGES: dict[str, str] = {
    "neutral": "multiview_neutral",
    "expression": "multiview_expressions",
    "occlusion": "multiview_occlusions",
    "selfie": "selfie",
}
"""CLI name -> folder name used in the NoW image paths."""

UNIT_FACTORS: dict[str, float] = {"mm": 1.0, "cm": 10.0, "m": 1000.0}
"""Metrical variant: factor taking the predicted mesh's unit to the scans' millimetres."""

IMAGE_LISTS = {"val": "imagepathsvalidation.txt", "test": "imagepathstest.txt"}
SCANS_DIR = "scans"
SCAN_LANDMARKS_DIR = "scans_lmks_onlypp"
CROP_CENTRE_FRACTION = 0.3
CROP_RADIUS_FACTOR = 1.4
CURVE_MAX_MM = 8.0


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def read_pp_landmarks(path: str | os.PathLike[str]) -> np.ndarray:
    """The 7 picked points of a MeshLab ``.pp`` file (PickedPoints XML), in file order, as (7, 3)."""
    p = Path(path)
    try:
        root = ET.parse(p).getroot()
    except (OSError, ET.ParseError) as exc:
        raise InvalidInputError(f"{p}: not a readable MeshLab picked-points (.pp) XML file ({exc})") from exc
    points = []
    for node in root.iter("point"):
        try:
            points.append([float(node.attrib[k]) for k in ("x", "y", "z")])
        except (KeyError, ValueError) as exc:
            raise InvalidInputError(f"{p}: a <point> lacks numeric x, y, z attributes ({node.attrib})") from exc
    if len(points) != 7:
        raise InvalidInputError(f"{p}: expected 7 picked points (the NoW landmarks), found {len(points)}")
    return np.asarray(points, dtype=np.float64)


def write_pp_landmarks(path: str | os.PathLike[str], landmarks: np.ndarray) -> None:
    """Write 7 points as a MeshLab picked-points file (used by test fixtures and tools)."""
    pts = np.asarray(landmarks, dtype=np.float64)
    lines = [
        "<!DOCTYPE PickedPoints>",
        "<PickedPoints>",
        " <DocumentData>",
        '  <DateTime time="00:00:00" date="2000-01-01"/>',
        '  <User name="facefuse"/>',
        '  <DataFileName name="scan.obj"/>',
        '  <templateName name=""/>',
        " </DocumentData>",
    ]
    for i, (x, y, z) in enumerate(pts):
        lines.append(f' <point x="{float(x)!r}" y="{float(y)!r}" z="{float(z)!r}" active="1" name="{i}"/>')
    lines.append("</PickedPoints>")
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_prediction_landmarks(path: str | os.PathLike[str]) -> np.ndarray:
    """A predicted 7x3 landmark file: ``.npy`` or whitespace-separated ``.txt``."""
    p = Path(path)
    try:
        arr = np.load(p, allow_pickle=False) if p.suffix == ".npy" else np.loadtxt(p, dtype=np.float64, ndmin=2)
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"{p}: unreadable landmark file ({exc})") from exc
    arr = np.asarray(arr, dtype=np.float64)
    if arr.shape != (7, 3):
        raise InvalidInputError(f"{p}: expected 7x3 landmarks (NoW order), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise InvalidInputError(f"{p}: landmarks contain NaN or infinite values")
    return arr


def read_obj_vertices(path: str | os.PathLike[str]) -> np.ndarray:
    """Every ``v`` line of an OBJ, in file order, as (N, 3) (extra colour columns ignored).

    Used for the ground-truth scans: the official evaluation crops all scan vertices, while mesh
    loaders (trimesh included) drop unreferenced vertices and split vertices at texture seams.
    """
    p = Path(path)
    try:
        with p.open("r", encoding="utf-8", errors="replace") as fh:
            rows = [line.split()[1:4] for line in fh if line.startswith("v ")]
        vertices = np.asarray(rows, dtype=np.float64)
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"{p}: unreadable OBJ vertices ({exc})") from exc
    if vertices.ndim != 2 or vertices.shape[1] != 3 or len(vertices) == 0:
        raise InvalidInputError(f"{p}: no 'v x y z' vertex lines found")
    if not np.all(np.isfinite(vertices)):
        raise InvalidInputError(f"{p}: NaN or infinite vertex coordinates")
    return vertices


def read_scan_vertices(path: str | os.PathLike[str]) -> np.ndarray:
    """All vertices of a ground-truth scan (.obj read line by line, other formats via trimesh)."""
    if Path(path).suffix.lower() == ".obj":
        return read_obj_vertices(path)
    return read_mesh(path, need_faces=False)[0]


def read_mesh(path: str | os.PathLike[str], *, need_faces: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Vertices and faces of an .obj/.ply with trimesh, unprocessed and in file order."""
    import trimesh

    p = Path(path)
    try:
        mesh = trimesh.load(p, process=False, maintain_order=True, force="mesh")
    except Exception as exc:  # trimesh raises many kinds for bad files
        raise InvalidInputError(f"{p}: unreadable mesh ({type(exc).__name__}: {exc})") from exc
    vertices = np.asarray(getattr(mesh, "vertices", np.zeros((0, 3))), dtype=np.float64)
    faces = np.asarray(getattr(mesh, "faces", np.zeros((0, 3))), dtype=np.int64)
    if vertices.ndim != 2 or len(vertices) == 0:
        raise InvalidInputError(f"{p}: the mesh has no vertices")
    if need_faces and (faces.ndim != 2 or len(faces) == 0):
        raise InvalidInputError(f"{p}: the mesh has no triangles; NoW measures distances to a surface")
    if not np.all(np.isfinite(vertices)):
        raise InvalidInputError(f"{p}: the mesh has NaN or infinite vertex coordinates")
    return vertices, faces


# ----------------------------------------------------------------------------------------------
# Dataset layout
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NowImage:
    subject: str
    challenge: str  # folder name, e.g. multiview_neutral
    image: str  # file name, e.g. IMG_0041.jpg

    @property
    def stem(self) -> str:
        return Path(self.image).stem

    @property
    def key(self) -> str:
        return f"{self.subject}/{self.challenge}/{self.image}"


@dataclass(frozen=True)
class NowLayout:
    """Where the pieces of a NoW download are. Both common arrangements are accepted:
    everything under ``NoW_Dataset/final_release_version/``, or the image lists, ``scans/`` and
    ``scans_lmks_onlypp/`` at the top with the pictures under ``NoW_Dataset/final_release_version/``."""

    root: Path
    image_list: Path
    scans: Path | None
    scan_landmarks: Path | None
    pictures: Path | None
    detected_faces: Path | None

    @staticmethod
    def discover(root: str | os.PathLike[str], split: str = "val") -> NowLayout:
        base = Path(root)
        if not base.is_dir():
            raise InvalidInputError(f"NoW dataset folder {base} does not exist or is not a folder")
        if split not in IMAGE_LISTS:
            raise InvalidInputError(f"unknown NoW split {split!r}; expected one of {sorted(IMAGE_LISTS)}")
        candidates = [
            base,
            base / "NoW_Dataset" / "final_release_version",
            base / "final_release_version",
            base / "NoW_Dataset",
        ]

        def first(name: str, want_dir: bool) -> Path | None:
            for c in candidates:
                p = c / name
                if (p.is_dir() if want_dir else p.is_file()):
                    return p
            return None

        image_list = first(IMAGE_LISTS[split], want_dir=False)
        if image_list is None:
            raise AssetError(
                f"NoW image list {IMAGE_LISTS[split]} not found in {base} or its NoW_Dataset/final_release_version/; "
                "download it from the NoW site (https://now.is.tue.mpg.de) and put it in the dataset folder"
            )
        return NowLayout(
            root=base,
            image_list=image_list,
            scans=first(SCANS_DIR, want_dir=True),
            scan_landmarks=first(SCAN_LANDMARKS_DIR, want_dir=True),
            pictures=first("iphone_pictures", want_dir=True),
            detected_faces=first("detected_face", want_dir=True),
        )

    def images(self, challenge: str | None = None) -> list[NowImage]:
        """The images of the list, optionally one challenge (folder name), in list order."""
        out = []
        for line_no, raw in enumerate(self.image_list.read_text(encoding="utf-8").splitlines(), start=1):
            line = raw.strip().replace("\\", "/")
            if not line:
                continue
            parts = [p for p in line.split("/") if p]
            if len(parts) < 3:
                raise InvalidInputError(
                    f"{self.image_list}:{line_no}: expected <subject>/<challenge>/<image>, got {raw!r}"
                )
            item = NowImage(parts[-3], parts[-2], parts[-1])
            if challenge is None or item.challenge == challenge:
                out.append(item)
        return out

    def subject_files(self, subject: str) -> tuple[Path, Path]:
        """The subject's ground-truth scan and its .pp landmarks."""
        if self.scans is None or self.scan_landmarks is None:
            raise AssetError(
                f"ground-truth folders {SCANS_DIR}/ and {SCAN_LANDMARKS_DIR}/ not found under {self.root}; "
                "they are part of the NoW validation download (the test split's scans are withheld: "
                "test results are computed by the NoW organisers)"
            )
        scans = sorted((self.scans / subject).glob("*.obj"))
        lmks = sorted((self.scan_landmarks / subject).glob("*.pp"))
        if not scans:
            raise AssetError(f"no ground-truth scan (*.obj) for subject {subject} in {self.scans / subject}")
        if not lmks:
            raise AssetError(f"no scan landmarks (*.pp) for subject {subject} in {self.scan_landmarks / subject}")
        return scans[0], lmks[0]


def prediction_files(predictions: Path, item: NowImage) -> tuple[Path | None, Path | None]:
    """The predicted mesh (.obj before .ply) and landmarks (.npy before .txt) of an image, if present."""
    folder = predictions / item.subject / item.challenge
    mesh = next((p for p in (folder / f"{item.stem}.obj", folder / f"{item.stem}.ply") if p.is_file()), None)
    lmk = next((p for p in (folder / f"{item.stem}.npy", folder / f"{item.stem}.txt") if p.is_file()), None)
    return mesh, lmk


# ----------------------------------------------------------------------------------------------
# Protocol
# ----------------------------------------------------------------------------------------------


def face_crop_sphere(landmarks: np.ndarray) -> tuple[np.ndarray, float]:
    """Centre and radius of the NoW face crop from the scan's 7 landmarks.

    Landmark order: 0 right-eye outer corner, 1/2 inner eye corners, 3 left-eye outer corner,
    4 nose bottom, 5/6 mouth corners (the order of landmarks_7_annotated.png).
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (7, 3):
        raise InvalidInputError(f"NoW crop needs 7x3 scan landmarks, got shape {lm.shape}")
    nose_bottom = lm[4]
    nose_bridge = 0.5 * (lm[1] + lm[2])
    centre = nose_bottom + CROP_CENTRE_FRACTION * (nose_bridge - nose_bottom)
    outer_eye_dist = float(np.linalg.norm(lm[0] - lm[3]))
    nose_dist = float(np.linalg.norm(nose_bridge - nose_bottom))
    return centre, CROP_RADIUS_FACTOR * (outer_eye_dist + nose_dist) / 2.0


def crop_scan(vertices: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Indices of the scan vertices within the crop radius (inclusive), ascending."""
    centre, radius = face_crop_sphere(landmarks)
    dist = np.linalg.norm(np.asarray(vertices, dtype=np.float64) - centre, axis=1)
    return np.nonzero(dist <= radius)[0]


@dataclass(frozen=True)
class AlignmentResult:
    transform: SimilarityTransform  # predicted mesh coordinates -> scan millimetres
    errors: np.ndarray  # (N,) unsigned distance of each cropped scan vertex to the aligned surface
    landmark_rms: float  # landmark residual after Procrustes (mm)
    iterations: int
    converged: bool


def _surface_state(
    points: np.ndarray, surface: TriangleMeshDistance, transform: SimilarityTransform
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distances (scan units), closest points and unit normals on the transformed surface."""
    query = surface.query(transform.inverse().apply(points))
    closest = transform.apply(query.closest_points)
    normals = surface.face_normals(query.triangle_ids) @ transform.rotation.T
    return transform.scale * query.distances, closest, normals


def _increment(delta: np.ndarray, pivot: np.ndarray, fit_scale: bool) -> SimilarityTransform:
    """x -> exp(sigma) R(omega) (x - pivot) + pivot + tau."""
    rot = Rotation.from_rotvec(delta[:3]).as_matrix()
    scale = math.exp(float(delta[6])) if fit_scale else 1.0
    return SimilarityTransform(scale, rot, pivot + delta[3:6] - scale * (rot @ pivot))


def refine_alignment(
    points: np.ndarray,
    surface: TriangleMeshDistance,
    initial: SimilarityTransform,
    *,
    fit_scale: bool,
    max_iterations: int = 60,
    ftol: float = 1e-6,
    xtol: float = 5e-4,
) -> tuple[SimilarityTransform, np.ndarray, int, bool]:
    """Minimise sum_i dist(points_i, T(surface))^2 over T = (rotation, translation[, scale]).

    Levenberg-Marquardt on the exact unsigned distances: each residual is linearised along the
    direction from its closest surface point to the scan point (the face normal when the point lies
    on the surface); a step is kept only if the exact objective decreases, so the objective is
    monotone and the loop ends. It stops when the relative decrease is below ``ftol`` or the step
    moves no scan-side surface point by more than ``xtol`` (scan units). Returns the transform, the
    final distances, iterations, converged.
    """
    dist, closest, normals = _surface_state(points, surface, initial)
    energy = float(np.dot(dist, dist))
    transform = initial
    damping = 1e-4
    n_params = 7 if fit_scale else 6
    iterations = 0
    converged = False
    while iterations < max_iterations:
        iterations += 1
        diff = points - closest
        on_surface = dist <= 1e-9 * max(1.0, float(np.max(dist, initial=0.0)))
        direction = np.where(on_surface[:, None], normals, diff / np.where(on_surface, 1.0, dist)[:, None])
        pivot = points.mean(axis=0)
        lever = closest - pivot
        jac = np.empty((len(points), n_params))
        jac[:, 0:3] = np.cross(lever, direction)
        jac[:, 3:6] = direction
        if fit_scale:
            jac[:, 6] = np.einsum("ij,ij->i", lever, direction)
        jtj = jac.T @ jac
        grad = jac.T @ dist
        diag = np.maximum(np.diag(jtj), 1e-12 * max(1.0, float(np.trace(jtj))))
        accepted = False
        at_minimum = False
        for _attempt in range(8):
            delta = np.linalg.solve(jtj + damping * np.diag(diag), grad)
            # The linear model's promised decrease; when even that is negligible we are at a minimum
            # (this also ends the loop on symmetric surfaces, where some motions change nothing).
            promised = 2.0 * float(grad @ delta) - float(delta @ jtj @ delta)
            if promised <= ftol * energy:
                at_minimum = True
                break
            full = np.zeros(7)
            full[:n_params] = delta
            candidate = _increment(full, pivot, fit_scale).compose(transform)
            c_dist, c_closest, c_normals = _surface_state(points, surface, candidate)
            c_energy = float(np.dot(c_dist, c_dist))
            if c_energy < energy:
                accepted = True
                break
            damping *= 8.0
        if not accepted:
            # Either the model promises no real decrease (a minimum), or eight ever shorter steps all
            # failed on this non-smooth objective (stalled: reported as not converged).
            converged = at_minimum
            break
        decrease = energy - c_energy
        reach = float(np.max(np.linalg.norm(lever, axis=1)))
        moved = np.linalg.norm(full[:3]) * reach + np.linalg.norm(full[3:6]) + abs(full[6]) * reach
        transform, dist, closest, normals, energy = candidate, c_dist, c_closest, c_normals, c_energy
        damping = max(damping / 4.0, 1e-12)
        if decrease <= ftol * max(energy, 1e-300) or energy == 0.0 or moved <= xtol:
            converged = True
            break
    return transform, dist, iterations, converged


def align_and_measure(
    scan_points: np.ndarray,
    scan_landmarks: np.ndarray,
    pred_vertices: np.ndarray,
    pred_faces: np.ndarray,
    pred_landmarks: np.ndarray,
    *,
    metrical: bool = False,
    unit: str = "mm",
    coarse_points: int = 6000,
) -> AlignmentResult:
    """Align a prediction to an (already cropped) scan and return the per-point errors in mm.

    The refinement first converges on an evenly strided subset of at most ``coarse_points`` scan
    points, then on all of them; the final objective and the errors use every point.
    """
    if unit not in UNIT_FACTORS:
        raise InvalidInputError(f"unknown mesh unit {unit!r}; expected one of {sorted(UNIT_FACTORS)}")
    points = np.asarray(scan_points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3 or len(points) == 0:
        raise InvalidInputError(f"the cropped scan has no points (shape {points.shape}); check the scan landmarks")
    fixed_scale = UNIT_FACTORS[unit] if metrical else None
    fit = similarity_procrustes(pred_landmarks, scan_landmarks, scale=None)
    initial = fit.transform
    if fixed_scale is not None:
        initial = similarity_procrustes(pred_landmarks, scan_landmarks, scale=fixed_scale).transform
    landmark_rms = float(np.sqrt(np.mean(np.sum((initial.apply(pred_landmarks) - scan_landmarks) ** 2, axis=1))))
    surface = TriangleMeshDistance(pred_vertices, pred_faces)
    transform = initial
    iterations = 0
    if len(points) > 2 * coarse_points:
        subset = points[:: math.ceil(len(points) / coarse_points)]
        transform, _, iterations, _ = refine_alignment(
            subset, surface, transform, fit_scale=not metrical, ftol=1e-5, xtol=1e-2
        )
    transform, errors, more, converged = refine_alignment(points, surface, transform, fit_scale=not metrical)
    return AlignmentResult(transform, errors, landmark_rms, iterations + more, converged)


# ----------------------------------------------------------------------------------------------
# Running over a dataset
# ----------------------------------------------------------------------------------------------


@dataclass
class ImageResult:
    subject: str
    challenge: str
    image: str
    status: str  # ok | missing | failed
    message: str = ""
    n_points: int = 0
    median_mm: float = float("nan")
    mean_mm: float = float("nan")
    std_mm: float = float("nan")
    scale: float = float("nan")
    landmark_rms_mm: float = float("nan")
    iterations: int = 0
    converged: bool = False
    errors: np.ndarray | None = field(default=None, repr=False)


@dataclass(frozen=True)
class _Task:
    item: NowImage
    scan: str
    scan_landmarks: str
    mesh: str | None
    landmarks: str | None
    metrical: bool
    unit: str


@functools.lru_cache(maxsize=2)
def _cropped_scan(scan_path: str, pp_path: str) -> tuple[np.ndarray, np.ndarray]:
    """Cropped scan points and the scan landmarks; cached because images come grouped by subject."""
    vertices = read_scan_vertices(scan_path)
    landmarks = read_pp_landmarks(pp_path)
    return vertices[crop_scan(vertices, landmarks)], landmarks


def _evaluate_task(task: _Task) -> ImageResult:
    item = task.item
    result = ImageResult(item.subject, item.challenge, item.image, status="ok")
    if task.mesh is None or task.landmarks is None:
        missing = [
            what
            for what, p in (("mesh (.obj/.ply)", task.mesh), ("landmarks (.npy/.txt)", task.landmarks))
            if p is None
        ]
        result.status = "missing"
        result.message = "missing predicted " + " and ".join(missing)
        return result
    try:
        points, scan_lmk = _cropped_scan(task.scan, task.scan_landmarks)
        vertices, faces = read_mesh(task.mesh)
        pred_lmk = read_prediction_landmarks(task.landmarks)
        out = align_and_measure(points, scan_lmk, vertices, faces, pred_lmk, metrical=task.metrical, unit=task.unit)
    except FacefuseError as exc:
        result.status = "failed"
        result.message = str(exc)
        return result
    except (ValueError, np.linalg.LinAlgError, MemoryError) as exc:
        result.status = "failed"
        result.message = f"{type(exc).__name__}: {exc}"
        return result
    errors = out.errors.astype(np.float32)
    result.n_points = len(errors)
    result.median_mm = float(np.median(out.errors))
    result.mean_mm = float(np.mean(out.errors))
    result.std_mm = float(np.std(out.errors))
    result.scale = float(out.transform.scale)
    result.landmark_rms_mm = out.landmark_rms
    result.iterations = out.iterations
    result.converged = out.converged
    result.errors = errors
    return result


def measure_prediction(layout: NowLayout, item: NowImage, vertices: np.ndarray, faces: np.ndarray,
                       landmarks7: np.ndarray, *, metrical: bool = False, unit: str = "mm") -> np.ndarray:
    """Per-point errors (mm) of one in-memory prediction, exactly as the evaluation measures its files."""
    scan, scan_landmarks = layout.subject_files(item.subject)
    points, scan_lmk = _cropped_scan(str(scan), str(scan_landmarks))
    result = align_and_measure(points, scan_lmk, np.asarray(vertices, np.float64), np.asarray(faces),
                               np.asarray(landmarks7, np.float64).reshape(7, 3), metrical=metrical, unit=unit)
    return result.errors.astype(np.float32)


@dataclass(frozen=True)
class NowEvalConfig:
    dataset: Path
    predictions: Path
    output: Path
    split: str = "val"
    challenge: str = "all"  # all | neutral | expression | occlusion | selfie
    metrical: bool = False
    unit: str = "mm"
    workers: int = 1
    progress: bool = True


def error_statistics(errors: np.ndarray) -> dict[str, float | int | None]:
    if len(errors) == 0:
        return {"median_mm": None, "mean_mm": None, "std_mm": None, "n_points": 0}
    e = np.asarray(errors, dtype=np.float64)
    return {
        "median_mm": float(np.median(e)),
        "mean_mm": float(np.mean(e)),
        "std_mm": float(np.std(e)),
        "n_points": len(e),
    }


def cumulative_curve(errors: np.ndarray, max_mm: float = CURVE_MAX_MM, n: int = 801) -> tuple[np.ndarray, np.ndarray]:
    """Percentage of errors <= x for x on [0, max_mm]."""
    grid = np.linspace(0.0, max_mm, n)
    if len(errors) == 0:
        return grid, np.zeros_like(grid)
    srt = np.sort(np.asarray(errors, dtype=np.float64))
    return grid, 100.0 * np.searchsorted(srt, grid, side="right") / len(srt)


def _write_curve_png(path: Path, curves: dict[str, np.ndarray], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5), dpi=100)
    ax = fig.add_subplot(111)
    for label, errs in curves.items():
        x, y = cumulative_curve(errs)
        ax.plot(x, y, label=f"{label} (median {np.median(errs):.3f} mm)" if len(errs) else label)
    ax.set_xlim(0, CURVE_MAX_MM)
    ax.set_ylim(0, 100)
    ax.set_xticks(np.arange(0, CURVE_MAX_MM + 1, 1.0))
    ax.set_yticks(np.arange(0, 101, 20.0))
    ax.set_xlabel("Error [mm]")
    ax.set_ylabel("Percentage of scan vertices")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


CSV_COLUMNS = (
    "subject", "challenge", "image", "status", "n_points", "median_mm", "mean_mm", "std_mm",
    "scale", "landmark_rms_mm", "iterations", "converged", "message",
)


def _run_tasks(tasks: Sequence[_Task], workers: int, progress: bool) -> list[ImageResult]:
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), desc="NoW eval", unit="img", disable=not progress, dynamic_ncols=True)
    results: list[ImageResult] = []
    try:
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                results.append(_evaluate_task(task))
                bar.update(1)
        else:
            # spawn: the parent may hold threads (torch, gRPC) that fork would copy half-locked.
            with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                try:
                    for res in pool.map(_evaluate_task, tasks, chunksize=1):
                        results.append(res)
                        bar.update(1)
                except BrokenProcessPool as exc:
                    raise LimitExceededError(
                        f"a NoW evaluation worker process died ({exc}); this is usually memory: "
                        f"rerun with fewer --workers (was {workers})"
                    ) from exc
    finally:
        bar.close()
    return results


def run_now_evaluation(config: NowEvalConfig) -> dict:
    """Evaluate every listed image that has a prediction; write CSV, PNG and JSON; return the summary."""
    if config.challenge != "all" and config.challenge not in CHALLENGES:
        raise InvalidInputError(f"unknown challenge {config.challenge!r}; expected all or one of {sorted(CHALLENGES)}")
    if config.unit not in UNIT_FACTORS:
        raise InvalidInputError(f"unknown mesh unit {config.unit!r}; expected one of {sorted(UNIT_FACTORS)}")
    predictions = Path(config.predictions)
    if not predictions.is_dir():
        raise InvalidInputError(f"predictions folder {predictions} does not exist or is not a folder")
    layout = NowLayout.discover(config.dataset, config.split)
    items = layout.images(None if config.challenge == "all" else CHALLENGES[config.challenge])
    if not items:
        raise InvalidInputError(f"{layout.image_list} lists no images for challenge {config.challenge!r}")
    subject_files = {s: layout.subject_files(s) for s in dict.fromkeys(i.subject for i in items)}
    tasks = []
    for item in sorted(items, key=lambda i: (i.subject, i.challenge, i.image)):
        mesh, lmk = prediction_files(predictions, item)
        scan, pp = subject_files[item.subject]
        tasks.append(_Task(item, str(scan), str(pp), None if mesh is None else str(mesh),
                           None if lmk is None else str(lmk), config.metrical, config.unit))
    results = _run_tasks(tasks, max(1, int(config.workers)), config.progress)
    evaluated = [r for r in results if r.status == "ok"]
    if not evaluated:
        n_missing = sum(r.status == "missing" for r in results)
        first_problem = next((f"{r.subject}/{r.challenge}/{r.image}: {r.message}" for r in results), "")
        raise InvalidInputError(
            f"no image could be evaluated: {n_missing} of {len(results)} predictions are missing under {predictions} "
            f"(expected <subject>/<challenge>/<image stem>.obj|.ply plus .npy|.txt); first: {first_problem}"
        )
    return _write_outputs(config, layout, results)


def _write_outputs(config: NowEvalConfig, layout: NowLayout, results: list[ImageResult]) -> dict:
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    evaluated = [r for r in results if r.status == "ok"]
    errors = [(r.challenge, r.errors) for r in evaluated if r.errors is not None]  # every "ok" result has them
    all_errors = np.concatenate([e for _, e in errors]) if errors else np.zeros(0, np.float32)
    per_challenge: dict[str, np.ndarray] = {}
    for cli_name, folder in CHALLENGES.items():
        errs = [e for challenge, e in errors if challenge == folder]
        if errs:
            per_challenge[cli_name] = np.concatenate(errs)

    csv_path = out / "now_per_image.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in results:
            row = {k: v for k, v in asdict(r).items() if k in CSV_COLUMNS}
            for k in ("median_mm", "mean_mm", "std_mm", "scale", "landmark_rms_mm"):
                row[k] = "" if not np.isfinite(row[k]) else f"{row[k]:.6f}"
            writer.writerow(row)

    png_path = out / "now_cumulative_error.png"
    curves = {"all": all_errors} if len(per_challenge) != 1 else {}
    curves.update(per_challenge)
    variant = "metrical" if config.metrical else "non-metrical"
    _write_curve_png(png_path, curves, f"NoW {config.split} ({variant}, {config.challenge})")

    missing = [r for r in results if r.status == "missing"]
    failed = [r for r in results if r.status == "failed"]
    files = {"per_image_csv": csv_path.name, "cumulative_error_png": png_path.name}
    summary = {
        "benchmark": "NoW",
        "evaluator": "facefuse built-in (exact point-to-triangle distances, Levenberg-Marquardt refinement)",
        "split": config.split,
        "challenge": config.challenge,
        "variant": variant,
        "unit": config.unit if config.metrical else None,
        "dataset": str(layout.root),
        "predictions": str(config.predictions),
        "n_images_listed": len(results),
        "n_images_evaluated": len(evaluated),
        "n_missing": len(missing),
        "n_failed": len(failed),
        "complete": not missing and not failed,
        "note": (
            "statistics over all per-vertex errors of the evaluated images"
            + ("" if not missing and not failed else
               "; missing and failed images are LEFT OUT, so these figures are not comparable to a complete run")
        ),
        "overall": error_statistics(all_errors),
        "per_challenge": {k: error_statistics(v) for k, v in per_challenge.items()},
        "missing": [f"{r.subject}/{r.challenge}/{r.image}: {r.message}" for r in missing],
        "failed": [f"{r.subject}/{r.challenge}/{r.image}: {r.message}" for r in failed],
        "files": files,
    }
    json_path = out / "now_summary.json"
    json_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    files["summary_json"] = json_path.name  # after writing: the summary does not list itself
    return summary


def summary_lines(summary: dict) -> Iterable[str]:
    """Human-readable lines for the CLI."""
    o = summary["overall"]
    yield (
        f"NoW {summary['split']} {summary['variant']} ({summary['challenge']}): "
        f"median {o['median_mm']:.4f} mm, mean {o['mean_mm']:.4f} mm, std {o['std_mm']:.4f} mm "
        f"over {summary['n_images_evaluated']} of {summary['n_images_listed']} images"
    )
    for name, st in summary["per_challenge"].items():
        yield f"  {name:<10} median {st['median_mm']:.4f}  mean {st['mean_mm']:.4f}  std {st['std_mm']:.4f}"
    if summary["n_missing"] or summary["n_failed"]:
        yield (
            f"WARNING: {summary['n_missing']} missing and {summary['n_failed']} failed predictions were left out; "
            "the figures are not comparable to a complete run (see the JSON summary)"
        )
