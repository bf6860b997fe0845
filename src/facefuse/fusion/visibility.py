"""How much of each face region the image actually shows, from several independent sources.

Fusion trusts MICA where the face is visible and the generative branch where it is not, so it needs
a per-region visibility in [0, 1]. Sources (each can be switched off, see :class:`VisibilitySources`):

* ``mask``: an occluder (or visible-skin) mask from any segmenter, mapped onto the regions;
* ``photometric``: each region's pixels tested against the face's own skin colour statistics;
* ``hands``: hand landmark points or a hand mask (the hand model lives in the model store).

Regions are defined on the MediaPipe FaceMesh 468-point topology as polygons of landmark indices
(:data:`MEDIAPIPE_REGIONS`), rasterised in the image. Sources are merged with :func:`combine` (the
minimum per region: a region is as visible as its most pessimistic source says). The mapping onto
FLAME regions (:data:`MEDIAPIPE_TO_FLAME`) is applied by ``ShapeSpace.region_weights``.

Names: "left"/"right" are the SUBJECT's left/right in both topologies (MediaPipe's ``left_eye`` is
landmarks 263/362, on the image's right in a non-mirrored frontal photo; FLAME's ``left_eye_region``
lies at +x). Landmarks are image pixels, x = column, y = row; a z column is ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from facefuse.errors import InvalidInputError

NUM_MEDIAPIPE_LANDMARKS = 468

# Landmark index facts of the MediaPipe 468-point FaceMesh (face_mesh_connections / the face-mesh
# keypoint annotations): contours listed in index order along each curve.
_SILHOUETTE = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152,
               148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109)
_LIPS_OUTER = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291, 375, 321, 405, 314, 17, 84, 181, 91, 146)
_RIGHT_BROW_UPPER = (156, 70, 63, 105, 66, 107, 55, 193)
_RIGHT_BROW_LOWER = (35, 124, 46, 53, 52, 65)
_LEFT_BROW_UPPER = (383, 300, 293, 334, 296, 336, 285, 417)
_LEFT_BROW_LOWER = (265, 353, 276, 283, 282, 295)
_RIGHT_EYE_LOWER2 = (226, 31, 228, 229, 230, 231, 232, 233, 244)  # second ring below the right eye
_LEFT_EYE_LOWER2 = (446, 261, 448, 449, 450, 451, 452, 453, 464)
_RIGHT_EYE_LOWER3 = (143, 111, 117, 118, 119, 120, 121, 128, 245)  # third ring: the top of the cheek
_LEFT_EYE_LOWER3 = (372, 340, 346, 347, 348, 349, 350, 357, 465)
_RIGHT_EYE_CORNERS = (33, 133)
_LEFT_EYE_CORNERS = (263, 362)
_NOSE_LINE = (168, 6, 197, 195, 5, 4, 1)  # between the eyes down to the tip
_NOSE_BASE = (98, 2, 327)  # right ala corner, bottom (subnasale), left ala corner


@dataclass(frozen=True)
class RegionShape:
    """A region in the 468 topology: a polygon through ``indices`` (in order) or their convex hull."""

    indices: tuple[int, ...]
    hull: bool


MEDIAPIPE_REGIONS: dict[str, RegionShape] = {
    # The forehead: above both brows, up to the top of the FaceMesh silhouette (mid-forehead).
    "forehead": RegionShape(
        (70, 63, 105, 66, 107, 336, 296, 334, 293, 300, 284, 332, 297, 338, 10, 109, 67, 103, 54), False
    ),
    # Each eye region: brow (lower line) down to the second ring under the eye, both corners included.
    "right_eye": RegionShape((*_RIGHT_BROW_LOWER, 55, *_RIGHT_EYE_LOWER2, *_RIGHT_EYE_CORNERS), True),
    "left_eye": RegionShape((*_LEFT_BROW_LOWER, 285, *_LEFT_EYE_LOWER2, *_LEFT_EYE_CORNERS), True),
    # The nose: bridge line plus the base (both alae and the subnasale).
    "nose": RegionShape(_NOSE_LINE + _NOSE_BASE, True),
    "lips": RegionShape(_LIPS_OUTER, True),
    # Each cheek: the third ring under the eye, down the side of the nose to the mouth corner, then
    # the silhouette from the jaw up to eye level.
    "right_cheek": RegionShape((*_RIGHT_EYE_LOWER3, 98, 61, 58, 132, 93, 234), False),
    "left_cheek": RegionShape((*_LEFT_EYE_LOWER3, 327, 291, 288, 361, 323, 454), False),
}
REGION_NAMES = tuple(MEDIAPIPE_REGIONS)

MEDIAPIPE_TO_FLAME: dict[str, tuple[str, ...]] = {
    "forehead": ("forehead",),
    "left_eye": ("left_eye_region", "left_eyeball"),
    "right_eye": ("right_eye_region", "right_eyeball"),
    "nose": ("nose",),
    "lips": ("lips",),
    "left_cheek": ("left_cheek",),  # derived by ShapeSpace: the rest of FLAME's face mask, subject's left
    "right_cheek": ("right_cheek",),
}
"""Visibility region -> FLAME mask regions it governs (``FLAME_masks.pkl`` names plus the derived cheeks)."""

SKIN_REFERENCE_REGIONS = ("forehead", "left_cheek", "right_cheek", "nose")
"""Regions whose pixels define the face's own skin statistics (photometric source)."""

