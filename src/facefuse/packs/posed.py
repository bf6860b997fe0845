"""The face as photographed, per pack: the fused identity shape fitted to the detected landmarks.

* flame pack (:class:`FlamePosedFitter`): FLAME with the fused β fixed; expression (first
  ``num_expression`` components), jaw, rotation and translation fitted to the 68 iBUG landmarks read off
  the 468 FaceMesh points (:mod:`facefuse.face.landmarks68`) through FLAME's ``landmark_embedding.npy``
  (51 static inner points + the 17 contour points of the dynamic table row of the current yaw), plus,
  when the user has ``mediapipe_landmark_embedding.npz``, its dense points against their FaceMesh points.
* open pack (:class:`OpenPosedFitter`): the observed FaceMesh mesh is split into the neutral identity part
  (the fused mesh, ``mesh.obj``) and an expression residual (observed − neutral after a similarity fit on
  the visible points; hidden points get no residual, i.e. the neutral shape there); the posed face
  (neutral + residual) is then fitted rigidly to the 468 points through the camera, starting from the
  head pose of that similarity fit.

Both return a :class:`PosedFaceResult` (the contract in docs/posed-face.md). Hidden landmarks (the
gateway's visibility) get ~0 weight. The math lives in :mod:`facefuse.models.fitting`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from facefuse.assets.canonical_face import CanonicalFace
from facefuse.errors import InvalidInputError
from facefuse.face.landmarks68 import ibug68_from_facemesh, ibug68_weights
from facefuse.geometry import umeyama
from facefuse.models.camera import extrinsics, intrinsics
from facefuse.models.fitting import (
    FitSettings,
    LandmarkFlame,
    LandmarkSelector,
    PosedFit,
    dynamic_landmark_selector,
    fit_posed_face,
    flame_landmark_bank,
    flame_landmark_model,
    posed_flame_vertices,
    posed_vertices,
    rigid_landmark_model,
)
from facefuse.models.flame import FlameLayer, FlameModelData, MediaPipeEmbedding
from facefuse.packs.base import PosedFaceResult, PoseFitTarget

DEFAULT_NUM_EXPRESSION = 50
"""FLAME expression components fitted (fewer when the file has fewer)."""
FOCAL_SOURCES = ("exif", "default")


def _result(fit: PosedFit, vertices: torch.Tensor, camera: torch.Tensor, target: PoseFitTarget,
            expression: np.ndarray | None = None) -> PosedFaceResult:
    def f32(t: torch.Tensor) -> np.ndarray:
        return t[0].detach().cpu().numpy().astype(np.float32)

    return PosedFaceResult(
        expression=f32(fit.expression) if expression is None else expression.astype(np.float32),
        jaw_pose=f32(fit.jaw_pose), global_pose=f32(fit.global_pose), translation=f32(fit.translation),
        camera_intrinsics=f32(camera), camera_extrinsics=f32(extrinsics(fit.rotation, fit.translation)),
        image_size=np.array([target.width, target.height], np.int32), focal_source=target.focal_source,
        reprojection_error_px=float(fit.reprojection_error_px[0]), vertices_mm=f32(vertices),
        landmarks_px=f32(fit.landmarks_px))


def _camera(target: PoseFitTarget) -> torch.Tensor:
    return intrinsics(torch.tensor([target.focal_px], dtype=torch.float64), target.width, target.height)


def _facemesh_points(target: PoseFitTarget) -> np.ndarray:
    points = np.asarray(target.landmarks_px, dtype=np.float64)
    if points.ndim != 2 or points.shape[0] < 468 or points.shape[1] < 2 or not np.isfinite(points).all():
        raise InvalidInputError(f"pose fit: expected the 468 FaceMesh points (468, 3) of the face, got {points.shape}")
    return points[:468]


def _point_weights(visibility: np.ndarray | None, indices: np.ndarray) -> np.ndarray:
    """Fit weights of FaceMesh points: their visibility (NaN or None: seen), clipped to [0, 1]."""
    if visibility is None:
        return np.ones(len(indices))
    vis = np.asarray(visibility, dtype=np.float64)[indices]
    return np.where(np.isfinite(vis), np.clip(vis, 0.0, 1.0), 1.0)


class FlamePosedFitter:
    """FLAME's expression, jaw and head pose for a fused β, fitted to the face's 68 iBUG landmarks (static
    inner points + yaw-dependent contour) and, with a MediaPipe embedding, its dense FaceMesh points."""

    def __init__(self, flame: FlameModelData, num_expression: int = DEFAULT_NUM_EXPRESSION,
                 settings: FitSettings | None = None, *, mediapipe: MediaPipeEmbedding | None = None,
                 dynamic_contour: bool = True) -> None:
        """``dynamic_contour`` False: the fixed 68-point ``full_lmk`` embedding (the fit before the dynamic
        contour; kept for comparison). ``mediapipe``: the optional dense embedding."""
        self.layer = FlameLayer(flame).double().eval()
        self.mediapipe = mediapipe
        self.dynamic_contour = dynamic_contour
        dense_faces = dense_bary = None
        self.select: LandmarkSelector | None = None
        if mediapipe is not None:
            dense_faces = torch.from_numpy(np.asarray(mediapipe.lmk_face_idx, np.int64))
            dense_bary = torch.from_numpy(np.asarray(mediapipe.lmk_b_coords, np.float64))
        num_dense = 0 if mediapipe is None else len(mediapipe.landmark_indices)
        if dynamic_contour:
            faces, bary = flame_landmark_bank(self.layer, dense_faces, dense_bary)
            self.select = dynamic_landmark_selector(
                num_static=self.layer.lmk_faces_idx.shape[0], num_contour=self.layer.dynamic_lmk_faces_idx.shape[1],
                num_rows=self.layer.dynamic_lmk_faces_idx.shape[0], num_dense=num_dense)
        else:
            faces, bary = self.layer.full_lmk_faces_idx[0], self.layer.full_lmk_bary_coords[0]
            if dense_faces is not None and dense_bary is not None:
                faces, bary = torch.cat([faces, dense_faces]), torch.cat([bary, dense_bary.to(bary)])
        self.landmarks = LandmarkFlame(self.layer, faces, bary)
        self.num_expression = min(int(num_expression), self.layer.num_expression)
        self.settings = settings or FitSettings()

    def targets(self, target: PoseFitTarget) -> tuple[np.ndarray, np.ndarray]:
        """(L,2) detected points in px and (L,) weights, in the fit's order: iBUG 68, then the dense points."""
        points = _facemesh_points(target)
        landmarks = ibug68_from_facemesh(points)[:, :2]
        weights = ibug68_weights(target.visibility)
        if self.mediapipe is not None:
            indices = np.asarray(self.mediapipe.landmark_indices, np.int64)
            landmarks = np.concatenate([landmarks, points[indices, :2]])
            weights = np.concatenate([weights, _point_weights(target.visibility, indices)])
        return landmarks, weights

    def __call__(self, shape: np.ndarray, target: PoseFitTarget) -> PosedFaceResult | None:
        """The posed face, or None when no landmark is visible (nothing to fit to)."""
        beta = torch.from_numpy(np.asarray(shape, np.float64).reshape(1, -1))
        points, point_weights = self.targets(target)
        landmarks = torch.from_numpy(points)[None]
        weights = torch.from_numpy(point_weights)[None]
        if float(weights.sum()) <= 0.0:
            return None
        camera = _camera(target)
        with torch.enable_grad():
            fit = fit_posed_face(flame_landmark_model(self.landmarks, beta), self.num_expression, landmarks, weights,
                                 camera, select=self.select, settings=self.settings)
        with torch.no_grad():
            vertices = posed_flame_vertices(self.layer, beta, fit)
        return _result(fit, vertices, camera, target)


