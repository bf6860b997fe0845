"""The Gaussian-process morphable model, checked against independent numpy formulas on a small mesh."""

from __future__ import annotations

import numpy as np
import pytest

from facefuse.models.gpmm import GaussianProcessMorphableModel, KernelScale, full_covariance, mirror_map

SCALES = (KernelScale(30.0, 4.0), KernelScale(10.0, 1.5))


@pytest.fixture(scope="module")
def template():
    """A mirror-symmetric point set (mm): 25 points with x > 0, their mirrors, and 6 on the mid-plane."""
    rng = np.random.default_rng(7)
    side = rng.uniform([5, -50, 0], [60, 50, 40], size=(25, 3))
    mid = np.c_[np.zeros(6), rng.uniform(-50, 50, 6), rng.uniform(0, 40, 6)]
    return np.vstack([side, side * [-1, 1, 1], mid])


def test_mirror_map(template):
    m = mirror_map(template)
    np.testing.assert_array_equal(m[:25], np.arange(25, 50))
    np.testing.assert_array_equal(m[25:50], np.arange(25))
    np.testing.assert_array_equal(m[50:], np.arange(50, 56))
    with pytest.raises(ValueError, match="not mirror-symmetric"):
        mirror_map(template + np.array([3.0, 0.0, 0.0]))


def test_covariance_matches_the_written_formula(template):
    rho = 0.7
    cov = full_covariance(template, SCALES, rho)
    v = template.shape[0]
    m = mirror_map(template)
    d2 = ((template[:, None] - template[None]) ** 2).sum(-1)
    k = sum(s.amplitude_mm**2 * np.exp(-d2 / (2 * s.length_mm**2)) for s in SCALES)
    sign = np.array([-1.0, 1.0, 1.0])
    expected = np.zeros((3 * v, 3 * v))
    for i in range(v):
        for j in range(v):
            for a in range(3):
                sym = 0.5 * (k[i, j] + sign[a] * k[i, m[j]] + sign[a] * k[m[i], j] + k[m[i], m[j]])
                expected[3 * i + a, 3 * j + a] = (1 - rho) * k[i, j] + rho * sym
    np.testing.assert_allclose(cov, expected, rtol=1e-12, atol=1e-12)
    assert np.linalg.eigvalsh(cov).min() > -1e-8 * np.abs(cov).max()
    # Mirror-invariant: reflecting a field (x -> -x, i -> m(i)) leaves the covariance unchanged.
    t = np.zeros((3 * v, 3 * v))
    for i in range(v):
        for a in range(3):
            t[3 * i + a, 3 * m[i] + a] = sign[a]
    np.testing.assert_allclose(t @ cov @ t.T, cov, atol=1e-9)
    # With ρ = 1 the x displacement of a mid-plane vertex has zero variance (a symmetric field keeps it there).
    assert full_covariance(template, SCALES, 1.0)[3 * 50, 3 * 50] < 1e-9


