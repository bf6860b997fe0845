"""The face as photographed, read back from a face folder (the posed-face contract in docs/video.md).

The fitting step writes, per face: ``params.npz`` with ``global_pose`` (3,) axis-angle (model ->
camera), ``translation`` (3,) mm, ``camera_intrinsics`` (3, 3) px, optionally ``camera_extrinsics``
(4, 4), ``expression`` (K,) and ``image_size`` (2,) = (width, height); and ``mesh_posed.obj`` (or
``.ply``): the mesh in OpenCV camera space, mm. Reading them from the files (rather than from the
response) makes the overlay and the video work from any finished output folder, and from faces a
resumed run did not fetch again. A face without them simply has no posed mesh (None).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from facefuse.client.validate import CheckedReconstruction
from facefuse.errors import FacefuseError
from facefuse.io.meshes import read_mesh

POSED_MESHES = ("mesh_posed.obj", "mesh_posed.ply")
MAX_POSED_VERTICES = 1_000_000


@dataclass(frozen=True)
class PosedFace:
    vertices_cam_mm: np.ndarray  # (V, 3) OpenCV camera space
    faces: np.ndarray  # (F, 3)
    intrinsics: np.ndarray  # (3, 3)
    rotation: np.ndarray  # (3,) axis-angle, model -> camera
    translation: np.ndarray  # (3,) mm
    expression: np.ndarray | None

    def model_space(self) -> np.ndarray:
        """The posed mesh taken back to model space (R^T (x - t)): identity plus expression, no head pose."""
        matrix = Rotation.from_rotvec(self.rotation).as_matrix()
        return (self.vertices_cam_mm - self.translation) @ matrix


def _finite(array: np.ndarray, shape: tuple[int, ...]) -> bool:
    return array.shape == shape and bool(np.isfinite(array).all())


def load_posed(face_dir: Path) -> PosedFace | None:
    """The face folder's posed mesh and camera, or None when it has none or they do not make sense."""
    mesh_path = next((face_dir / name for name in POSED_MESHES if (face_dir / name).is_file()), None)
    params_path = face_dir / "params.npz"
    if mesh_path is None or not params_path.is_file():
        return None
    try:
        with np.load(params_path, allow_pickle=False) as params:
            fields = {k: np.asarray(params[k], np.float64) for k in params.files}
        vertices, faces = read_mesh(mesh_path)
    except (OSError, ValueError, KeyError, FacefuseError):
        return None
    intrinsics = fields.get("camera_intrinsics")
    if intrinsics is None or not _finite(intrinsics, (3, 3)) or intrinsics[0, 0] <= 0 or intrinsics[1, 1] <= 0:
        return None
    extrinsics = fields.get("camera_extrinsics")
    if extrinsics is not None and _finite(extrinsics, (4, 4)):
        rotation = Rotation.from_matrix(extrinsics[:3, :3]).as_rotvec()
        translation = extrinsics[:3, 3]
    else:
        pose, shift = fields.get("global_pose"), fields.get("translation")
        if pose is None or shift is None or not _finite(pose, (3,)) or not _finite(shift, (3,)):
            return None
        rotation, translation = pose, shift
    vertices = np.asarray(vertices, np.float64)
    if not _finite(vertices, vertices.shape) or vertices.ndim != 2 or not 0 < len(vertices) <= MAX_POSED_VERTICES:
        return None
    expression = fields.get("expression")
    return PosedFace(vertices, np.asarray(faces, np.int64), intrinsics, np.asarray(rotation, np.float64),
                     np.asarray(translation, np.float64),
                     expression.ravel() if expression is not None and np.isfinite(expression).all() else None)


def posed_from_reconstruction(rec: CheckedReconstruction) -> PosedFace | None:
    """The same from a checked response (no file read back): its posed face and the mesh's triangles."""
    posed = rec.posed
    if posed is None or rec.faces is None:
        return None
    return PosedFace(np.asarray(posed.vertices, np.float64), np.asarray(rec.faces, np.int64),
                     np.asarray(posed.camera_intrinsics, np.float64),
                     Rotation.from_matrix(np.asarray(posed.camera_extrinsics, np.float64)[:3, :3]).as_rotvec(),
                     np.asarray(posed.camera_extrinsics, np.float64)[:3, 3], np.asarray(posed.expression, np.float64))
