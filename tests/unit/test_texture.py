"""The open pack's photo texture and the fixed-scale uncertainty images."""

from __future__ import annotations

import numpy as np
import pytest

from facefuse.errors import InvalidInputError
from facefuse.render import RULER_HEIGHT, SPREAD_SCALE_MM, render_uncertainty, spread_colors, spread_legend
from facefuse.texture import STRIPE_DARKEN, photo_texture


def _square(flip_second: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    uvs = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    faces = np.array([[0, 2, 1], [1, 2, 3]])
    xy = uvs * 99.0
    if flip_second:  # vertex 3 folded over the diagonal: the second triangle faces away in the photo
        xy[3] = [10.0, 10.0]
    return uvs, faces, xy


def test_texture_samples_the_photo_through_the_uv_layout():
    photo = np.zeros((100, 100, 3), np.uint8)
    photo[..., 0] = np.arange(100)[None, :] * 2  # red grows with the column
    photo[..., 1] = np.arange(100)[:, None] * 2  # green with the row
    uvs, faces, xy = _square()
    texture, hidden = photo_texture(photo, xy, faces, uvs, size=64)
    assert not hidden.any()
    rows, cols = np.mgrid[0:64, 0:64]
    expected_red = (cols + 0.5) / 64 * 99 * 2
    assert np.abs(texture[8:56, 8:56, 0] - expected_red[8:56, 8:56]).max() < 4
    assert np.abs(texture[8:56, 8:56, 1] - ((rows + 0.5) / 64 * 99 * 2)[8:56, 8:56]).max() < 4


def test_hidden_texels_are_filled_and_marked():
    photo = np.full((100, 100, 3), 200, np.uint8)
    uvs, faces, xy = _square(flip_second=True)
    texture, hidden = photo_texture(photo, xy, faces, uvs, size=64)
    assert hidden[60, 60] and not hidden[4, 4]  # the folded triangle (lower right) is hidden
    values = texture[hidden][:, 0]
    assert set(np.unique(values)) == {200, round(200 * STRIPE_DARKEN)}  # fill colour, with stripes
    low_visibility = np.array([1.0, 1.0, 1.0, 0.0])
    _, hidden = photo_texture(photo, _square()[2], faces, uvs, visibility=low_visibility, size=64)
    assert hidden[62, 62] and not hidden[2, 2]
    with pytest.raises(InvalidInputError):
        photo_texture(photo, xy[:3], faces, uvs)


def test_uncertainty_colours_use_one_fixed_scale():
    one = spread_colors(np.array([0.0, 2.0, 100.0]))
    other = spread_colors(np.array([2.0, 0.5]))
    np.testing.assert_array_equal(one[1], other[0])  # 2 mm looks the same whatever else the face has
    np.testing.assert_array_equal(one[2], spread_colors(np.array([SPREAD_SCALE_MM]))[0])  # clipped at the top
    assert spread_legend(300).shape == (44, 300, 3)
    square = np.array([[0, 0, 0], [10, 0, 0], [0, 10, 0], [10, 10, 0]], float)
    image = render_uncertainty(square, np.array([[0, 1, 2], [1, 3, 2]]), np.array([0.0, 1.0, 4.0, 8.0]), size=64)
    assert image.shape == (64 + RULER_HEIGHT + 44, 128, 3)  # views at the fixed mm scale, ruler, legend


def test_landmark_visibility_takes_each_points_regions():
    from facefuse.assets.canonical_face import load_canonical_face
    from facefuse.assets.store import ModelStore
    from facefuse.fusion.visibility import MEDIAPIPE_REGIONS, REGION_NAMES, landmark_visibility

    face = load_canonical_face(ModelStore())
    landmarks = np.c_[face.vertices_mm[:, 0] * 4 + 400, -face.vertices_mm[:, 1] * 4 + 400]  # a frontal photo
    regions = {name: 1.0 for name in REGION_NAMES} | {"lips": 0.2}
    per_point = landmark_visibility(landmarks, regions)
    assert per_point.shape == (468,)
    np.testing.assert_allclose(per_point[list(MEDIAPIPE_REGIONS["lips"].indices)], 0.2)
    assert per_point[1] == 1.0  # the nose tip
    assert np.isnan(per_point).sum() > 20  # points in no region (jaw line, temples) have no value
