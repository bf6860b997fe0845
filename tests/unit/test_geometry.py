"""The one Umeyama solver: exact recovery, weights, reflections, fixed scale, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from facefuse.errors import InvalidInputError
from facefuse.geometry import SimilarityTransform, umeyama


def _rotation(rng: np.random.Generator, dim: int) -> np.ndarray:
    if dim == 2:
        angle = rng.uniform(-np.pi, np.pi)
        return np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return Rotation.random(random_state=rng).as_matrix()


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("weighted", [False, True])
def test_recovers_a_known_similarity_exactly(dim: int, weighted: bool) -> None:
    rng = np.random.default_rng(dim * 10 + weighted)
    src = rng.normal(size=(9, dim)) * 40
    rot, s, t = _rotation(rng, dim), 1.7, rng.normal(size=dim) * 20
    dst = s * src @ rot.T + t
    weights = rng.uniform(0.1, 3.0, len(src)) if weighted else None
    fit = umeyama(src, dst, weights)
    assert fit.scale == pytest.approx(s, rel=1e-12)
    np.testing.assert_allclose(fit.rotation, rot, atol=1e-12)
    np.testing.assert_allclose(fit.translation, t, atol=1e-10)
    np.testing.assert_allclose(fit.matrix(), np.hstack([s * rot, t[:, None]]), atol=1e-10)


def test_zero_weights_ignore_outliers_and_integer_weights_equal_repeated_points() -> None:
    rng = np.random.default_rng(3)
    src = rng.normal(size=(12, 3)) * 30
    rot, s, t = _rotation(rng, 3), 0.8, np.array([5.0, -2.0, 9.0])
    dst = s * src @ rot.T + t
    dst[:4] += rng.normal(size=(4, 3)) * 50  # outliers the weights exclude
    weights = np.r_[np.zeros(4), np.ones(8)]
    fit = umeyama(src, dst, weights)
    assert fit.scale == pytest.approx(s, rel=1e-12)
    np.testing.assert_allclose(fit.rotation, rot, atol=1e-12)
    assert not np.allclose(umeyama(src, dst).rotation, rot, atol=1e-3)  # unweighted, the outliers pull it away

    noisy = dst + rng.normal(size=dst.shape)
    counts = rng.integers(1, 4, len(src))
    weighted = umeyama(src, noisy, counts.astype(float))
    repeated = umeyama(np.repeat(src, counts, axis=0), np.repeat(noisy, counts, axis=0))
    assert weighted.scale == pytest.approx(repeated.scale, rel=1e-12)
    np.testing.assert_allclose(weighted.rotation, repeated.rotation, atol=1e-12)
    np.testing.assert_allclose(weighted.translation, repeated.translation, atol=1e-9)


def test_weighted_rigid_rotation_matches_scipy_kabsch() -> None:
    rng = np.random.default_rng(4)
    src = rng.normal(size=(20, 3)) * 10
    dst = src @ _rotation(rng, 3).T + rng.normal(size=(20, 3))  # noisy, so the weights matter
    weights = rng.uniform(0.0, 2.0, len(src))
    fit = umeyama(src, dst, weights, scale=1.0)
    w = weights / weights.sum()
    expected, _ = Rotation.align_vectors(dst - w @ dst, src - w @ src, weights=weights)
    np.testing.assert_allclose(fit.rotation, expected.as_matrix(), atol=1e-10)
    np.testing.assert_allclose(fit.apply(w @ src), w @ dst, atol=1e-10)  # weighted centroids meet


@pytest.mark.parametrize("dim", [2, 3])
def test_reflection_modes(dim: int) -> None:
    rng = np.random.default_rng(5)
    src = rng.normal(size=(7, dim))
    mirrored = src * np.r_[-1.0, np.ones(dim - 1)]
    proper = umeyama(src, mirrored)  # the default never reflects
    assert np.linalg.det(proper.rotation) == pytest.approx(1.0)
    assert np.abs(proper.apply(src) - mirrored).max() > 0.1
    best = umeyama(src, mirrored, reflection="best")
    assert np.linalg.det(best.rotation) == pytest.approx(-1.0)
    np.testing.assert_allclose(best.apply(src), mirrored, atol=1e-12)  # a mirror image fits exactly
    forced = umeyama(src, src, reflection=True)
    assert np.linalg.det(forced.rotation) == pytest.approx(-1.0)
    assert np.linalg.det(umeyama(src, src, reflection="best").rotation) == pytest.approx(1.0)


def test_fixed_scale_keeps_the_rotation_and_the_centroids() -> None:
    rng = np.random.default_rng(6)
    src = rng.normal(size=(8, 3)) * 10
    rot = _rotation(rng, 3)
    dst = 2.5 * src @ rot.T + np.array([1.0, 2.0, 3.0])
    fixed = umeyama(src, dst, scale=1.0)
    assert fixed.scale == 1.0
    np.testing.assert_allclose(fixed.rotation, rot, atol=1e-12)
    np.testing.assert_allclose(fixed.apply(src).mean(axis=0), dst.mean(axis=0), atol=1e-10)


def test_a_fit_no_better_than_the_centroid_has_scale_zero() -> None:
    square = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    fit = umeyama(square, square * np.array([-1.0, 1.0]))  # a proper rotation cannot do better than collapse
    assert fit.scale == 0.0
    np.testing.assert_allclose(fit.apply(square), np.tile([-0.5, 0.5], (4, 1)), atol=1e-12)
    assert umeyama(square, np.zeros((4, 2))).scale == 0.0


def test_transform_inverse_and_compose() -> None:
    rng = np.random.default_rng(7)
    a = SimilarityTransform(2.0, _rotation(rng, 3), rng.normal(size=3))
    b = SimilarityTransform(0.5, _rotation(rng, 3), rng.normal(size=3))
    points = rng.normal(size=(5, 3))
    np.testing.assert_allclose(a.compose(b).apply(points), a.apply(b.apply(points)), atol=1e-12)
    np.testing.assert_allclose(a.inverse().apply(a.apply(points)), points, atol=1e-12)
    np.testing.assert_allclose(SimilarityTransform.identity(2).apply(points[:, :2]), points[:, :2])


@pytest.mark.parametrize(
    ("src", "dst", "kwargs", "match"),
    [
        (np.zeros((4, 3)), np.ones((4, 3)), {}, "all identical"),
        (np.ones((4, 3)), np.ones((4, 2)), {}, "equal shape"),
        (np.ones((1, 3)), np.ones((1, 3)), {}, "N>=2"),
        (np.r_[[[np.nan, 0, 0]], np.eye(3)], np.ones((4, 3)), {}, "NaN"),
        (np.eye(3), np.eye(3), {"weights": np.zeros(3)}, "weights"),
        (np.eye(3), np.eye(3), {"weights": np.array([1.0, -1.0, 1.0])}, "weights"),
        (np.eye(3), np.eye(3), {"weights": np.ones(4)}, "weights"),
        (np.eye(3), np.eye(3), {"scale": -1.0}, "positive"),
        (np.eye(3), np.eye(3), {"reflection": "maybe"}, "reflection"),
    ],
)
def test_bad_input_is_refused_with_a_message(src, dst, kwargs, match) -> None:
    with pytest.raises(InvalidInputError, match=match):
        umeyama(src, dst, **kwargs)
