"""Synthetic FLAME files in the official formats: ``generic_model.pkl``, ``landmark_embedding.npy``,
``FLAME_masks.pkl``.

The numbers are random or procedural (no FLAME data is used); the containers are the official ones, so
the real readers in ``facefuse.assets.flame_file`` are what tests exercise:

* the model pickle is a protocol-2 pickle of a dict whose arrays ``v_template``, ``shapedirs``,
  ``posedirs``, ``weights`` and ``J`` are chumpy ``Ch`` objects (global ``chumpy.ch.Ch``, state dict with
  the array under ``'x'``), ``J_regressor`` a ``scipy.sparse.csc.csc_matrix``, ``f`` uint32,
  ``kintree_table`` int64 with 4294967295 (uint32 -1) as the root's parent, plus ``bs_style='lbs'`` and
  ``bs_type='lrotmin'``. chumpy is never imported: the pickle is written with local classes whose global
  names are rewritten to chumpy's/scipy's in the protocol-2 byte stream (``GLOBAL`` opcodes are plain
  text lines, there is no framing to fix up).
* the landmark embedding is a 0-d object ``.npy`` holding a dict; the dynamic contour entries are torch
  tensors, as in the file MICA and OFER ship.

The mesh is a deformed ellipsoid (head-sized, in metres, y up, face toward +z) with an open neck and, at
full size, a small mouth opening so that the vertex and face counts equal FLAME's.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import pickletools
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from facefuse.models.flame import N_JOINTS, NOW7_FROM_LMK68, FlameModelData

__all__ = [
    "FLAME_SIZES",
    "FlameSize",
    "flame_generator",
    "synthetic_flame_data",
    "synthetic_flame_mesh",
    "write_flame_masks",
    "write_flame_model",
    "write_landmark_embedding",
    "write_mediapipe_embedding",
]


@dataclass(frozen=True)
class FlameSize:
    """A grid with one top pole and ``rings`` latitude rings of ``ring_vertices`` each (open at the neck)."""

    rings: int
    ring_vertices: int
    num_faces: int
    num_shapedirs: int = 400  # 300 identity + 100 expression, as FLAME 2020
    num_joints: int = N_JOINTS

    @property
    def num_vertices(self) -> int:
        return 1 + self.rings * self.ring_vertices

    @property
    def grid_faces(self) -> int:
        return self.ring_vertices + 2 * self.ring_vertices * (self.rings - 1)


FLAME_SIZES: dict[str, FlameSize] = {
    # 1 + 81 * 62 = 5023 vertices; the grid has 9982 faces, 6 are removed (mouth opening) -> 9976.
    "full": FlameSize(rings=81, ring_vertices=62, num_faces=9976),
    # 1 + 36 * 56 = 2017 vertices (>= 1785, OFER IdRank's front-vertex count), 3976 faces.
    "small": FlameSize(rings=36, ring_vertices=56, num_faces=3976),
}
"""The one size table: other synthetic writers (OFER's front indices) read vertex counts from here."""

_HALF_AXES = np.array([0.078, 0.115, 0.095])  # metres: half width, half height, half depth
_POLAR_MAX = np.deg2rad(150.0)  # where the neck opening starts
_MOUTH = np.array([0.0, -0.04, 0.0])
_UINT32_MINUS_ONE = 4294967295


_MODEL_STREAM, _LANDMARK_STREAM, _MEDIAPIPE_STREAM = 0, 1, 2


def flame_generator(generator: torch.Generator, stream: int = _MODEL_STREAM) -> torch.Generator:
    """The generator FLAME content is drawn from: a function of the run's seed only.

    FLAME is one fixed model that several files carry (the pickle, the landmark embedding, the buffers
    inside mica.tar); deriving its randomness from ``generator.initial_seed()`` rather than from the
    generator's current state makes every writer produce the same FLAME for the same seed and size.
    """
    return torch.Generator().manual_seed((generator.initial_seed() * 1_000_003 + 0xF1A3E + stream) % (1 << 63))


def synthetic_flame_data(size: str, generator: torch.Generator) -> FlameModelData:
    """The synthetic FLAME (with landmarks) exactly as the readers return it from the written files."""
    from facefuse.assets.flame_file import flame_data_from_fields, landmark_embedding_from_dict

    data = flame_data_from_fields(flame_model_fields(size, flame_generator(generator, _MODEL_STREAM)))
    embedding = landmark_embedding_dict(size, flame_generator(generator, _LANDMARK_STREAM))
    landmarks = landmark_embedding_from_dict(embedding, source="synthetic")
    return dataclasses.replace(data, landmarks=landmarks)


def _size(size: str) -> FlameSize:
    if size not in FLAME_SIZES:
        raise ValueError(f"unknown synthetic size {size!r}; known: {sorted(FLAME_SIZES)}")
    return FLAME_SIZES[size]


def synthetic_flame_mesh(size: str) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic template (V,3) float64 metres and faces (F,3) int64, outward-facing triangles."""
    spec = _size(size)
    n_lon = spec.ring_vertices
    polar = np.linspace(_POLAR_MAX / spec.rings, _POLAR_MAX, spec.rings)
    azimuth = np.linspace(0.0, 2.0 * np.pi, n_lon, endpoint=False)
    sin_p, cos_p = np.sin(polar)[:, None], np.cos(polar)[:, None]
    # azimuth 0 points to +z (the face), increasing toward +x
    ring = np.stack(
        [sin_p * np.sin(azimuth)[None], np.broadcast_to(cos_p, (spec.rings, n_lon)), sin_p * np.cos(azimuth)[None]],
        axis=-1,
    ).reshape(-1, 3)
    unit = np.concatenate([np.array([[0.0, 1.0, 0.0]]), ring], axis=0)
    vertices = unit * _HALF_AXES
    # face-like relief: flatter face, a nose, a chin; a narrower neck below the jaw
    front = np.clip(unit[:, 2], 0.0, None)
    vertices[:, 2] -= 0.012 * front**2
    nose = np.exp(-((vertices[:, 0] / 0.014) ** 2 + ((vertices[:, 1] + 0.005) / 0.03) ** 2)) * front**4
    vertices[:, 2] += 0.03 * nose
    chin = np.exp(-((vertices[:, 0] / 0.03) ** 2 + ((vertices[:, 1] + 0.085) / 0.02) ** 2)) * front**2
    vertices[:, 2] += 0.01 * chin
    neck = np.clip((-vertices[:, 1] - 0.07) / 0.04, 0.0, 1.0)
    vertices[:, [0, 2]] *= (1.0 - 0.35 * neck)[:, None]

    faces = []
    first = 1
    for j in range(n_lon):  # top fan
        faces.append((0, first + (j + 1) % n_lon, first + j))
    for r in range(spec.rings - 1):
        top, bottom = 1 + r * n_lon, 1 + (r + 1) * n_lon
        for j in range(n_lon):
            a, b = top + j, top + (j + 1) % n_lon
            c, d = bottom + j, bottom + (j + 1) % n_lon
            faces.append((a, b, c))
            faces.append((b, d, c))
    faces_array = np.asarray(faces, dtype=np.int64)[:, [0, 2, 1]]  # counter-clockwise seen from outside
    extra = faces_array.shape[0] - spec.num_faces
    if extra < 0:
        raise AssertionError(f"size table: grid has {faces_array.shape[0]} faces, fewer than {spec.num_faces}")
    if extra:
        mouth = _MOUTH.copy()
        mouth[2] = vertices[:, 2].max()
        centroids = vertices[faces_array].mean(axis=1)
        drop = np.argsort(np.linalg.norm(centroids - mouth, axis=1), kind="stable")[:extra]
        faces_array = np.delete(faces_array, drop, axis=0)
    return vertices, faces_array


# --------------------------------------------------------------------------- pickling as chumpy


class _AsChumpyCh:
    """Pickled as ``chumpy.ch.Ch``: its ``__dict__`` mirrors what a chumpy Ch pickles (no caches)."""

    def __init__(self, array: np.ndarray) -> None:
        self.x = np.asarray(array, dtype=np.float64)
        self._dirty_vars: set[str] = set()
        self._itr = None
        self._depends_on_deps: dict[str, object] = {}
        self._make_dense = False
        self._make_sparse = False


class _AsScipyCsc:
    """Pickled as ``scipy.sparse.csc.csc_matrix`` (the module path of the scipy that wrote FLAME)."""

    def __init__(self, dense: np.ndarray) -> None:
        n_rows, n_cols = dense.shape
        cols = [np.nonzero(dense[:, c])[0] for c in range(n_cols)]
        self._shape = (n_rows, n_cols)
        self.maxprint = 50
        self.format = "csc"
        self.indices = np.concatenate(cols).astype(np.int32) if cols else np.zeros(0, np.int32)
        self.indptr = np.concatenate([[0], np.cumsum([len(c) for c in cols])]).astype(np.int32)
        self.data = np.concatenate([dense[c, i] for i, c in enumerate(cols)]).astype(np.float64)


_RENAMES = {
    f"c{__name__}\n_AsChumpyCh\n".encode(): b"cchumpy.ch\nCh\n",
    f"c{__name__}\n_AsScipyCsc\n".encode(): b"cscipy.sparse.csc\ncsc_matrix\n",
    b"cnumpy._core.multiarray\n": b"cnumpy.core.multiarray\n",
}


def official_style_pickle(obj: object) -> bytes:
    """Protocol-2 pickle with the stand-in classes renamed to chumpy's / scipy's globals."""
    blob = pickle.dumps(obj, protocol=2)
    for old, new in _RENAMES.items():
        blob = blob.replace(old, new)
    return blob


# --------------------------------------------------------------------------- model


def _smooth_fields(
    points: np.ndarray, count: int, scales: np.ndarray, generator: torch.Generator, features: int = 4
) -> np.ndarray:
    """``count`` smooth random displacement fields on ``points`` (V,3) -> (V, 3, count)."""
    freq = torch.randn(3, count * features, generator=generator, dtype=torch.float64).numpy() * 25.0
    phase = torch.rand(count * features, generator=generator, dtype=torch.float64).numpy() * 2.0 * np.pi
    amp = torch.randn(count, features, 3, generator=generator, dtype=torch.float64).numpy()
    waves = np.sin(points @ freq + phase).reshape(points.shape[0], count, features)
    fields = np.einsum("vcf,cfk->vkc", waves, amp) / np.sqrt(features)
    return fields * scales[None, None, :]


def _joint_targets(vertices: np.ndarray) -> np.ndarray:
    eye_z = 0.6 * vertices[:, 2].max()
    return np.array([
        [0.0, -0.10, 0.0],  # root / global, at the neck base
        [0.0, -0.07, 0.0],  # neck
        [0.0, -0.025, -0.01],  # jaw
        [0.032, 0.025, eye_z],  # left eye (subject's left = +x)
        [-0.032, 0.025, eye_z],  # right eye
    ])


def _joint_regressor(vertices: np.ndarray, targets: np.ndarray, spec: FlameSize) -> np.ndarray:
    """Each axial joint averages one whole ring (centroid on the axis); each eye a few nearby vertices."""
    regressor = np.zeros((targets.shape[0], vertices.shape[0]))
    ring_y = vertices[1:, 1].reshape(spec.rings, spec.ring_vertices).mean(axis=1)
    for j, target in enumerate(targets):
        if j < 3:
            r = int(np.argmin(np.abs(ring_y - target[1])))
            regressor[j, 1 + r * spec.ring_vertices: 1 + (r + 1) * spec.ring_vertices] = 1.0 / spec.ring_vertices
        else:
            near = np.argsort(np.linalg.norm(vertices - target, axis=1), kind="stable")[:8]
            regressor[j, near] = 1.0 / near.size
    return regressor


def _skinning_weights(vertices: np.ndarray, joints: np.ndarray) -> np.ndarray:
    dist2 = ((vertices[:, None, :] - joints[None]) ** 2).sum(-1)
    logits = -dist2 / 0.03**2
    logits[:, 3:] = -dist2[:, 3:] / 0.012**2  # eyes move only what is close to them
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


def flame_model_fields(size: str, generator: torch.Generator) -> dict[str, np.ndarray | str]:
    """The model's fields as plain arrays (float64, f uint32), before chumpy wrapping."""
    spec = _size(size)
    vertices, faces = synthetic_flame_mesh(size)
    n_shape, n_exp = 300, spec.num_shapedirs - 300
    scales = np.concatenate(
        [0.004 / np.sqrt(1.0 + np.arange(n_shape) / 10.0), 0.002 / np.sqrt(1.0 + np.arange(n_exp) / 10.0)]
    )
    shapedirs = _smooth_fields(vertices, spec.num_shapedirs, scales, generator)
    posedirs = _smooth_fields(vertices, 9 * (spec.num_joints - 1), np.full(9 * (spec.num_joints - 1), 0.002), generator)
    regressor = _joint_regressor(vertices, _joint_targets(vertices), spec)
    joints = regressor @ vertices
    return {
        "f": faces.astype(np.uint32),
        "v_template": vertices,
        "shapedirs": shapedirs,
        "posedirs": posedirs,
        "J_regressor": regressor,
        "J": joints,
        "weights": _skinning_weights(vertices, joints),
        "kintree_table": np.array([[_UINT32_MINUS_ONE, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64),
        "bs_style": "lbs",
        "bs_type": "lrotmin",
    }


def write_flame_model(path: Path, size: str, generator: torch.Generator, *, chumpy: bool = True) -> None:
    """FLAME 2020-format ``generic_model.pkl``; ``chumpy=False`` writes plain numpy (FLAME 2023-style)."""
    arrays = flame_model_fields(size, flame_generator(generator, _MODEL_STREAM))
    fields: dict[str, object] = dict(arrays)
    if chumpy:
        for key in ("v_template", "shapedirs", "posedirs", "weights", "J"):
            fields[key] = _AsChumpyCh(np.asarray(arrays[key]))
        fields["J_regressor"] = _AsScipyCsc(np.asarray(arrays["J_regressor"]))
    else:
        import scipy.sparse

        fields["J_regressor"] = scipy.sparse.csc_matrix(arrays["J_regressor"])
    Path(path).write_bytes(official_style_pickle(fields))



# --------------------------------------------------------------------------- landmarks


def ibug68_layout() -> np.ndarray:
    """A procedural iBUG-68 layout (68,2) in decimetres, as seen from the camera: x right (= FLAME +x), y up."""
    pts = np.zeros((68, 2))
    s = np.linspace(-np.pi / 2.0, np.pi / 2.0, 17)  # jaw: subject's right ear -> chin -> left ear
    pts[0:17] = np.stack([0.72 * np.sin(s), 0.15 - 0.9 * np.cos(s)], axis=1)
    brow = np.linspace(0.0, 1.0, 5)
    pts[17:22] = np.stack([-0.6 + 0.45 * brow, 0.42 + 0.06 * np.sin(brow * np.pi)], axis=1)
    pts[22:27] = np.stack([0.15 + 0.45 * brow, 0.42 + 0.06 * np.sin(brow * np.pi)], axis=1)
    pts[27:31] = np.stack([np.zeros(4), np.linspace(0.3, 0.0, 4)], axis=1)
    pts[31:36] = np.stack([np.linspace(-0.15, 0.15, 5), -0.07 - 0.03 * np.cos(np.linspace(-1.0, 1.0, 5))], axis=1)
    ang = np.linspace(0.0, 2.0 * np.pi, 6, endpoint=False)
    for start, cx in ((36, -0.35), (42, 0.35)):  # 36 outer right corner, 39 inner; 42 inner left, 45 outer
        pts[start:start + 6] = np.stack([cx - 0.13 * np.cos(ang), 0.25 + 0.04 * np.sin(ang)], axis=1)
    ang = np.linspace(0.0, 2.0 * np.pi, 12, endpoint=False)  # 48 right mouth corner, 54 left
    pts[48:60] = np.stack([-0.28 * np.cos(ang), -0.4 + 0.1 * np.sin(ang)], axis=1)
    ang = np.linspace(0.0, 2.0 * np.pi, 8, endpoint=False)
    pts[60:68] = np.stack([-0.2 * np.cos(ang), -0.4 + 0.04 * np.sin(ang)], axis=1)
    return pts


def _front_faces(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    centroids = vertices[faces].mean(axis=1)
    normals = np.cross(vertices[faces[:, 1]] - vertices[faces[:, 0]], vertices[faces[:, 2]] - vertices[faces[:, 0]])
    front = np.nonzero(normals[:, 2] > 0.0)[0]
    return front, centroids[front]


def _embed(
    points_xy: np.ndarray, vertices: np.ndarray, faces: np.ndarray, generator: torch.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest front-facing face (in x,y) for each point; random interior barycentric weights."""
    front, centroids = _front_faces(vertices, faces)
    d = ((centroids[None, :, :2] - points_xy[:, None, :]) ** 2).sum(-1)
    face_idx = front[np.argmin(d, axis=1)]
    raw = torch.rand(points_xy.shape[0], 3, generator=generator, dtype=torch.float64).numpy() + 0.2
    return face_idx.astype(np.int64), raw / raw.sum(axis=1, keepdims=True)


def landmark_embedding_dict(size: str, generator: torch.Generator) -> dict[str, object]:
    vertices, faces = synthetic_flame_mesh(size)
    layout = ibug68_layout() * 0.1  # decimetres -> metres
    full_idx, full_bary = _embed(layout, vertices, faces, generator)
    contour = layout[0:17]
    dyn_idx = np.zeros((79, 17), np.int64)
    dyn_bary = np.zeros((79, 17, 3))
    for row in range(79):
        # The public FLAME code's layout: rows 0..39 hold yaw 0..39°, rows 40..78 yaw -1..-39° (row = 39 - yaw).
        yaw = np.deg2rad(row if row <= 39 else 39 - row)
        # A silhouette-like contour: turned toward +x (yaw > 0), the +x side's outline moves toward the middle
        # of the face and the -x side's toward the ear (clamped at the front faces' edge by _embed).
        shifted = contour.copy()
        shifted[:, 0] = contour[:, 0] * np.cos(yaw) - 0.05 * np.sin(yaw)
        dyn_idx[row], dyn_bary[row] = _embed(shifted, vertices, faces, generator)
    assert list(NOW7_FROM_LMK68) == [36, 39, 42, 45, 33, 48, 54]
    return {
        "static_lmk_faces_idx": full_idx[17:].copy(),
        "static_lmk_bary_coords": full_bary[17:].copy(),
        "dynamic_lmk_faces_idx": torch.from_numpy(dyn_idx),
        "dynamic_lmk_bary_coords": torch.from_numpy(dyn_bary.astype(np.float32)),
        "full_lmk_faces_idx": full_idx[None].copy(),
        "full_lmk_bary_coords": full_bary[None].astype(np.float32),
    }


def write_landmark_embedding(path: Path, size: str, generator: torch.Generator) -> None:
    """``landmark_embedding.npy``: a dict in a 0-d object array (torch tensors for the dynamic keys)."""
    holder = np.empty((), dtype=object)
    holder[()] = landmark_embedding_dict(size, flame_generator(generator, _LANDMARK_STREAM))
    buffer = io.BytesIO()
    np.save(buffer, holder, allow_pickle=True)
    Path(path).write_bytes(_stable_storage_keys(buffer.getvalue()))


def mediapipe_embedding_dict(size: str, generator: torch.Generator) -> dict[str, np.ndarray]:
    """105 distinct FaceMesh indices (random) on a procedural grid over the synthetic face's front."""
    vertices, faces = synthetic_flame_mesh(size)
    columns, rows = np.meshgrid(np.linspace(-0.055, 0.055, 15), np.linspace(-0.075, 0.045, 7))
    points = np.stack([columns.ravel(), rows.ravel()], axis=1)  # 105 points, metres, x right, y up
    face_idx, bary = _embed(points, vertices, faces, generator)
    indices = torch.randperm(468, generator=generator)[:105].numpy().astype(np.int64)
    return {"lmk_face_idx": face_idx, "lmk_b_coords": bary, "landmark_indices": indices}


def write_mediapipe_embedding(path: Path, size: str, generator: torch.Generator) -> None:
    """``mediapipe_landmark_embedding.npz``: the three arrays as .npy members of a zip, written with a fixed
    timestamp (``np.savez`` stamps the current time) so the same seed gives the same bytes."""
    import zipfile

    arrays = mediapipe_embedding_dict(size, flame_generator(generator, _MEDIAPIPE_STREAM))
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for key, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0)), member.getvalue())


def _stable_storage_keys(blob: bytes) -> bytes:
    """Replace the memory addresses torch uses as storage keys when it pickles a tensor.

    Each tensor's storage is embedded as a legacy ``torch.save`` blob whose key is the storage's
    address, so two identical runs would write different bytes. Every key is replaced by a counter of
    the same length (lengths, hence every length prefix, stay valid), making the file reproducible.
    """
    header_end = blob.index(b"\n") + 1  # the .npy header ends with a newline
    keys: list[bytes] = []
    for op, arg, _ in pickletools.genops(io.BytesIO(blob[header_end:])):
        if op.name in ("BINBYTES", "SHORT_BINBYTES", "BINBYTES8") and isinstance(arg, bytes):
            inner = io.BytesIO(arg)
            while inner.tell() < len(arg):
                try:
                    ops = list(pickletools.genops(inner))
                except ValueError:  # the raw storage bytes after the last pickle
                    break
                keys += [a.encode() for o, a, _ in ops
                         if o.name == "BINUNICODE" and isinstance(a, str) and a.isdigit() and a.encode() not in keys]
    for number, key in enumerate(keys, start=1):
        blob = blob.replace(
            struct.pack("<cI", b"X", len(key)) + key,
            struct.pack("<cI", b"X", len(key)) + str(number).zfill(len(key)).encode(),
        )
    return blob


# --------------------------------------------------------------------------- masks


def flame_masks(size: str) -> dict[str, np.ndarray]:
    """Region -> vertex indices, by position on the synthetic head (deterministic)."""
    spec = _size(size)
    v, _ = synthetic_flame_mesh(size)
    x, y, z = v[:, 0], v[:, 1], v[:, 2]
    zmax = z.max()
    front = z > 0.35 * zmax
    eye_l = (np.abs(x - 0.032) < 0.022) & (np.abs(y - 0.025) < 0.016) & front
    eye_r = (np.abs(x + 0.032) < 0.022) & (np.abs(y - 0.025) < 0.016) & front
    regions = {
        "face": front & (y > -0.1) & (y < 0.075),
        "nose": (np.abs(x) < 0.018) & (y > -0.03) & (y < 0.03) & front,
        "lips": (np.abs(x) < 0.03) & (np.abs(y - _MOUTH[1]) < 0.015) & front,
        "forehead": (np.abs(x) < 0.055) & (y > 0.045) & (y < 0.085) & front,
        "eye_region": eye_l | eye_r,
        "left_eye_region": eye_l,
        "right_eye_region": eye_r,
        "neck": y < -0.085,
        "scalp": (y > 0.06) & ~front | (y > 0.09),
        "boundary": np.zeros(v.shape[0], bool),
        "left_ear": (x > 0.06) & (np.abs(y - 0.01) < 0.025) & (np.abs(z) < 0.025),
        "right_ear": (x < -0.06) & (np.abs(y - 0.01) < 0.025) & (np.abs(z) < 0.025),
        "left_eyeball": np.linalg.norm(v - np.array([0.032, 0.025, 0.6 * zmax]), axis=1) < 0.012,
        "right_eyeball": np.linalg.norm(v - np.array([-0.032, 0.025, 0.6 * zmax]), axis=1) < 0.012,
    }
    regions["boundary"][1 + (spec.rings - 1) * spec.ring_vertices:] = True  # the neck opening
    masks = {}
    for name, mask in regions.items():
        idx = np.nonzero(mask)[0]
        if idx.size == 0:  # keep every region non-empty at every size
            idx = np.array([int(np.argmax(z))])
        masks[name] = idx.astype(np.int64)
    return masks


def write_flame_masks(path: Path, size: str, generator: torch.Generator) -> None:
    """``FLAME_masks.pkl``: a protocol-2 pickled dict region -> int64 vertex indices."""
    del generator  # deterministic regions
    Path(path).write_bytes(official_style_pickle(flame_masks(size)))
