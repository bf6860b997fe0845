"""The open pack: a metric face from FaceMesh (mica's slot) and GP completions of what is hidden (ofer's slot).

Everything comes from registry packages through the model store (Apache-2.0 MediaPipe models and the
MediaPipe canonical face); see docs/open-pack.md for the method, its limits and what was measured.

* :class:`OpenShapeBackend` turns the 468 FaceMesh points of a face into a metric mesh in the canonical
  face's pose: millimetres per pixel from the iris (a human iris is about 11.7 mm across), pose removed
  by a weighted rigid Procrustes fit to the canonical face (MediaPipe's own Procrustes landmark weights),
  expression kept as observed.
* :class:`OpenGenerativeBackend` samples completions from a Gaussian-process morphable model of the
  canonical face (:mod:`facefuse.models.gpmm`) conditioned on the visible vertices of that metric mesh,
  and ranks candidates by their log posterior density (GP prior + robust agreement with the mesh).
* :func:`open_shape_space` is the space both report in: template = canonical face, basis = identity,
  so a "shape" is the (V·3,) displacement from the canonical face in mm, vertex-major x, y, z. Exact
  for any mesh and the same numbers in every process and on every machine (see the docs for why an
  eigenbasis was not used).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from facefuse.assets.canonical_face import TOPOLOGY, CanonicalFace, load_canonical_face
from facefuse.errors import InvalidInputError, LimitExceededError
from facefuse.face.types import AlignedFace, Detection
from facefuse.fusion.space import ShapeSpace
from facefuse.fusion.visibility import Visibility
from facefuse.geometry import umeyama
from facefuse.models.gpmm import GaussianProcessMorphableModel, mirror_map
from facefuse.models.landmark_fit import fit_shape_to_landmarks
from facefuse.packs.base import BackendStatus, FusionSetup, ShapeResult, StopCheck

if TYPE_CHECKING:  # FaceMesh (LiteRT, OpenCV) is imported only where the generative backend runs it.
    from facefuse.face.facemesh import FaceMesh

PACK = "open"
NUM_VERTICES = 468
IRIS_DIAMETER_MM = 11.7
"""Mean adult horizontal visible iris diameter (white-to-white), nearly constant across people (sd ≈ 0.5 mm)."""
IRIS_SCALE_RANGE = (0.85, 1.18)
"""The iris scale is used only when it lies within this factor of the default (canonical-size) scale. Adult
outer eye-corner widths have a spread of about ±5 % (sd) around the canonical face's, so this band is
about three standard deviations: beyond it the iris reading is more likely wrong (eyes closed or
covered, a misfit, a face too small for the iris model) than the face that unusual."""
IRIS_MIN_CONFIDENCE = 0.3
"""An iris reading with a lower confidence (:func:`iris_scale`) is not used: the default scale is."""
IRIS_EYE_TOLERANCE = 0.08
"""Relative difference of the two eyes' corrected iris diameters tolerated in full; the confidence falls
linearly from there to 0 at :data:`IRIS_EYE_LIMIT`, and beyond the tolerance only the more frontal eye
(the wider one in the image) is used."""
IRIS_EYE_LIMIT = 0.35
IRIS_FULL_CONFIDENCE_PX = 10.0
"""Iris diameters of at least this many pixels are read at full confidence; below it the confidence falls
linearly to 0 at :data:`IRIS_MIN_DIAMETER_PX` (the iris model sees a 64 px eye crop; a 4 px iris is noise)."""
IRIS_MIN_DIAMETER_PX = 3.0
IRIS_FRONTAL_DEG = 20.0
"""Head rotations (angle between the face's forward axis and the view) up to this are read at full
confidence; the confidence falls linearly to 0 at :data:`IRIS_MAX_DEG`, where the foreshortening
correction (1/cos) is too steep to trust a pixel-level reading."""
IRIS_MAX_DEG = 60.0
KPT7_INDICES = (33, 133, 362, 263, 2, 61, 291)
"""NoW's 7 points on the 468 topology, in FLAME's NoW order (iBUG 36, 39, 42, 45, 33, 48, 54): image-left
eye outer and inner corner, image-right eye inner and outer corner, nose bottom (subnasale), image-left
and image-right mouth corner."""
OBSERVATION_NOISE_MM = 1.0
"""Per-coordinate noise of a visible metric FaceMesh vertex, as the GP sees it (chosen, see the docs)."""
IMPUTED_NOISE_MM = 1.5
"""Per-coordinate noise of a hidden vertex of one noise-imputed FaceMesh completion, as the GP sees it."""
RANK_IMPUTATIONS = 8
RANK_SEED = 0
"""The ranker compares hidden vertices with the mean of this many imputed completions, drawn with this
seed, so a candidate's score depends on the face and the candidate only."""
ROBUST_DOF = 4.0
"""Degrees of freedom of the Student-t agreement term of :meth:`OpenGenerativeBackend.rank`."""
MAX_SAMPLES = 1024
OPEN_RIDGE_MM2 = 1e-6
"""Ridge of the open space's projections: the identity basis needs none to be solvable, so only a trace
(projections shrink by 1e-6 relative) instead of FLAME's unit-variance prior."""
VISIBLE = 0.5
"""Vertices with visibility ≥ this are observed by the GP."""

REGION_NAMES_FLAME = {
    "forehead": "forehead", "left_eye": "left_eye_region", "right_eye": "right_eye_region",
    "nose": "nose", "lips": "lips", "left_cheek": "left_cheek", "right_cheek": "right_cheek",
}
"""MediaPipe visibility region (fusion/visibility.py) -> the FLAME mask name the region gets in the open space."""


# --------------------------------------------------------------------------- geometry


@dataclass
class MetricFace:
    """A face's metric mesh in the canonical face's frame (mm) and how it was made."""

    vertices_mm: np.ndarray  # (468, 3) float64
    mm_per_px: float
    scale_source: str  # "iris" | "default" (canonical size), see SCALE_SOURCES
    rotation: np.ndarray  # (3, 3): camera (x right, y up, z toward the viewer) -> canonical frame
    fit_rms_mm: float  # weighted RMS distance to the canonical face after the fit
    scale_confidence: float = 0.0  # [0, 1]: the iris reading's confidence when used, 0 for the default
    iris: IrisScale | None = None  # the iris reading, used or not (None without iris points)
    translation_mm: np.ndarray | None = None  # (3,): with ``rotation``, camera-frame mm -> canonical frame

    def head_rotation(self) -> np.ndarray:
        """(3,3) the head pose kept: canonical (model) frame -> OpenCV camera (x right, y down, z forward)."""
        return np.diag([1.0, -1.0, -1.0]) @ self.rotation.T


def camera_points(landmarks: np.ndarray) -> np.ndarray:
    """FaceMesh (x right, y down, z away; pixels) -> right-handed (x right, y up, z toward the viewer)."""
    points = np.asarray(landmarks, dtype=np.float64)[:NUM_VERTICES, :3]
    return points * np.array([1.0, -1.0, -1.0])


def iris_mm_per_px(iris: np.ndarray | None) -> float | None:
    """11.7 mm / the mean of the valid iris diameters in pixels, or None when none is valid."""
    if iris is None:
        return None
    diameters = np.asarray(iris, dtype=np.float64).reshape(2, 3)[:, 2]
    valid = diameters[np.isfinite(diameters) & (diameters > 1.0)]
    return IRIS_DIAMETER_MM / float(valid.mean()) if valid.size else None


@dataclass(frozen=True)
class IrisScale:
    """One face's iris reading: millimetres per pixel, how far to trust it and why."""

    mm_per_px: float | None  # 11.7 mm / the corrected diameter; None when no eye has a valid reading
    confidence: float  # [0, 1], the product of the factors below
    eyes: str  # "both" | "image-left" | "image-right" | "none": whose diameters were used
    diameters_px: tuple[float, float]  # per eye (image-left, image-right), corrected for head rotation; nan if invalid
    foreshortening: float  # measured / true diameter expected from the head pose (1 = frontal)
    rotation_deg: float  # angle between the face's forward axis and the view direction
    eye_disagreement: float  # |d_left - d_right| / their mean (0 with one eye)
    factors: dict[str, float]  # resolution, pose, agreement: each in [0, 1]


def _ramp(value: float, full: float, zero: float) -> float:
    """1 at ``full``, 0 at ``zero``, linear between (either order), clipped."""
    return float(np.clip((value - zero) / (full - zero), 0.0, 1.0))


def iris_foreshortening(rotation: np.ndarray, eye_axis_xy: np.ndarray) -> float:
    """Measured / true iris diameter for a head pose, as the iris model measures it.

    The iris is taken as a disc facing the face's forward axis (the gaze follows the head; see the docs
    for when it does not). Under the pose ``rotation`` (camera -> canonical frame, as :class:`MetricFace`)
    the disc projects to an ellipse: the full diameter across the tilt, times cos(angle to the view)
    along it. The iris model reports the mean of two chords through the centre, one along the eye
    (``eye_axis_xy``, image pixels, y down) and one across it; this is that mean over the true diameter.
    """
    normal = np.asarray(rotation, dtype=np.float64)[2]  # the canonical +z (forward) axis in camera space
    cos_view = float(np.clip(abs(normal[2]), 1e-3, 1.0))
    tilt = np.array([normal[0], -normal[1]])  # image direction (y down) of the foreshortened axis
    along = np.asarray(eye_axis_xy, dtype=np.float64)
    along = along / max(float(np.linalg.norm(along)), 1e-12)
    chords = []
    for u in (along, np.array([-along[1], along[0]])):
        norm = float(np.linalg.norm(tilt))
        if norm < 1e-9:
            chords.append(1.0)
            continue
        minor = tilt / norm
        c_minor = float(u @ minor)
        c_major = float(np.sqrt(max(1.0 - c_minor**2, 0.0)))
        chords.append(1.0 / float(np.sqrt(c_major**2 + (c_minor / cos_view) ** 2)))
    return float(np.mean(chords))


def iris_scale(iris: np.ndarray | None, landmarks: np.ndarray, rotation: np.ndarray) -> IrisScale:
    """The iris reading of one face, corrected for head rotation, with both eyes checked against each other.

    ``iris``: (2, 3) per eye (image-left, image-right) centre x, y and diameter in pixels
    (``Detection.iris``); ``landmarks``: the 468 FaceMesh points (eye corners give each eye's axis and
    width); ``rotation``: the head pose of the Procrustes fit. Confidence = resolution x pose x agreement
    (:data:`IRIS_FULL_CONFIDENCE_PX`, :data:`IRIS_FRONTAL_DEG`, :data:`IRIS_EYE_TOLERANCE`).
    """
    nan2 = (float("nan"), float("nan"))
    if iris is None:
        return IrisScale(None, 0.0, "none", nan2, 1.0, 0.0, 0.0, {})
    raw = np.asarray(iris, dtype=np.float64).reshape(2, 3)[:, 2]
    from facefuse.face.facemesh import EYE_CORNERS_IMAGE_LEFT, EYE_CORNERS_IMAGE_RIGHT

    points = np.asarray(landmarks, dtype=np.float64)[:, :2]
    # Each eye's axis as the iris model's crop takes it: from its first corner to its second.
    axes = [points[b] - points[a] for a, b in (EYE_CORNERS_IMAGE_LEFT, EYE_CORNERS_IMAGE_RIGHT)]
    widths = np.array([float(np.linalg.norm(a)) for a in axes])
    normal_z = float(np.clip(abs(np.asarray(rotation, dtype=np.float64)[2, 2]), 0.0, 1.0))
    rotation_deg = float(np.degrees(np.arccos(normal_z)))
    shortening = np.array([iris_foreshortening(rotation, a) for a in axes])
    valid = np.isfinite(raw) & (raw > IRIS_MIN_DIAMETER_PX) & (widths > 0)
    corrected = np.where(valid, raw / shortening, np.nan)
    if not valid.any():
        return IrisScale(None, 0.0, "none", nan2, float(shortening.mean()), rotation_deg, 0.0, {})
    pose = _ramp(rotation_deg, IRIS_FRONTAL_DEG, IRIS_MAX_DEG)
    names = ("image-left", "image-right")
    if valid.all():
        disagreement = float(abs(corrected[0] - corrected[1]) / corrected.mean())
        agreement = _ramp(disagreement, IRIS_EYE_TOLERANCE, IRIS_EYE_LIMIT)
        if disagreement <= IRIS_EYE_TOLERANCE:
            used, eyes = [0, 1], "both"
        else:  # the more frontal eye: the wider one in the image (the far eye turns away and hides behind the nose)
            k = int(np.argmax(widths))
            used, eyes = [k], names[k]
    else:
        disagreement, agreement = 0.0, 0.5  # one eye alone cannot be checked: half trust at most
        k = int(np.flatnonzero(valid)[0])
        used, eyes = [k], names[k]
    diameter = float(np.mean(corrected[used]))
    resolution = _ramp(float(np.mean(raw[used])), IRIS_FULL_CONFIDENCE_PX, IRIS_MIN_DIAMETER_PX)
    factors = {"resolution": resolution, "pose": pose, "agreement": agreement}
    confidence = float(np.clip(resolution * pose * agreement, 0.0, 1.0))
    return IrisScale(IRIS_DIAMETER_MM / diameter, confidence, eyes, (float(corrected[0]), float(corrected[1])),
                     float(shortening[used].mean()), rotation_deg, disagreement, factors)


def metric_face(landmarks: np.ndarray, canonical: CanonicalFace, *, iris: np.ndarray | None = None,
                visibility: np.ndarray | None = None) -> MetricFace:
    """Metric scale (iris, else the default: canonical size), then pose removed by a rigid fit to the canonical face.

    The iris is used when :func:`iris_scale` trusts it (confidence >= :data:`IRIS_MIN_CONFIDENCE`) and it
    lies within :data:`IRIS_SCALE_RANGE` of the canonical-size scale; otherwise the default scale is.

    Weights: the canonical model's Procrustes weights, times ``visibility`` (V,) when given; if the
    visible weighted landmarks carry almost no weight, every visible vertex counts equally.
    """
    points = camera_points(landmarks)
    weights = canonical.procrustes_weights()
    if visibility is not None:
        weights = weights * np.clip(np.asarray(visibility, dtype=np.float64), 0.0, 1.0)
        if weights.sum() < 0.2 * canonical.landmark_weights.sum():
            weights = np.clip(np.asarray(visibility, dtype=np.float64), 0.0, 1.0)
    if weights.sum() <= 0:
        raise InvalidInputError("metric face: no visible landmark to fit the pose on (visibility is all zero)")
    size_fit = umeyama(points, canonical.vertices_mm, weights)
    size_scale = size_fit.scale
    if size_scale <= 0:
        raise InvalidInputError("metric face: the landmarks are degenerate (no positive scale fits the canonical face)")
    mm_per_px, source, confidence = size_scale, "default", 0.0
    reading = None if iris is None else iris_scale(iris, landmarks, size_fit.rotation)
    if (reading is not None and reading.mm_per_px is not None and reading.confidence >= IRIS_MIN_CONFIDENCE
            and IRIS_SCALE_RANGE[0] <= reading.mm_per_px / size_scale <= IRIS_SCALE_RANGE[1]):
        mm_per_px, source, confidence = reading.mm_per_px, "iris", reading.confidence
    metric = points * mm_per_px
    pose = umeyama(metric, canonical.vertices_mm, weights, scale=1.0)
    rotation, vertices = pose.rotation, pose.apply(metric)
    rms = float(np.sqrt((weights @ ((vertices - canonical.vertices_mm) ** 2).sum(axis=1)) / weights.sum()))
    return MetricFace(vertices, float(mm_per_px), source, rotation, rms, confidence, reading, pose.translation)


SHAPE_FITS = ("facemesh", "model", "model+detail")
"""How :class:`OpenShapeBackend` makes the metric mesh: ``facemesh`` trusts FaceMesh's x, y and z (the mesh
before issue 16); ``model`` is the GP morphable model fitted to the 2-D landmarks and the face contour
jointly with the head pose, FaceMesh's z a weak prior; ``model+detail`` is that fit with each seen
landmark's image position put back (what the model's span cannot express, e.g. parted lips), depth from
the fit. See docs/open-pack.md for which measured better."""
DEFAULT_SHAPE_FIT = "facemesh"
DEFAULT_MIRROR_AVERAGE = True
"""Whether the loaders mirror-average FaceMesh's points (measured to make people's meshes more distinct,
docs/open-pack.md); needs LiteRT and OpenCV in the service that runs the deterministic backend."""
LANDMARK_SD_MM = 1.0
"""Per-coordinate sd of a seen FaceMesh landmark's image position in the fit (≈ 0.7 px at 1.5 mm/px)."""
DEPTH_SD_MM = 4.0
"""Sd of FaceMesh's relative depth in the fit: a weak prior (its depth carries little identity)."""
FIT_ITERATIONS = 8
FIT_RANK: int | None = None
"""Leading GP components the fit uses (None: all the GP keeps); a cut never splits a degenerate (y, z) pair."""


def face_oval() -> tuple[int, ...]:
    """The closed loop of FaceMesh's face-contour landmarks (the silhouette), from the visibility module."""
    from facefuse.fusion.visibility import _SILHOUETTE

    return tuple(_SILHOUETTE)


def fitted_metric_face(landmarks: np.ndarray, canonical: CanonicalFace, gpmm: GaussianProcessMorphableModel, *,
                       iris: np.ndarray | None = None, visibility: np.ndarray | None = None,
                       detail: bool = False) -> MetricFace:
    """The metric mesh from the shape model fitted to the 2-D landmarks and contour with the head pose.

    Scale and the starting pose come from :func:`metric_face` (iris or canonical size; rigid fit); then
    :func:`facefuse.models.landmark_fit.fit_shape_to_landmarks` fits the GP's low-rank shape and the pose to
    FaceMesh's x, y (weight = visibility), the face oval by its normal only, FaceMesh's z as a weak prior.
    ``detail``: seen landmarks keep their observed image position (blended by visibility), depth from the fit.
    """
    start = metric_face(landmarks, canonical, iris=iris, visibility=visibility)
    observed = camera_points(landmarks) * start.mm_per_px
    to_canonical = start.rotation
    offset = start.vertices_mm[0] - to_canonical @ observed[0]
    weights = np.ones(NUM_VERTICES) if visibility is None else np.clip(np.asarray(visibility, np.float64), 0.0, 1.0)
    rank = gpmm.rank if FIT_RANK is None else min(FIT_RANK, gpmm.rank)
    while rank < gpmm.rank and np.isclose(gpmm.eigenvalues[rank], gpmm.eigenvalues[rank - 1], rtol=1e-9, atol=0.0):
        rank += 1
    fit = fit_shape_to_landmarks(
        gpmm.mean_mm, gpmm.basis[:, :rank], gpmm.eigenvalues[:rank], observed, weights,
        to_canonical.T, -to_canonical.T @ offset,
        landmark_sd_mm=float(np.hypot(LANDMARK_SD_MM, np.sqrt(gpmm.residual_variance))),
        depth_sd_mm=float(np.hypot(DEPTH_SD_MM, np.sqrt(gpmm.residual_variance))),
        contour=face_oval(), iterations=FIT_ITERATIONS)
    vertices = fit.vertices_mm
    if detail:
        camera = vertices @ fit.rotation.T + fit.translation
        camera[:, :2] = weights[:, None] * observed[:, :2] + (1.0 - weights[:, None]) * camera[:, :2]
        vertices = (camera - fit.translation) @ fit.rotation
    pw = canonical.procrustes_weights()
    rms = float(np.sqrt((pw @ ((vertices - canonical.vertices_mm) ** 2).sum(axis=1)) / pw.sum()))
    return MetricFace(vertices, start.mm_per_px, start.scale_source, fit.rotation.T, rms,
                      start.scale_confidence, start.iris, -(fit.rotation.T @ fit.translation))


def kpt7(vertices_mm: np.ndarray) -> np.ndarray:
    return np.asarray(vertices_mm, dtype=np.float32)[list(KPT7_INDICES)]


def mediapipe_regions(canonical: CanonicalFace) -> dict[str, np.ndarray]:
    """Vertex index sets named like FLAME's masks, from the visibility regions' landmark polygons.

    Each polygon of :data:`facefuse.fusion.visibility.MEDIAPIPE_REGIONS` is drawn on the frontal view of
    the canonical face (x, −y); a region holds the vertices inside it plus the polygon's own landmarks.
    ``eye_region`` is both eyes; ``face`` is every vertex (FaceMesh covers the face only).
    """
    from skimage.measure import points_in_poly

    from facefuse.fusion.visibility import MEDIAPIPE_REGIONS, region_polygon

    frontal = canonical.vertices_mm[:, :2] * np.array([1.0, -1.0])
    regions: dict[str, np.ndarray] = {}
    for name, flame_name in REGION_NAMES_FLAME.items():
        inside = points_in_poly(frontal, region_polygon(name, frontal))
        inside[list(MEDIAPIPE_REGIONS[name].indices)] = True
        regions[flame_name] = np.flatnonzero(inside)
    regions["eye_region"] = np.union1d(regions["left_eye_region"], regions["right_eye_region"])
    regions["face"] = np.arange(NUM_VERTICES)
    return regions


def vertex_visibility_from_mask(
    occluder_mask: np.ndarray, landmarks: np.ndarray, *, radius_px: float = 2.0
) -> np.ndarray:
    """(468,) visibility per FaceMesh vertex: the clear fraction of 9 pixels around its landmark.

    ``occluder_mask`` (H, W) is true (or > 0) where something covers the face; pixels outside the
    image count as not seen. A direct per-vertex alternative to the region visibilities for this topology.
    """
    mask = np.asarray(occluder_mask)
    if mask.ndim != 2:
        raise InvalidInputError(f"occluder mask: expected (H, W), got {mask.shape}")
    covered = mask > (127 if mask.dtype == np.uint8 and mask.max() > 1 else 0)
    points = np.asarray(landmarks, dtype=np.float64)[:NUM_VERTICES, :2]
    offsets = np.array([(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1)], np.float64) * radius_px
    cols = np.rint(points[:, None, 0] + offsets[None, :, 0]).astype(np.int64)
    rows = np.rint(points[:, None, 1] + offsets[None, :, 1]).astype(np.int64)
    inside = (rows >= 0) & (rows < covered.shape[0]) & (cols >= 0) & (cols < covered.shape[1])
    clear = np.zeros(rows.shape, bool)
    clear[inside] = ~covered[rows[inside], cols[inside]]
    return clear.mean(axis=1)


# --------------------------------------------------------------------------- the open space and the GP


_LOCK = threading.Lock()
OPEN_DEFAULT_STRATEGY = "region"
"""Visible regions from the deterministic mesh, hidden ones from the GP completion (docs/open-pack.md)."""
_SPACES: dict[int, ShapeSpace] = {}
_GPMMS: dict[int, GaussianProcessMorphableModel] = {}


def open_shape_space(store=None, canonical: CanonicalFace | None = None) -> ShapeSpace:
    """template = canonical face (m), basis = identity (1 mm per coefficient), K = 3·468; one per process."""
    canonical = canonical if canonical is not None else load_canonical_face(store)
    with _LOCK:
        key = id(canonical)
        if key not in _SPACES:
            k = 3 * NUM_VERTICES
            basis = (np.eye(k) / 1000.0).reshape(NUM_VERTICES, 3, k)
            _SPACES[key] = ShapeSpace(canonical.vertices_mm / 1000.0, basis, canonical.faces,
                                      regions=mediapipe_regions(canonical), topology=TOPOLOGY, ridge_mm2=OPEN_RIDGE_MM2)
        return _SPACES[key]


def open_gpmm(canonical: CanonicalFace) -> GaussianProcessMorphableModel:
    """The GP morphable model of the canonical face with the default kernels; one per process."""
    with _LOCK:
        key = id(canonical)
        if key not in _GPMMS:
            _GPMMS[key] = GaussianProcessMorphableModel.build(canonical.vertices_mm)
        return _GPMMS[key]


def shape_from_vertices(vertices_mm: np.ndarray, canonical: CanonicalFace) -> np.ndarray:
    """(..., 468, 3) mm -> (..., 1404) float32 open-space coefficients (the displacement in mm)."""
    disp = np.asarray(vertices_mm, dtype=np.float64) - canonical.vertices_mm
    return disp.reshape(*disp.shape[:-2], 3 * NUM_VERTICES).astype(np.float32)


def vertices_from_shape(shape: np.ndarray, canonical: CanonicalFace) -> np.ndarray:
    array = np.asarray(shape, dtype=np.float64)
    return canonical.vertices_mm + array.reshape(*array.shape[:-1], NUM_VERTICES, 3)


def _landmarks_of(face: AlignedFace | Detection, position: int) -> tuple[np.ndarray, np.ndarray | None]:
    detection = face.detection if isinstance(face, AlignedFace) else face
    landmarks = detection.landmarks
    if (
        landmarks is None
        or np.ndim(landmarks) != 2
        or np.shape(landmarks)[0] < NUM_VERTICES
        or np.shape(landmarks)[1] < 3
    ):
        raise InvalidInputError(
            f"face {position}: the open pack needs the 468 FaceMesh landmarks (x, y, z) of the face, got "
            f"{None if landmarks is None else np.shape(landmarks)} from detector {detection.detector!r}; "
            "use the blazeface-facemesh front end (the SCRFD detector gives 5 points only)")
    if not np.all(np.isfinite(np.asarray(landmarks)[:NUM_VERTICES, :3])):
        raise InvalidInputError(f"face {position}: the FaceMesh landmarks contain NaN or infinite values")
    return np.asarray(landmarks, dtype=np.float64), detection.iris


def _check_visibility(visibility: np.ndarray | Visibility | None) -> np.ndarray | None:
    """Per-vertex visibility (468,): given directly, or from a ``Visibility``'s per-vertex values or regions."""
    if visibility is None:
        return None
    if isinstance(visibility, Visibility):
        if visibility.per_vertex is None:
            return np.clip(open_shape_space().region_weights(visibility), 0.0, 1.0)
        visibility = visibility.per_vertex
    array = np.asarray(visibility, dtype=np.float64)
    if array.shape != (NUM_VERTICES,) or not np.all(np.isfinite(array)):
        raise InvalidInputError(f"visibility: expected ({NUM_VERTICES},) finite per-vertex values in "
                                f"[0, 1], got {array.shape}")
    return np.clip(array, 0.0, 1.0)


class OpenShapeBackend:
    """The mica slot of the open pack: FaceMesh points -> a metric mesh in the canonical pose.

    With ``mesh`` (a FaceMesh model) the points are first mirror-averaged: FaceMesh also runs on the
    mirrored box crop and the two readings are averaged (:mod:`facefuse.face.mirror`); a face message
    without its box crop keeps its own points.
    """

    def __init__(self, canonical: CanonicalFace, device: str = "cpu", shape_fit: str = DEFAULT_SHAPE_FIT,
                 mesh: FaceMesh | None = None) -> None:
        if shape_fit not in SHAPE_FITS:
            raise InvalidInputError(f"shape fit: expected one of {SHAPE_FITS}, got {shape_fit!r}")
        self.canonical = canonical
        self.shape_fit = shape_fit
        self.gpmm = None if shape_fit == "facemesh" else open_gpmm(canonical)
        self.mesh = mesh
        self.mirror = mirror_map(canonical.vertices_mm) if mesh is not None else None
        self.status = BackendStatus(
            "mica", "facemesh-metric", PACK, True, False, "ready", device="cpu",
            details={"topology": TOPOLOGY, "vertices": str(NUM_VERTICES),
                     "scale": f"iris {IRIS_DIAMETER_MM} mm (head-rotation corrected, both eyes checked), else default",
                     "shape": "displacement from the canonical face, mm (1404)", "shape_fit": shape_fit,
                     "mirror_average": "on" if mesh is not None else "off"})

    def landmarks(self, face: AlignedFace | Detection, position: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
        """The face's checked 468 points (mirror-averaged when this backend has a FaceMesh model) and its iris."""
        landmarks, iris = _landmarks_of(face, position)
        if self.mesh is not None and self.mirror is not None and isinstance(face, AlignedFace):
            from facefuse.face.mirror import mirror_averaged_face_landmarks

            averaged = mirror_averaged_face_landmarks(self.mesh, face, self.mirror)
            if averaged is not None:
                landmarks = averaged
        return landmarks, iris

    def reconstruct(
        self, face: AlignedFace | Detection, visibility: np.ndarray | None = None, position: int = 0
    ) -> MetricFace:
        landmarks, iris = self.landmarks(face, position)
        if self.gpmm is not None:
            return fitted_metric_face(landmarks, self.canonical, self.gpmm, iris=iris,
                                      visibility=_check_visibility(visibility), detail=self.shape_fit == "model+detail")
        return metric_face(landmarks, self.canonical, iris=iris, visibility=_check_visibility(visibility))

    def predict(self, faces: Sequence[AlignedFace]) -> list[ShapeResult]:
        results = []
        for position, face in enumerate(faces):
            metric = self.reconstruct(face, position=position)
            vertices = metric.vertices_mm.astype(np.float32)
            results.append(ShapeResult(
                vertices_mm=vertices, faces=self.canonical.faces, topology=TOPOLOGY,
                shape=shape_from_vertices(metric.vertices_mm, self.canonical), kpt7_mm=kpt7(vertices),
                uvs=self.canonical.uvs, scale_source=metric.scale_source, scale_confidence=metric.scale_confidence))
        return results


class OpenGenerativeBackend:
    """The ofer slot of the open pack: completions of the hidden part given the visible part.

    With hidden vertices and a FaceMesh model, each sample is one draw of the GP posterior conditioned
    on the visible vertices of the deterministic mesh and on the hidden vertices of one noise-imputed
    FaceMesh completion (:mod:`facefuse.face.imputation`); without either, a draw of the GP posterior
    given the visible vertices alone.
    """

    def __init__(self, shape_backend: OpenShapeBackend, gpmm: GaussianProcessMorphableModel,
                 mesh: FaceMesh | None = None, noise_mm: float = OBSERVATION_NOISE_MM,
                 imputed_noise_mm: float = IMPUTED_NOISE_MM) -> None:
        self.shape_backend = shape_backend
        self.canonical = shape_backend.canonical
        self.gpmm = gpmm
        self.mesh = mesh
        self.noise_mm = float(noise_mm)
        self.imputed_noise_mm = float(imputed_noise_mm)
        self.status = BackendStatus(
            "ofer", "gpmm+imputation" if mesh is not None else "gpmm", PACK, True, False, "ready", device="cpu",
            details={"topology": TOPOLOGY, "rank": str(gpmm.rank), "explained": f"{gpmm.explained_fraction:.3f}",
                     "noise_mm": str(self.noise_mm), "imputed_noise_mm": str(self.imputed_noise_mm),
                     "imputation": "facemesh, uniform noise" if mesh is not None else "off"})

    def observation(self, face: AlignedFace, start_shape: np.ndarray | None) -> np.ndarray:
        """(468, 3) mm: the deterministic mesh (``start_shape`` when the gateway passes it, else recomputed)."""
        if start_shape is None:
            return self.shape_backend.reconstruct(face).vertices_mm
        shape = np.asarray(start_shape, dtype=np.float64).reshape(-1)
        if shape.shape != (3 * NUM_VERTICES,) or not np.all(np.isfinite(shape)):
            raise InvalidInputError(f"start_shape: expected ({3 * NUM_VERTICES},) finite open-space coefficients, "
                                    f"got {np.shape(start_shape)}")
        return vertices_from_shape(shape, self.canonical)

    def visible_frame(self, observed: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(R, t) that re-fits the observed mesh to the canonical face on its visible Procrustes landmarks.

        The deterministic backend fits the pose on all its landmarks (it is not told what is hidden), so
        an occluder can tilt it; the GP's mean is the canonical face in its own pose, so conditioning is
        done in the frame fitted on visible landmarks only, and samples are mapped back (R⁻¹, −t) into
        the deterministic mesh's frame, where the visible parts must agree with it.
        """
        fit = self.canonical.procrustes_weights() * weights
        if fit.sum() < 0.2 * self.canonical.landmark_weights.sum():
            fit = weights.copy()
        if np.all(weights >= 1.0) or fit.sum() <= 0:
            return np.eye(3), np.zeros(3)
        frame = umeyama(observed, self.canonical.vertices_mm, fit, scale=1.0)
        return frame.rotation, frame.translation

    def completions(self, face: AlignedFace | Detection, observed: np.ndarray, weights: np.ndarray, num: int,
                    generator: np.random.Generator, stop_check: StopCheck | None = None) -> np.ndarray | None:
        """(num, 468, 3) mm noise-imputed FaceMesh meshes, each similarity-fitted to ``observed`` on its
        visible vertices; None when nothing is hidden or there is no FaceMesh model or crop to run (a face
        message without its box crop arrives as zeros)."""
        hidden = weights < VISIBLE
        if (self.mesh is None or not isinstance(face, AlignedFace) or not hidden.any() or hidden.all()
                or not np.any(face.crop_box224)):
            return None
        from facefuse.face.imputation import noise_imputed_landmarks

        landmarks = noise_imputed_landmarks(self.mesh, face, hidden, self.canonical.faces, num, generator, stop_check)
        iris = face.detection.iris
        out = np.empty((int(num), NUM_VERTICES, 3))
        for i, points in enumerate(landmarks):
            vertices = metric_face(points, self.canonical, iris=iris).vertices_mm
            out[i] = umeyama(vertices, observed, (~hidden).astype(np.float64)).apply(vertices)
        return out

    def sample(self, face: AlignedFace, num_samples: int, *, mode: str = "", steps: int = 0, seed: int = 0,
               start_shape: np.ndarray | None = None, start_t0: int = 0, guide_shape: np.ndarray | None = None,
               guide_strength: float = 0.0, visibility: np.ndarray | None = None,
               stop_check: StopCheck | None = None) -> np.ndarray:
        """(N, 1404) float32 samples. ``mode``, ``steps``, ``start_t0`` and ``guide_*`` are diffusion-sampler
        settings and do not apply here (ignored). The generator seeded by ``seed`` draws the imputation
        noise first, then the GP noise. ``stop_check`` runs before each FaceMesh completion and before
        the GP; its exception ends the work."""
        if not 1 <= int(num_samples) <= MAX_SAMPLES:
            raise (LimitExceededError if int(num_samples) > MAX_SAMPLES else InvalidInputError)(
                f"num_samples: expected 1..{MAX_SAMPLES}, got {num_samples}")
        weights = _check_visibility(visibility)
        weights = np.ones(NUM_VERTICES) if weights is None else weights
        observed = self.observation(face, start_shape)
        rotation, translation = self.visible_frame(observed, weights)
        generator = np.random.default_rng(int(seed) & 0xFFFFFFFFFFFFFFFF)
        completions = self.completions(face, observed, weights, int(num_samples), generator, stop_check)
        if stop_check is not None:
            stop_check()
        if completions is None:
            posterior = self.gpmm.condition(observed @ rotation.T + translation, weights, self.noise_mm)
        else:
            hidden = (weights < VISIBLE)[None, :, None]
            targets = np.where(hidden, completions, observed[None])
            posterior = self.gpmm.condition(
                targets @ rotation.T + translation, weights, self.noise_mm, self.imputed_noise_mm
            )
        samples = (posterior.sample_mm(int(num_samples), generator) - translation) @ rotation  # back: R⁻¹(x − t)
        return shape_from_vertices(samples, self.canonical)

    def rank(self, face: AlignedFace, candidates: np.ndarray, visibility: np.ndarray | None = None,
             stop_check: StopCheck | None = None) -> np.ndarray:
        """(N,) log density up to a constant: −½·GP Mahalanobis − Σ Student-t misfits, to the deterministic
        mesh on visible vertices and, on hidden ones, to the mean of :data:`RANK_IMPUTATIONS` noise-imputed
        completions drawn with a fixed seed. Higher is better; each score depends on its own candidate only."""
        array = np.asarray(candidates, dtype=np.float64)
        if array.ndim != 2 or array.shape[1] != 3 * NUM_VERTICES or not np.all(np.isfinite(array)):
            raise InvalidInputError(f"candidates: expected (N, {3 * NUM_VERTICES}) finite open-space shapes, "
                                    f"got {np.shape(candidates)}")
        weights = _check_visibility(visibility)
        weights = np.ones(NUM_VERTICES) if weights is None else weights
        observed = self.shape_backend.reconstruct(face).vertices_mm
        vertices = vertices_from_shape(array, self.canonical)
        rotation, translation = self.visible_frame(observed, weights)
        prior = 0.5 * self.gpmm.mahalanobis(vertices @ rotation.T + translation)
        seen = weights >= VISIBLE
        target = observed.copy()
        scale2 = np.full(NUM_VERTICES, np.inf)
        scale2[seen] = self.noise_mm**2 / np.clip(weights[seen], VISIBLE, 1.0)
        completions = self.completions(
            face, observed, weights, RANK_IMPUTATIONS, np.random.default_rng(RANK_SEED), stop_check
        )
        if completions is not None:
            target[~seen] = completions.mean(axis=0)[~seen]
            scale2[~seen] = self.imputed_noise_mm**2
        used = np.isfinite(scale2)
        r2 = ((vertices[:, used] - target[used]) ** 2).sum(axis=-1)
        misfit = 0.5 * (ROBUST_DOF + 3.0) * np.log1p(r2 / (ROBUST_DOF * (scale2[used] + self.gpmm.residual_variance)))
        return (-(prior + misfit.sum(axis=1))).astype(np.float32)


def load_open_shape_backend(device: str = "cpu", store=None, *, shape_fit: str = DEFAULT_SHAPE_FIT,
                            mirror_average: bool = DEFAULT_MIRROR_AVERAGE) -> OpenShapeBackend:
    """The metric-mesh backend; ``mirror_average`` loads FaceMesh from the model store (LiteRT, OpenCV)."""
    mesh = None
    if mirror_average:
        from facefuse.assets.store import ModelStore
        from facefuse.face.facemesh import FaceMesh
        from facefuse.face.tflite import TFLiteModel

        store = store if store is not None else ModelStore()
        mesh = FaceMesh(TFLiteModel(store.path("face_landmark")))
    return OpenShapeBackend(load_canonical_face(store), device, shape_fit, mesh)


def load_open_generative_backend(device: str = "cpu", store=None, *, imputation: bool = True) -> OpenGenerativeBackend:
    """The GP sampler with FaceMesh imputation (the FaceMesh model comes from the model store), or the
    GP alone with ``imputation=False``."""
    from facefuse.assets.store import ModelStore
    from facefuse.face.facemesh import FaceMesh
    from facefuse.face.tflite import TFLiteModel

    store = store if store is not None else ModelStore()
    canonical = load_canonical_face(store)
    mesh = FaceMesh(TFLiteModel(store.path("face_landmark"))) if imputation or DEFAULT_MIRROR_AVERAGE else None
    # the ranker's deterministic mesh must be the one the mica slot makes (mirror-averaged by default)
    shape_backend = OpenShapeBackend(canonical, device, mesh=mesh if DEFAULT_MIRROR_AVERAGE else None)
    return OpenGenerativeBackend(shape_backend, open_gpmm(canonical), mesh if imputation else None)


def open_fusion_setup() -> FusionSetup:
    """The open pack's fusion setup: the canonical face's identity space with MediaPipe regions and UVs."""
    from facefuse.assets.canonical_face import load_canonical_face

    canonical = load_canonical_face()
    space = open_shape_space(canonical=canonical)
    from facefuse.packs.posed import OpenPosedFitter

    fitter = OpenPosedFitter(canonical, camera_points)
    return FusionSetup(space, BackendStatus("fusion", "mediapipe468-identity", "open", True, False, "ready",
                                            details={"regions": ",".join(sorted(space.regions)),
                                                     "posed_fit": "neutral + observed residual, head pose, camera"}),
                       lambda vertices: (None, kpt7(vertices)), OPEN_DEFAULT_STRATEGY, uvs=canonical.uvs,
                       posed_fitter=lambda _shape, vertices, target: fitter(vertices, target))
