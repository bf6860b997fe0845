"""The shape + pose fit to 2-D landmarks (facefuse.models.landmark_fit) on synthetic faces of known shape."""

from __future__ import annotations

import numpy as np
import pytest

from facefuse.models.gpmm import GaussianProcessMorphableModel
from facefuse.models.landmark_fit import contour_normals, fit_shape_to_landmarks, rotation_from_vector


def _template() -> np.ndarray:
    """A mirror-symmetric half-ellipsoid 'face' (mm), x = 0 the mid-plane, z toward the viewer."""
    xs = np.linspace(-60.0, 60.0, 9)
    ys = np.linspace(-80.0, 80.0, 11)
    gx, gy = np.meshgrid(xs, ys)
    gz = 40.0 * np.sqrt(np.clip(1.0 - (gx / 75.0) ** 2 - (gy / 95.0) ** 2, 0.0, None))
    return np.stack([gx.ravel(), gy.ravel(), gz.ravel()], axis=1)


@pytest.fixture(scope="module")
def model() -> GaussianProcessMorphableModel:
    return GaussianProcessMorphableModel.build(_template(), rank=30)


def _scene(model, seed: int, depth_noise_mm: float = 0.0):
    rng = np.random.default_rng(seed)
    alpha = rng.standard_normal(model.rank) * np.sqrt(model.eigenvalues)
    truth = model.vertices_from_coefficients(alpha)
    rotation = rotation_from_vector(np.array([0.15, -0.35, 0.1]))  # ~20° yaw, tilt and roll
    translation = np.array([4.0, -3.0, 20.0])
    observed = truth @ rotation.T + translation
    observed[:, 2] += depth_noise_mm * rng.standard_normal(observed.shape[0])
    return alpha, truth, rotation, translation, observed


def _rotation_error_deg(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip((np.trace(a.T @ b) - 1.0) / 2.0, -1.0, 1.0))))


def test_recovers_a_known_shape_and_pose(model):
    _, truth, rotation, translation, observed = _scene(model, 1, depth_noise_mm=3.0)
    fit = fit_shape_to_landmarks(model.mean_mm, model.basis, model.eigenvalues, observed, np.ones(len(truth)),
                                 np.eye(3), np.zeros(3), landmark_sd_mm=0.05, depth_sd_mm=4.0, iterations=15)
    assert _rotation_error_deg(fit.rotation, rotation) < 0.5
    assert np.abs(fit.translation[:2] - translation[:2]).max() < 0.2
    error = np.linalg.norm(fit.vertices_mm - truth, axis=1)
    start = np.linalg.norm(model.mean_mm - truth, axis=1)
    assert error.mean() < 0.5 < start.mean()  # the shape is recovered, not just the mean face
    assert fit.landmark_rms_mm < 0.1


def test_hidden_landmarks_with_zero_weight_are_ignored(model):
    _, truth, rotation, _, observed = _scene(model, 3)
    hidden = truth[:, 1] < -30.0  # the lower third of the face
    corrupted = observed.copy()
    corrupted[hidden] += np.array([25.0, -40.0, 30.0])  # what an occluder would make the landmarks say
    weights = np.where(hidden, 0.0, 1.0)
    fit = fit_shape_to_landmarks(model.mean_mm, model.basis, model.eigenvalues, corrupted, weights,
                                 np.eye(3), np.zeros(3), landmark_sd_mm=0.05, iterations=15)
    clean = fit_shape_to_landmarks(model.mean_mm, model.basis, model.eigenvalues, observed, weights,
                                   np.eye(3), np.zeros(3), landmark_sd_mm=0.05, iterations=15)
    np.testing.assert_allclose(fit.vertices_mm, clean.vertices_mm, atol=1e-6)  # the hidden values do not matter
    assert _rotation_error_deg(fit.rotation, rotation) < 1.0
    assert np.linalg.norm(fit.vertices_mm[~hidden] - truth[~hidden], axis=1).mean() < 2.0
    naive = fit_shape_to_landmarks(model.mean_mm, model.basis, model.eigenvalues, corrupted, np.ones(len(truth)),
                                   np.eye(3), np.zeros(3), landmark_sd_mm=0.05, iterations=15)
    assert np.linalg.norm(naive.vertices_mm - truth, axis=1).mean() > 3.0  # the weights are what protects it


def test_contour_points_count_only_across_the_outline(model):
    """Sliding contour landmarks along the outline barely matters; moving them across does."""
    _, truth, _, _, observed = _scene(model, 4)
    grid = np.arange(len(truth)).reshape(11, 9)
    loop = [*grid[0], *grid[1:, -1], *grid[-1, -2::-1], *grid[-2:0:-1, 0]]
    normals = contour_normals(observed[:, :2], loop)

    def fit(observed_mm):
        return fit_shape_to_landmarks(model.mean_mm, model.basis, model.eigenvalues, observed_mm, np.ones(len(truth)),
                                      np.eye(3), np.zeros(3), landmark_sd_mm=0.05, contour=loop, iterations=15)

    base = fit(observed)
    slid, pushed = observed.copy(), observed.copy()
    tangent = np.stack([-normals[:, 1], normals[:, 0]], axis=1)
    slid[loop, :2] += 3.0 * tangent
    pushed[loop, :2] += 3.0 * normals
    along, across = fit(slid), fit(pushed)
    moved_along = np.linalg.norm(along.vertices_mm - base.vertices_mm, axis=1).mean()
    moved_across = np.linalg.norm(across.vertices_mm - base.vertices_mm, axis=1).mean()
    assert moved_across > 5.0 and moved_along < 0.05 * moved_across  # along: only the normals shift a little


def test_deterministic_and_rejects_bad_input(model):
    _, truth, _, _, observed = _scene(model, 5)
    ones = np.ones(len(truth))
    a = fit_shape_to_landmarks(model.mean_mm, model.basis, model.eigenvalues, observed, ones, np.eye(3), np.zeros(3))
    b = fit_shape_to_landmarks(model.mean_mm, model.basis, model.eigenvalues, observed, ones, np.eye(3), np.zeros(3))
    np.testing.assert_array_equal(a.vertices_mm, b.vertices_mm)
    with pytest.raises(ValueError, match="zero weight"):
        fit_shape_to_landmarks(model.mean_mm, model.basis, model.eigenvalues, observed, 0 * ones, np.eye(3),
                               np.zeros(3))
    bad = observed.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fit_shape_to_landmarks(model.mean_mm, model.basis, model.eigenvalues, bad, ones, np.eye(3), np.zeros(3))
