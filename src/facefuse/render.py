"""A small CPU software renderer for preview images: orthographic, z-buffered, Lambert-shaded.

Meant for previews (a few thousand triangles), not speed: one numpy pass per triangle over its bounding
box. Conventions: model space x right, y up, z toward the viewer (the canonical face's and FLAME's),
lengths in any unit; image rows go down. A pixel is covered when its centre (col + 0.5, row + 0.5)
lies inside the triangle (edges included), and the nearest surface (largest z) wins.
"""

from __future__ import annotations

import numpy as np

from facefuse.errors import InvalidInputError

BACKGROUND = 240
BASE_COLOR = np.array([200.0, 200.0, 205.0])
AMBIENT = 0.25
LIGHT = np.array([-0.3, 0.4, 1.0]) / np.linalg.norm([-0.3, 0.4, 1.0])
"""Light from the upper left, slightly in front (a direction toward the light)."""


def rasterize(
    points: np.ndarray, faces: np.ndarray, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Triangles in pixel space -> (depth (H,W), triangle index (H,W), barycentrics (H,W,3)).

    ``points`` (V,3): x = column, y = row (continuous, pixel centres at +0.5) and z = depth, larger is
    nearer. Uncovered pixels have depth −inf and index −1.
    """
    pts = np.asarray(points, dtype=np.float64)
    tris = np.asarray(faces, dtype=np.int64)
    depth = np.full((height, width), -np.inf)
    index = np.full((height, width), -1, np.int64)
    bary = np.zeros((height, width, 3))
    for f, (a, b, c) in enumerate(tris):
        pa, pb, pc = pts[a], pts[b], pts[c]
        area = (pb[0] - pa[0]) * (pc[1] - pa[1]) - (pb[1] - pa[1]) * (pc[0] - pa[0])
        if abs(area) < 1e-12:
            continue
        lo = np.floor(np.minimum(np.minimum(pa, pb), pc)[:2] - 0.5).astype(int)
        hi = np.ceil(np.maximum(np.maximum(pa, pb), pc)[:2] - 0.5).astype(int)
        c0, r0 = max(lo[0], 0), max(lo[1], 0)
        c1, r1 = min(hi[0], width - 1), min(hi[1], height - 1)
        if c0 > c1 or r0 > r1:
            continue
        cols, rows = np.meshgrid(np.arange(c0, c1 + 1) + 0.5, np.arange(r0, r1 + 1) + 0.5)
        w0 = ((pb[0] - cols) * (pc[1] - rows) - (pb[1] - rows) * (pc[0] - cols)) / area
        w1 = ((pc[0] - cols) * (pa[1] - rows) - (pc[1] - rows) * (pa[0] - cols)) / area
        w2 = 1.0 - w0 - w1
        inside = (w0 >= -1e-9) & (w1 >= -1e-9) & (w2 >= -1e-9)
        z = w0 * pa[2] + w1 * pb[2] + w2 * pc[2]
        region = depth[r0:r1 + 1, c0:c1 + 1]
        win = inside & (z > region)
        if not win.any():
            continue
        region[win] = z[win]
        index[r0:r1 + 1, c0:c1 + 1][win] = f
        bary[r0:r1 + 1, c0:c1 + 1][win] = np.stack([w0, w1, w2], axis=-1)[win]
    return depth, index, bary


def _face_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    v = vertices[faces]
    n = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)


def shade(vertices: np.ndarray, faces: np.ndarray, index: np.ndarray, bary: np.ndarray,
          colors: np.ndarray | None) -> np.ndarray:
    """Lambert (two-sided, flat per triangle) times the interpolated vertex colour; background elsewhere."""
    image = np.full((*index.shape, 3), float(BACKGROUND))
    hit = index >= 0
    if not hit.any():
        return image.astype(np.uint8)
    normals = _face_normals(vertices, faces)
    light = AMBIENT + (1.0 - AMBIENT) * np.abs(normals @ LIGHT)
    tri = index[hit]
    if colors is None:
        albedo = np.broadcast_to(BASE_COLOR, (tri.size, 3))
    else:
        corner = colors[faces[tri]]  # (P, 3 corners, 3)
        albedo = np.einsum("pk,pkc->pc", bary[hit], corner)
    image[hit] = albedo * light[tri, None]
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _check(
    vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    if v.ndim != 2 or v.shape[1] != 3 or not np.all(np.isfinite(v)):
        raise InvalidInputError(f"render: vertices must be finite (V, 3), got {v.shape}")
    if f.ndim != 2 or f.shape[1] != 3 or (f.size and (f.min() < 0 or f.max() >= v.shape[0])):
        raise InvalidInputError(f"render: faces must be (F, 3) indices into {v.shape[0]} vertices")
    c = None
    if colors is not None:
        c = np.asarray(colors)
        if c.shape[0] != v.shape[0] or c.ndim != 2 or c.shape[1] not in (3, 4):
            raise InvalidInputError(f"render: colors must be (V, 3|4), got {c.shape}")
        c = c[:, :3].astype(np.float64) * (255.0 if c.dtype.kind == "f" else 1.0)
    return v, f, c


def render_views(vertices: np.ndarray, faces: np.ndarray, rotations: list[np.ndarray], size: int,
                 colors: np.ndarray | None = None) -> list[np.ndarray]:
    """One (size, size, 3) image per rotation (applied to the centred mesh), all at the same scale."""
    v, f, c = _check(vertices, faces, colors)
    centre = (v.min(axis=0) + v.max(axis=0)) / 2.0
    posed = [(v - centre) @ r.T for r in rotations]
    extent = max(float(np.abs(p[:, :2]).max()) for p in posed) if v.size else 1.0
    scale = 0.45 * size / max(extent, 1e-12)
    images = []
    for p in posed:
        pix = np.stack([size / 2.0 + p[:, 0] * scale, size / 2.0 - p[:, 1] * scale, p[:, 2]], axis=1)
        _, index, bary = rasterize(pix, f, size, size)
        images.append(shade(p, f, index, bary, c))
    return images


def render_preview(
    vertices_mm: np.ndarray, faces: np.ndarray, colors: np.ndarray | None = None, size: int = 384
) -> np.ndarray:
    """(size, 2·size, 3) uint8: head-on view and the subject's right profile, side by side."""
    if not 16 <= int(size) <= 4096:
        raise InvalidInputError(f"render: size must be 16..4096 pixels, got {size}")
    angle = np.pi / 2  # turn the face to the viewer's left: the subject's right cheek faces the camera
    profile = np.array([[np.cos(angle), 0.0, -np.sin(angle)], [0.0, 1.0, 0.0], [np.sin(angle), 0.0, np.cos(angle)]])
    front, side = render_views(vertices_mm, faces, [np.eye(3), profile], int(size), colors)
    return np.concatenate([front, side], axis=1)


SPREAD_SCALE_MM = 8.0
"""Top of the fixed uncertainty colour scale (mm): 0 is blue, this and above red, the same for every face."""
SPREAD_COLORMAP = "turbo"


def spread_colors(spread_mm: np.ndarray) -> np.ndarray:
    """(V,) per-vertex spread in mm -> (V, 3) uint8 on the fixed scale 0..SPREAD_SCALE_MM."""
    import matplotlib

    t = np.clip(np.nan_to_num(np.asarray(spread_mm, np.float64), nan=0.0) / SPREAD_SCALE_MM, 0.0, 1.0)
    return np.rint(matplotlib.colormaps[SPREAD_COLORMAP](t)[:, :3] * 255).astype(np.uint8)


def spread_legend(width: int, height: int = 44) -> np.ndarray:
    """(height, width, 3) colour bar of the fixed spread scale with mm ticks (0, 2, ... SPREAD_SCALE_MM)."""
    import cv2

    legend = np.full((height, width, 3), BACKGROUND, np.uint8)
    left, right, bar_top, bar_bottom = 12, width - 12, 4, height // 2
    ramp = spread_colors(np.linspace(0.0, SPREAD_SCALE_MM, max(right - left, 1)))
    legend[bar_top:bar_bottom, left:right] = ramp[None, :, :]
    for mm in np.arange(0.0, SPREAD_SCALE_MM + 1e-9, 2.0):
        x = round(left + (right - left - 1) * float(mm) / SPREAD_SCALE_MM)
        legend[bar_bottom:bar_bottom + 4, x] = 0
        label = f"{mm:g} mm" if mm in (0.0, SPREAD_SCALE_MM) else f"{mm:g}"
        size = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)[0][0]
        x = min(max(x - size // 2, 0), width - size)
        cv2.putText(legend, label, (x, height - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return legend


def render_uncertainty(vertices_mm: np.ndarray, faces: np.ndarray, spread_mm: np.ndarray,
                       size: int = 384) -> np.ndarray:
    """The preview's two views coloured by per-vertex spread on the fixed mm scale, with its legend below."""
    views = render_preview(vertices_mm, faces, colors=spread_colors(spread_mm), size=size)
    return np.concatenate([views, spread_legend(views.shape[1])], axis=0)
