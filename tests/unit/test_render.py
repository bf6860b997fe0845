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
