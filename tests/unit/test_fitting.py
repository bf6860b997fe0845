"""Known-answer tests of the posed-face fit on the synthetic official-format FLAME.

A face is posed with known expression, jaw, rotation, translation and camera, its 68 landmarks projected
and perturbed with pixel noise; the fit must find them again within the tolerances stated here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from facefuse.assets.synthetic.flame import synthetic_flame_data
from facefuse.models.camera import (
    axis_angle_to_rotation,
    flame_to_opencv,
    intrinsics,
    project,
    rotation_to_axis_angle,
)
from facefuse.models.fitting import (
    LandmarkFlame,
    fit_posed_face,
    flame_landmark_model,
    posed_flame_vertices,
    rigid_landmark_model,
)
from facefuse.models.flame import FlameLayer
from facefuse.models.focal import DEFAULT_FOCAL_35MM, focal_px_from_35mm

WIDTH, HEIGHT = 1024, 768
NOISE_PX = 0.3
NUM_EXPRESSION = 10
MOUTH = list(range(48, 68))


@pytest.fixture(scope="module")
def flame() -> FlameLayer:
    return FlameLayer(synthetic_flame_data("small", torch.Generator().manual_seed(1))).double()


@pytest.fixture(scope="module")
def landmark_flame(flame: FlameLayer) -> LandmarkFlame:
    return LandmarkFlame(flame, flame.full_lmk_faces_idx[0], flame.full_lmk_bary_coords[0])


def _posed_case(flame: FlameLayer, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    shape = torch.randn(2, 300, generator=g, dtype=f64) * 0.3
    expression = torch.randn(2, NUM_EXPRESSION, generator=g, dtype=f64) * 0.7
    jaw = torch.tensor([[0.15, 0.01, 0.0], [0.05, -0.02, 0.01]], dtype=f64)
    omega = torch.tensor([[0.1, 0.3, 0.05], [-0.1, -0.2, 0.1]], dtype=f64)  # up to ~19° of yaw
    rotation = axis_angle_to_rotation(omega) @ flame_to_opencv(2, f64)
    translation = torch.tensor([[20.0, -10.0, 600.0], [-30.0, 15.0, 900.0]], dtype=f64)
    camera = intrinsics(torch.full((2,), focal_px_from_35mm(DEFAULT_FOCAL_35MM, WIDTH, HEIGHT), dtype=f64),
                        WIDTH, HEIGHT)
    out = flame(shape, expression=expression, jaw_pose=jaw)
    landmarks = out.landmarks68 * 1000.0 @ rotation.transpose(1, 2) + translation[:, None]
    clean = project(landmarks, camera)
    noisy = clean + torch.randn(clean.shape, generator=g, dtype=f64) * NOISE_PX
    vertices = out.vertices * 1000.0 @ rotation.transpose(1, 2) + translation[:, None]
    return dict(shape=shape, expression=expression, jaw=jaw, rotation=rotation, translation=translation,
                camera=camera, clean=clean, noisy=noisy, vertices=vertices)


def _angle_deg(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return np.degrees(rotation_to_axis_angle(a @ b.transpose(1, 2)).norm(dim=-1).numpy())


def test_landmark_flame_equals_the_full_layer_at_the_landmarks(flame: FlameLayer,
                                                               landmark_flame: LandmarkFlame) -> None:
    g = torch.Generator().manual_seed(3)
    shape = torch.randn(2, 300, generator=g, dtype=torch.float64)
    expression = torch.randn(2, 50, generator=g, dtype=torch.float64)
    jaw = torch.randn(2, 3, generator=g, dtype=torch.float64) * 0.2
    full = flame(shape, expression=expression, jaw_pose=jaw).landmarks68
    assert torch.allclose(landmark_flame(shape, expression, jaw), full, atol=1e-12)


def test_camera_focal_and_axis_angle() -> None:
    assert focal_px_from_35mm(43.2666, 3600, 2400) == pytest.approx(math.hypot(3600, 2400), rel=1e-4)
    k = intrinsics(torch.tensor([1000.0]), 641, 481)
    assert k[0, 0, 2].item() == 320.0 and k[0, 1, 2].item() == 240.0
    for angle in ([0.0, 0.0, 0.0], [0.3, -0.2, 0.1], [math.pi - 1e-5, 0.0, 0.0], [0.0, 2.0, -1.0]):
        r = axis_angle_to_rotation(torch.tensor([angle], dtype=torch.float64))
        back = axis_angle_to_rotation(rotation_to_axis_angle(r))
        assert torch.allclose(back, r, atol=1e-6)
    with pytest.raises(ValueError):
        focal_px_from_35mm(0.0, 10, 10)


def test_fit_recovers_known_expression_jaw_pose_and_translation(flame: FlameLayer,
                                                               landmark_flame: LandmarkFlame) -> None:
    case = _posed_case(flame)
    fit = fit_posed_face(flame_landmark_model(landmark_flame, case["shape"]), NUM_EXPRESSION, case["noisy"],
                         torch.ones(2, 68, dtype=torch.float64), case["camera"])
    # Tolerances for 0.3 px noise on a face ~100-150 px across:
    assert (fit.reprojection_error_px < 0.6).all(), fit.reprojection_error_px  # at the noise level (E|n| ≈ 0.38 px)
    assert (fit.initial_error_px > 5.0).all()  # the rigid initial guess was far off
    assert (_angle_deg(fit.rotation, case["rotation"]) < 0.5).all()
    depth_error = (fit.translation[:, 2] - case["translation"][:, 2]).abs() / case["translation"][:, 2]
    assert (depth_error < 0.005).all(), depth_error  # metric shape + known focal: the distance in mm
    assert ((fit.translation[:, :2] - case["translation"][:, :2]).abs() < 1.5).all()
    assert ((fit.jaw_pose - case["jaw"]).abs() < 0.01).all(), fit.jaw_pose
    expression_rms = (fit.expression - case["expression"]).pow(2).mean(dim=1).sqrt()
    assert (expression_rms < 0.15).all(), expression_rms  # the true coefficients have sd 0.7
    vertices = posed_flame_vertices(flame, case["shape"], fit)
    assert ((vertices - case["vertices"]).norm(dim=-1).mean(dim=1) < 2.5).all()


def test_hidden_mouth_stays_plausible_and_the_visible_fit_holds(flame: FlameLayer,
                                                               landmark_flame: LandmarkFlame) -> None:
    case = _posed_case(flame, seed=1)
    weights = torch.ones(2, 68, dtype=torch.float64)
    weights[:, MOUTH] = 0.0
    target = case["noisy"].clone()
    target[:, MOUTH] += 60.0  # what an occluder would make a detector report there: must not matter
    fit = fit_posed_face(flame_landmark_model(landmark_flame, case["shape"]), NUM_EXPRESSION, target, weights,
                         case["camera"])
    assert (fit.reprojection_error_px < 0.6).all(), fit.reprojection_error_px  # over the visible landmarks
    assert (_angle_deg(fit.rotation, case["rotation"]) < 1.0).all()
    # Hidden: the prior keeps the coefficients in range and the mouth near where the face really has it.
    assert (fit.expression.abs() < 3.0).all() and (fit.jaw_pose.abs() < 0.5).all()
    mouth_error = (fit.landmarks_px[:, MOUTH] - case["clean"][:, MOUTH]).norm(dim=-1).mean(dim=1)
    face_size = (case["clean"].amax(dim=1) - case["clean"].amin(dim=1)).norm(dim=-1)
    assert (mouth_error < 0.1 * face_size).all(), (mouth_error, face_size)


def test_rigid_fit_of_fixed_points_and_bad_input() -> None:
    g = torch.Generator().manual_seed(5)
    points = torch.randn(1, 40, 3, generator=g, dtype=torch.float64) * 40.0
    rotation = axis_angle_to_rotation(torch.tensor([[0.05, -0.25, 0.02]], dtype=torch.float64)) @ flame_to_opencv(
        1, torch.float64)
    camera = intrinsics(torch.tensor([800.0], dtype=torch.float64), 640, 480)
    target = project(points @ rotation.transpose(1, 2) + torch.tensor([[5.0, 0.0, 500.0]], dtype=torch.float64),
                     camera)
    fit = fit_posed_face(rigid_landmark_model(points), 0, target, torch.ones(1, 40, dtype=torch.float64), camera,
                         fit_jaw=False)
    assert fit.reprojection_error_px.item() < 0.05
    assert fit.translation[0, 2].item() == pytest.approx(500.0, rel=1e-3)
    with pytest.raises(ValueError, match="no landmark"):
        fit_posed_face(rigid_landmark_model(points), 0, target, torch.zeros(1, 40, dtype=torch.float64), camera)