def test_low_rank_is_the_truncated_eigendecomposition(template):
    cov = full_covariance(template, SCALES, 0.8)
    model = GaussianProcessMorphableModel.build(template, SCALES, 0.8, variance_fraction=0.99)
    w = np.sort(np.linalg.eigvalsh(cov))[::-1]
    np.testing.assert_allclose(model.eigenvalues, w[:model.rank], rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(model.basis.T @ model.basis, np.eye(model.rank), atol=1e-10)
    assert model.eigenvalues.sum() / w.sum() >= 0.99
    np.testing.assert_allclose(model.residual_variance, w[model.rank:].mean(), rtol=1e-8)


def _independent_posterior(model, observed, seen, noise):
    """Vertex-space GP regression with the low-rank covariance: μ + C_*o (C_oo + D)⁻¹ (y − μ_o)."""
    c = (model.basis * model.eigenvalues) @ model.basis.T
    rows = (3 * np.flatnonzero(seen)[:, None] + np.arange(3)).reshape(-1)
    d = np.eye(rows.size) * (noise**2 + model.residual_variance)
    gain = c[:, rows] @ np.linalg.inv(c[np.ix_(rows, rows)] + d)
    mean = model.mean_mm.reshape(-1) + gain @ (observed.reshape(-1)[rows] - model.mean_mm.reshape(-1)[rows])
    cov = c - gain @ c[rows]
    return mean.reshape(-1, 3), cov


def test_conditioning_agrees_with_vertex_space_regression(template):
    model = GaussianProcessMorphableModel.build(template, SCALES, 0.8, variance_fraction=0.99)
    rng = np.random.default_rng(0)
    truth = model.prior().sample_mm(1, rng)[0]
    observed = truth + rng.normal(scale=0.5, size=truth.shape)
    seen = template[:, 0] >= 0  # the right half and the mid-plane are seen, the left half hidden
    post = model.condition(observed, seen.astype(float), 0.5)
    mean, cov = _independent_posterior(model, observed, seen, 0.5)
    np.testing.assert_allclose(post.mean_mm(), mean, atol=1e-8)
    np.testing.assert_allclose(post.vertex_std_mm(), np.sqrt(np.diag(cov).reshape(-1, 3).sum(1)), rtol=1e-6)
    # Samples: their covariance is the posterior's; hidden vertices spread more than seen ones.
    samples = post.sample_mm(4000, np.random.default_rng(1))
    emp = np.cov(samples.reshape(4000, -1).T)
    assert np.abs(emp - cov).max() < 0.08 * np.abs(cov).max()
    std = samples.std(axis=0).sum(axis=1)
    assert std[~seen].mean() > 2.0 * std[seen].mean()
    # Symmetry carries information: the hidden left half is predicted from the seen right half.
    err_post = np.linalg.norm(post.mean_mm()[~seen] - truth[~seen], axis=1).mean()
    err_prior = np.linalg.norm(model.mean_mm[~seen] - truth[~seen], axis=1).mean()
    assert err_post < 0.6 * err_prior


def test_sampling_is_seeded_and_basis_independent(template):
    model = GaussianProcessMorphableModel.build(template, SCALES, 0.8, variance_fraction=0.99)
    observed = template + 1.0
    weights = (template[:, 1] > 0).astype(float)
    post = model.condition(observed, weights, 1.0)
    a = post.sample_mm(3, np.random.default_rng(5))
    np.testing.assert_array_equal(a, post.sample_mm(3, np.random.default_rng(5)))
    assert np.abs(a - post.sample_mm(3, np.random.default_rng(6))).max() > 0.1
    # Flip the sign of every other eigenvector: the same model, so the same samples for the same seed.
    flipped = model.basis * np.where(np.arange(model.rank) % 2, -1.0, 1.0)
    other = GaussianProcessMorphableModel(model.mean_mm, flipped, model.eigenvalues, model.residual_variance)
    np.testing.assert_allclose(
        other.condition(observed, weights, 1.0).sample_mm(3, np.random.default_rng(5)), a, atol=1e-8
    )
    # No vertex seen: the prior.
    prior = model.condition(observed, np.zeros(template.shape[0]), 1.0)
    np.testing.assert_allclose(prior.coeff_cov, np.diag(model.eigenvalues))


def test_batch_of_observations_shares_one_covariance(template):
    """N observation sets at the same vertices: each posterior mean equals the one-at-a-time answer."""
    model = GaussianProcessMorphableModel.build(template, SCALES, 0.8, variance_fraction=0.99)
    rng = np.random.default_rng(3)
    observed = template + rng.normal(scale=2.0, size=(4, *template.shape))
    weights = (template[:, 1] > 0).astype(float)
    batch = model.condition(observed, weights, 1.0, hidden_noise_mm=3.0)
    assert batch.mean_mm().shape == (4, *template.shape)
    for i in range(4):
        one = model.condition(observed[i], weights, 1.0, hidden_noise_mm=3.0)
        np.testing.assert_allclose(batch.mean_mm()[i], one.mean_mm(), atol=1e-9)
        np.testing.assert_allclose(batch.coeff_cov, one.coeff_cov, atol=1e-12)
    # Hidden vertices observed with 3 mm noise follow their observations less closely than seen ones.
    gap = np.linalg.norm(batch.mean_mm() - observed, axis=-1).mean(axis=0)
    assert gap[weights < 0.5].mean() > gap[weights >= 0.5].mean()
    # One sample per posterior, seeded.
    draws = batch.sample_mm(4, np.random.default_rng(0))
    np.testing.assert_array_equal(draws, batch.sample_mm(4, np.random.default_rng(0)))
    with pytest.raises(ValueError, match="one sample each"):
        batch.sample_mm(3, np.random.default_rng(0))
    assert model.condition(observed, np.zeros(template.shape[0]), 1.0).mean_mm().shape == (4, *template.shape)


def test_mahalanobis_is_the_ppca_quadratic_form(template):
    model = GaussianProcessMorphableModel.build(template, SCALES, 0.8, rank=20)
    x = template + np.random.default_rng(2).normal(size=template.shape)
    c = (model.basis * model.eigenvalues) @ model.basis.T
    proj = model.basis @ model.basis.T
    cov = c + model.residual_variance * (np.eye(c.shape[0]) - proj)  # PPCA covariance, full rank
    d = (x - template).reshape(-1)
    np.testing.assert_allclose(model.mahalanobis(x), d @ np.linalg.solve(cov, d), rtol=1e-8)
