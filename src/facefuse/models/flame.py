"""FLAME as a differentiable layer: shape/expression blendshapes, pose correctives, linear blend skinning.

Written from the published FLAME/SMPL formulation (Li et al. 2017; Loper et al. 2015). Buffer and
parameter names are those of MICA's ``flameModel`` section under ``generator.``, so a ``FlameLayer``
loads that part of ``mica.tar`` strictly. Units are metres throughout; services convert to mm with
``METRES_TO_MM`` at their edge.

No file I/O here: a ``FlameModelData`` comes from ``facefuse.assets.flame_file`` (the FLAME pickle
plus the landmark embedding) or from MICA's checkpoint buffers (``facefuse.assets.mica_checkpoint``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

METRES_TO_MM = 1000.0
N_SHAPE = 300
"""Identity components; components N_SHAPE: of ``shapedirs`` are expression (100 in FLAME 2020)."""
N_JOINTS = 5
"""Root (global), neck, jaw, left eye, right eye."""
NECK_KIN_CHAIN = (1, 0)
NOW7_FROM_LMK68 = (36, 39, 42, 45, 33, 48, 54)
"""NoW's 7 points in iBUG-68 order: outer/inner left eye corner, inner/outer right, nose bottom, mouth corners."""
_RODRIGUES_EPS = 1e-8
DYNAMIC_CONTOUR_MAX_YAW_DEG = 39
"""The dynamic contour table has one row per whole degree of yaw in [-39, 39] (79 rows)."""


def dynamic_contour_row(yaw_deg: Tensor) -> Tensor:
    """(B,) head yaw in degrees -> (B,) row of ``dynamic_lmk_faces_idx`` (long), in the layout of the public
    code that reads ``landmark_embedding.npy`` (DECA's FLAME layer, also in EMOCA/SPECTRE): yaw 0..39 ->
    rows 0..39, yaw -1..-39 -> rows 40..78 (row = 39 - yaw), the yaw rounded and clamped to ±39 first.
    Yaw is the rotation about FLAME's +y axis (y up), positive when the face turns toward FLAME's +x, with
    no sign flip (code reading the FLAME website's separate ``flame_dynamic_embedding.npy``, e.g. smplx,
    negates the angle for that file).
    """
    yaw = torch.round(yaw_deg.clamp(-DYNAMIC_CONTOUR_MAX_YAW_DEG, DYNAMIC_CONTOUR_MAX_YAW_DEG)).long()
    return torch.where(yaw >= 0, yaw, DYNAMIC_CONTOUR_MAX_YAW_DEG - yaw)


@dataclass(frozen=True)
class LandmarkEmbedding:
    """Landmarks as (face index, barycentric weights) on the FLAME surface (``landmark_embedding.npy``)."""

    static_lmk_faces_idx: np.ndarray  # (51,) int64: inner-face landmarks (iBUG 17..67)
    static_lmk_bary_coords: np.ndarray  # (51, 3) float32
    dynamic_lmk_faces_idx: np.ndarray  # (79, 17) int64: contour table indexed by quantised yaw
    dynamic_lmk_bary_coords: np.ndarray  # (79, 17, 3) float32
    full_lmk_faces_idx: np.ndarray  # (1, 68) int64: the 68 iBUG landmarks
    full_lmk_bary_coords: np.ndarray  # (1, 68, 3) float32


@dataclass(frozen=True)
class MediaPipeEmbedding:
    """MediaPipe FaceMesh points on the FLAME surface (``mediapipe_landmark_embedding.npz``): for each of
    the file's points, the FLAME face, its barycentric weights and the FaceMesh vertex it corresponds to."""

    lmk_face_idx: np.ndarray  # (N,) int64 FLAME face indices (N = 105 in the official file)
    lmk_b_coords: np.ndarray  # (N, 3) float32
    landmark_indices: np.ndarray  # (N,) int64 FaceMesh vertex indices in [0, 468)