EXPECTED_SKIN_FRACTION = {"left_eye": 0.55, "right_eye": 0.55, "lips": 0.7}
"""Skin-like fraction of a fully visible region (brows, sclerae and the mouth are not skin); others 0.85."""
_DEFAULT_SKIN_FRACTION = 0.85


@dataclass
class Visibility:
    """Per-region visibility in [0, 1] (1 = fully seen), optionally per vertex of a topology."""

    regions: dict[str, float]
    per_vertex: np.ndarray | None = None  # (V,) for the topology at hand
    sources: tuple[str, ...] = ()
    unknown: tuple[str, ...] = ()
    """Regions a source could not judge (the skin test in a grayscale photo). That source counts as 1 there:
    unknown means "trust the observation" unless other evidence (hands, a mask, the pose) says otherwise,
    never "hidden" (a hidden face would be replaced by the prior)."""

    @property
    def overall(self) -> float:
        """Mean over regions (each counts once, whatever its area); the per-vertex mean if no regions; 1 if neither."""
        if self.regions:
            return float(np.mean([float(v) for v in self.regions.values()]))
        if self.per_vertex is not None and np.size(self.per_vertex):
            return float(np.mean(self.per_vertex))
        return 1.0

    @classmethod
    def full(cls, source: str = "assumed") -> Visibility:
        """Every region fully visible (what fusion assumes when no visibility is given)."""
        return cls({name: 1.0 for name in REGION_NAMES}, None, (source,))


# --------------------------------------------------------------------------- geometry


def _landmarks_xy(landmarks468: np.ndarray) -> np.ndarray:
    points = np.asarray(landmarks468, dtype=np.float64)
    if points.ndim != 2 or points.shape[0] < NUM_MEDIAPIPE_LANDMARKS or points.shape[1] not in (2, 3):
        raise InvalidInputError(
            f"landmarks468: expected ({NUM_MEDIAPIPE_LANDMARKS}, 2 or 3) image-pixel points, got {points.shape}")
    if not np.all(np.isfinite(points[:NUM_MEDIAPIPE_LANDMARKS, :2])):
        raise InvalidInputError("landmarks468: contains NaN or infinite coordinates")
    return points[:NUM_MEDIAPIPE_LANDMARKS, :2]


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Monotone-chain convex hull of (P,2) points, counter-clockwise, no repeated end point."""
    pts = np.unique(points, axis=0)
    if len(pts) < 3:
        return pts
    order = np.lexsort((pts[:, 1], pts[:, 0]))
    pts = pts[order]

    def half(seq: np.ndarray) -> list[np.ndarray]:
        chain: list[np.ndarray] = []
        for p in seq:
            while len(chain) >= 2:
                a, b = chain[-2], chain[-1]
                if (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0]) > 0:
                    break
                chain.pop()
            chain.append(p)
        return chain

    lower, upper = half(pts), half(pts[::-1])
    return np.array(lower[:-1] + upper[:-1])


def region_polygon(name: str, landmarks468: np.ndarray) -> np.ndarray:
    """The region's polygon (P,2) in image pixels (x, y)."""
    xy = _landmarks_xy(landmarks468)
    shape = MEDIAPIPE_REGIONS[name]
    points = xy[list(shape.indices)]
    return _convex_hull(points) if shape.hull else points


