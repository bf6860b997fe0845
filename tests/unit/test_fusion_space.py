"""ShapeSpace: the linear shape space fusion works in (FLAME shape-only: v = T + S·β)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facefuse.errors import InvalidInputError
from facefuse.fusion.space import ShapeSpace
from facefuse.fusion.visibility import Visibility


def random_space(seed: int = 0, v: int = 120, k: int = 10) -> tuple[ShapeSpace, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    template = rng.normal(scale=0.05, size=(v, 3))  # metres
    basis = rng.normal(scale=0.002, size=(v, 3, k))
    faces = rng.integers(0, v, size=(2 * v, 3))
    regions = {
        "face": np.arange(0, 80), "nose": np.arange(0, 10), "lips": np.arange(10, 20), "forehead": np.arange(20, 30),
        "eye_region": np.arange(30, 40), "left_eye_region": np.arange(30, 35), "right_eye_region": np.arange(35, 40),
        "scalp": np.arange(80, 120),
    }
    return ShapeSpace(template, basis, faces, regions=regions), template, basis


@pytest.fixture(scope="module")
def flame_data():
    from facefuse.assets.synthetic.flame import flame_masks, flame_model_fields
    from facefuse.models.flame import FlameModelData

    fields = flame_model_fields("small", torch.Generator().manual_seed(5))
    v = fields["v_template"].shape[0]
    data = FlameModelData(
        faces=np.asarray(fields["f"], dtype=np.int64), v_template=np.asarray(fields["v_template"], np.float32),
        shapedirs=np.asarray(fields["shapedirs"], np.float32), posedirs=np.zeros((36, 3 * v), np.float32),
        J_regressor=np.asarray(fields["J_regressor"], np.float32), parents=np.array([-1, 0, 1, 1, 1]),
        lbs_weights=np.asarray(fields["weights"], np.float32))
    return data, flame_masks("small")


def test_vertices_equal_template_plus_basis_times_beta(flame_data):
    data, masks = flame_data
    space = ShapeSpace.from_flame(data, masks)
    beta = np.random.default_rng(1).normal(size=(2, 300))
    expected = 1000.0 * (data.v_template.astype(np.float64)[None]
                         + np.einsum("vcl,bl->bvc", data.shapedirs[:, :, :300].astype(np.float64), beta))
    got = space.vertices_mm(beta)
    assert got.dtype == np.float32 and got.shape == (2, data.num_vertices, 3)
    np.testing.assert_allclose(got, expected, atol=2e-3)  # float32 output of ~100 mm values
    assert space.topology == "flame2020" and space.num_coeffs == 300 and space.faces.dtype == np.int32


def test_from_flame_uses_only_the_first_coefficients(flame_data):
    data, _ = flame_data
    space = ShapeSpace.from_flame(data, None, num_coeffs=50)
    beta = np.random.default_rng(2).normal(size=50)
    expected = 1000.0 * (data.v_template + np.einsum("vcl,l->vc", data.shapedirs[:, :, :50].astype(np.float64), beta))
    np.testing.assert_allclose(space.vertices_mm(beta), expected, atol=2e-3)
    with pytest.raises(InvalidInputError, match="shape coefficients"):
        space.vertices_mm(np.zeros(300))


def test_project_recovers_beta_from_its_own_vertices(flame_data):
    small, _, _ = random_space()
    beta_small = np.random.default_rng(8).normal(size=10)
    np.testing.assert_allclose(small.project_mm(small.vertices_mm(beta_small)), beta_small, atol=1e-3)
    # The synthetic FLAME basis (random smooth fields) is nearly degenerate (smallest Gram eigenvalue
    # ~6e-3 mm², where the default ridge of 1e-3 mm² would bias those directions): a tiny ridge here.
    data, masks = flame_data
    b = data.shapedirs[:, :, :300]
    space = ShapeSpace(data.v_template, b, data.faces, regions=masks, ridge_mm2=1e-9)
    beta = np.random.default_rng(3).normal(size=300)
    exact = 1000.0 * (data.v_template.astype(np.float64) + np.einsum("vcl,l->vc", b.astype(np.float64), beta))
    np.testing.assert_allclose(space.project_mm(exact), beta, atol=1e-4)
    # From the float32 output, the vertices come back even where weak directions wander.
    default = ShapeSpace.from_flame(data, masks)
    recovered = default.project_mm(default.vertices_mm(beta))
    np.testing.assert_allclose(default.vertices_mm(recovered), default.vertices_mm(beta), atol=5e-3)


def test_weighted_projection_ignores_zero_weight_vertices():
    space, _, _ = random_space()
    beta = np.random.default_rng(4).normal(size=10)
    target = space.vertices_mm(beta).astype(np.float64)
    target[:40] += 50.0  # garbage where the weight is zero
    weights = np.ones(space.num_vertices)
    weights[:40] = 0.0
    np.testing.assert_allclose(space.project_mm(target, weights), beta, atol=1e-4)
    assert np.abs(space.project_mm(target) - beta).max() > 1.0  # unweighted, the garbage matters


def test_projection_is_the_ridge_least_squares_solution():
    space, template, basis = random_space(seed=6)
    rng = np.random.default_rng(7)
    target = 1000.0 * template + rng.normal(scale=3.0, size=template.shape)  # not in the space
    weights = rng.uniform(0.0, 1.0, size=space.num_vertices)
    b = 1000.0 * basis.reshape(-1, 10)
    w3 = np.repeat(weights, 3)
    expected = np.linalg.solve(b.T @ (w3[:, None] * b) + space.ridge_mm2 * np.eye(10),
                               b.T @ (w3 * (target - 1000.0 * template).reshape(-1)))
    np.testing.assert_allclose(space.project_mm(target, weights), expected, rtol=1e-8, atol=1e-10)
    prior = rng.normal(size=10)
    expected_prior = prior + np.linalg.solve(
        b.T @ b + space.ridge_mm2 * np.eye(10),
        b.T @ (target - 1000.0 * template - (b @ prior).reshape(-1, 3)).reshape(-1),
    )
    np.testing.assert_allclose(space.project_mm(target, prior=prior), expected_prior, rtol=1e-8, atol=1e-10)


def test_zero_displacement_fits_exactly_zero():
    space, _, _ = random_space()
    assert np.array_equal(space.fit_displacement_mm(np.zeros((space.num_vertices, 3))), np.zeros(10))


def test_cheeks_are_the_rest_of_the_face_split_at_the_nose():
    space, template, _ = random_space()
    rest = set(range(40, 80))  # face minus nose, lips, forehead, eye regions
    left, right = set(space.regions["left_cheek"].tolist()), set(space.regions["right_cheek"].tolist())
    assert left | right == rest and not left & right
    split = np.median(template[:10, 0])
    assert all(template[i, 0] > split for i in left) and all(template[i, 0] <= split for i in right)


def test_region_weights_map_visibility_regions_onto_vertices():
    space, _, _ = random_space()
    vis = Visibility({"lips": 0.2, "nose": 0.5, "left_eye": 0.1, "right_eye": 1.0, "forehead": 1.0,
                      "left_cheek": 0.9, "right_cheek": 0.9})
    w = space.region_weights(vis)
    assert np.all(w[10:20] == 0.2) and np.all(w[0:10] == 0.5)
    assert np.all(w[30:35] == 0.1) and np.all(w[35:40] == 1.0)
    assert np.all(w[space.regions["left_cheek"]] == 0.9)
    np.testing.assert_allclose(w[80:], vis.overall)  # scalp: no visibility region governs it
    assert np.all(space.region_weights(None) == 1.0)
    per_vertex = np.linspace(0, 1, space.num_vertices)
    np.testing.assert_array_equal(space.region_weights(Visibility({}, per_vertex)), per_vertex)
    smooth = space.region_weights(vis, smooth_iterations=3)
    assert smooth.min() >= 0.0 and smooth.max() <= 1.0


def test_bad_inputs_are_invalid_input_errors():
    space, _, _ = random_space()
    with pytest.raises(InvalidInputError, match="NaN"):
        space.vertices_mm(np.full(10, np.nan))
    with pytest.raises(InvalidInputError, match="vertices"):
        space.project_mm(np.zeros((5, 3)))
    with pytest.raises(InvalidInputError, match="weights"):
        space.project_mm(np.zeros((space.num_vertices, 3)), weights=-np.ones(space.num_vertices))