@dataclass(frozen=True)
class FlameModelData:
    """Everything a ``FlameLayer`` needs, as numpy arrays in the layer's own layout.

    ``posedirs`` is (P, 3V) as in the layer (the pickle stores (V, 3, P)); ``J_regressor`` is dense;
    ``parents[0] == -1``. ``landmarks`` is required to build a layer.
    """

    faces: np.ndarray  # (F, 3) int64
    v_template: np.ndarray  # (V, 3) float32, metres
    shapedirs: np.ndarray  # (V, 3, N_SHAPE + n_expression) float32
    posedirs: np.ndarray  # (9 * (J - 1), 3V) float32
    J_regressor: np.ndarray  # (J, V) float32
    parents: np.ndarray  # (J,) int64
    lbs_weights: np.ndarray  # (V, J) float32
    landmarks: LandmarkEmbedding | None = None
    version: str = "2020"

    @property
    def num_vertices(self) -> int:
        return int(self.v_template.shape[0])

    @property
    def num_expression(self) -> int:
        return int(self.shapedirs.shape[2]) - N_SHAPE


class FlameOutput(NamedTuple):
    vertices: Tensor  # (B, V, 3) metres
    landmarks68: Tensor  # (B, 68, 3) metres, from the full_lmk embedding
    joints: Tensor  # (B, J, 3) posed joint locations, metres


def _buffer(array: np.ndarray, dtype: torch.dtype) -> Tensor:
    return torch.as_tensor(np.ascontiguousarray(array)).to(dtype).clone()


