"""The one CPU software renderer: vectorised numpy rasterisation, z-buffered, Lambert-shaded.

Used for every image facefuse draws of a mesh: the previews (orthographic, at a fixed millimetre
scale with a ruler), the uncertainty map, the photo textures' texel lookup and the overlay of the posed
mesh on the photo or video frame (perspective, OpenCV camera). No per-pixel Python loop: each batch of
triangles expands into its bounding boxes' pixels in one array, so a FLAME head (10k triangles) at
384² takes tens of milliseconds instead of the per-triangle loop's second.

Pixel space (``rasterize``): x = column, y = row, pixel centres at +0.5 (a pixel is covered when its
centre lies inside the triangle, edges included), z = depth with larger nearer. Preview model space:
x right, y up, z toward the viewer (the canonical face's and FLAME's). Camera space (``render_camera``):
OpenCV, millimetres, x right, y down, z forward; pixel (u, v) = (fx·x/z + cx, fy·y/z + cy) with pixel
centres at integer u, v.
"""

from __future__ import annotations

import numpy as np

from facefuse.errors import InvalidInputError

BACKGROUND = 240
BASE_COLOR = np.array([200.0, 200.0, 205.0])
AMBIENT = 0.25
LIGHT = np.array([-0.3, 0.4, 1.0]) / np.linalg.norm([-0.3, 0.4, 1.0])
"""Preview light from the upper left, slightly in front (a direction toward the light)."""
CANDIDATES_PER_BATCH = 1 << 21
"""Pixel candidates (bounding-box pixels of a batch of triangles) held at once: bounds memory (~100 MB)."""
PREVIEW_FIELD_MM = 260.0
"""The preview's fixed field of view (mm across each view): a FLAME head with its neck fits, and a face
that came out too large or small looks it, since nothing is rescaled to fill the frame."""
RULER_HEIGHT = 40
NEAR_MM = 1.0
"""Triangles with a vertex closer to the camera than this are not drawn (no clipping at the image plane)."""


def _batches(counts: np.ndarray) -> list[tuple[int, int]]:
    """Consecutive triangle ranges whose bounding boxes hold about CANDIDATES_PER_BATCH pixels each."""
    ends = np.cumsum(counts)
    bounds, start, base = [], 0, 0
    while start < len(counts):
        stop = int(np.searchsorted(ends, base + CANDIDATES_PER_BATCH, side="right"))
        stop = max(stop, start + 1)
        bounds.append((start, stop))
        base, start = int(ends[stop - 1]), stop
    return bounds


