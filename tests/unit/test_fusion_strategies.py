"""Fusion strategies: each test pins a defining property against an independent computation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from facefuse.errors import InvalidInputError
from facefuse.fusion.space import ShapeSpace
from facefuse.fusion.strategies import (
    DEFAULT_STRATEGY,
    SDEDIT_T_MAX,
    SDEDIT_T_MIN,
    STRATEGIES,
    FusionInputs,
    GaussianStrategy,
    create_strategy,
    fuse,
    guided_strength,
    sdedit_t0,
    strategy_names,
)
from facefuse.fusion.visibility import REGION_NAMES, Visibility

K = 12
V = 150


@pytest.fixture(scope="module")
def space() -> ShapeSpace:
    rng = np.random.default_rng(0)
    template = rng.normal(scale=0.05, size=(V, 3))
    basis = rng.normal(scale=0.003, size=(V, 3, K))
    faces = np.stack([np.arange(V), np.roll(np.arange(V), 1), np.roll(np.arange(V), 2)], axis=1)
    regions = {
        "face": np.arange(0, 100), "nose": np.arange(0, 12), "lips": np.arange(12, 24), "forehead": np.arange(24, 40),
        "eye_region": np.arange(40, 56), "left_eye_region": np.arange(40, 48), "right_eye_region": np.arange(48, 56),
        "scalp": np.arange(100, V),
    }
    return ShapeSpace(template, basis, faces, regions=regions)


@pytest.fixture()
def data():
    rng = np.random.default_rng(1)
    mica = rng.normal(size=K).astype(np.float32)
    samples = rng.normal(scale=0.7, size=(9, K)).astype(np.float32)
    scores = rng.normal(size=9).astype(np.float32)
    return mica, samples, scores


def visibility(value: float) -> Visibility:
    return Visibility({name: value for name in REGION_NAMES})


def test_registry_and_default():
    assert strategy_names() == ["mica", "ofer", "linear", "pool", "gaussian", "sdedit", "guided", "region"]
    assert DEFAULT_STRATEGY in STRATEGIES
    assert create_strategy("linear", w=0.25).params["w"] == 0.25
    with pytest.raises(InvalidInputError, match="unknown option"):
        create_strategy("linear", weight=0.3)


def test_mica_and_ofer(space, data):
    mica, samples, scores = data
    assert np.array_equal(fuse("mica", FusionInputs(mica, None, None), space).shape, mica)
    ofer = fuse("ofer", FusionInputs(None, samples, scores), space)
    assert np.array_equal(ofer.shape, samples[int(np.argmax(scores))])


def test_linear_endpoints_are_ofer_and_mica(space, data):
    mica, samples, scores = data
    inputs = dict(mica_shape=mica, samples=samples, scores=scores)
    ofer = fuse("ofer", FusionInputs(**inputs), space)
    assert np.array_equal(fuse("linear", FusionInputs(**inputs, options={"w": 0.0}), space).shape, ofer.shape)
    assert np.array_equal(fuse("linear", FusionInputs(**inputs, options={"w": 1.0}), space).shape, mica)
    half = fuse("linear", FusionInputs(**inputs, options={"w": 0.5}), space).shape
    np.testing.assert_allclose(half, 0.5 * mica + 0.5 * samples[int(np.argmax(scores))], atol=1e-6)
    with pytest.raises(InvalidInputError, match="w must lie"):
        fuse("linear", FusionInputs(**inputs, options={"w": 1.5}), space)


def test_pool_returns_mica_exactly_when_it_scores_highest(space, data):
    mica, samples, scores = data
    pool = np.concatenate([samples, mica[None]], axis=0)
    top = np.append(scores, scores.max() + 1.0)
    assert np.array_equal(fuse("pool", FusionInputs(mica, pool, top), space).shape, mica)
    low = np.append(scores, scores.min() - 1.0)
    assert np.array_equal(fuse("pool", FusionInputs(mica, pool, low), space).shape, samples[int(np.argmax(scores))])
    tie = np.append(scores, scores.max())  # MICA must be strictly highest
    assert np.array_equal(fuse("pool", FusionInputs(mica, pool, tie), space).shape, samples[int(np.argmax(scores))])
    with pytest.raises(InvalidInputError, match="last row"):
        fuse("pool", FusionInputs(mica + 1.0, pool, top), space)


def _independent_gaussian(mica, samples, sigma, alpha, bias, floor=1e-4):
    s = np.cov(samples.astype(np.float64).T, ddof=1)
    target = np.diag(np.maximum(np.diag(s), floor))
    off = s - np.diag(np.diag(s))
    cov = target + (1 - alpha) * off + bias**2 * np.eye(len(mica))
    prec_o = np.linalg.inv(cov)
    prec = prec_o + np.eye(len(mica)) / sigma**2
    return np.linalg.solve(prec, prec_o @ samples.mean(axis=0) + mica / sigma**2)


def test_gaussian_is_the_precision_weighted_product(space, data):
    mica, samples, _ = data
    strategy = create_strategy("gaussian", shrinkage=0.3, sigma_mica=0.4, occlusion_gain=2.0, ofer_bias=0.2)
    for v in (1.0, 0.5, 0.0):
        got = strategy(FusionInputs(mica, samples, None, visibility(v)), space).shape
        sigma = 0.4 * (1 + 2.0 * (1 - v))
        np.testing.assert_allclose(
            got, _independent_gaussian(mica.astype(np.float64), samples, sigma, 0.3, 0.2), atol=1e-5
        )


def test_gaussian_moves_toward_ofer_as_visibility_drops(space, data):
    mica, samples, _ = data
    mean = samples.astype(np.float64).mean(axis=0)
    distances = []
    for v in (1.0, 0.75, 0.5, 0.25, 0.0):
        shape = fuse("gaussian", FusionInputs(mica, samples, None, visibility(v)), space).shape
        distances.append(np.linalg.norm(shape - mean))
        # Between the inputs: never farther from either input than they are from each other.
        assert np.linalg.norm(shape - mica) <= np.linalg.norm(mean - mica) + 1e-6
    assert all(a > b for a, b in itertools.pairwise(distances))


def test_gaussian_automatic_shrinkage_matches_the_formula(data):
    _, samples, _ = data
    x = samples.astype(np.float64)
    n, k = x.shape
    z = (x - x.mean(0)) / x.std(0, ddof=1)
    w = np.einsum("ni,nj->nij", z, z)  # the per-sample products whose mean gives the correlation
    r = w.mean(0) * n / (n - 1)
    var_r = n / (n - 1) ** 3 * ((w - w.mean(0)) ** 2).sum(0)
    off = ~np.eye(k, dtype=bool)
    expected = np.clip(var_r[off].sum() / (r[off] ** 2).sum(), 0, 1)
    assert GaussianStrategy.shrinkage_intensity(x) == pytest.approx(expected, rel=1e-9)


def test_sdedit_with_t0_zero_samples_returns_mica(space, data):
    mica, _, scores = data
    samples = np.tile(mica, (9, 1))  # with t0 = 0 the ofer service returns MICA's shape itself
    assert np.array_equal(fuse("sdedit", FusionInputs(mica, samples, scores), space).shape, mica)
    assert np.array_equal(fuse("sdedit", FusionInputs(mica, samples, scores, options={"t0": 0}), space).shape, mica)


def test_sdedit_and_guided_rank_select(space, data):
    mica, samples, scores = data
    for name in ("sdedit", "guided"):
        assert np.array_equal(
            fuse(name, FusionInputs(mica, samples, scores), space).shape, samples[int(np.argmax(scores))]
        )


def test_schedules_from_visibility():
    assert sdedit_t0(visibility(1.0)) == SDEDIT_T_MIN and sdedit_t0(visibility(0.0)) == SDEDIT_T_MAX
    assert sdedit_t0(0.5) == round(SDEDIT_T_MIN + 0.5 * (SDEDIT_T_MAX - SDEDIT_T_MIN))
    assert sdedit_t0(None) == SDEDIT_T_MIN and sdedit_t0(1.0, t_min=0) == 0
    assert guided_strength(visibility(0.0)) == 0.0 and guided_strength(1.0, max_strength=0.3) == 0.3
    assert guided_strength(0.2, 0.5) < guided_strength(0.8, 0.5)


def test_region_full_visibility_equals_mica_and_stays_in_the_space(space, data):
    mica, samples, scores = data
    full = fuse("region", FusionInputs(mica, samples, scores, visibility(1.0)), space)
    assert np.array_equal(full.shape, mica)
    partial = fuse(
        "region",
        FusionInputs(mica, samples, scores, Visibility({**visibility(1.0).regions, "lips": 0.0, "nose": 0.0})),
        space,
    )
    np.testing.assert_array_equal(partial.vertices_mm, space.vertices_mm(partial.shape))
    pick = samples[int(np.argmax(scores))]
    # Occluded regions move toward OFER's pick, visible ones stay near MICA.
    got, m, o = partial.vertices_mm, space.vertices_mm(mica), space.vertices_mm(pick)
    occluded, visible = np.arange(0, 24), np.arange(40, 56)
    assert np.linalg.norm(got[occluded] - o[occluded]) < np.linalg.norm(m[occluded] - o[occluded])
    assert np.linalg.norm(got[visible] - m[visible]) < np.linalg.norm(got[visible] - o[visible])


def test_region_with_nothing_visible_is_ofer_pick(space, data):
    mica, samples, scores = data
    none = Visibility({name: 0.0 for name in REGION_NAMES})
    got = fuse("region", FusionInputs(mica, samples, scores, none), space).shape
    np.testing.assert_allclose(got, samples[int(np.argmax(scores))], atol=1e-3)


def test_every_strategy_is_deterministic_and_well_formed(space, data):
    mica, samples, scores = data
    vis = Visibility({**visibility(0.8).regions, "lips": 0.1})
    for name in strategy_names():
        cand, sc = (
            (np.concatenate([samples, mica[None]]), np.append(scores, 0.0)) if name == "pool" else (samples, scores)
        )
        a = fuse(name, FusionInputs(mica, cand, sc, vis), space)
        b = fuse(name, FusionInputs(mica.copy(), cand.copy(), sc.copy(), vis), space)
        assert a.strategy == name
        assert a.shape.dtype == np.float32 and a.shape.shape == (K,)
        assert a.vertices_mm.shape == (V, 3) and a.vertex_spread_mm.shape == (V,)
        assert np.all(a.vertex_spread_mm >= 0) and 0.0 <= a.confidence <= 1.0
        np.testing.assert_array_equal(a.vertices_mm, space.vertices_mm(a.shape))
        assert a.shape.tobytes() == b.shape.tobytes() and a.vertex_spread_mm.tobytes() == b.vertex_spread_mm.tobytes()
        assert a.confidence == b.confidence


def test_spread_of_selection_strategies_is_the_sample_spread(space, data):
    mica, samples, scores = data
    disp = space.vertices_mm(samples).astype(np.float64)
    expected = np.sqrt(((disp - disp.mean(0)) ** 2).sum(-1).mean(0))
    np.testing.assert_allclose(
        fuse("ofer", FusionInputs(None, samples, scores), space).vertex_spread_mm, expected, rtol=1e-4, atol=1e-4
    )
    lin = fuse("linear", FusionInputs(mica, samples, scores, options={"w": 0.25}), space).vertex_spread_mm
    np.testing.assert_allclose(lin, 0.75 * expected, rtol=1e-4, atol=1e-4)
    assert np.all(fuse("mica", FusionInputs(mica, None, None), space).vertex_spread_mm == 0)


def test_errors_name_what_is_missing_or_wrong(space, data):
    mica, samples, scores = data
    with pytest.raises(InvalidInputError, match="unknown fusion strategy 'blend'"):
        fuse("blend", FusionInputs(mica, samples, scores), space)
    with pytest.raises(InvalidInputError, match="missing: mica_shape"):
        fuse("linear", FusionInputs(None, samples, scores), space)
    with pytest.raises(InvalidInputError, match="missing: samples, scores"):
        fuse("ofer", FusionInputs(mica, None, None), space)
    with pytest.raises(InvalidInputError, match="one score per sample"):
        fuse("ofer", FusionInputs(None, samples, scores[:3]), space)
    with pytest.raises(InvalidInputError, match="mica_shape"):
        fuse("mica", FusionInputs(np.zeros(K + 1), None, None), space)
    with pytest.raises(InvalidInputError, match="unknown option"):
        fuse("ofer", FusionInputs(None, samples, scores, options={"w": 0.5}), space)
    with pytest.raises(InvalidInputError, match="NaN"):
        fuse("ofer", FusionInputs(None, np.full((2, K), np.nan), np.zeros(2)), space)


@pytest.mark.parametrize("n", [2, 3, 9, K - 1])
@pytest.mark.parametrize(("shrinkage", "bias"), [(-1.0, 0.3), (0.0, 0.3), (0.5, 0.0), (1.0, 0.3), (0.0, 0.0)])
def test_gaussian_low_rank_spread_equals_the_eigenvector_spread(space, n, shrinkage, bias):
    rng = np.random.default_rng(n)
    samples = rng.normal(scale=0.7, size=(n, K))
    strategy = GaussianStrategy()
    options = {**strategy.params, "shrinkage": shrinkage, "ofer_bias": bias}
    alpha = strategy.shrinkage(samples, options)
    for sigma in (0.3, 0.9):
        # The posterior from its eigen-decomposition, written out independently of the strategy's code.
        eigval, eigvec = np.linalg.eigh(strategy.covariance(samples, options, alpha))
        eigval = np.maximum(eigval, 0.0)
        posterior = (eigvec * (eigval * sigma**2 / (eigval + sigma**2))) @ eigvec.T
        basis = space.basis_mm().reshape(V, 3, K)
        expected = np.sqrt(np.einsum("vck,kl,vcl->v", basis, posterior, basis))
        low_rank = strategy.spread_low_rank(samples, options, alpha, sigma, space)
        np.testing.assert_allclose(low_rank, expected, rtol=1e-9, atol=1e-12)


def test_gaussian_uses_the_eigenvector_spread_from_k_samples_on(space):
    samples = np.random.default_rng(5).normal(size=(K + 3, K)).astype(np.float32)
    mica = np.zeros(K, np.float32)
    result = fuse("gaussian", FusionInputs(mica, samples, None), space)
    strategy = GaussianStrategy()
    alpha = strategy.shrinkage(samples.astype(np.float64), strategy.params)
    sigma = strategy.params["sigma_mica"]
    low_rank = strategy.spread_low_rank(samples.astype(np.float64), strategy.params, alpha, sigma, space)
    np.testing.assert_allclose(result.vertex_spread_mm, low_rank, rtol=1e-5)  # the same posterior either way