class FlameLayer(nn.Module):
    """FLAME with MICA's state-dict names (``faces_tensor``, ``v_template``, ... ``neck_kin_chain``)."""

    # Buffers, declared so that type checkers see tensors rather than nn.Module.__getattr__'s union.
    faces_tensor: Tensor
    v_template: Tensor
    shapedirs: Tensor
    posedirs: Tensor
    J_regressor: Tensor
    parents: Tensor
    lbs_weights: Tensor
    lmk_faces_idx: Tensor
    lmk_bary_coords: Tensor
    dynamic_lmk_faces_idx: Tensor
    dynamic_lmk_bary_coords: Tensor
    full_lmk_faces_idx: Tensor
    full_lmk_bary_coords: Tensor
    neck_kin_chain: Tensor

    def __init__(self, data: FlameModelData, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if data.landmarks is None:
            raise ValueError("FlameLayer needs FlameModelData.landmarks (load the landmark embedding too)")
        lmk = data.landmarks
        self.register_buffer("faces_tensor", _buffer(data.faces, torch.long))
        self.register_buffer("v_template", _buffer(data.v_template, dtype))
        self.register_buffer("shapedirs", _buffer(data.shapedirs, dtype))
        self.register_buffer("posedirs", _buffer(data.posedirs, dtype))
        self.register_buffer("J_regressor", _buffer(data.J_regressor, dtype))
        parents = _buffer(data.parents, torch.long)
        parents[0] = -1
        self.register_buffer("parents", parents)
        self.register_buffer("lbs_weights", _buffer(data.lbs_weights, dtype))
        self.register_buffer("lmk_faces_idx", _buffer(lmk.static_lmk_faces_idx, torch.long))
        self.register_buffer("lmk_bary_coords", _buffer(lmk.static_lmk_bary_coords, dtype))
        self.register_buffer("dynamic_lmk_faces_idx", _buffer(lmk.dynamic_lmk_faces_idx, torch.long))
        self.register_buffer("dynamic_lmk_bary_coords", _buffer(lmk.dynamic_lmk_bary_coords, dtype))
        self.register_buffer("full_lmk_faces_idx", _buffer(lmk.full_lmk_faces_idx, torch.long))
        self.register_buffer("full_lmk_bary_coords", _buffer(lmk.full_lmk_bary_coords, dtype))
        self.register_buffer("neck_kin_chain", torch.tensor(NECK_KIN_CHAIN, dtype=torch.long))
        self.eye_pose = nn.Parameter(torch.zeros(1, 6, dtype=dtype), requires_grad=False)
        self.neck_pose = nn.Parameter(torch.zeros(1, 3, dtype=dtype), requires_grad=False)

    @property
    def num_vertices(self) -> int:
        return int(self.v_template.shape[0])

    @property
    def num_expression(self) -> int:
        return int(self.shapedirs.shape[2]) - N_SHAPE

    def to_data(self) -> FlameModelData:
        """The layer's buffers as ``FlameModelData`` (e.g. MICA's FLAME, taken from its checkpoint)."""

        def np_(t: Tensor) -> np.ndarray:
            return t.detach().cpu().numpy().copy()

        return FlameModelData(
            faces=np_(self.faces_tensor), v_template=np_(self.v_template), shapedirs=np_(self.shapedirs),
            posedirs=np_(self.posedirs), J_regressor=np_(self.J_regressor), parents=np_(self.parents),
            lbs_weights=np_(self.lbs_weights),
            landmarks=LandmarkEmbedding(
                np_(self.lmk_faces_idx), np_(self.lmk_bary_coords), np_(self.dynamic_lmk_faces_idx),
                np_(self.dynamic_lmk_bary_coords), np_(self.full_lmk_faces_idx), np_(self.full_lmk_bary_coords)),
        )

    def shape_vertices(self, shape: Tensor) -> Tensor:
        """Neutral mesh ``T + S[..., :300]·β`` (B,V,3): shape-only FLAME is linear in β."""
        shape = shape.to(self.v_template.dtype)
        return self.v_template + torch.einsum("bl,vkl->bvk", shape, self.shapedirs[..., : shape.shape[1]])

    def landmarks68(self, vertices: Tensor) -> Tensor:
        """(B,V,3) -> (B,68,3) iBUG landmarks from the ``full_lmk`` embedding."""
        return barycentric_landmarks(
            vertices, self.faces_tensor, self.full_lmk_faces_idx[0], self.full_lmk_bary_coords[0]
        )

    def forward(
        self,
        shape: Tensor,
        expression: Tensor | None = None,
        global_pose: Tensor | None = None,
        neck_pose: Tensor | None = None,
        jaw_pose: Tensor | None = None,
        eye_pose: Tensor | None = None,
    ) -> FlameOutput:
        """Full FLAME: blendshapes, pose correctives and LBS. Missing parts are zero (neutral)."""
        dtype = self.v_template.dtype
        batch = shape.shape[0]
        if shape.ndim != 2 or shape.shape[1] > N_SHAPE:
            raise ValueError(f"shape must be (B, <= {N_SHAPE}), got {tuple(shape.shape)}")
        shape = nn.functional.pad(shape.to(dtype), (0, N_SHAPE - shape.shape[1]))
        if expression is None:
            expression = shape.new_zeros(batch, self.num_expression)
        if expression.ndim != 2 or expression.shape[0] != batch or expression.shape[1] > self.num_expression:
            raise ValueError(f"expression must be ({batch}, <= {self.num_expression}), got {tuple(expression.shape)}")
        expression = nn.functional.pad(expression.to(dtype), (0, self.num_expression - expression.shape[1]))

        def pose(value: Tensor | None, default: Tensor) -> Tensor:
            return default.to(dtype).expand(batch, -1) if value is None else value.to(dtype).reshape(batch, -1)

        zeros3 = shape.new_zeros(1, 3)
        full_pose = torch.cat(
            [
                pose(global_pose, zeros3),
                pose(neck_pose, self.neck_pose),
                pose(jaw_pose, zeros3),
                pose(eye_pose, self.eye_pose),
            ],
            dim=1,
        )
        vertices, joints = linear_blend_skinning(
            torch.cat([shape, expression], dim=1), full_pose, self.v_template, self.shapedirs, self.posedirs,
            self.J_regressor, self.parents, self.lbs_weights,
        )
        return FlameOutput(vertices, self.landmarks68(vertices), joints)


def now7(landmarks68: Tensor) -> Tensor:
    """(..., 68, 3) -> (..., 7, 3): the points the NoW benchmark aligns on."""
    return landmarks68[..., list(NOW7_FROM_LMK68), :]


def barycentric_landmarks(vertices: Tensor, faces: Tensor, face_idx: Tensor, bary: Tensor) -> Tensor:
    """L = Σ_k w_k · V[faces[f][k]] for each landmark; vertices (B,V,3), face_idx (L,), bary (L,3)."""
    corner_ids = faces[face_idx.long()]  # (L, 3)
    corners = vertices[:, corner_ids]  # (B, L, 3 corners, 3 xyz)
    return torch.einsum("blkx,lk->blx", corners, bary.to(vertices.dtype))


def rodrigues(axis_angle: Tensor) -> Tensor:
    """(N,3) axis-angle -> (N,3,3) rotation matrices; angle = ‖r + 1e-8‖ as in SMPL-family code."""
    angle = torch.linalg.norm(axis_angle + _RODRIGUES_EPS, dim=1, keepdim=True)  # (N,1)
    axis = axis_angle / angle
    cos = torch.cos(angle)[:, :, None]
    sin = torch.sin(angle)[:, :, None]
    x, y, z = axis.unbind(dim=1)
    zero = torch.zeros_like(x)
    skew = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=1).view(-1, 3, 3)
    eye = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device)[None]
    return eye + sin * skew + (1.0 - cos) * torch.bmm(skew, skew)