def rasterize(
    points: np.ndarray, faces: np.ndarray, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Triangles in pixel space -> (depth (H,W), triangle index (H,W), barycentrics (H,W,3)).

    ``points`` (V,3): x = column, y = row (continuous, pixel centres at +0.5) and z = depth, larger is
    nearer. Uncovered pixels have depth −inf and index −1. Where two triangles are equally near, the
    lower index wins (the result does not depend on how triangles are batched).
    """
    pts = np.asarray(points, dtype=np.float64)
    tris = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    depth = np.full(height * width, -np.inf)
    index = np.full(height * width, -1, np.int64)
    bary = np.zeros((height * width, 3))
    pa, pb, pc = pts[tris[:, 0]], pts[tris[:, 1]], pts[tris[:, 2]]
    area = (pb[:, 0] - pa[:, 0]) * (pc[:, 1] - pa[:, 1]) - (pb[:, 1] - pa[:, 1]) * (pc[:, 0] - pa[:, 0])
    lo = np.floor(np.minimum(np.minimum(pa, pb), pc)[:, :2] - 0.5).astype(np.int64)
    hi = np.ceil(np.maximum(np.maximum(pa, pb), pc)[:, :2] - 0.5).astype(np.int64)
    c0, r0 = np.maximum(lo[:, 0], 0), np.maximum(lo[:, 1], 0)
    c1, r1 = np.minimum(hi[:, 0], width - 1), np.minimum(hi[:, 1], height - 1)
    keep = np.flatnonzero((np.abs(area) >= 1e-12) & (c0 <= c1) & (r0 <= r1))
    box_w, box_h = (c1 - c0 + 1)[keep], (r1 - r0 + 1)[keep]
    c0, r0 = c0[keep], r0[keep]
    # per kept triangle, 1-D (gathers of 1-D arrays are the cheap kind)
    ax, ay, az = pa[keep].T
    bx, by, bz = pb[keep].T
    cx, cy, cz = pc[keep].T
    ax, ay, az, bx, by, bz, cx, cy, cz = (np.ascontiguousarray(x) for x in (ax, ay, az, bx, by, bz, cx, cy, cz))
    ar = area[keep]
    # a box larger than a batch is cut into bands of rows (a huge triangle, e.g. one very near the camera)
    bands = np.maximum(-(-(box_w * box_h) // CANDIDATES_PER_BATCH), 1)
    band_rows = -(-box_h // bands)
    owner = np.repeat(np.arange(len(keep)), bands)  # position among the kept triangles
    first = np.repeat(np.cumsum(bands) - bands, bands)
    band = np.arange(len(owner)) - first
    band_r0 = (r0[owner] + band * band_rows[owner]).astype(np.int32)
    band_h = np.clip(box_h[owner] - band * band_rows[owner], 0, band_rows[owner])
    band_w = box_w[owner].astype(np.int32)
    band_c0 = c0[owner].astype(np.int32)
    counts = band_w.astype(np.int64) * band_h
    for start, stop in _batches(counts):
        n = counts[start:stop]
        piece = np.repeat(np.arange(start, stop), n)
        offset = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
        row_in_box, col_in_box = np.divmod(offset, band_w[piece])
        cols = (band_c0[piece] + col_in_box) + 0.5
        rows = (band_r0[piece] + row_in_box) + 0.5
        tri = owner[piece]
        tbx, tby, tcx, tcy, tar = bx[tri], by[tri], cx[tri], cy[tri], ar[tri]
        w0 = ((tbx - cols) * (tcy - rows) - (tby - rows) * (tcx - cols)) / tar
        w1 = ((tcx - cols) * (ay[tri] - rows) - (tcy - rows) * (ax[tri] - cols)) / tar
        w2 = 1.0 - w0 - w1
        hit = np.flatnonzero((w0 >= -1e-9) & (w1 >= -1e-9) & (w2 >= -1e-9))
        if not hit.size:
            continue
        w0, w1, w2, tri = w0[hit], w1[hit], w2[hit], tri[hit]
        face = keep[tri]
        z = w0 * az[tri] + w1 * bz[tri] + w2 * cz[tri]
        pixel = (rows[hit] - 0.5).astype(np.int64) * width + (cols[hit] - 0.5).astype(np.int64)
        # per pixel: the largest z, and on a tie the lowest triangle index (earlier batches hold lower ones)
        before = depth[pixel]
        np.maximum.at(depth, pixel, z)
        index[pixel[z > before]] = np.iinfo(np.int64).max  # a nearer surface came: the old owner is gone
        best = z == depth[pixel]
        np.minimum.at(index, pixel[best], face[best])
        win = np.flatnonzero(best)
        win = win[index[pixel[win]] == face[win]]
        bary[pixel[win]] = np.stack([w0[win], w1[win], w2[win]], axis=-1)
    return depth.reshape(height, width), index.reshape(height, width), bary.reshape(height, width, 3)


def _face_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    v = vertices[faces]
    n = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)


def shade(vertices: np.ndarray, faces: np.ndarray, index: np.ndarray, bary: np.ndarray,
          colors: np.ndarray | None, light: np.ndarray = LIGHT) -> np.ndarray:
    """Lambert (two-sided, flat per triangle) times the interpolated vertex colour; background elsewhere.

    ``light`` is one direction toward the light (3,) or one per triangle (F, 3), unit length.
    """
    image = np.full((*index.shape, 3), float(BACKGROUND))
    hit = index >= 0
    if not hit.any():
        return image.astype(np.uint8)
    normals = _face_normals(vertices, faces)
    lambert = np.abs(normals @ light) if np.ndim(light) == 1 else np.abs(np.einsum("fk,fk->f", normals, light))
    intensity = AMBIENT + (1.0 - AMBIENT) * lambert
    tri = index[hit]
    if colors is None:
        albedo = np.broadcast_to(BASE_COLOR, (tri.size, 3))
    else:
        corner = colors[faces[tri]]  # (P, 3 corners, 3)
        albedo = np.einsum("pk,pkc->pc", bary[hit], corner)
    image[hit] = albedo * intensity[tri, None]
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
                 colors: np.ndarray | None = None, field_mm: float | None = None) -> list[np.ndarray]:
    """One (size, size, 3) image per rotation (applied to the centred mesh), all at the same scale.

    ``field_mm``: the millimetres across each view (a fixed scale, so sizes can be compared between
    faces); None scales the mesh to fill 90 % of the frame.
    """
    v, f, c = _check(vertices, faces, colors)
    centre = (v.min(axis=0) + v.max(axis=0)) / 2.0 if v.size else np.zeros(3)
    posed = [(v - centre) @ r.T for r in rotations]
    if field_mm is None:
        extent = max(float(np.abs(p[:, :2]).max()) for p in posed) if v.size else 1.0
        scale = 0.45 * size / max(extent, 1e-12)
    else:
        scale = size / float(field_mm)
    images = []
    for p in posed:
        pix = np.stack([size / 2.0 + p[:, 0] * scale, size / 2.0 - p[:, 1] * scale, p[:, 2]], axis=1)
        _, index, bary = rasterize(pix, f, size, size)
        images.append(shade(p, f, index, bary, c))
    return images


def ruler(width: int, px_per_mm: float, height: int = RULER_HEIGHT) -> np.ndarray:
    """(height, width, 3) scale bar: 100 mm (fewer if it does not fit) with a tick every 10 mm."""
    import cv2

    strip = np.full((height, width, 3), BACKGROUND, np.uint8)
    left, base = 12, 12
    length_mm = 100
    while length_mm > 10 and left + length_mm * px_per_mm > width - 40:
        length_mm -= 10
    right = round(left + length_mm * px_per_mm)
    cv2.line(strip, (left, base), (right, base), (0, 0, 0), 1)
    for mm in range(0, length_mm + 1, 10):
        x = round(left + mm * px_per_mm)
        tall = 8 if mm % 50 == 0 else 4
        cv2.line(strip, (x, base - tall), (x, base), (0, 0, 0), 1)
    for mm in sorted({0, 50, length_mm} if length_mm >= 50 else {0, length_mm}):
        label = f"{mm} mm" if mm == length_mm else str(mm)
        x = round(left + mm * px_per_mm) - (4 if mm == 0 else 10)
        cv2.putText(strip, label, (max(x, 0), height - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return strip


def render_preview(
    vertices_mm: np.ndarray, faces: np.ndarray, colors: np.ndarray | None = None, size: int = 384,
    field_mm: float | None = PREVIEW_FIELD_MM,
) -> np.ndarray:
    """(size + RULER_HEIGHT, 2·size, 3) uint8: head-on view and the subject's right profile side by side,
    at a fixed ``field_mm`` across each view, with a millimetre ruler below (``field_mm=None``: the old
    fill-the-frame scale and no ruler, (size, 2·size, 3))."""
    if not 16 <= int(size) <= 4096:
        raise InvalidInputError(f"render: size must be 16..4096 pixels, got {size}")
    if field_mm is not None and not (np.isfinite(field_mm) and 1.0 <= field_mm <= 10_000.0):
        raise InvalidInputError(f"render: field_mm must be 1..10000, got {field_mm}")
    angle = np.pi / 2  # turn the face to the viewer's left: the subject's right cheek faces the camera
    profile = np.array([[np.cos(angle), 0.0, -np.sin(angle)], [0.0, 1.0, 0.0], [np.sin(angle), 0.0, np.cos(angle)]])
    front, side = render_views(vertices_mm, faces, [np.eye(3), profile], int(size), colors, field_mm)
    views = np.concatenate([front, side], axis=1)
    if field_mm is None:
        return views
    return np.concatenate([views, ruler(views.shape[1], int(size) / float(field_mm))], axis=0)


def render_camera(vertices_cam_mm: np.ndarray, faces: np.ndarray, intrinsics: np.ndarray, width: int, height: int,
                  colors: np.ndarray | None = None) -> np.ndarray:
    """(height, width, 4) uint8 RGBA: the mesh seen by an OpenCV pinhole camera, lit from the camera.

    ``vertices_cam_mm`` (V,3) in camera space (x right, y down, z forward), ``intrinsics`` (3,3) in the
    image's pixel grid. Alpha is 255 where the mesh covers the pixel centre, 0 elsewhere. Depth test on
    1/z (affine across a projected triangle, so the z-buffer is exact); triangles with a vertex nearer
    than NEAR_MM are dropped.
    """
    v, f, c = _check(vertices_cam_mm, faces, colors)
    k = np.asarray(intrinsics, np.float64)
    if k.shape != (3, 3) or not np.isfinite(k).all() or k[0, 0] <= 0 or k[1, 1] <= 0:
        raise InvalidInputError(f"render: intrinsics must be a finite (3, 3) matrix with fx, fy > 0, got {k.shape}")
    if not (1 <= int(width) <= 16384 and 1 <= int(height) <= 16384):
        raise InvalidInputError(f"render: image size must be 1..16384 pixels, got {width}x{height}")
    width, height = int(width), int(height)
    rgba = np.zeros((height, width, 4), np.uint8)
    f = f[(v[f, 2] > NEAR_MM).all(axis=1)] if f.size else f
    if not f.size:
        return rgba
    z = np.where(v[:, 2] > NEAR_MM, v[:, 2], np.inf)
    projected = v @ k.T
    pix = np.stack([projected[:, 0] / z + 0.5, projected[:, 1] / z + 0.5, 1.0 / z], axis=1)
    _, index, bary = rasterize(pix, f, height, width)
    centroid = v[f].mean(axis=1)
    toward_camera = -centroid / np.maximum(np.linalg.norm(centroid, axis=1, keepdims=True), 1e-12)
    rgba[..., :3] = shade(v, f, index, bary, c, light=toward_camera)
    rgba[..., 3] = np.where(index >= 0, 255, 0).astype(np.uint8)
    return rgba


def composite(image: np.ndarray, rgba: np.ndarray, opacity: float = 0.6) -> np.ndarray:
    """``rgba`` over the RGB ``image`` (same height and width), its alpha scaled by ``opacity``."""
    if image.shape[:2] != rgba.shape[:2]:
        raise InvalidInputError(f"render: overlay {rgba.shape[:2]} does not match the image {image.shape[:2]}")
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0 * float(opacity)
    base = np.asarray(image)[..., :3].astype(np.float32)
    return np.clip(np.rint(base * (1.0 - alpha) + rgba[..., :3] * alpha), 0, 255).astype(np.uint8)


def overlay(image: np.ndarray, vertices_cam_mm: np.ndarray, faces: np.ndarray, intrinsics: np.ndarray,
            opacity: float = 0.6, colors: np.ndarray | None = None,
            window: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """The posed mesh shaded over the photo (RGB uint8); ``window`` (left, top, right, bottom) crops both
    the photo and the rendering to that region of the photo's pixel grid (the camera is shifted, not
    rescaled, so the crop is pixel for pixel the same as the full overlay's)."""
    photo = np.asarray(image)
    left, top, right, bottom = window if window is not None else (0, 0, photo.shape[1], photo.shape[0])
    if not (0 <= left < right <= photo.shape[1] and 0 <= top < bottom <= photo.shape[0]):
        raise InvalidInputError(f"render: window {window} lies outside the {photo.shape[1]}x{photo.shape[0]} image")
    k = np.array(intrinsics, np.float64)
    k[0, 2] -= left
    k[1, 2] -= top
    rgba = render_camera(vertices_cam_mm, faces, k, right - left, bottom - top, colors)
    return composite(photo[top:bottom, left:right], rgba, opacity)


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