def landmark_visibility(landmarks468: np.ndarray, regions: dict[str, float]) -> np.ndarray:
    """(468,) visibility of each FaceMesh point: the lowest of the regions it lies in, NaN in none.

    For showing visibility on a 468-point mesh (the open pack's vertices are these points); a point on a
    region's outline counts as inside it.
    """
    from skimage.measure import points_in_poly

    xy = _landmarks_xy(landmarks468)
    out = np.full(NUM_MEDIAPIPE_LANDMARKS, np.nan)
    for name, value in regions.items():
        if name not in MEDIAPIPE_REGIONS:
            continue
        inside = points_in_poly(xy, region_polygon(name, landmarks468))
        inside[list(MEDIAPIPE_REGIONS[name].indices)] = True
        out[inside] = np.fmin(out[inside], float(value))
    return out


def _polygon_pixels(polygon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of every pixel centre inside the polygon, including pixels outside any image."""
    from skimage.draw import polygon as fill

    x0, y0 = np.floor(polygon.min(axis=0)).astype(int) - 1
    x1, y1 = np.ceil(polygon.max(axis=0)).astype(int) + 1
    rows, cols = fill(polygon[:, 1] - y0, polygon[:, 0] - x0, shape=(y1 - y0 + 1, x1 - x0 + 1))
    return rows + y0, cols + x0


def region_pixels(
    landmarks468: np.ndarray, image_shape: Sequence[int]
) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """Region -> (rows, cols) of its pixels inside the image, and its full pixel count (in or out of the frame)."""
    height, width = int(image_shape[0]), int(image_shape[1])
    out = {}
    for name in REGION_NAMES:
        rows, cols = _polygon_pixels(region_polygon(name, landmarks468))
        inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
        out[name] = (rows[inside], cols[inside], int(rows.size))
    return out


def region_label_image(landmarks468: np.ndarray, image_shape: Sequence[int]) -> np.ndarray:
    """(H,W) int8 map of region indices into ``REGION_NAMES`` (-1 elsewhere; later regions win overlaps).

    For inspection."""
    labels = np.full((int(image_shape[0]), int(image_shape[1])), -1, np.int8)
    for k, (rows, cols, _) in enumerate(region_pixels(landmarks468, image_shape).values()):
        labels[rows, cols] = k
    return labels


def _fraction_visible(clear: np.ndarray, landmarks468: np.ndarray, source: str) -> Visibility:
    """Visibility = clear pixels / all pixels of the region; pixels outside the frame count as not seen."""
    regions = {}
    for name, (rows, cols, total) in region_pixels(landmarks468, clear.shape).items():
        regions[name] = float(clear[rows, cols].sum()) / total if total else 0.0
    return Visibility(regions, None, (source,))


def _check_mask(mask: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(mask)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim != 2 or array.size == 0:
        raise InvalidInputError(f"{what}: expected an (H, W) bool/uint8 mask, got shape {array.shape}")
    if array.dtype == bool:
        return array
    if not np.issubdtype(array.dtype, np.number):
        raise InvalidInputError(f"{what}: expected a bool or numeric mask, got dtype {array.dtype}")
    # uint8 masks are 0/255 or 0/1; anything above half of the maximum value counts as set.
    top = 255.0 if array.dtype == np.uint8 and array.max() > 1 else 1.0
    return array.astype(np.float64) > 0.5 * top


# --------------------------------------------------------------------------- sources


def visibility_from_mask(mask: np.ndarray, landmarks468: np.ndarray, *, marks: str = "occluded") -> Visibility:
    """Map a segmentation onto the regions: the fraction of each region's pixels that are clear.

    ``marks="occluded"``: the mask is set where something covers the face (an occluder mask);
    ``marks="visible"``: it is set where the face is seen (a visible-skin/face-parsing mask).
    """
    if marks not in ("occluded", "visible"):
        raise InvalidInputError(f"visibility_from_mask: marks must be 'occluded' or 'visible', got {marks!r}")
    flags = _check_mask(mask, "visibility mask")
    clear = ~flags if marks == "occluded" else flags
    return _fraction_visible(clear, landmarks468, "mask")


HAND_BONES = ((0, 1), (1, 2), (2, 3), (3, 4), (5, 6), (6, 7), (7, 8), (9, 10), (10, 11), (11, 12),
              (13, 14), (14, 15), (15, 16), (17, 18), (18, 19), (19, 20), (0, 5), (5, 9), (9, 13), (13, 17), (0, 17))
"""The 21-point MediaPipe hand's bones (its HAND_CONNECTIONS): thumb 1-4, index 5-8, middle 9-12, ring
13-16, little finger 17-20, wrist 0, and the palm's outline."""
HAND_PALM = (0, 1, 5, 9, 13, 17)
"""The palm polygon: wrist, thumb base, the four finger bases (knuckles)."""
FINGER_RADIUS = 0.2
"""Half a finger's width as a fraction of the palm's width (index to little-finger knuckle, points 5-17):
four fingers side by side span the palm, so a finger is about a quarter of it across (0.125 as a half
width); 0.2 leaves room for the landmarks' error and the finger's flesh beyond its bone line."""


def _capsule(mask: np.ndarray, a: np.ndarray, b: np.ndarray, radius: float) -> None:
    """Set every pixel centre within ``radius`` of the segment a-b (x, y pixels), clipped to the mask."""
    height, width = mask.shape
    x0, y0 = np.floor(np.minimum(a, b) - radius).astype(int)
    x1, y1 = np.ceil(np.maximum(a, b) + radius).astype(int)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width - 1), min(y1, height - 1)
    if x1 < x0 or y1 < y0:
        return
    ys, xs = np.mgrid[y0:y1 + 1, x0:x1 + 1]
    p = np.stack([xs, ys], axis=-1).astype(np.float64)
    d = b - a
    t = np.clip(((p - a) @ d) / max(float(d @ d), 1e-12), 0.0, 1.0)
    near = np.linalg.norm(p - (a + t[..., None] * d), axis=-1) <= radius
    mask[y0:y1 + 1, x0:x1 + 1] |= near