def rigid_chain(rotations: Tensor, joints: Tensor, parents: Tensor) -> tuple[Tensor, Tensor]:
    """Compose joint transforms along the kinematic tree.

    Returns posed joints (B,J,3) and relative transforms A_j = G_j − G_j·[J_j; 0] (B,J,4,4), which move
    rest-pose points to posed points.
    """
    batch, n_joints = joints.shape[:2]
    rel_joints = joints.clone()
    rel_joints[:, 1:] = joints[:, 1:] - joints[:, parents[1:]]
    local = torch.zeros(batch, n_joints, 4, 4, dtype=joints.dtype, device=joints.device)
    local[:, :, :3, :3] = rotations
    local[:, :, :3, 3] = rel_joints
    local[:, :, 3, 3] = 1.0
    chain = [local[:, 0]]
    parent_list = parents.tolist()
    for j in range(1, n_joints):
        chain.append(torch.matmul(chain[parent_list[j]], local[:, j]))
    world = torch.stack(chain, dim=1)  # (B,J,4,4)
    posed_joints = world[:, :, :3, 3]
    moved_rest = torch.einsum("bjrc,bjc->bjr", world[:, :, :3, :3], joints)  # G_j · [J_j; 0]
    relative = world.clone()
    relative[:, :, :3, 3] = world[:, :, :3, 3] - moved_rest
    return posed_joints, relative


def linear_blend_skinning(
    betas: Tensor,
    full_pose: Tensor,
    v_template: Tensor,
    shapedirs: Tensor,
    posedirs: Tensor,
    J_regressor: Tensor,
    parents: Tensor,
    lbs_weights: Tensor,
) -> tuple[Tensor, Tensor]:
    """Blendshapes, joint regression, pose correctives and skinning; returns (vertices, posed joints)."""
    batch = betas.shape[0]
    v_shaped = v_template + torch.einsum("bl,vkl->bvk", betas, shapedirs)
    joints = torch.einsum("jv,bvk->bjk", J_regressor, v_shaped)
    rotations = rodrigues(full_pose.reshape(-1, 3)).view(batch, -1, 3, 3)
    eye = torch.eye(3, dtype=betas.dtype, device=betas.device)
    pose_feature = (rotations[:, 1:] - eye).reshape(batch, -1)
    v_posed = v_shaped + torch.matmul(pose_feature, posedirs).view(batch, -1, 3)
    posed_joints, relative = rigid_chain(rotations, joints, parents)
    per_vertex = torch.einsum("vj,bjrc->bvrc", lbs_weights, relative)  # (B,V,4,4)
    vertices = torch.einsum("bvrc,bvc->bvr", per_vertex[:, :, :3, :3], v_posed) + per_vertex[:, :, :3, 3]
    return vertices, posed_joints
