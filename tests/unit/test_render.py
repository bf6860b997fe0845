"""The preview renderer (coverage, z-buffer, shading) and the .glb writer (read back with trimesh)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import trimesh

from facefuse.errors import InvalidInputError
from facefuse.io.gltf import glb_bytes, write_glb
from facefuse.render import BACKGROUND, rasterize, render_preview


def _inside_triangle(px, py, a, b, c):
    """Independent same-side test for a pixel centre."""
    def side(p, q):
        return (q[0] - p[0]) * (py - p[1]) - (q[1] - p[1]) * (px - p[0])
    s = np.array([side(a, b), side(b, c), side(c, a)])
    return bool(np.all(s >= 0) or np.all(s <= 0))


def test_front_facing_triangle_covers_exactly_the_pixel_centres_inside():
    a, b, c = (2.2, 1.7), (13.6, 3.1), (5.4, 12.9)
    pts = np.array([[*a, 1.0], [*b, 1.0], [*c, 1.0]])
    depth, index, bary = rasterize(pts, np.array([[0, 1, 2]]), 16, 16)
    expected = np.array([[_inside_triangle(col + 0.5, row + 0.5, a, b, c) for col in range(16)] for row in range(16)])
    assert expected.sum() > 30
    np.testing.assert_array_equal(index >= 0, expected)
    assert np.allclose(depth[expected], 1.0)
    np.testing.assert_allclose(bary[expected].sum(axis=-1), 1.0)


def test_z_buffer_keeps_the_nearer_triangle_whatever_the_order():
    far = [[0, 0, -5.0], [20, 0, -5.0], [0, 20, -5.0]]
    near = [[2, 2, 3.0], [18, 2, 3.0], [2, 18, 3.0]]
    for order in ((0, 1), (1, 0)):
        pts = np.array([far, near][order[0]] + [far, near][order[1]], dtype=float)
        _, index, _ = rasterize(pts, np.array([[0, 1, 2], [3, 4, 5]]), 20, 20)
        near_id = order.index(1)
        assert index[5, 5] == near_id  # inside both: the nearer one (z = 3) wins
        assert index[0, 15] == 1 - near_id  # only the far one covers it


def test_preview_layout_and_lambert_shading():
    # A square facing the viewer, and the same square tilted 60 degrees: cos 60 = half the diffuse light.
    square = np.array([[-1, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0]], float)
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    image = render_preview(square, faces, size=64, field_mm=None)
    assert image.shape == (64, 128, 3) and image.dtype == np.uint8
    front = image[:, :64]
    assert (front[32, 32] != BACKGROUND).any() and (front[1, 1] == BACKGROUND).all()
    colors = np.full((4, 3), 1.0)  # white albedo
    from facefuse.render import AMBIENT, LIGHT, render_views

    straight, = render_views(square, faces, [np.eye(3)], 64, colors)
    expected = 255 * (AMBIENT + (1 - AMBIENT) * abs(LIGHT[2]))
    assert abs(float(straight[32, 32, 0]) - expected) <= 1.0
    # Per-vertex colours are interpolated: a red corner makes its side redder.
    colors = np.zeros((4, 3), np.uint8)
    colors[:] = 100
    colors[0] = (255, 0, 0)
    tinted, = render_views(square, faces, [np.eye(3)], 64, colors)
    assert tinted[60, 4, 0] > tinted[4, 60, 0] and tinted[60, 4, 1] < tinted[4, 60, 1]
    with pytest.raises(InvalidInputError):
        render_preview(square, np.array([[0, 1, 7]]))


def test_glb_round_trips_through_trimesh(tmp_path):
    rng = np.random.default_rng(3)
    vertices = rng.normal(size=(30, 3)) * 50.0
    faces = np.array([[i, (i + 1) % 30, (i + 7) % 30] for i in range(30)])
    colors = rng.integers(0, 256, size=(30, 3), dtype=np.uint8)
    uvs = rng.uniform(size=(30, 2))
    texture = rng.integers(0, 256, size=(16, 8, 3), dtype=np.uint8)
    path = write_glb(tmp_path / "m.glb", vertices, faces, uvs=uvs, texture=texture)
    mesh = trimesh.load(str(path), process=False, force="mesh")
    np.testing.assert_allclose(np.asarray(mesh.vertices) * 1000.0, vertices, rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(mesh.faces), faces)
    # glTF's UV origin is the image's top-left; trimesh converts to a bottom-left origin (v -> 1 - v).
    np.testing.assert_allclose(np.asarray(mesh.visual.uv), np.c_[uvs[:, 0], 1 - uvs[:, 1]], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(mesh.visual.material.baseColorTexture.convert("RGB")), texture)
    # Vertex colours: no material, so trimesh's default load (and three.js, Blender) shows them.
    coloured = trimesh.load(str(write_glb(tmp_path / "c.glb", vertices, faces, colors=colors)), process=False,
                            force="mesh")
    assert coloured.visual.kind == "vertex"
    np.testing.assert_array_equal(np.asarray(coloured.visual.vertex_colors)[:, :3], colors)
    # Layout checked by hand: header, 4-byte aligned chunks, which attributes each file has.
    layouts = (("m.glb", {"POSITION", "NORMAL", "TEXCOORD_0"}), ("c.glb", {"POSITION", "NORMAL", "COLOR_0"}))
    for name, expected in layouts:
        data = (tmp_path / name).read_bytes()
        magic, version, total = struct.unpack_from("<III", data, 0)
        assert (magic, version, total) == (0x46546C67, 2, len(data))
        json_len, json_type = struct.unpack_from("<II", data, 12)
        assert json_type == 0x4E4F534A and json_len % 4 == 0
        doc = json.loads(data[20:20 + json_len])
        primitive = doc["meshes"][0]["primitives"][0]
        assert set(primitive["attributes"]) == expected
        assert ("material" in primitive) == (name == "m.glb")
        position = doc["accessors"][primitive["attributes"]["POSITION"]]
        np.testing.assert_allclose(position["max"], (vertices / 1000).max(axis=0), rtol=1e-6)
    with pytest.raises(InvalidInputError, match="only together with a texture"):
        glb_bytes(vertices, faces, uvs=uvs)
    with pytest.raises(InvalidInputError):
        glb_bytes(vertices, faces + 100)


def _brute_force(points, faces, height, width):
    """Independent reference: every pixel centre against every triangle, nearest wins (first on ties)."""
    index = np.full((height, width), -1)
    depth = np.full((height, width), -np.inf)
    for row in range(height):
        for col in range(width):
            px, py = col + 0.5, row + 0.5
            for f, (a, b, c) in enumerate(faces):
                pa, pb, pc = points[a], points[b], points[c]
                area = (pb[0] - pa[0]) * (pc[1] - pa[1]) - (pb[1] - pa[1]) * (pc[0] - pa[0])
                if abs(area) < 1e-12 or not _inside_triangle(px, py, pa, pb, pc):
                    continue
                w0 = ((pb[0] - px) * (pc[1] - py) - (pb[1] - py) * (pc[0] - px)) / area
                w1 = ((pc[0] - px) * (pa[1] - py) - (pc[1] - py) * (pa[0] - px)) / area
                z = w0 * pa[2] + w1 * pb[2] + (1 - w0 - w1) * pc[2]
                if z > depth[row, col]:
                    depth[row, col], index[row, col] = z, f
    return depth, index


def test_vectorised_rasterizer_matches_a_per_pixel_reference_in_any_batching(monkeypatch):
    import facefuse.render as render

    rng = np.random.default_rng(7)
    points = np.c_[rng.uniform(-4, 28, size=(40, 2)), rng.uniform(-5, 5, size=40)]  # some off the image
    faces = rng.integers(0, 40, size=(60, 3))
    depth, index = _brute_force(points, faces, 24, 24)
    for batch in (render.CANDIDATES_PER_BATCH, 50, 7):  # one batch; many; big boxes cut into bands of rows
        monkeypatch.setattr(render, "CANDIDATES_PER_BATCH", batch)
        got_depth, got_index, bary = rasterize(points, faces, 24, 24)
        np.testing.assert_array_equal(got_index, index)
        np.testing.assert_allclose(got_depth[index >= 0], depth[index >= 0], rtol=0, atol=1e-9)
        hit = index >= 0
        np.testing.assert_allclose(bary[hit].sum(axis=1), 1.0)
        corners = points[faces[index[hit]]]
        np.testing.assert_allclose(np.einsum("pk,pkc->pc", bary[hit], corners)[:, 2], depth[hit], atol=1e-9)


def test_flame_preview_is_the_per_triangle_loops_image():
    """The vectorised renderer draws the same preview as the per-triangle loop it replaced (git f4f12f7),
    pixel for pixel, at the old fill-the-frame scale (the new default adds the fixed scale and ruler)."""
    import importlib.util
    import subprocess
    from pathlib import Path

    from facefuse.assets.synthetic.flame import synthetic_flame_mesh

    root = Path(__file__).resolve().parents[2]
    try:
        source = subprocess.run(["git", "-C", str(root), "show", "f4f12f7:src/facefuse/render.py"], check=True,
                                capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        pytest.skip("needs the git history (the old renderer at f4f12f7)")
    spec = importlib.util.spec_from_loader("facefuse_render_f4f12f7", loader=None)
    old = importlib.util.module_from_spec(spec)
    exec(compile(source, "render_f4f12f7.py", "exec"), old.__dict__)
    vertices, faces = synthetic_flame_mesh("small")
    vertices = vertices * 1000.0
    colors = np.random.default_rng(0).integers(0, 256, size=(len(vertices), 3), dtype=np.uint8)
    for c in (None, colors):
        np.testing.assert_array_equal(render_preview(vertices, faces, c, size=160, field_mm=None),
                                      old.render_preview(vertices, faces, c, size=160))


def test_preview_is_drawn_at_a_fixed_mm_scale_with_a_ruler():
    from facefuse.render import PREVIEW_FIELD_MM, RULER_HEIGHT

    faces = np.array([[0, 1, 2], [0, 2, 3]])
    square = np.array([[-1, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0]], float)
    size = 260
    widths = []
    for half_mm in (40.0, 60.0):  # 80 mm and 120 mm wide: drawn 80 and 120 px wide at 1 px/mm
        image = render_preview(square * half_mm, faces, size=size)
        assert image.shape == (size + RULER_HEIGHT, 2 * size, 3)
        covered = (image[size // 2, :size] != BACKGROUND).any(axis=1)
        widths.append(int(covered.sum()))
    assert PREVIEW_FIELD_MM == 260.0 and widths == [80, 120]
    strip = image[size:]
    # ticks every 10 mm from x = 12: at 1 px/mm, dark pixels in the tick row at 12, 22, ... 112
    tick_row = strip[8]
    dark = np.flatnonzero((tick_row < 100).all(axis=1))
    assert set(range(12, 113, 10)) <= set(dark.tolist())
    with pytest.raises(InvalidInputError):
        render_preview(square, faces, field_mm=0.0)


def test_camera_render_projects_like_opencv_and_lights_from_the_camera():
    import cv2

    from facefuse.render import AMBIENT, render_camera

    k = np.array([[300.0, 0, 40.3], [0, 310.0, 30.7], [0, 0, 1]])
    tri = np.array([[-20.0, -15.0, 400.0], [25.0, -10.0, 420.0], [0.0, 30.0, 380.0]])
    rgba = render_camera(tri, np.array([[0, 1, 2]]), k, 80, 60)
    assert rgba.shape == (60, 80, 4) and set(np.unique(rgba[..., 3])) <= {0, 255}
    uv, _ = cv2.projectPoints(tri, np.zeros(3), np.zeros(3), k, None)
    uv = uv[:, 0]
    # OpenCV pixel centres are at integer (u, v): pixel (row, col) covers its centre (col, row)
    expected = np.array([[_inside_triangle(col, row, *uv) for col in range(80)] for row in range(60)])
    np.testing.assert_array_equal(rgba[..., 3] == 255, expected)
    # a triangle facing the camera head-on gets the full light; nearer one hides the farther one
    facing = np.array([[-30.0, -30.0, 300.0], [30.0, -30.0, 300.0], [0.0, 30.0, 300.0]])
    behind = facing * [2.0, 2.0, 1.5]
    both = render_camera(np.r_[behind, facing], np.array([[0, 1, 2], [3, 4, 5]]), k, 80, 60)
    front_only = render_camera(facing, np.array([[0, 1, 2]]), k, 80, 60)
    np.testing.assert_array_equal(both[30, 40], front_only[30, 40])
    assert abs(int(front_only[30, 40, 0]) - 200 * (AMBIENT + (1 - AMBIENT) * 1.0)) <= 1
    assert render_camera(tri - [0, 0, 500], np.array([[0, 1, 2]]), k, 80, 60)[..., 3].max() == 0  # behind: none
    with pytest.raises(InvalidInputError):
        render_camera(tri, np.array([[0, 1, 2]]), np.eye(2), 80, 60)


def test_overlay_window_is_the_crop_of_the_full_overlay():
    from facefuse.render import composite, overlay, render_camera

    rng = np.random.default_rng(1)
    photo = rng.integers(0, 256, size=(90, 120, 3), dtype=np.uint8)
    k = np.array([[200.0, 0, 60.0], [0, 200.0, 45.0], [0, 0, 1]])
    tri = np.array([[-20.0, -15.0, 300.0], [25.0, -10.0, 320.0], [0.0, 30.0, 280.0]])
    full = overlay(photo, tri, np.array([[0, 1, 2]]), k, opacity=0.5)
    np.testing.assert_array_equal(full, composite(photo, render_camera(tri, np.array([[0, 1, 2]]), k, 120, 90), 0.5))
    crop = overlay(photo, tri, np.array([[0, 1, 2]]), k, opacity=0.5, window=(30, 20, 100, 80))
    np.testing.assert_array_equal(crop, full[20:80, 30:100])
    np.testing.assert_array_equal(full[0, 0], photo[0, 0])  # off the mesh: the photo itself
    with pytest.raises(InvalidInputError):
        overlay(photo, tri, np.array([[0, 1, 2]]), k, window=(0, 0, 200, 80))