def hand_mask_from_points(
    hand_points: Sequence[np.ndarray], image_shape: Sequence[int], *, dilate_px: float = 0.08,
    model: str = "fingers",
) -> np.ndarray:
    """(H,W) bool: the pixels each hand covers.

    ``model="fingers"`` (the default) for 21 MediaPipe hand points: a capsule along every bone of
    :data:`HAND_BONES` (radius :data:`FINGER_RADIUS` x the palm width) plus the palm polygon, so the gaps
    between fingers stay open (fingers held in a ring around an eye leave the eye visible).
    ``model="hull"``, and any point set that is not 21 points: the convex hull, grown by ``dilate_px``
    (< 1: a fraction of the hand's size, since fingers are thicker than their landmark line; >= 1: pixels).
    """
    from skimage.draw import polygon as fill

    if model not in ("fingers", "hull"):
        raise InvalidInputError(f"hand mask model: expected 'fingers' or 'hull', got {model!r}")
    height, width = int(image_shape[0]), int(image_shape[1])
    mask = np.zeros((height, width), bool)
    for k, points in enumerate(hand_points):
        pts = np.asarray(points, dtype=np.float64)
        if pts.ndim != 2 or pts.shape[0] < 3 or pts.shape[1] not in (2, 3) or not np.all(np.isfinite(pts)):
            raise InvalidInputError(f"hand_points[{k}]: expected (P >= 3, 2 or 3) finite pixel points, got {pts.shape}")
        xy = pts[:, :2]
        if model == "fingers" and len(xy) == 21:
            palm = xy[list(HAND_PALM)]
            radius = max(FINGER_RADIUS * float(np.linalg.norm(xy[5] - xy[17])), 1.0)
            for i, j in HAND_BONES:
                _capsule(mask, xy[i], xy[j], radius)
            rr, cc = fill(palm[:, 1], palm[:, 0], shape=(height, width))
            mask[rr, cc] = True
            continue
        hull = _convex_hull(xy)
        centre = hull.mean(axis=0)
        size = float(np.max(np.linalg.norm(hull - centre, axis=1)))
        grow = dilate_px * size if dilate_px < 1 else dilate_px
        radii = np.linalg.norm(hull - centre, axis=1, keepdims=True)
        grown = centre + (hull - centre) * (radii + grow) / np.maximum(radii, 1e-9)
        rr, cc = fill(grown[:, 1], grown[:, 0], shape=(height, width))
        mask[rr, cc] = True
    return mask


