"""Meshes and parameters out: OBJ/PLY through trimesh, written atomically.

OBJ files carry no vertex colours (the NoW evaluation's loader breaks on them); colours and heat maps
go to PLY, and a photo texture (open pack) to an OBJ with ``vt``, ``.mtl`` and ``texture.png``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trimesh

from facefuse.errors import InvalidInputError
from facefuse.io.atomic import write_bytes_atomic


def _mesh(vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray | None = None) -> trimesh.Trimesh:
    return trimesh.Trimesh(vertices=np.asarray(vertices, np.float64), faces=np.asarray(faces, np.int64),
                           vertex_colors=colors, process=False)


def write_obj(path: str | Path, vertices: np.ndarray, faces: np.ndarray) -> Path:
    text = trimesh.exchange.obj.export_obj(_mesh(vertices, faces), include_color=False, include_texture=False,
                                           include_normals=False, header=None)
    return write_bytes_atomic(path, text.encode())


def write_textured_obj(path: str | Path, vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray,
                       texture: np.ndarray) -> list[Path]:
    """OBJ with ``vt`` coordinates, its ``.mtl`` and ``texture.png`` beside it; returns the three paths.

    ``uvs`` have a top-left origin (facefuse's and glTF's); OBJ's has a bottom-left one, so v is flipped.
    """
    from PIL import Image

    target = Path(path)
    t = np.asarray(uvs, np.float64)
    material = trimesh.visual.material.SimpleMaterial(name="texture", image=Image.fromarray(np.asarray(texture)),
                                                      diffuse=[255, 255, 255, 255])
    mesh = trimesh.Trimesh(vertices=np.asarray(vertices, np.float64), faces=np.asarray(faces, np.int64), process=False,
                           visual=trimesh.visual.TextureVisuals(uv=np.c_[t[:, 0], 1.0 - t[:, 1]], material=material))
    text, extras = trimesh.exchange.obj.export_obj(mesh, include_texture=True, return_texture=True,
                                                   include_normals=False, header=None,
                                                   mtl_name=target.with_suffix(".mtl").name)
    written = [write_bytes_atomic(target.parent / name, data) for name, data in sorted(extras.items())]
    return [*written, write_bytes_atomic(target, text.encode())]


def write_ply(path: str | Path, vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray | None = None) -> Path:
    return write_bytes_atomic(path, trimesh.exchange.ply.export_ply(_mesh(vertices, faces, colors), encoding="binary"))


def heat_colors(values: np.ndarray, vmax: float | None = None) -> np.ndarray:
    """(V,) non-negative values -> (V,4) uint8 RGBA, blue (0) to red (vmax; default the 99th percentile)."""
    values = np.asarray(values, np.float64)
    top = float(vmax) if vmax is not None else float(np.percentile(values, 99)) if values.size else 1.0
    t = np.clip(values / max(top, 1e-12), 0.0, 1.0)
    import matplotlib

    rgba = matplotlib.colormaps["turbo"](t)
    return (rgba * 255).round().astype(np.uint8)


def read_mesh(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    mesh = trimesh.load(str(path), process=False, force="mesh")
    if not isinstance(mesh, trimesh.Trimesh):
        raise InvalidInputError(f"{path}: not a triangle mesh (trimesh read a {type(mesh).__name__})")
    return np.asarray(mesh.vertices), np.asarray(mesh.faces)