class OpenPosedFitter:
    """The open pack's posed face: neutral mesh + observed expression residual, posed through the camera."""

    def __init__(self, canonical: CanonicalFace, camera_points: Callable[[np.ndarray], np.ndarray],
                 settings: FitSettings | None = None) -> None:
        """``camera_points``: FaceMesh points (px, y down, z away) -> the canonical face's axes (the open
        pack's ``packs.open.camera_points``; passed in so this module does not import the pack)."""
        self.canonical = canonical
        self.camera_points = camera_points
        self.settings = settings or FitSettings()

    def split(self, neutral_mm: np.ndarray, target: PoseFitTarget) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(residual (468,3) mm, weights (468,), initial model -> OpenCV camera rotation (3,3)); None when
        no point is visible.

        The observed points (x right, y up, z toward the viewer; FaceMesh's z is a relative depth in px)
        are similarity-fitted onto the neutral mesh on the visible points weighted like MediaPipe's own
        Procrustes; what remains is the expression. Hidden points keep the neutral shape (residual 0).
        """
        points = self.camera_points(_facemesh_points(target))
        weights = np.ones(len(points)) if target.visibility is None else np.where(
            np.isfinite(target.visibility), np.clip(target.visibility, 0.0, 1.0), 1.0)
        fit_weights = self.canonical.procrustes_weights() * weights
        if fit_weights.sum() < 0.2 * self.canonical.landmark_weights.sum():
            fit_weights = weights
        if fit_weights.sum() <= 0:
            return None
        similarity = umeyama(points, neutral_mm, fit_weights)
        residual = (similarity.apply(points) - neutral_mm) * weights[:, None]
        # similarity.rotation: camera (y up) -> model; the model -> OpenCV camera rotation flips y and z back.
        rotation = np.diag([1.0, -1.0, -1.0]) @ similarity.rotation.T
        return residual, weights, rotation

    def __call__(self, neutral_mm: np.ndarray, target: PoseFitTarget) -> PosedFaceResult | None:
        """The posed face, or None when no point is visible (nothing to fit to)."""
        neutral = np.asarray(neutral_mm, np.float64)
        split = self.split(neutral, target)
        if split is None:
            return None
        residual, weights, rotation = split
        posed_model = torch.from_numpy(neutral + residual)[None]
        camera = _camera(target)
        landmarks = torch.from_numpy(_facemesh_points(target)[:, :2])[None]
        with torch.enable_grad():
            fit = fit_posed_face(rigid_landmark_model(posed_model), 0, landmarks, torch.from_numpy(weights)[None],
                                 camera, fit_jaw=False, initial_rotation=torch.from_numpy(rotation)[None],
                                 settings=self.settings)
        return _result(fit, posed_vertices(posed_model, fit), camera, target, expression=residual.reshape(-1))

