"""Fitting the face as photographed: expression, jaw, head rotation and translation to 2D landmarks.

The identity shape is fixed (MICA/OFER's fused β, or the open pack's neutral mesh). What is fitted,
per face, against detected landmarks in pixels through a known perspective camera (``models.camera``):

* ``expression`` (K coefficients of the model's expression basis) and ``jaw`` (axis-angle, FLAME's jaw
  joint), both with Gaussian priors that keep what the landmarks do not see plausible;
* the head's rotation R (model -> camera, composed as R = exp(ω)·R₀ with R₀ the frontal view) and
  translation t = z·(a, b, 1) in mm (depth as log z so that all parameters have comparable steps).

The neck is not fitted: for the face's landmarks a neck rotation is a rigid motion of the head that the
global rotation plus translation already express, so fitting both is degenerate. FLAME's root joint
stays at zero and the global rotation is applied as the extrinsic [R | t] about the model origin.

Loss per face: Σ_l w_l·ρ(‖π(R·X_l + t) − u_l‖ / σ) + priors, with w_l ∈ [0, 1] the landmark's
visibility (hidden ≈ 0), σ = 1 % of the face's size in the photo (so the balance with the priors does
not depend on the photo's resolution) and ρ the pseudo-Huber function (a few wrong landmarks cannot
drag the fit). Optimised with Adam for a fixed number of steps (rigid first, then everything) with a
cosine-decayed step size: deterministic, batched (Adam is element-wise, so faces in one batch do not
influence each other) and device-agnostic. Pure math, no file I/O.

FLAME's jaw contour is a silhouette, so which surface points are its landmarks depends on the head's yaw
(the dynamic embedding): the model then gives every candidate point (:func:`flame_landmark_bank`) and a
selector picks the fitted ones from the current yaw (:func:`dynamic_landmark_selector`), between steps,
without a gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from facefuse.models.camera import (
    axis_angle_to_rotation,
    flame_to_opencv,
    project,
    rotation_to_axis_angle,
)
from facefuse.models.flame import (
    METRES_TO_MM,
    N_SHAPE,
    FlameLayer,
    dynamic_contour_row,
    rigid_chain,
    rodrigues,
)

LandmarkModel = Callable[[Tensor, Tensor], Tensor]
"""(expression (B,K), jaw (B,3)) -> landmarks (B,L,3) in mm in the model frame (x right, y up, z to viewer)."""
LandmarkSelector = Callable[[Tensor], Tensor]
"""(B,3,3) current model -> camera rotation -> (B,L) index into the model's points: which of them are the
fitted landmarks at this head pose (FLAME's yaw-dependent contour). Not differentiated."""


@dataclass(frozen=True)
class FitSettings:
    """Step counts, step sizes and prior strengths of :func:`fit_posed_face` (defaults: docs/posed-face.md)."""

    rigid_steps: int = 100
    full_steps: int = 300
    rigid_lr: float = 0.03
    full_lr: float = 0.02
    expression_lr: float = 0.05
    sigma_fraction: float = 0.01
    """σ of the data term as a fraction of the face's size in px (RMS distance of the landmarks from their centroid)."""
    huber_delta: float = 3.0
    """The pseudo-Huber's knee in σ: residuals beyond 3σ count linearly."""
    expression_prior: float = 0.1
    """Weight of ½‖ψ‖² (FLAME's expression coefficients have unit prior variance)."""
    jaw_prior_rad: tuple[float, float, float] = (0.3, 0.05, 0.05)
    """Prior standard deviation of the jaw's axis-angle per axis: it opens about x, barely turns about y, z."""
    jaw_prior: float = 0.5
    """Weight of ½‖jaw / jaw_prior_rad‖²."""
    visible_threshold: float = 0.5
    """Landmarks with at least this weight count in the reported reprojection error."""
    reselect_every: int = 50
    """With a landmark selector (the dynamic contour): re-select the landmarks from the current pose at the
    start of each stage and every this many steps within a stage."""


@dataclass(frozen=True)
class PosedFit:
    """The fitted parameters, batched; lengths in mm, angles in rad, pixels of the original photo."""

    expression: Tensor  # (B,K)
    jaw_pose: Tensor  # (B,3) axis-angle
    rotation: Tensor  # (B,3,3) model -> camera
    global_pose: Tensor  # (B,3) axis-angle of ``rotation``
    translation: Tensor  # (B,3) mm
    landmarks_px: Tensor  # (B,L,2) the fitted landmarks projected
    reprojection_error_px: Tensor  # (B,) mean distance to the targets over landmarks with weight >= threshold
    initial_error_px: Tensor  # (B,) the same for the rigid initial guess (before any step)


class LandmarkFlame(nn.Module):
    """FLAME evaluated at its landmarks only: blendshapes, pose correctives and skinning on the corners of
    the landmark triangles, with joints from the regressor folded into the blendshapes (J·(T + S·β)).

    Why: a fit step then costs a few hundred vertices instead of FLAME's 5023, with the same numbers as the
    full layer at those points.
    """

    v_template: Tensor
    shapedirs: Tensor
    posedirs: Tensor
    lbs_weights: Tensor
    joint_template: Tensor
    joint_dirs: Tensor
    parents: Tensor
    corner_index: Tensor
    bary: Tensor

    def __init__(self, flame: FlameLayer, faces_idx: Tensor, bary: Tensor, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        corners = flame.faces_tensor[faces_idx.long()]  # (L,3)
        used, inverse = torch.unique(corners.reshape(-1), return_inverse=True)
        n_pose = flame.posedirs.shape[0]
        v = flame.num_vertices
        self.register_buffer("corner_index", inverse.reshape(corners.shape))
        self.register_buffer("bary", bary.to(dtype).clone())
        self.register_buffer("v_template", flame.v_template[used].to(dtype))
        self.register_buffer("shapedirs", flame.shapedirs[used].to(dtype))
        self.register_buffer("posedirs", flame.posedirs.view(n_pose, v, 3)[:, used].reshape(n_pose, -1).to(dtype))
        self.register_buffer("lbs_weights", flame.lbs_weights[used].to(dtype))
        regressor = flame.J_regressor.to(dtype)
        self.register_buffer("joint_template", regressor @ flame.v_template.to(dtype))
        self.register_buffer("joint_dirs", torch.einsum("jv,vkl->jkl", regressor, flame.shapedirs.to(dtype)))
        self.register_buffer("parents", flame.parents.clone())
        self.num_expression = flame.num_expression

    def forward(self, shape: Tensor, expression: Tensor, jaw_pose: Tensor) -> Tensor:
        """shape (B,≤300), expression (B,≤K), jaw (B,3) -> landmarks (B,L,3) in metres, root/neck/eyes at zero."""
        dtype = self.v_template.dtype
        shape = nn.functional.pad(shape.to(dtype), (0, N_SHAPE - shape.shape[1]))
        expression = nn.functional.pad(expression.to(dtype), (0, self.num_expression - expression.shape[1]))
        betas = torch.cat([shape, expression], dim=1)
        v_shaped = self.v_template + torch.einsum("bl,vkl->bvk", betas, self.shapedirs)
        joints = self.joint_template + torch.einsum("bl,jkl->bjk", betas, self.joint_dirs)
        return posed_landmarks(v_shaped, joints, jaw_pose, self.posedirs, self.lbs_weights, self.parents,
                               self.corner_index, self.bary)


def posed_landmarks(v_shaped: Tensor, joints: Tensor, jaw_pose: Tensor, posedirs: Tensor, lbs_weights: Tensor,
                    parents: Tensor, corner_index: Tensor, bary: Tensor) -> Tensor:
    """FLAME's pose correctives and skinning with only the jaw posed (root, neck, eyes at zero), on the
    shaped corner vertices (B,U,3) and joints (B,J,3), then the landmarks (B,L,3) from their corners."""
    dtype = v_shaped.dtype
    batch = v_shaped.shape[0]
    zeros = jaw_pose.new_zeros(batch, 3).to(dtype)
    n_joints = joints.shape[1]
    full_pose = torch.cat([zeros, zeros, jaw_pose.to(dtype)] + [zeros] * (n_joints - 3), dim=1)
    rotations = rodrigues(full_pose.reshape(-1, 3)).view(batch, -1, 3, 3)
    eye = torch.eye(3, dtype=dtype, device=v_shaped.device)
    pose_feature = (rotations[:, 1:] - eye).reshape(batch, -1)
    v_posed = v_shaped + torch.matmul(pose_feature, posedirs).view(batch, -1, 3)
    _, relative = rigid_chain(rotations, joints, parents)
    per_vertex = torch.einsum("vj,bjrc->bvrc", lbs_weights, relative)
    posed = torch.einsum("bvrc,bvc->bvr", per_vertex[:, :, :3, :3], v_posed) + per_vertex[:, :, :3, 3]
    corners = posed[:, corner_index]  # (B,L,3,3)
    return torch.einsum("blkx,lk->blx", corners, bary)


JAW_JOINT = 2
"""FLAME's jaw joint (root 0, neck 1, jaw 2, eyes 3 and 4); its parent chain is neck -> root."""


def jaw_posed_landmarks(v_shaped: Tensor, joints: Tensor, jaw_pose: Tensor, jaw_posedirs: Tensor,
                        weight_sum: Tensor, jaw_weight: Tensor, corner_index: Tensor, bary: Tensor) -> Tensor:
    """:func:`posed_landmarks` in closed form for the fit's pose, where only the jaw turns.

    With root, neck and eyes at zero, every joint's skinning transform is the identity except the jaw's,
    a rotation R about the jaw joint J, so linear blend skinning reduces to
    v' = (Σ_j w_j)·v_p + w_jaw·(R − I)(v_p − J) with v_p = v + P_jaw·vec(R − I) (the jaw's 9 pose
    correctives). A few operations per step instead of the whole kinematic chain: the same function, the
    rounding of the zero rotations aside (``rodrigues`` turns a zero pose into I + O(1e-8))."""
    dtype = v_shaped.dtype
    batch = v_shaped.shape[0]
    rotation = rodrigues(jaw_pose.to(dtype).reshape(-1, 3)).view(batch, 3, 3)
    turn = rotation - torch.eye(3, dtype=dtype, device=v_shaped.device)
    v_posed = v_shaped + torch.matmul(turn.reshape(batch, 9), jaw_posedirs).view(batch, -1, 3)
    moved = (v_posed - joints[:, JAW_JOINT, None]) @ turn.transpose(1, 2)
    posed = weight_sum[:, None] * v_posed + jaw_weight[:, None] * moved
    corners = posed[:, corner_index]  # (B,L,3,3)
    return torch.einsum("blkx,lk->blx", corners, bary)


class IdentityLandmarks:
    """The fit's model for a fixed FLAME identity: (expression (B,K), jaw (B,3)) -> landmarks (B,L,3) in mm.

    The same numbers as ``LandmarkFlame(shape, expression, jaw)`` up to float rounding, for less work per
    fit step: the identity's part of the blendshapes and joints (300 of FLAME's 400 components) is added
    once, a step adds only the K fitted expression components, the skinning is the jaw-only closed form
    (:func:`jaw_posed_landmarks`), and :meth:`restricted` evaluates only the landmarks a selector picked
    (17 contour points of a yaw row instead of the whole 79 x 17 table)."""

    def __init__(self, landmarks: LandmarkFlame, shape: Tensor, points: Tensor | None = None) -> None:
        self.landmarks = landmarks
        self.shape = shape
        dtype = landmarks.v_template.dtype
        corners = landmarks.corner_index if points is None else landmarks.corner_index[points]
        used, inverse = torch.unique(corners.reshape(-1), return_inverse=True)
        self.corner_index = inverse.reshape(corners.shape)
        self.bary = landmarks.bary if points is None else landmarks.bary[points]
        beta = nn.functional.pad(shape.to(dtype), (0, N_SHAPE - shape.shape[1]))
        shapedirs = landmarks.shapedirs[used]
        self.v_identity = landmarks.v_template[used] + torch.einsum("bl,vkl->bvk", beta, shapedirs[..., :N_SHAPE])
        self.joint_identity = landmarks.joint_template + torch.einsum(
            "bl,jkl->bjk", beta, landmarks.joint_dirs[..., :N_SHAPE])
        self.expression_dirs = shapedirs[..., N_SHAPE:]
        self.joint_expression_dirs = landmarks.joint_dirs[..., N_SHAPE:]
        n_pose = landmarks.posedirs.shape[0]
        self.posedirs = landmarks.posedirs.view(n_pose, -1, 3)[:, used].reshape(n_pose, -1)
        self.lbs_weights = landmarks.lbs_weights[used]
        parents = landmarks.parents.tolist()
        # The closed form needs FLAME's chain: the jaw under the neck under the root (with the 4 posed joints
        # after the root giving 36 correctives, the jaw's being the second 9).
        self.jaw_only = len(parents) > JAW_JOINT and parents[JAW_JOINT] == 1 and parents[1] == 0 and n_pose == 36
        self.jaw_posedirs = self.posedirs[9:18]
        self.weight_sum = self.lbs_weights.sum(dim=1)
        self.jaw_weight = self.lbs_weights[:, JAW_JOINT]
        self._first: dict[int, tuple[Tensor, Tensor]] = {}

    def _expression_dirs(self, count: int) -> tuple[Tensor, Tensor]:
        """The first ``count`` expression directions of the vertices and the joints, contiguous (cached)."""
        if count not in self._first:
            self._first[count] = (self.expression_dirs[..., :count].contiguous(),
                                  self.joint_expression_dirs[..., :count].contiguous())
        return self._first[count]

    def __call__(self, expression: Tensor, jaw: Tensor) -> Tensor:
        dtype = self.v_identity.dtype
        count = expression.shape[1]
        if count > self.expression_dirs.shape[-1]:
            raise ValueError(f"expression: {count} components, the model has {self.expression_dirs.shape[-1]}")
        v_shaped, joints = self.v_identity, self.joint_identity
        if count:
            vertex_dirs, joint_dirs = self._expression_dirs(count)
            expression = expression.to(dtype)
            v_shaped = v_shaped + torch.einsum("bl,vkl->bvk", expression, vertex_dirs)
            joints = joints + torch.einsum("bl,jkl->bjk", expression, joint_dirs)
        if self.jaw_only:
            points = jaw_posed_landmarks(v_shaped, joints, jaw, self.jaw_posedirs, self.weight_sum, self.jaw_weight,
                                         self.corner_index, self.bary)
        else:
            points = posed_landmarks(v_shaped, joints, jaw, self.posedirs, self.lbs_weights, self.landmarks.parents,
                                     self.corner_index, self.bary)
        return points * METRES_TO_MM

    def restricted(self, points: Tensor) -> IdentityLandmarks:
        """The same model evaluated at ``points`` (indices into this model's landmarks) only."""
        return IdentityLandmarks(self.landmarks, self.shape, points)


def flame_landmark_model(landmarks: LandmarkFlame, shape: Tensor) -> IdentityLandmarks:
    """The fit's model for a fixed FLAME identity ``shape`` (B,≤300): landmarks in mm."""
    return IdentityLandmarks(landmarks, shape)


def rigid_landmark_model(points_mm: Tensor) -> LandmarkModel:
    """A model with no expression or jaw: fixed landmarks (B,L,3) mm (the open pack's posed face)."""

    def model(expression: Tensor, jaw: Tensor) -> Tensor:
        return points_mm

    return model


def yaw_degrees(rotation: Tensor) -> Tensor:
    """(B,3,3) model -> OpenCV camera rotation -> (B,) the head's yaw in degrees as FLAME's fitting code
    measures it: the rotation in FLAME's camera frame (y up, z toward the viewer, i.e. diag(1,-1,-1)·R)
    taken as Euler angles, yaw = atan2(-R'₂₀, √(R'₀₀² + R'₁₀²)); positive when the face turns toward +x
    (image right). The public code assumes an orthographic view: the face's off-axis position is ignored.
    """
    flame_frame = rotation * rotation.new_tensor((1.0, -1.0, -1.0))[:, None]  # diag(1,-1,-1) @ R
    return torch.rad2deg(torch.atan2(-flame_frame[:, 2, 0], torch.hypot(flame_frame[:, 0, 0], flame_frame[:, 1, 0])))


def flame_landmark_bank(flame: FlameLayer, dense_faces: Tensor | None = None,
                        dense_bary: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Every candidate landmark of the flame fit as (faces (N,), bary (N,3)) for one :class:`LandmarkFlame`:
    the 51 static inner points, the 79×17 dynamic contour table row by row, then the optional dense
    (MediaPipe) points. :func:`dynamic_landmark_selector` picks the fitted ones from it by yaw."""
    faces = [flame.lmk_faces_idx, flame.dynamic_lmk_faces_idx.reshape(-1)]
    bary = [flame.lmk_bary_coords, flame.dynamic_lmk_bary_coords.reshape(-1, 3)]
    if dense_faces is not None and dense_bary is not None:
        faces.append(dense_faces.to(faces[0].device))
        bary.append(dense_bary.to(bary[0]))
    return torch.cat(faces).long(), torch.cat(bary)


def dynamic_landmark_selector(num_static: int = 51, num_contour: int = 17, num_rows: int = 79,
                              num_dense: int = 0) -> LandmarkSelector:
    """The selector for :func:`flame_landmark_bank`'s layout: iBUG-68 order (the contour, 0-16, from the
    table row of the current yaw, :func:`facefuse.models.flame.dynamic_contour_row`; 17-67 static), then
    the ``num_dense`` dense points."""
    contour = torch.arange(num_contour)
    static = torch.arange(num_static)
    dense = num_static + num_rows * num_contour + torch.arange(num_dense)

    def select(rotation: Tensor) -> Tensor:
        row = dynamic_contour_row(yaw_degrees(rotation.detach())).clamp(0, num_rows - 1).cpu()
        index = torch.cat([num_static + row[:, None] * num_contour + contour,
                           static.expand(row.shape[0], -1), dense.expand(row.shape[0], -1)], dim=1)
        return index.to(rotation.device)

    return select


def _weighted_centre_and_size(points: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """(B,L,D), (B,L) -> weighted centroid (B,D) and RMS distance from it (B,)."""
    w = weights / weights.sum(dim=1, keepdim=True)
    centre = (w[..., None] * points).sum(dim=1)
    size = ((w * ((points - centre[:, None]) ** 2).sum(-1)).sum(dim=1)).sqrt()
    return centre, size


def _pseudo_huber(r2: Tensor, delta: float) -> Tensor:
    return delta**2 * (torch.sqrt(1.0 + r2 / delta**2) - 1.0)


def _cosine(step: int, total: int, lr: float) -> float:
    return lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1))))


def reprojection_error(projected: Tensor, target: Tensor, weights: Tensor, threshold: float) -> Tensor:
    """(B,) mean pixel distance over landmarks with weight >= threshold (all landmarks if none is)."""
    distance = (projected - target).norm(dim=-1)
    seen = (weights >= threshold).to(distance.dtype)
    seen = torch.where(seen.sum(dim=1, keepdim=True) > 0, seen, torch.ones_like(seen))
    return (distance * seen).sum(dim=1) / seen.sum(dim=1)


def fit_posed_face(
    model: LandmarkModel,
    num_expression: int,
    target_px: Tensor,
    weights: Tensor,
    camera: Tensor,
    *,
    fit_jaw: bool = True,
    initial_rotation: Tensor | None = None,
    select: LandmarkSelector | None = None,
    settings: FitSettings = FitSettings(),
) -> PosedFit:
    """Fit expression (first ``num_expression`` components), jaw, rotation and translation to landmarks.

    ``target_px`` (B,L,2) detected landmarks, ``weights`` (B,L) in [0, 1] (visibility; hidden ≈ 0),
    ``camera`` (B,3,3) intrinsics. ``num_expression`` 0 and ``fit_jaw`` False make it a rigid fit.
    ``initial_rotation`` (B,3,3) model -> camera where a head pose is already known; default frontal.
    ``select``: the model returns candidate points and ``select(rotation)`` the L fitted ones among them
    (FLAME's dynamic contour); re-selected from the current rotation at the start of each stage, every
    ``settings.reselect_every`` steps and at the end, never differentiated.
    Raises ValueError when a face has no landmark with positive weight.
    """
    dtype = torch.float64
    target = target_px.to(dtype)
    weights = weights.to(dtype).clamp(0.0, 1.0)
    k = camera.to(dtype)
    batch, device = target.shape[0], target.device
    if target.ndim != 3 or target.shape[2] != 2 or weights.shape != target.shape[:2] or k.shape != (batch, 3, 3):
        raise ValueError(f"fit: target (B,L,2), weights (B,L), camera (B,3,3); got {tuple(target.shape)}, "
                         f"{tuple(weights.shape)}, {tuple(k.shape)}")
    if not bool((weights.sum(dim=1) > 0).all()):
        raise ValueError("fit: a face has no landmark with positive weight (everything hidden)")
    expression = torch.zeros(batch, num_expression, dtype=dtype, device=device)
    jaw = torch.zeros(batch, 3, dtype=dtype, device=device)
    frontal = flame_to_opencv(batch, dtype, device) if initial_rotation is None else initial_rotation.to(dtype)
    restrict = getattr(model, "restricted", None)
    # The model evaluated now and the index of the fitted landmarks in its output (None: all of them).
    current: list[tuple[LandmarkModel, Tensor | None]] = [(model, None)]

    def choose(rotation: Tensor) -> None:
        if select is None:
            return
        index = select(rotation)
        if callable(restrict):  # evaluate the selected points only; index into that smaller output
            points, local = torch.unique(index, return_inverse=True)
            current[0] = (restrict(points), local)
        else:
            current[0] = (model, index)

    def landmarks_of(points: Tensor) -> Tensor:
        index = current[0][1]
        if index is None:
            return points
        return torch.gather(points, 1, index[..., None].expand(-1, -1, points.shape[2]))

    def model_points() -> Tensor:
        return current[0][0](expression, jaw).to(dtype)

    choose(frontal)
    # Initial guess: frontal, at the depth where the neutral landmarks' size matches the detected ones.
    with torch.no_grad():
        neutral = landmarks_of(model_points()) @ frontal.transpose(1, 2)
        if neutral.shape[1] != target.shape[1]:
            raise ValueError(f"fit: the model gives {neutral.shape[1]} landmarks, the target has {target.shape[1]}")
        centre_mm, size_mm = _weighted_centre_and_size(neutral, weights)
        centre_px, size_px = _weighted_centre_and_size(target, weights)
        focal = (k[:, 0, 0] + k[:, 1, 1]) / 2.0
        depth = focal * size_mm / size_px - centre_mm[:, 2]
        z = depth + centre_mm[:, 2]
        txy = (centre_px - k[:, :2, 2]) * z[:, None] / focal[:, None] - centre_mm[:, :2]
    omega = torch.zeros(batch, 3, dtype=dtype, device=device, requires_grad=True)
    log_depth = depth.log().clone().requires_grad_(True)
    offset = (txy / depth[:, None]).clone().requires_grad_(True)
    expression.requires_grad_(True)
    jaw.requires_grad_(True)
    sigma = (settings.sigma_fraction * size_px).clamp_min(1e-3)
    jaw_scale = torch.tensor(settings.jaw_prior_rad, dtype=dtype, device=device)

    def pose() -> tuple[Tensor, Tensor]:
        rotation = axis_angle_to_rotation(omega) @ frontal
        d = log_depth.exp()
        return rotation, torch.cat([offset * d[:, None], d[:, None]], dim=1)

    def projected(fixed: Tensor | None = None) -> Tensor:
        rotation, translation = pose()
        points = landmarks_of(model_points() if fixed is None else fixed)
        return project(points @ rotation.transpose(1, 2) + translation[:, None], k)

    def loss(fixed: Tensor | None = None) -> Tensor:
        r2 = ((projected(fixed) - target) ** 2).sum(-1) / sigma[:, None] ** 2
        data = (weights * _pseudo_huber(r2, settings.huber_delta)).sum()
        prior = 0.5 * settings.expression_prior * (expression**2).sum()
        prior = prior + 0.5 * settings.jaw_prior * ((jaw / jaw_scale) ** 2).sum()
        return data + prior

    with torch.no_grad():
        initial = reprojection_error(projected(), target, weights, settings.visible_threshold)
    stages: list[tuple[int, list[dict[str, object]]]] = [
        (settings.rigid_steps, [{"params": [omega, log_depth, offset], "lr": settings.rigid_lr}]),
    ]
    full: list[dict[str, object]] = [{"params": [omega, log_depth, offset], "lr": settings.full_lr}]
    if num_expression > 0:
        full.append({"params": [expression], "lr": settings.expression_lr})
    if fit_jaw:
        full.append({"params": [jaw], "lr": settings.full_lr})
    stages.append((settings.full_steps, full))
    for stage, (steps, groups) in enumerate(stages):
        # The rigid stage moves no model parameter: its landmarks are computed once per selection.
        fixed: Tensor | None = None
        optimiser = torch.optim.Adam(groups)
        base = [float(g["lr"]) for g in groups]  # type: ignore[arg-type]
        for step in range(steps):
            reselect = select is not None and step % max(settings.reselect_every, 1) == 0
            with torch.no_grad():
                if reselect:
                    choose(pose()[0])
                if stage == 0 and (fixed is None or reselect):
                    fixed = model_points()
            for group, lr in zip(optimiser.param_groups, base, strict=True):
                group["lr"] = _cosine(step, steps, lr)
            optimiser.zero_grad(set_to_none=True)
            loss(fixed).backward()
            optimiser.step()
    with torch.no_grad():
        rotation, translation = pose()
        choose(rotation)
        landmarks_px = projected()
        error = reprojection_error(landmarks_px, target, weights, settings.visible_threshold)
    return PosedFit(
        expression=expression.detach(), jaw_pose=jaw.detach(), rotation=rotation.detach(),
        global_pose=rotation_to_axis_angle(rotation.detach()), translation=translation.detach(),
        landmarks_px=landmarks_px.detach(), reprojection_error_px=error, initial_error_px=initial,
    )


def posed_flame_vertices(flame: FlameLayer, shape: Tensor, fit: PosedFit) -> Tensor:
    """(B,V,3) camera-space vertices in mm of the fitted face: FLAME(β, ψ, jaw) in mm, then R·v + t."""
    dtype = flame.v_template.dtype
    k = fit.expression.shape[1]
    expression = fit.expression.to(dtype)[:, : min(k, flame.num_expression)]
    model = flame(shape.to(dtype), expression=expression, jaw_pose=fit.jaw_pose.to(dtype)).vertices * METRES_TO_MM
    return model @ fit.rotation.to(dtype).transpose(1, 2) + fit.translation.to(dtype)[:, None]


def posed_vertices(vertices_mm: Tensor, fit: PosedFit) -> Tensor:
    """(B,V,3) model-frame vertices in mm -> camera space with the fitted [R | t]."""
    dtype = vertices_mm.dtype
    return vertices_mm @ fit.rotation.to(dtype).transpose(1, 2) + fit.translation.to(dtype)[:, None]
