"""Binary glTF 2.0 (.glb) meshes through trimesh's exporter, in a layout every common viewer reads.

What goes in, and why (checked against the Khronos glTF validator in tests/unit/test_gltf_validator.py):

* positions in metres (glTF's unit; facefuse's millimetres / 1000) and vertex normals;
* vertex colours as ``COLOR_0`` RGBA bytes (4-byte aligned, as the validator requires) on a primitive
  **without a material**: three.js and Blender then show them, and trimesh's default load keeps them as
  ``mesh.visual.vertex_colors`` (with a material, trimesh files them under ``vertex_attributes``);
* ``TEXCOORD_0`` only together with a texture image (a PNG embedded in the file, referenced by the
  material's base colour); a textured mesh carries no ``COLOR_0``, which glTF would multiply into the
  texture.

UVs come in facefuse's convention (origin at the image's top-left, v down, as glTF and the MediaPipe
canonical face use); trimesh's own UVs have a bottom-left origin, so v is flipped on the way in.
Written atomically (facefuse.io.atomic).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trimesh

from facefuse.errors import InvalidInputError
from facefuse.io.atomic import write_bytes_atomic

MM_TO_M = 1e-3


def _checked(vertices_mm: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(vertices_mm, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    if v.ndim != 2 or v.shape[1] != 3 or v.shape[0] == 0 or not np.all(np.isfinite(v)):
        raise InvalidInputError(f"glb: vertices must be finite (V, 3), got {v.shape}")
    if f.ndim != 2 or f.shape[1] != 3 or f.shape[0] == 0 or f.min() < 0 or f.max() >= v.shape[0]:
        raise InvalidInputError(f"glb: faces must be (F, 3) indices into {v.shape[0]} vertices, got {f.shape}")
    return v, f


def _rgba_bytes(colors: np.ndarray, count: int) -> np.ndarray:
    c = np.asarray(colors)
    if c.ndim != 2 or c.shape[0] != count or c.shape[1] not in (3, 4):
        raise InvalidInputError(f"glb: colors must be ({count}, 3|4), got {c.shape}")
    if c.dtype.kind == "f":
        c = np.rint(np.clip(c, 0.0, 1.0) * 255.0)
    c = np.clip(c, 0, 255).astype(np.uint8)
    return c if c.shape[1] == 4 else np.c_[c, np.full(count, 255, np.uint8)]


def glb_bytes(vertices_mm: np.ndarray, faces: np.ndarray, colors: np.ndarray | None = None,
              uvs: np.ndarray | None = None, texture: np.ndarray | None = None) -> bytes:
    """The .glb file's bytes: ``colors`` (V, 3|4) as vertex colours, or ``uvs`` (V, 2) with ``texture`` (H, W, 3)."""
    v, f = _checked(vertices_mm, faces)
    if (uvs is None) != (texture is None):
        raise InvalidInputError("glb: texture coordinates are written only together with a texture image")
    visual: trimesh.visual.ColorVisuals | trimesh.visual.TextureVisuals | None = None
    if texture is not None and uvs is not None:
        from PIL import Image

        t = np.asarray(uvs, dtype=np.float64)
        if t.shape != (v.shape[0], 2) or not np.all(np.isfinite(t)):
            raise InvalidInputError(f"glb: uvs must be finite ({v.shape[0]}, 2), got {t.shape}")
        image = np.asarray(texture)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) < 1:
            raise InvalidInputError(f"glb: texture must be an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
        material = trimesh.visual.material.PBRMaterial(
            name="photo", baseColorTexture=Image.fromarray(image), metallicFactor=0.0, roughnessFactor=0.9,
            doubleSided=True)
        visual = trimesh.visual.TextureVisuals(uv=np.c_[t[:, 0], 1.0 - t[:, 1]], material=material)
    elif colors is not None:
        visual = trimesh.visual.ColorVisuals(vertex_colors=_rgba_bytes(colors, v.shape[0]))
    mesh = trimesh.Trimesh(vertices=v * MM_TO_M, faces=f, visual=visual, process=False)
    data = mesh.export(file_type="glb", include_normals=True)
    if not isinstance(data, bytes):
        raise TypeError(f"trimesh's glb exporter returned {type(data).__name__}, not bytes")
    return data


def write_glb(path: str | Path, vertices_mm: np.ndarray, faces: np.ndarray, colors: np.ndarray | None = None,
              uvs: np.ndarray | None = None, texture: np.ndarray | None = None) -> Path:
    """Write a .glb atomically (see :func:`glb_bytes`); positions in metres (glTF's unit)."""
    return write_bytes_atomic(path, glb_bytes(vertices_mm, faces, colors, uvs, texture))
