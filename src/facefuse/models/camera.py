"""The pinhole camera of the posed face: intrinsics from a focal length, projection, rotations.

Convention (OpenCV): camera space in millimetres, x right, y down, z forward; pixel
(u, v) = (fx·x/z + cx, fy·y/z + cy) in the photo's pixel grid with pixel centres at integer
coordinates, so the principal point of a W×H photo is ((W − 1)/2, (H − 1)/2).
Focal lengths from a photo's 35 mm-equivalent focal: :mod:`facefuse.models.focal` (no torch: the gateway
uses it).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from facefuse.models.flame import rodrigues

FLAME_TO_OPENCV = (1.0, -1.0, -1.0)
"""FLAME's model frame is x right, y up, z toward the viewer; a frontal face in the OpenCV camera is the
model rotated 180° about x (diag(1, −1, −1))."""


def intrinsics(focal_px: Tensor, width: int, height: int) -> Tensor:
    """(B,) focal lengths in px -> (B,3,3) K with square pixels and the principal point at the centre."""
    focal = torch.as_tensor(focal_px).reshape(-1)
    k = torch.zeros(focal.shape[0], 3, 3, dtype=focal.dtype, device=focal.device)
    k[:, 0, 0] = focal
    k[:, 1, 1] = focal
    k[:, 0, 2] = (width - 1) / 2.0
    k[:, 1, 2] = (height - 1) / 2.0
    k[:, 2, 2] = 1.0
    return k


def project(points: Tensor, k: Tensor) -> Tensor:
    """(B,N,3) camera-space points (z > 0) -> (B,N,2) pixels with (B,3,3) intrinsics."""
    z = points[..., 2:3].clamp_min(1e-6)
    xy = points[..., :2] / z
    focal = torch.stack([k[:, 0, 0], k[:, 1, 1]], dim=-1)[:, None, :]
    centre = k[:, None, :2, 2]
    return xy * focal + centre


def extrinsics(rotation: Tensor, translation: Tensor) -> Tensor:
    """(B,3,3) R and (B,3) t -> (B,4,4) [R | t; 0 0 0 1]."""
    out = torch.zeros(rotation.shape[0], 4, 4, dtype=rotation.dtype, device=rotation.device)
    out[:, :3, :3] = rotation
    out[:, :3, 3] = translation
    out[:, 3, 3] = 1.0
    return out


def flame_to_opencv(batch: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
    """(B,3,3) the rotation that shows FLAME's model frame frontally in the OpenCV camera."""
    return torch.diag(torch.tensor(FLAME_TO_OPENCV, dtype=dtype, device=device)).expand(batch, 3, 3).clone()


def rotation_to_axis_angle(rotation: Tensor) -> Tensor:
    """(B,3,3) rotations -> (B,3) axis-angle (log map), exact near 0 and near π.

    Why here: the fit composes rotations as matrices, the outputs (and FLAME) speak axis-angle.
    """
    r = rotation.to(torch.float64)
    cos = (r.diagonal(dim1=1, dim2=2).sum(-1) - 1.0) / 2.0
    skew = torch.stack([r[:, 2, 1] - r[:, 1, 2], r[:, 0, 2] - r[:, 2, 0], r[:, 1, 0] - r[:, 0, 1]], dim=-1)
    angle = torch.atan2(skew.norm(dim=-1) / 2.0, cos)  # precise at both ends, unlike arccos near π
    sin = torch.sin(angle)
    out = torch.empty(r.shape[0], 3, dtype=torch.float64, device=r.device)
    small = angle < 1e-6
    regular = (~small) & (angle < math.pi - 1e-3)
    out[small] = skew[small] / 2.0
    out[regular] = skew[regular] * (angle[regular] / (2.0 * sin[regular]))[:, None]
    near_pi = ~(small | regular)
    if near_pi.any():
        # R = 2·a·aᵀ − I at θ = π (approximately near it): the axis is the largest column of R + I.
        sym = (r[near_pi] + r[near_pi].transpose(1, 2)) / 2.0 + torch.eye(3, dtype=r.dtype, device=r.device)
        column = sym.diagonal(dim1=1, dim2=2).argmax(dim=-1)
        axis = sym[torch.arange(sym.shape[0]), :, column]
        axis = axis / axis.norm(dim=-1, keepdim=True)
        sign = torch.sign((axis * skew[near_pi]).sum(-1))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        out[near_pi] = axis * (sign * angle[near_pi])[:, None]
    return out.to(rotation.dtype)


def axis_angle_to_rotation(axis_angle: Tensor) -> Tensor:
    """(B,3) -> (B,3,3); FLAME's own Rodrigues formula, so the fit and the model agree exactly."""
    return rodrigues(axis_angle)
