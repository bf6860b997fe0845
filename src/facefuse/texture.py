"""A texture image in a mesh's UV layout, sampled from the photo the mesh was fitted to.

For a mesh whose vertices have known image positions (the open pack: its 468 vertices are the FaceMesh
landmarks), each texel is mapped through its UV triangle to the same triangle in the photo and sampled
there. Texels the photo does not show are **filled** (the median colour of the seen texels) and
**marked** with diagonal stripes, so nobody mistakes them for observed skin: those of triangles that
face away from the camera (their image winding is reversed against the UV layout), that fall outside the
frame, or lie in a region the visibility estimate calls hidden (< 0.5).
"""

from __future__ import annotations

import numpy as np

from facefuse.errors import InvalidInputError
from facefuse.render import rasterize

HIDDEN_BELOW = 0.5  # per-vertex visibility under this counts as hidden
STRIPE_PERIOD = 8  # texels: marks on hidden texels, half dark, half fill colour
STRIPE_DARKEN = 0.6


def _signed_areas(points: np.ndarray, faces: np.ndarray) -> np.ndarray:
    a, b, c = points[faces[:, 0]], points[faces[:, 1]], points[faces[:, 2]]
    return (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])


def photo_texture(image: np.ndarray, image_xy: np.ndarray, faces: np.ndarray, uvs: np.ndarray,
                  visibility: np.ndarray | None = None, size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(texture (size, size, 3) uint8, hidden (size, size) bool) for UVs with a top-left origin.

    ``image_xy`` (V, 2): each vertex's position in the photo (x = column, y = row); ``visibility`` (V,):
    per-vertex visibility in [0, 1], NaN where unknown (treated as seen).
    """
    import cv2

    photo = np.asarray(image)
    xy = np.asarray(image_xy, np.float64)[:, :2]
    f = np.asarray(faces, np.int64)
    t = np.asarray(uvs, np.float64)
    if photo.ndim != 3 or photo.shape[2] != 3 or photo.dtype != np.uint8:
        raise InvalidInputError(f"texture: the photo must be (H, W, 3) uint8, got {photo.shape} {photo.dtype}")
    if t.shape != xy.shape or t.ndim != 2 or t.shape[1] != 2 or not np.isfinite(t).all() or not np.isfinite(xy).all():
        raise InvalidInputError(f"texture: uvs {t.shape} and image points {xy.shape} must be finite (V, 2)")
    if f.ndim != 2 or f.shape[1] != 3 or f.size == 0 or f.min() < 0 or f.max() >= len(t):
        raise InvalidInputError("texture: faces must index the vertices")
    if not 16 <= size <= 4096:
        raise InvalidInputError(f"texture: size must be 16..4096, got {size}")

    texel = np.c_[t * size, np.zeros(len(t))]
    _, tri, bary = rasterize(texel, f, size, size)
    covered = tri >= 0
    corner_xy = xy[f[tri[covered]]]  # (P, 3, 2)
    source = np.einsum("pk,pkc->pc", bary[covered], corner_xy)
    map_x = np.full((size, size), -1.0, np.float32)
    map_y = np.full((size, size), -1.0, np.float32)
    map_x[covered], map_y[covered] = source[:, 0], source[:, 1]
    texture = cv2.remap(np.ascontiguousarray(photo), map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    h, w = photo.shape[:2]
    facing = np.sign(_signed_areas(xy, f)) == np.sign(_signed_areas(t, f))
    hidden = covered & ~facing[np.maximum(tri, 0)]
    hidden |= covered & ((map_x < 0) | (map_y < 0) | (map_x > w - 1) | (map_y > h - 1))
    if visibility is not None:
        vis = np.nan_to_num(np.asarray(visibility, np.float64), nan=1.0)
        if vis.shape != (len(t),):
            raise InvalidInputError(f"texture: visibility must be ({len(t)},), got {vis.shape}")
        seen = np.einsum("pk,pk->p", bary[covered], vis[f[tri[covered]]])
        hidden[covered] |= seen < HIDDEN_BELOW
    visible = covered & ~hidden
    fill = np.median(texture[visible], axis=0) if visible.any() else np.array([180.0, 180.0, 180.0])
    texture[~visible] = np.rint(fill).astype(np.uint8)
    rows, cols = np.indices((size, size))
    stripes = hidden & (((rows + cols) // (STRIPE_PERIOD // 2)) % 2 == 0)
    texture[stripes] = np.rint(texture[stripes] * STRIPE_DARKEN).astype(np.uint8)
    return texture, hidden
