"""Fit a linear shape model and a rigid head pose to dense 2-D landmarks (weak perspective, known scale).

Pure math, no file I/O, deterministic (fixed iteration count, no random draws).

Model: X_i(α) = μ_i + Φ_i α (mm, model frame), α ~ N(0, diag(λ)); camera point Y_i = R X_i + t. The
camera is weak-perspective with a known scale: the observations are already in mm (pixels × mm per
pixel), so the image is the orthographic projection (Y_x, Y_y). Evidence, all Gaussian:

* landmarks: (Y_i,x, Y_i,y) − o_i,xy with sd ``landmark_sd_mm`` / √w_i (w_i = 0: unseen, no term);
* contour (silhouette) landmarks: only the component along the 2-D normal of the model's projected
  outline counts, because a point's position *along* the outline is ill-defined (the outline's position
  is the evidence);
* depth: Y_i,z − o_i,z with sd ``depth_sd_mm`` / √w_i — the landmark network's relative depth, a weak
  prior rather than the truth (its depth carries little identity);
* prior: α_k / √λ_k.

Solved by Gauss–Newton on (δω, t, α) with R ← exp([δω]×) R; α enters linearly, so once the pose has
settled each step is the exact regularised least-squares shape for that pose.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LandmarkFitResult:
    coefficients: np.ndarray  # (K,) shape coefficients α
    vertices_mm: np.ndarray  # (V, 3) μ + Φα in the model frame
    rotation: np.ndarray  # (3, 3) model -> camera
    translation: np.ndarray  # (3,) mm
    landmark_rms_mm: float  # weighted RMS of the 2-D residuals (landmarks, contour normals)
    depth_rms_mm: float  # weighted RMS of the depth residuals


def rotation_from_vector(omega: np.ndarray) -> np.ndarray:
    """exp([ω]×) by Rodrigues' formula."""
    omega = np.asarray(omega, dtype=np.float64)
    angle = float(np.linalg.norm(omega))
    cross = _cross_matrix(omega)
    if angle < 1e-12:
        return np.eye(3) + cross
    return np.eye(3) + np.sin(angle) / angle * cross + (1.0 - np.cos(angle)) / angle**2 * (cross @ cross)


def _cross_matrix(v: np.ndarray) -> np.ndarray:
    return np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])


def contour_normals(points_xy: np.ndarray, loop: Sequence[int] | np.ndarray) -> np.ndarray:
    """(len(loop), 2) unit normals of a closed 2-D polygon at its vertices (central differences)."""
    ring = np.asarray(points_xy, dtype=np.float64)[np.asarray(loop, dtype=np.int64)]
    tangent = np.roll(ring, -1, axis=0) - np.roll(ring, 1, axis=0)
    normal = np.stack([tangent[:, 1], -tangent[:, 0]], axis=1)
    length = np.linalg.norm(normal, axis=1, keepdims=True)
    return normal / np.maximum(length, 1e-9)