def visibility_from_hands(
    landmarks468: np.ndarray,
    image_shape: Sequence[int],
    *,
    hand_points: Sequence[np.ndarray] | None = None,
    hand_mask: np.ndarray | None = None,
) -> Visibility:
    """Regions covered by hands: from hand landmark points (one (21,2|3) array per hand) and/or a hand mask."""
    height, width = int(image_shape[0]), int(image_shape[1])
    covered = np.zeros((height, width), bool)
    if hand_mask is not None:
        flags = _check_mask(hand_mask, "hand mask")
        if flags.shape != (height, width):
            raise InvalidInputError(f"hand mask: shape {flags.shape} differs from the image's {(height, width)}")
        covered |= flags
    if hand_points:
        covered |= hand_mask_from_points(hand_points, (height, width))
    return _fraction_visible(~covered, landmarks468, "hands")


FACING_FULL = 0.1
"""A surface point whose normal makes cos >= this with the direction to the camera (up to ~75 degrees) is
fully seen; at cos <= 0 (edge-on or turned away) it is unseen; linear between. Near the silhouette a
surface shows too few pixels, and FaceMesh's depth there is least sure, to be trusted as evidence."""


def facing_camera(landmarks468: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """(468,) in [0, 1]: how squarely each FaceMesh point's surface faces the camera (1 = seen, 0 = turned away).

    ``landmarks468``: (468, 3) x, y image pixels and FaceMesh's relative depth z (same scale, larger =
    farther); ``triangles``: (F, 3) the topology's triangles (``CanonicalFace.faces``). Vertex normals are
    the area-weighted triangle normals; their orientation is fixed by the whole face's vector area, which
    points at the camera for any head turn short of a profile.
    """
    points = np.asarray(landmarks468, dtype=np.float64)
    if points.ndim != 2 or points.shape[0] < NUM_MEDIAPIPE_LANDMARKS or points.shape[1] < 3:
        raise InvalidInputError(f"pose visibility: expected (468, 3) landmarks with depth, got {points.shape}")
    tri = np.asarray(triangles)
    if tri.ndim != 2 or tri.shape[1] != 3 or tri.size == 0 or tri.min() < 0 or tri.max() >= NUM_MEDIAPIPE_LANDMARKS:
        raise InvalidInputError(f"pose visibility: expected (F, 3) triangles of the 468 points, got {tri.shape}")
    if not np.all(np.isfinite(points[:NUM_MEDIAPIPE_LANDMARKS, :3])):
        raise InvalidInputError("pose visibility: the landmarks contain NaN or infinite values")
    # Right-handed camera frame: x right, y up, z toward the camera.
    xyz = points[:NUM_MEDIAPIPE_LANDMARKS, :3] * np.array([1.0, -1.0, -1.0])
    a, b, c = xyz[tri[:, 0]], xyz[tri[:, 1]], xyz[tri[:, 2]]
    area_normals = np.cross(b - a, c - a)  # length = twice the area
    if area_normals[:, 2].sum() < 0:
        area_normals = -area_normals
    normals = np.zeros_like(xyz)
    for k in range(3):
        np.add.at(normals, tri[:, k], area_normals)
    length = np.linalg.norm(normals, axis=1)
    cos_view = np.where(length > 0, normals[:, 2] / np.maximum(length, 1e-12), 1.0)
    facing = np.clip(cos_view / FACING_FULL, 0.0, 1.0)
    facing[behind_surface(xyz, tri)] = 0.0
    return facing


OCCLUSION_DEPTH = 0.03
"""A point counts as behind the surface when another triangle over it in the image lies closer to the
camera by more than this fraction of the face's size (FaceMesh's depth is a learned guess: a margin)."""


def behind_surface(xyz: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """(V,) bool: points hidden by the face's own surface (e.g. the far eye's inner corner behind the nose
    of a turned head). ``xyz``: (V, 3) camera frame, x right, y up, z toward the camera; a point is
    behind when a triangle not containing it covers its (x, y) and lies nearer by :data:`OCCLUSION_DEPTH`."""
    tri = np.asarray(triangles)
    xy = xyz[:, :2]
    corners = xy[tri]  # (F, 3, 2)
    low, high = corners.min(axis=1), corners.max(axis=1)
    # Candidate pairs: the point inside the triangle's bounding box and not one of its corners.
    point, face = np.nonzero((xy[:, 0:1] >= low[:, 0]) & (xy[:, 0:1] <= high[:, 0])
                             & (xy[:, 1:2] >= low[:, 1]) & (xy[:, 1:2] <= high[:, 1]))
    keep = ~(tri[face] == point[:, None]).any(axis=1)
    point, face = point[keep], face[keep]
    a, b, c = corners[face, 0], corners[face, 1], corners[face, 2]
    v0, v1, rel = b - a, c - a, xy[point] - a
    denominator = v0[:, 0] * v1[:, 1] - v1[:, 0] * v0[:, 1]
    usable = np.abs(denominator) > 1e-9
    safe = np.where(usable, denominator, 1.0)
    u = (rel[:, 0] * v1[:, 1] - v1[:, 0] * rel[:, 1]) / safe
    v = (v0[:, 0] * rel[:, 1] - rel[:, 0] * v0[:, 1]) / safe
    inside = usable & (u >= 0.0) & (v >= 0.0) & (u + v <= 1.0)
    z = xyz[tri[face, 0], 2] * (1.0 - u - v) + xyz[tri[face, 1], 2] * u + xyz[tri[face, 2], 2] * v
    size = float(np.ptp(xy, axis=0).max())
    hidden = np.zeros(len(xyz), bool)
    hidden[point[inside & (z > xyz[point, 2] + OCCLUSION_DEPTH * size)]] = True
    return hidden


def region_members(frontal_xy: np.ndarray) -> dict[str, np.ndarray]:
    """Region -> boolean (468,) of the points inside its polygon, drawn on a frontal layout of the face
    (e.g. the canonical face's x, -y), plus the polygon's own points. A turned head folds the polygons in
    the image, so membership comes from a frontal layout, not the photo."""
    from skimage.measure import points_in_poly

    xy = _landmarks_xy(frontal_xy)
    members = {}
    for name in REGION_NAMES:
        inside = points_in_poly(xy, region_polygon(name, xy))
        inside[list(MEDIAPIPE_REGIONS[name].indices)] = True
        members[name] = inside
    return members


def visibility_from_pose(landmarks468: np.ndarray, triangles: np.ndarray, canonical_mm: np.ndarray) -> Visibility:
    """Self-occlusion from the head pose: how much of each region faces the camera, relative to a frontal face.

    ``canonical_mm``: (468, 3) the canonical face (x right, y up, z toward the viewer), for region
    membership (:func:`region_members` on its frontal x, −y) and as the frontal reference: a region's
    value is its mean :func:`facing_camera` over the canonical face's in a frontal view, clipped to 1. The
    silhouette points are left out: FaceMesh puts them on the outline, edge-on in any pose. For a turned head
    the side turning away reads low, and fusion fills it from the generative branch instead of trusting a
    flattened half.
    """
    canonical = np.asarray(canonical_mm, dtype=np.float64)
    if canonical.shape != (NUM_MEDIAPIPE_LANDMARKS, 3):
        raise InvalidInputError(f"pose visibility: expected the (468, 3) canonical face, got {canonical.shape}")
    facing = facing_camera(landmarks468, triangles)
    frontal = facing_camera(canonical * np.array([1.0, -1.0, -1.0]), triangles)
    regions = {}
    outline = np.zeros(NUM_MEDIAPIPE_LANDMARKS, bool)
    outline[list(_SILHOUETTE)] = True  # FaceMesh puts these on the outline whatever the pose: edge-on by design
    for name, inside in region_members(canonical[:, :2] * np.array([1.0, -1.0])).items():
        inside = inside & ~outline
        reference = float(frontal[inside].mean())
        regions[name] = float(np.clip(facing[inside].mean() / reference, 0.0, 1.0)) if reference > 0 else 1.0
    return Visibility(regions, None, ("pose",))


def _ycrcb(image_rgb: np.ndarray) -> np.ndarray:
    """BT.601 full-range Y, Cr, Cb (the JPEG convention), float64 (H,W,3)."""
    rgb = image_rgb.astype(np.float64)
    y = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    cr = 128.0 + 0.713 * (rgb[..., 0] - y)
    cb = 128.0 + 0.564 * (rgb[..., 2] - y)
    return np.stack([y, cr, cb], axis=-1)


GENERIC_SKIN_CR = (133.0, 173.0)
GENERIC_SKIN_CB = (77.0, 127.0)
"""A broad, widely used skin gate in YCrCb (Chai & Ngan 1999): only to seed the face's own statistics."""


@dataclass(frozen=True)
class PhotometricSettings:
    """Thresholds of the photometric test (see :func:`visibility_photometric`)."""

    tolerance: float = 3.5  # robust z-score on Cr and Cb
    min_scale: float = 3.0  # floor of the robust chroma scale (Cr/Cb units), so a very even skin is not over-strict
    dark_ratio: float = 0.4  # pixels darker than this fraction of the skin's median luma are not skin
    bright_ratio: float = 1.8  # ... or brighter than this multiple (specular white, a white mask)
    lips_redness: float = 30.0  # lips may be this much redder (Cr) than skin and still count as uncovered
    min_reference_pixels: int = 50
    min_chroma_spread: float = 3.0  # face pixels whose colour varies less than this (Cr/Cb units) are monochrome


def _unknown(source: str) -> Visibility:
    """A source with no evidence: every region unknown (read as visible, see :class:`Visibility`)."""
    return Visibility({name: 1.0 for name in REGION_NAMES}, None, (source,), REGION_NAMES)


def is_monochrome(ycc: np.ndarray, pixels: dict[str, tuple[np.ndarray, np.ndarray, int]], min_spread: float) -> bool:
    """Whether the face's pixels (all regions, inside the frame) carry no colour beyond their brightness.

    Chroma (Cr, Cb) is fitted as a linear function of luma; the photo is monochrome when the 90th
    percentile of the residual is below ``min_spread``: 0 in grayscale, about 1 (rounding) in a sepia or
    tinted print, where the colour follows the brightness. Skin, lips, eyes and occluders of a colour
    photo leave well over that.
    """
    rows = np.concatenate([r for r, _, _ in pixels.values()])
    cols = np.concatenate([c for _, c, _ in pixels.values()])
    if rows.size < 3:
        return False
    values = ycc[rows, cols]
    design = np.stack([values[:, 0], np.ones(len(values))], axis=1)
    coef, *_ = np.linalg.lstsq(design, values[:, 1:], rcond=None)
    residual = np.linalg.norm(values[:, 1:] - design @ coef, axis=1)
    return float(np.percentile(residual, 90)) < min_spread


def visibility_photometric(image_rgb: np.ndarray, landmarks468: np.ndarray,
                           settings: PhotometricSettings | None = None) -> Visibility:
    """Each region's fraction of skin-like pixels, judged against the face's OWN skin statistics.

    1. Seed: pixels of the forehead, cheeks and nose that pass a broad generic skin gate in YCrCb.
    2. Statistics: median and 1.4826·MAD of Cr and Cb, median luma Y, over the seed.
    3. A pixel is skin-like when both chroma robust z-scores are within ``tolerance`` and its luma is
       within [dark_ratio, bright_ratio] × the median (a dark band fails on luma, a white/blue/green
       mask on chroma). In the lips region Cr may exceed the skin range by ``lips_redness``.
    4. Visibility = skin-like fraction / the fraction a clear region has (:data:`EXPECTED_SKIN_FRACTION`),
       clipped to [0, 1]; pixels outside the frame count as not seen.
    Fails safe: when the photo carries no colour evidence the test has nothing to say, and every region
    is returned as *unknown* (value 1, listed in ``Visibility.unknown``), not hidden:
    * monochrome: the face's pixels vary in chroma by less than ``min_chroma_spread`` (the 90th
      percentile of their distance from the median Cr/Cb): grayscale, sepia or a tinted print, where an
      occluder differs from skin in brightness only;
    * no skin model: fewer than ``min_reference_pixels`` seed pixels pass the generic gate (odd lighting,
      coloured light, an unusual white balance).
    """
    settings = settings or PhotometricSettings()
    image = np.asarray(image_rgb)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise InvalidInputError("visibility_photometric: expected an (H, W, 3) uint8 RGB image, got "
                                f"{image.shape} {image.dtype}")
    ycc = _ycrcb(image)
    pixels = region_pixels(landmarks468, image.shape)
    if is_monochrome(ycc, pixels, settings.min_chroma_spread):
        return _unknown("photometric")
    seed_rows = np.concatenate([pixels[r][0] for r in SKIN_REFERENCE_REGIONS])
    seed_cols = np.concatenate([pixels[r][1] for r in SKIN_REFERENCE_REGIONS])
    seed = ycc[seed_rows, seed_cols]
    gate = ((seed[:, 1] >= GENERIC_SKIN_CR[0]) & (seed[:, 1] <= GENERIC_SKIN_CR[1])
            & (seed[:, 2] >= GENERIC_SKIN_CB[0]) & (seed[:, 2] <= GENERIC_SKIN_CB[1]) & (seed[:, 0] > 30.0))
    seed = seed[gate]
    if seed.shape[0] < settings.min_reference_pixels:
        return _unknown("photometric")
    median = np.median(seed, axis=0)
    scale = np.maximum(1.4826 * np.median(np.abs(seed - median), axis=0), settings.min_scale)
    regions = {}
    for name, (rows, cols, total) in pixels.items():
        if total == 0:
            regions[name] = 0.0
            continue
        values = ycc[rows, cols]
        z_cr = (values[:, 1] - median[1]) / scale[1]
        if name == "lips":
            z_cr = np.where(z_cr > 0, np.maximum(z_cr - settings.lips_redness / scale[1], 0.0), z_cr)
        z_cb = (values[:, 2] - median[2]) / scale[2]
        luma_ok = (values[:, 0] >= settings.dark_ratio * median[0]) & (
            values[:, 0] <= settings.bright_ratio * median[0]
        )
        skin = (np.abs(z_cr) <= settings.tolerance) & (np.abs(z_cb) <= settings.tolerance) & luma_ok
        fraction = float(skin.sum()) / total
        regions[name] = float(np.clip(fraction / EXPECTED_SKIN_FRACTION.get(name, _DEFAULT_SKIN_FRACTION), 0.0, 1.0))
    return Visibility(regions, None, ("photometric",))


# --------------------------------------------------------------------------- combining


def combine(*visibilities: Visibility | None) -> Visibility:
    """Merge sources: the minimum per region (and per vertex) over the sources that report it. A region is
    listed unknown when a source could not judge it (no colour evidence); its value is then what the other
    sources found (1 when none did)."""
    present = [v for v in visibilities if v is not None]
    if not present:
        return Visibility.full()
    names: list[str] = []
    for vis in present:
        names += [n for n in vis.regions if n not in names]
    regions = {n: float(min(float(v.regions[n]) for v in present if n in v.regions)) for n in names}
    per_vertex = None
    arrays = [np.asarray(v.per_vertex, dtype=np.float32) for v in present if v.per_vertex is not None]
    if arrays:
        if any(a.shape != arrays[0].shape for a in arrays):
            raise InvalidInputError(f"combine: per-vertex visibilities of different shapes {[a.shape for a in arrays]}")
        per_vertex = np.minimum.reduce(arrays)
    sources: list[str] = []
    for vis in present:
        sources += [s for s in vis.sources if s not in sources]
    # A source without evidence reports 1 there, so the minimum above is the other sources' evidence alone.
    unknown = tuple(n for n in names if any(n in v.unknown for v in present))
    return Visibility(regions, per_vertex, tuple(sources), unknown)


@dataclass(frozen=True)
class VisibilitySources:
    """Which sources to use; each can be switched off. With all off, everything is assumed visible."""

    mask: bool = True
    photometric: bool = True
    hands: bool = True
    photometric_settings: PhotometricSettings = field(default_factory=PhotometricSettings)
    pose: bool = True

    def estimate(self, image_rgb: np.ndarray, landmarks468: np.ndarray, *, occluder_mask: np.ndarray | None = None,
                 hand_points: Sequence[np.ndarray] | None = None, hand_mask: np.ndarray | None = None,
                 triangles: np.ndarray | None = None, canonical_mm: np.ndarray | None = None) -> Visibility:
        """Run the enabled sources that have their inputs, and :func:`combine` them. The pose source needs
        landmarks with depth plus the topology's ``triangles`` and ``canonical_mm`` face."""
        image = np.asarray(image_rgb)
        found: list[Visibility] = []
        if self.mask and occluder_mask is not None:
            found.append(visibility_from_mask(occluder_mask, landmarks468))
        if self.photometric:
            found.append(visibility_photometric(image, landmarks468, self.photometric_settings))
        if self.hands and (hand_points or hand_mask is not None):
            found.append(visibility_from_hands(landmarks468, image.shape, hand_points=hand_points, hand_mask=hand_mask))
        if (self.pose and triangles is not None and canonical_mm is not None
                and np.ndim(landmarks468) == 2 and np.shape(landmarks468)[1] >= 3):
            found.append(visibility_from_pose(landmarks468, triangles, canonical_mm))
        return combine(*found) if found else Visibility.full("none")
