"""Multi-image identity fusion: the weighted mean in a linear shape space, and its spread."""

import numpy as np
import pytest

from facefuse.errors import InvalidInputError
from facefuse.fusion.identity import fuse_identity, image_weight
from facefuse.fusion.space import ShapeSpace


def test_mean_of_meshes_is_the_mesh_of_the_mean_shape() -> None:
    rng = np.random.default_rng(0)
    template = rng.standard_normal((30, 3)) * 0.05
    basis = rng.standard_normal((30, 3, 6)) * 0.002
    space = ShapeSpace(template, basis, np.array([[0, 1, 2]]))
    shapes = rng.standard_normal((4, 6)).astype(np.float32)
    weights = np.array([1.0, 0.5, 0.25, 2.0])
    result = fuse_identity(space.vertices_mm(shapes), weights, shapes=shapes)
    expected_shape = (weights[:, None] * shapes).sum(0) / weights.sum()
    np.testing.assert_allclose(result.shape, expected_shape, rtol=1e-5)
    np.testing.assert_allclose(result.vertices_mm, space.vertices_mm(expected_shape), atol=1e-3)
    np.testing.assert_allclose(result.weights, weights / weights.sum())


def test_spread_combines_between_image_and_own_spread() -> None:
    vertices = np.zeros((2, 5, 3))
    vertices[1, :, 0] = 2.0  # two images 2 mm apart in x, equal weights: between-image std is 1 mm
    own = np.full((2, 5), 1.0)
    result = fuse_identity(vertices, np.ones(2), spreads_mm=own)
    np.testing.assert_allclose(result.vertices_mm[:, 0], 1.0)
    np.testing.assert_allclose(result.vertex_spread_mm, np.sqrt(1.0 + 1.0), rtol=1e-6)


def test_weights_follow_confidence_and_visibility() -> None:
    assert image_weight(0.8, 0.5) == pytest.approx(0.4)
    assert image_weight(None, None) == 1.0
    assert image_weight(0.0, 1.0) > 0  # never exactly zero: a group of poor images still fuses
    with pytest.raises(InvalidInputError):
        fuse_identity(np.zeros((2, 4, 3)), np.array([1.0, -1.0]))
    with pytest.raises(InvalidInputError):
        fuse_identity(np.zeros((0, 4, 3)), np.zeros(0))