def fit_shape_to_landmarks(
    mean_mm: np.ndarray,
    basis: np.ndarray,
    eigenvalues: np.ndarray,
    observed_mm: np.ndarray,
    weights: np.ndarray,
    initial_rotation: np.ndarray,
    initial_translation: np.ndarray,
    *,
    landmark_sd_mm: float = 1.0,
    depth_sd_mm: float = 4.0,
    contour: Sequence[int] = (),
    iterations: int = 8,
) -> LandmarkFitResult:
    """MAP shape coefficients and pose given ``observed_mm`` (V, 3): x, y the landmarks' image position and
    z their relative depth, in camera mm (x right, y up, z toward the viewer). ``basis`` (3V, K) is
    vertex-major (v0x, v0y, v0z, v1x, ...); ``weights`` (V,) in [0, 1] per landmark (0 = unseen);
    ``contour`` a closed loop of landmark indices observed by their normal component only."""
    mean = np.asarray(mean_mm, dtype=np.float64)
    phi = np.asarray(basis, dtype=np.float64)
    lam = np.asarray(eigenvalues, dtype=np.float64)
    obs = np.asarray(observed_mm, dtype=np.float64)
    w = np.clip(np.asarray(weights, dtype=np.float64), 0.0, 1.0)
    num_vertices, rank = mean.shape[0], lam.shape[0]
    if (mean.shape != (num_vertices, 3) or phi.shape != (3 * num_vertices, rank) or obs.shape != mean.shape
            or w.shape != (num_vertices,)):
        raise ValueError(f"landmark fit: shapes do not agree: mean {mean.shape}, basis {phi.shape}, eigenvalues "
                         f"{lam.shape}, observed {obs.shape}, weights {w.shape}")
    if not (np.all(np.isfinite(obs)) and np.all(np.isfinite(w))):
        raise ValueError("landmark fit: observations or weights contain NaN or infinite values")
    if np.any(lam <= 0) or landmark_sd_mm <= 0 or depth_sd_mm <= 0:
        raise ValueError("landmark fit: eigenvalues and noise levels must be positive")
    if w.sum() <= 0:
        raise ValueError("landmark fit: every landmark has zero weight")
    if iterations < 1:
        raise ValueError(f"landmark fit: iterations must be >= 1, got {iterations}")

    contour_idx = np.asarray(list(contour), dtype=np.int64)
    plain = np.ones(num_vertices, bool)
    plain[contour_idx] = False

    sqrt_lam = np.sqrt(lam)
    phi_v = phi.reshape(num_vertices, 3, rank) * sqrt_lam  # whitened: X = μ + Φ_v β, β ~ N(0, I)
    root_w = np.sqrt(w)
    rotation = np.asarray(initial_rotation, dtype=np.float64).copy()
    translation = np.asarray(initial_translation, dtype=np.float64).copy()
    beta = np.zeros(rank)
    num_params = 6 + rank

    def residuals_and_jacobian(need_jacobian: bool) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
        model = mean + phi_v @ beta  # (V, 3)
        camera = model @ rotation.T + translation
        diff = camera - obs
        # d camera_i / d(δω) = −[R X_i]×, d/dt = I, d/dβ = R Φ_i
        blocks: list[np.ndarray] = []
        jac_blocks: list[np.ndarray] = []
        jac = None
        if need_jacobian:
            rotated = model @ rotation.T
            jac = np.zeros((num_vertices, 3, num_params))
            jac[:, 0, 1], jac[:, 0, 2] = rotated[:, 2], -rotated[:, 1]
            jac[:, 1, 0], jac[:, 1, 2] = -rotated[:, 2], rotated[:, 0]
            jac[:, 2, 0], jac[:, 2, 1] = rotated[:, 1], -rotated[:, 0]
            jac[:, :, 3:6] = np.eye(3)
            jac[:, :, 6:] = np.einsum("ab,vbk->vak", rotation, phi_v)
        scale_xy = root_w[plain] / landmark_sd_mm
        blocks.append((diff[plain, :2] * scale_xy[:, None]).reshape(-1))
        lm = [blocks[-1]]
        if need_jacobian and jac is not None:
            jac_blocks.append((jac[plain, :2] * scale_xy[:, None, None]).reshape(-1, num_params))
        if contour_idx.size:
            # normals of the model's own outline, so a hidden contour landmark does not tilt its neighbours'
            normals = contour_normals(camera[:, :2], contour_idx)
            scale_c = root_w[contour_idx] / landmark_sd_mm
            blocks.append(np.einsum("ca,ca->c", diff[contour_idx, :2], normals) * scale_c)
            lm.append(blocks[-1])
            if need_jacobian and jac is not None:
                jac_blocks.append(np.einsum("ca,cak->ck", normals, jac[contour_idx, :2]) * scale_c[:, None])
        scale_z = root_w / depth_sd_mm
        blocks.append(diff[:, 2] * scale_z)
        depth = blocks[-1]
        if need_jacobian and jac is not None:
            jac_blocks.append(jac[:, 2] * scale_z[:, None])
        blocks.append(beta)
        if need_jacobian:
            prior_jac = np.zeros((rank, num_params))
            prior_jac[:, 6:] = np.eye(rank)
            jac_blocks.append(prior_jac)
        full_jac = np.concatenate(jac_blocks) if need_jacobian else None
        return np.concatenate(blocks), full_jac, np.concatenate(lm), depth

    for _ in range(int(iterations)):
        residual, jacobian, _, _ = residuals_and_jacobian(True)
        assert jacobian is not None
        normal_matrix = jacobian.T @ jacobian
        normal_matrix[:3, :3] += 1e-6 * np.eye(3)  # a flat or tiny landmark set leaves the pose barely determined
        step = -np.linalg.solve(normal_matrix, jacobian.T @ residual)
        rotation = rotation_from_vector(step[:3]) @ rotation
        u, _, vt = np.linalg.svd(rotation)  # keep R orthonormal against round-off
        rotation = u @ vt
        translation = translation + step[3:6]
        beta = beta + step[6:]

    _, _, landmark_res, depth_res = residuals_and_jacobian(False)
    coefficients = beta * sqrt_lam
    vertices = mean + (phi @ coefficients).reshape(num_vertices, 3)
    seen_2d = 2.0 * w[plain].sum() + w[contour_idx].sum()
    landmark_rms = float(np.sqrt((landmark_res**2).sum() / max(seen_2d, 1e-12))) * landmark_sd_mm
    depth_rms = float(np.sqrt((depth_res**2).sum() / max(w.sum(), 1e-12))) * depth_sd_mm
    return LandmarkFitResult(coefficients, vertices, rotation, translation, landmark_rms, depth_rms)
