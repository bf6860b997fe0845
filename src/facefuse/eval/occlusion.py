"""Deterministic occluded variants of a face photo, for occlusion-robustness benchmarks.

Given an image, its face box and its 5 key-points, ``occlude`` draws one occluder and returns the
occluded image together with the occluder's pixel mask, so a benchmark can relate errors to what was
hidden. Kinds: ``mask`` (a surgical mask over nose and mouth, textured with the mask photos that ship
in the installed insightface package, read at run time), ``eye_band`` (a dark band over both eyes,
like sunglasses), ``hand`` (a hand-shaped blob sized to a requested coverage) and ``rectangle`` (a
rectangle of a requested coverage). Coverage is the fraction of the face box's pixels hidden.

Everything random comes from ``numpy.random.default_rng(seed)``: the same inputs and seed give the
same image bit for bit.

Key-point order is the 5-point SCRFD/ArcFace order in image coordinates: eye on the image's left,
eye on the image's right, nose tip, mouth corner on the left, mouth corner on the right.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import cv2
import numpy as np

from facefuse.errors import AssetError, InvalidInputError

OCCLUDER_KINDS = ("mask", "eye_band", "hand", "rectangle")
DEFAULT_COVERAGES = (0.1, 0.2, 0.3, 0.4)
MASK_TEXTURE_GLOB = "mask_*.jpg"


@dataclass(frozen=True)
class OccludedImage:
    image: np.ndarray  # (H, W, 3) uint8, the occluded photo
    mask: np.ndarray  # (H, W) bool, True where the occluder is
    kind: str
    coverage: float  # fraction of the face box's pixels hidden
    seed: int
    detail: str = ""  # e.g. which mask texture


def mask_textures() -> dict[str, Path]:
    """The mask photos of the installed insightface package, by colour name (black, blue, ...)."""
    try:
        folder = resources.files("insightface") / "data" / "images"
    except ModuleNotFoundError as exc:
        raise AssetError(
            "the insightface package is not installed; its mask textures are needed for kind 'mask'"
        ) from exc
    found = {}
    for entry in sorted(Path(str(folder)).glob(MASK_TEXTURE_GLOB)):
        found[entry.stem.removeprefix("mask_")] = entry
    if not found:
        raise AssetError(f"no {MASK_TEXTURE_GLOB} textures in {folder}; reinstall insightface (its data/images folder)")
    return found


def _load_texture(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise AssetError(f"{path}: unreadable mask texture")
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    h, w = rgb.shape[:2]
    # The photos have a light border around the fabric: keep the inner part.
    return rgb[int(0.08 * h) : int(0.92 * h), int(0.04 * w) : int(0.96 * w)]


def _check_inputs(image: np.ndarray, box: tuple[float, float, float, float], landmarks: np.ndarray):
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise InvalidInputError(f"image must be an (H, W, 3) uint8 array, got {img.shape} {img.dtype}")
    kps = np.asarray(landmarks, dtype=np.float64)
    if kps.shape != (5, 2) or not np.all(np.isfinite(kps)):
        raise InvalidInputError(f"landmarks must be 5 finite (x, y) key-points, got shape {kps.shape}")
    b = np.asarray(box, dtype=np.float64).reshape(-1)
    if b.shape != (4,) or not np.all(np.isfinite(b)) or b[2] <= b[0] or b[3] <= b[1]:
        raise InvalidInputError(f"box must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got {box}")
    h, w = img.shape[:2]
    x0, y0 = int(max(0, math.floor(b[0]))), int(max(0, math.floor(b[1])))
    x1, y1 = int(min(w, math.ceil(b[2]))), int(min(h, math.ceil(b[3])))
    if x1 - x0 < 4 or y1 - y0 < 4:
        raise InvalidInputError(f"face box {box} lies (almost) outside the {w}x{h} image")
    return img, kps, (x0, y0, x1, y1)


def _box_coverage(mask: np.ndarray, box: tuple[int, int, int, int]) -> float:
    x0, y0, x1, y1 = box
    return float(mask[y0:y1, x0:x1].mean())


def _face_frame(kps: np.ndarray) -> tuple[np.ndarray, float, float, np.ndarray]:
    """Eye midpoint, eye distance, roll angle (radians) and the unit 'down the face' vector."""
    eyes_mid = 0.5 * (kps[0] + kps[1])
    eye_vec = kps[1] - kps[0]
    eye_dist = float(np.linalg.norm(eye_vec))
    if eye_dist < 2.0:
        raise InvalidInputError(f"the eye key-points are {eye_dist:.1f} px apart; the face is too "
                                "small or the points are wrong")
    angle = math.atan2(eye_vec[1], eye_vec[0])
    down = np.array([-math.sin(angle), math.cos(angle)])
    return eyes_mid, eye_dist, angle, down


def _to_image(points_face: np.ndarray, origin: np.ndarray, angle: float) -> np.ndarray:
    """Face-frame points (x along the eye line, y down the face) to image pixels."""
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return points_face @ rot.T + origin


def _fill(shape: tuple[int, int], polygons: list[np.ndarray]) -> np.ndarray:
    canvas = np.zeros(shape, dtype=np.uint8)
    for p in polygons:  # one call per polygon: overlaps must stay filled, not cancel out
        cv2.fillPoly(canvas, [np.round(p * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return canvas.astype(bool)


def _mask_occluder(img: np.ndarray, kps: np.ndarray, rng: np.random.Generator, texture: str | None):
    eyes_mid, eye_dist, angle, down = _face_frame(kps)
    mouth_mid = 0.5 * (kps[3] + kps[4])
    face_len = float(np.dot(mouth_mid - eyes_mid, down))
    if face_len <= 1.0:
        raise InvalidInputError("the mouth key-points are not below the eyes; cannot place a face mask")
    # Face frame: origin between the eyes, x along the eye line, y down the face, in pixels.
    top = 0.5 * float(np.dot(kps[2] - eyes_mid, down))  # across the nose bridge
    bottom = face_len * 1.75  # under the chin
    half = 1.05 * eye_dist
    t = np.linspace(0.0, math.pi, 24)
    outline = np.concatenate(
        [
            [[-half * 0.92, top], [half * 0.92, top]],
            [[half, top + 0.35 * (bottom - top)]],
            np.stack([half * np.cos(t), bottom - 0.45 * (bottom - top) + 0.45 * (bottom - top) * np.sin(t)], axis=1),
            [[-half, top + 0.35 * (bottom - top)]],
        ]
    )
    polygon = _to_image(outline, eyes_mid, angle)
    mask = _fill(img.shape[:2], [polygon])
    textures = mask_textures()
    name = texture if texture is not None else sorted(textures)[int(rng.integers(len(textures)))]
    if name not in textures:
        raise InvalidInputError(f"unknown mask texture {name!r}; available: {sorted(textures)}")
    tex = _load_texture(textures[name]).astype(np.float32) * float(rng.uniform(0.85, 1.1))
    # Map the texture rectangle onto the mask's bounding rectangle in the face frame.
    src = np.array([[0, 0], [tex.shape[1], 0], [0, tex.shape[0]]], dtype=np.float32)
    dst = _to_image(np.array([[-half, top], [half, top], [-half, bottom]]), eyes_mid, angle).astype(np.float32)
    warped = cv2.warpAffine(
        np.clip(tex, 0, 255).astype(np.uint8), cv2.getAffineTransform(src, dst), (img.shape[1], img.shape[0]),
        flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE,
    )
    return mask, warped, f"texture {name}"


def _eye_band_occluder(img: np.ndarray, kps: np.ndarray, rng: np.random.Generator):
    eyes_mid, eye_dist, angle, _ = _face_frame(kps)
    half_len = eye_dist * float(rng.uniform(0.95, 1.1))
    half_h = eye_dist * float(rng.uniform(0.22, 0.3))
    rect = np.array([[-half_len, -half_h], [half_len, -half_h], [half_len, half_h], [-half_len, half_h]])
    mask = _fill(img.shape[:2], [_to_image(rect, eyes_mid, angle)])
    colour = rng.integers(0, 60, size=3)
    fill = np.broadcast_to(colour.astype(np.uint8), img.shape).copy()
    return mask, fill, f"colour {tuple(int(c) for c in colour)}"


def _hand_polygons(scale: float, centre: np.ndarray, angle: float) -> list[np.ndarray]:
    """A palm and five fingers (capsules), unit size ~1, scaled, rotated and placed."""
    t = np.linspace(0, 2 * math.pi, 40, endpoint=False)
    shapes = [np.stack([0.42 * np.cos(t), 0.5 * np.sin(t) + 0.25], axis=1)]  # palm
    fingers = [(-0.3, 0.55, 0.09), (-0.1, 0.7, 0.095), (0.1, 0.68, 0.095), (0.28, 0.55, 0.085)]
    for x, length, r in fingers:
        cap = np.concatenate(
            [
                np.stack([x + r * np.cos(t[:20]), -length + r * -np.sin(t[:20])], axis=1),
                [[x - r, 0.0], [x + r, 0.0]],
            ]
        )
        shapes.append(cap)
    thumb = np.array([[0.35, 0.1], [0.75, -0.15], [0.82, -0.05], [0.45, 0.35]])
    shapes.append(thumb)
    return [_to_image(s * scale, centre, angle) for s in shapes]


def _hand_occluder(img: np.ndarray, box: tuple[int, int, int, int], coverage: float, rng: np.random.Generator):
    x0, y0, x1, y1 = box
    centre = np.array(
        [
            rng.uniform(x0 + 0.3 * (x1 - x0), x1 - 0.3 * (x1 - x0)),
            rng.uniform(y0 + 0.3 * (y1 - y0), y1 - 0.3 * (y1 - y0)),
        ]
    )
    angle = float(rng.uniform(-0.6, 0.6))
    size = max(x1 - x0, y1 - y0)
    lo, hi = 0.0, 4.0 * size
    mask = np.zeros(img.shape[:2], bool)
    for _ in range(40):  # coverage grows with the scale: bisection
        mid = 0.5 * (lo + hi)
        mask = _fill(img.shape[:2], _hand_polygons(mid, centre, angle))
        got = _box_coverage(mask, box)
        if abs(got - coverage) < 0.002:
            break
        lo, hi = (mid, hi) if got < coverage else (lo, mid)
    skin = np.array([rng.uniform(150, 235), rng.uniform(100, 180), rng.uniform(80, 150)])
    shade = rng.normal(0, 6, size=img.shape[:2])[..., None]
    fill = np.clip(skin + shade, 0, 255).astype(np.uint8)
    return mask, fill, f"angle {angle:.2f}"


def _rectangle_occluder(img: np.ndarray, box: tuple[int, int, int, int], coverage: float, rng: np.random.Generator):
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    area = coverage * bw * bh
    aspect = float(np.exp(rng.uniform(math.log(0.5), math.log(2.0))))
    w = round(min(bw, max(1.0, math.sqrt(area * aspect))))
    h = round(min(bh, max(1.0, area / w)))
    if h == bh and w < bw:  # too tall for the box: widen instead
        w = round(min(bw, area / h))
    rx = x0 + int(rng.integers(0, bw - w + 1))
    ry = y0 + int(rng.integers(0, bh - h + 1))
    mask = np.zeros(img.shape[:2], bool)
    mask[ry : ry + h, rx : rx + w] = True
    colour = rng.integers(0, 256, size=3)
    noise = rng.normal(0, 12, size=img.shape[:2])[..., None]
    fill = np.clip(colour + noise, 0, 255).astype(np.uint8)
    return mask, fill, f"{w}x{h} px at ({rx}, {ry})"


def occlude(
    image: np.ndarray,
    box: tuple[float, float, float, float],
    landmarks: np.ndarray,
    kind: str,
    *,
    coverage: float | None = None,
    seed: int = 0,
    texture: str | None = None,
) -> OccludedImage:
    """One occluded variant of ``image``; ``coverage`` (0-1 of the face box) is for hand and rectangle."""
    img, kps, ibox = _check_inputs(image, box, landmarks)
    if kind not in OCCLUDER_KINDS:
        raise InvalidInputError(f"unknown occluder kind {kind!r}; expected one of {OCCLUDER_KINDS}")
    if kind in ("hand", "rectangle"):
        if coverage is None or not (0.0 < coverage <= 1.0):
            raise InvalidInputError(f"occluder {kind!r} needs a coverage in (0, 1], got {coverage}")
    elif coverage is not None:
        raise InvalidInputError(f"occluder {kind!r} is placed by the landmarks; it takes no coverage")
    share = 0.0 if coverage is None else float(coverage)  # validated above for the kinds that use it
    rng = np.random.default_rng(seed)
    if kind == "mask":
        mask, fill, detail = _mask_occluder(img, kps, rng, texture)
    elif kind == "eye_band":
        mask, fill, detail = _eye_band_occluder(img, kps, rng)
    elif kind == "hand":
        mask, fill, detail = _hand_occluder(img, ibox, share, rng)
    else:
        mask, fill, detail = _rectangle_occluder(img, ibox, share, rng)
    out = img.copy()
    out[mask] = fill[mask]
    return OccludedImage(out, mask, kind, _box_coverage(mask, ibox), seed, detail)


def occluded_variants(
    image: np.ndarray,
    box: tuple[float, float, float, float],
    landmarks: np.ndarray,
    *,
    seed: int = 0,
    coverages: tuple[float, ...] = DEFAULT_COVERAGES,
) -> list[OccludedImage]:
    """The standard set: a mask, an eye band, and a hand and a rectangle at each coverage level.

    Each variant gets its own seed derived from ``seed`` and its position in the list, so adding
    coverage levels does not change the earlier variants.
    """
    out = [
        occlude(image, box, landmarks, "mask", seed=seed * 1000 + 0),
        occlude(image, box, landmarks, "eye_band", seed=seed * 1000 + 1),
    ]
    for i, c in enumerate(coverages):
        out.append(occlude(image, box, landmarks, "hand", coverage=c, seed=seed * 1000 + 10 + 2 * i))
        out.append(occlude(image, box, landmarks, "rectangle", coverage=c, seed=seed * 1000 + 11 + 2 * i))
    return out
