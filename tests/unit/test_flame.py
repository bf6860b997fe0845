"""FLAME layer against an independent numpy FLAME (scipy rotations, 4x4 chains) on the synthetic model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from facefuse.assets.synthetic.flame import synthetic_flame_data
from facefuse.models.flame import METRES_TO_MM, NOW7_FROM_LMK68, FlameLayer, now7, rodrigues


@pytest.fixture(scope="module")
def flame_data():
    return synthetic_flame_data("small", torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def flame64(flame_data) -> FlameLayer:
    return FlameLayer(flame_data, dtype=torch.float64)


def numpy_flame(data, betas: np.ndarray, full_pose: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SMPL/FLAME from the paper's equations: blendshapes, joints, pose correctives, LBS. One sample."""
    T = data.v_template.astype(np.float64)
    S = data.shapedirs.astype(np.float64)
    n_v, n_j = T.shape[0], data.J_regressor.shape[0]
    v_shaped = T + S[:, :, : betas.size] @ betas
    joints = data.J_regressor.astype(np.float64) @ v_shaped
    rots = Rotation.from_rotvec(full_pose.reshape(-1, 3)).as_matrix()
    pose_feature = (rots[1:] - np.eye(3)).reshape(-1)
    v_posed = v_shaped + (pose_feature @ data.posedirs.astype(np.float64)).reshape(n_v, 3)
    world = []
    for j in range(n_j):
        local = np.eye(4)
        local[:3, :3] = rots[j]
        parent = data.parents[j]
        local[:3, 3] = joints[j] - (joints[parent] if j > 0 else 0.0)
        world.append(local if j == 0 else world[parent] @ local)
    rest_to_posed = []
    for j in range(n_j):
        undo_rest = np.eye(4)
        undo_rest[:3, 3] = -joints[j]
        rest_to_posed.append(world[j] @ undo_rest)
    homog = np.concatenate([v_posed, np.ones((n_v, 1))], axis=1)
    per_joint = np.einsum("jrc,vc->vjr", np.stack(rest_to_posed), homog)  # (V, J, 4)
    vertices = np.einsum("vj,vjr->vr", data.lbs_weights.astype(np.float64), per_joint)[:, :3]
    return vertices, np.stack([w[:3, 3] for w in world])


def test_state_dict_names_are_micas_generator_names(flame64, official_keys):
    expected = [
        k.removeprefix("generator.") for k, _, _ in official_keys("mica_flameModel") if k.startswith("generator.")
    ]
    assert list(flame64.state_dict()) == expected
    assert [n for n, _ in flame64.named_parameters()] == ["eye_pose", "neck_pose"]


def test_shape_only_output_is_template_plus_shapedirs_times_beta(flame_data, flame64):
    beta = np.random.default_rng(0).normal(size=(3, 300))
    expected = flame_data.v_template[None].astype(np.float64) + np.einsum(
        "vkl,bl->bvk", flame_data.shapedirs[:, :, :300].astype(np.float64), beta
    )
    fast = flame64.shape_vertices(torch.from_numpy(beta)).numpy()
    full = flame64(torch.from_numpy(beta)).vertices.numpy()
    np.testing.assert_allclose(fast, expected, atol=1e-12)
    np.testing.assert_allclose(full, expected, atol=1e-9)  # LBS with zero pose: Σ_j w_vj = 1 up to rounding


def test_pose_and_expression_agree_with_numpy_lbs(flame_data, flame64):
    rng = np.random.default_rng(1)
    batch = 3
    shape = rng.normal(size=(batch, 300))
    expression = rng.normal(size=(batch, 100))
    global_pose, neck, jaw = (rng.normal(scale=0.3, size=(batch, 3)) for _ in range(3))
    eyes = rng.normal(scale=0.2, size=(batch, 6))
    out = flame64(*(torch.from_numpy(a) for a in (shape, expression, global_pose, neck, jaw, eyes)))
    for b in range(batch):
        pose = np.concatenate([global_pose[b], neck[b], jaw[b], eyes[b]])
        vertices, joints = numpy_flame(flame_data, np.concatenate([shape[b], expression[b]]), pose)
        np.testing.assert_allclose(out.vertices[b].numpy(), vertices, atol=1e-7)
        np.testing.assert_allclose(out.joints[b].numpy(), joints, atol=1e-7)
    # the pose really moved the mesh (the test is not vacuous)
    assert np.abs(out.vertices.numpy() - flame64.shape_vertices(torch.from_numpy(shape)).numpy()).max() > 1e-3


def test_float32_layer_matches_float64(flame_data, flame64):
    rng = np.random.default_rng(2)
    shape, jaw = rng.normal(size=(2, 300)), rng.normal(scale=0.2, size=(2, 3))
    out32 = FlameLayer(flame_data)(torch.from_numpy(shape).float(), jaw_pose=torch.from_numpy(jaw).float())
    out64 = flame64(torch.from_numpy(shape), jaw_pose=torch.from_numpy(jaw))
    assert out32.vertices.dtype == torch.float32
    np.testing.assert_allclose(out32.vertices.numpy(), out64.vertices.numpy(), atol=1e-6)


def test_batch_one_equals_batch_n(flame64):
    shape = torch.from_numpy(np.random.default_rng(3).normal(size=(4, 300)))
    jaw = torch.from_numpy(np.random.default_rng(4).normal(scale=0.2, size=(4, 3)))
    batch = flame64(shape, jaw_pose=jaw).vertices
    single = torch.cat([flame64(shape[i:i + 1], jaw_pose=jaw[i:i + 1]).vertices for i in range(4)])
    torch.testing.assert_close(single, batch, rtol=0, atol=1e-12)


def test_rodrigues_matches_scipy():
    vectors = np.random.default_rng(5).normal(size=(20, 3))
    np.testing.assert_allclose(
        rodrigues(torch.from_numpy(vectors)).numpy(), Rotation.from_rotvec(vectors).as_matrix(), atol=1e-7
    )
    np.testing.assert_allclose(rodrigues(torch.zeros(1, 3, dtype=torch.float64)).numpy()[0], np.eye(3), atol=1e-12)


def test_landmarks68_and_now7_select_the_documented_points(flame_data, flame64):
    vertices = flame64.shape_vertices(torch.from_numpy(np.random.default_rng(6).normal(size=(2, 300))))
    lmk = flame64.landmarks68(vertices).numpy()
    faces = flame_data.faces[flame_data.landmarks.full_lmk_faces_idx[0]]  # (68, 3)
    bary = flame_data.landmarks.full_lmk_bary_coords[0].astype(np.float64)
    expected = np.einsum("blkx,lk->blx", vertices.numpy()[:, faces], bary)
    np.testing.assert_allclose(lmk, expected, atol=1e-12)
    seven = now7(torch.from_numpy(lmk)).numpy()
    np.testing.assert_array_equal(seven, lmk[:, [36, 39, 42, 45, 33, 48, 54]])
    assert NOW7_FROM_LMK68 == (36, 39, 42, 45, 33, 48, 54) and METRES_TO_MM == 1000.0
    # forward() reports the same landmarks
    np.testing.assert_allclose(flame64(torch.zeros(1, 300, dtype=torch.float64)).landmarks68.numpy()[0],
                               flame64.landmarks68(flame64.v_template[None]).numpy()[0], atol=1e-9)
