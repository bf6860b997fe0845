"""Reading the FLAME files (model pickle, landmark embedding, vertex masks) without chumpy and safely.

The FLAME 2020 ``generic_model.pkl`` is a Python-2 pickle whose arrays are partly ``chumpy`` objects
(``chumpy.ch.Ch``; its pickled state is the instance ``__dict__``, the array under the key ``'x'``) and
whose ``J_regressor`` is a ``scipy.sparse`` CSC matrix. Unpickling it normally needs chumpy (an
unmaintained package that breaks on current numpy) and runs whatever code the pickle names. Here a
restricted ``pickle.Unpickler`` resolves only an allow-list of globals: numpy's array reconstruction,
a few builtins, inert stand-ins for chumpy classes (any ``chumpy.*`` class; only those that hold or
reorder arrays can be evaluated: ``Ch``, ``reordering.Select/Reshape/transpose``,
``ch_ops.add/subtract/multiply/divide``, and only for the fields facefuse reads) and a stand-in for the
scipy sparse matrices, rebuilt through scipy's public constructors. Anything else is refused.

FLAME 2020 vs FLAME 2023: no reliable structural marker is documented. Both have the same fields and
(for the head model) the same dimensions. What can be checked is the field set, the shapes and whether
the arrays are chumpy objects (FLAME 2020 as downloaded) or plain numpy arrays (FLAME 2023, and also
"de-chumpied" copies of older files). ``expect="2020"`` therefore requires the chumpy format; a user
with a converted 2020 file passes ``expect="any"`` (the CLI's ``--flame-version any``).

``landmark_embedding.npy`` is a 0-d object array holding a pickled dict, two of whose values are torch
tensors. ``np.load(allow_pickle=True)`` would run an unrestricted unpickler; instead the ``.npy`` header
is parsed with ``numpy.lib.format`` and the payload is unpickled with the same allow-list plus torch's
tensor rebuild, whose serialized storage bytes are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import codecs
import copyreg
import io
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.lib.format as npy_format
import scipy.sparse
import torch

from facefuse.errors import AssetError
from facefuse.models.flame import N_JOINTS, N_SHAPE, FlameModelData, LandmarkEmbedding, MediaPipeEmbedding

FLAME_VERSIONS = ("2020", "2023", "any")
FLAME_FIELDS = ("f", "v_template", "shapedirs", "posedirs", "J_regressor", "kintree_table", "weights")
FLAME2020_SHAPEDIRS = 400  # 300 identity + 100 expression
OFFICIAL_NUM_VERTICES = 5023
OFFICIAL_NUM_FACES = 9976
FLAME_MASK_REGIONS = (
    "face", "nose", "lips", "forehead", "eye_region", "left_eye_region", "right_eye_region", "neck",
    "scalp", "boundary", "left_ear", "right_ear", "left_eyeball", "right_eyeball",
)
LANDMARK_KEYS = (
    "static_lmk_faces_idx", "static_lmk_bary_coords", "dynamic_lmk_faces_idx", "dynamic_lmk_bary_coords",
    "full_lmk_faces_idx", "full_lmk_bary_coords",
)
MEDIAPIPE_KEYS = ("lmk_face_idx", "lmk_b_coords", "landmark_indices")
MEDIAPIPE_POINTS = 105
"""Points in the official ``mediapipe_landmark_embedding.npz``."""
FACEMESH_POINTS = 468
LANDMARK_SHAPES = {
    "static_lmk_faces_idx": (51,), "static_lmk_bary_coords": (51, 3), "dynamic_lmk_faces_idx": (79, 17),
    "dynamic_lmk_bary_coords": (79, 17, 3), "full_lmk_faces_idx": (1, 68), "full_lmk_bary_coords": (1, 68, 3),
}


# --------------------------------------------------------------------------- restricted unpickling


class _Refused(pickle.UnpicklingError):
    pass


class ChumpyStandIn:
    """Inert placeholder for a pickled chumpy object: keeps its state, evaluated by ``_to_array``."""

    chumpy_class = "chumpy.ch.Ch"

    def __new__(cls, *args: Any, **kwargs: Any) -> ChumpyStandIn:
        return object.__new__(cls)

    def __setstate__(self, state: Any) -> None:
        self.state = state if isinstance(state, dict) else {"_state": state}


class SparseStandIn:
    """Placeholder for a pickled ``scipy.sparse`` matrix (its state: data, indices, indptr, shape)."""

    sparse_class = "csc_matrix"

    def __new__(cls, *args: Any, **kwargs: Any) -> SparseStandIn:
        return object.__new__(cls)

    def __setstate__(self, state: Any) -> None:
        self.state = state if isinstance(state, dict) else {"_state": state}


_CHUMPY_SUPPORTED = {
    ("chumpy.ch", "Ch"), ("chumpy.reordering", "Select"), ("chumpy.reordering", "Reshape"),
    ("chumpy.reordering", "transpose"), ("chumpy.ch_ops", "add"), ("chumpy.ch_ops", "subtract"),
    ("chumpy.ch_ops", "multiply"), ("chumpy.ch_ops", "divide"),
}
_SPARSE_MODULES = {"scipy.sparse", "scipy.sparse.csc", "scipy.sparse._csc", "scipy.sparse.csr", "scipy.sparse._csr"}
_SPARSE_CLASSES = {"csc_matrix", "csr_matrix"}
_STAND_INS: dict[tuple[str, str], type] = {}


def _stand_in(base: type, module: str, name: str, attr: str) -> type:
    key = (module, name)
    if key not in _STAND_INS:
        _STAND_INS[key] = type(f"{name}StandIn", (base,), {attr: f"{module}.{name}" if base is ChumpyStandIn else name})
    return _STAND_INS[key]


def _numpy_multiarray(name: str) -> Any:
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    return getattr(multiarray, name)


def _tensor_from_bytes(data: bytes) -> Any:
    """Replacement for ``torch.storage._load_from_bytes``: the same bytes, tensors-only loading."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


_BASE_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): lambda: _numpy_multiarray("_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): lambda: _numpy_multiarray("_reconstruct"),
    ("numpy.core.multiarray", "scalar"): lambda: _numpy_multiarray("scalar"),
    ("numpy._core.multiarray", "scalar"): lambda: _numpy_multiarray("scalar"),
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    # typeshed leaves out copyreg's private _reconstructor, which protocol-2 pickles of objects name.
    ("copy_reg", "_reconstructor"): lambda: copyreg._reconstructor,  # type: ignore[attr-defined]
    ("copyreg", "_reconstructor"): lambda: copyreg._reconstructor,  # type: ignore[attr-defined]
    ("__builtin__", "object"): lambda: object,
    ("builtins", "object"): lambda: object,
    ("__builtin__", "set"): lambda: set,
    ("builtins", "set"): lambda: set,
    ("__builtin__", "frozenset"): lambda: frozenset,
    ("builtins", "frozenset"): lambda: frozenset,
    ("_codecs", "encode"): lambda: codecs.encode,  # how Python 3 writes bytes at protocol 2
}
_TORCH_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("torch._utils", "_rebuild_tensor_v2"): lambda: torch._utils._rebuild_tensor_v2,
    ("torch.storage", "_load_from_bytes"): lambda: _tensor_from_bytes,
    ("collections", "OrderedDict"): lambda: OrderedDict,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only allow-listed globals; chumpy and scipy.sparse become inert stand-ins."""

    def __init__(self, file: Any, *, allow_chumpy: bool = True, allow_torch: bool = False) -> None:
        super().__init__(file, encoding="latin1")
        self.allow_chumpy = allow_chumpy
        self.globals = dict(_BASE_GLOBALS)
        if allow_torch:
            self.globals.update(_TORCH_GLOBALS)
        self.saw_chumpy = False

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.globals:
            return self.globals[(module, name)]()
        if self.allow_chumpy and module.split(".")[0] == "chumpy" and name.isidentifier():
            # every chumpy class becomes an inert stand-in (no chumpy code runs); only the classes in
            # _CHUMPY_SUPPORTED can be evaluated, and only the fields facefuse reads are evaluated
            self.saw_chumpy = True
            return _stand_in(ChumpyStandIn, module, name, "chumpy_class")
        if self.allow_chumpy and module in _SPARSE_MODULES and name in _SPARSE_CLASSES:
            return _stand_in(SparseStandIn, module, name, "sparse_class")
        raise _Refused(f"refusing to load the global {module}.{name}")


def restricted_unpickle(path: Path, what: str, *, allow_chumpy: bool, allow_torch: bool = False,
                        header_npy: bool = False) -> tuple[Any, bool]:
    """(object, saw_chumpy) from a pickle (or an object ``.npy`` when ``header_npy``) without running code.

    Only numpy/scipy array reconstruction (and chumpy or torch stand-ins when allowed) is let through;
    anything else is refused with an ``AssetError`` naming ``what`` was expected.
    """
    if not path.is_file():
        raise AssetError(f"{path}: file not found (expected {what})")
    try:
        with open(path, "rb") as handle:
            if header_npy:
                _read_object_npy_header(handle, path, what)
            unpickler = RestrictedUnpickler(handle, allow_chumpy=allow_chumpy, allow_torch=allow_torch)
            return unpickler.load(), unpickler.saw_chumpy
    except AssetError:
        raise
    except _Refused as exc:
        raise AssetError(f"{path}: not {what}: {exc}") from None
    except (pickle.UnpicklingError, EOFError) as exc:
        raise AssetError(f"{path}: not {what} (not a readable pickle, or truncated: {_first_line(exc)})") from None
    except (
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        UnicodeDecodeError,
        RuntimeError,
        OSError,
        MemoryError,
    ) as exc:
        raise AssetError(f"{path}: not {what} (corrupt pickle: {type(exc).__name__}: {_first_line(exc)})") from None


def _read_object_npy_header(handle: Any, path: Path, what: str) -> None:
    try:
        version = npy_format.read_magic(handle)
        if version == (1, 0):
            shape, _, dtype = npy_format.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, _, dtype = npy_format.read_array_header_2_0(handle)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except ValueError as exc:
        raise AssetError(f"{path}: not {what} (not a .npy file: {_first_line(exc)})") from None
    if dtype != np.dtype(object) or shape != ():
        raise AssetError(f"{path}: not {what} (expected a 0-d object array holding a dict, found "
                         f"dtype {dtype} shape {shape})")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


_CH_OPS = {"add": np.add, "subtract": np.subtract, "multiply": np.multiply, "divide": np.divide}


def to_array(value: Any) -> np.ndarray | scipy.sparse.spmatrix:
    """Evaluate a stand-in (or pass an array through) to a numpy array; sparse stays scipy-sparse."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, ChumpyStandIn):
        state = value.state
        _module, _, name = value.chumpy_class.rpartition(".")
        if name == "Ch":
            return np.asarray(to_array(state["x"]))
        if name == "Select":
            out = to_array(state["a"]).ravel()[np.asarray(state["idxs"])].copy()
            return out.reshape(state["preferred_shape"]) if "preferred_shape" in state else out
        if name == "Reshape":
            return to_array(state["a"]).reshape(state["newshape"])
        if name == "transpose":
            return np.ascontiguousarray(np.transpose(to_array(state["a"]), axes=state.get("axes")))
        if name in _CH_OPS:
            return _CH_OPS[name](to_array(state["a"]), to_array(state["b"]))
        raise ValueError(f"cannot evaluate chumpy class {value.chumpy_class} (supported: "
                         f"{sorted('.'.join(c) for c in _CHUMPY_SUPPORTED)})")
    if isinstance(value, SparseStandIn):
        return sparse_from_state(value)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def sparse_from_state(value: SparseStandIn) -> scipy.sparse.spmatrix:
    state = value.state
    shape = state.get("_shape", state.get("shape"))
    if shape is None:
        raise ValueError(f"{value.sparse_class} without a shape")
    parts = (np.asarray(state["data"]), np.asarray(state["indices"]), np.asarray(state["indptr"]))
    make = scipy.sparse.csr_matrix if value.sparse_class == "csr_matrix" else scipy.sparse.csc_matrix
    return make(parts, shape=tuple(int(s) for s in shape))


def _dense(value: Any) -> np.ndarray:
    if isinstance(value, SparseStandIn):
        return np.asarray(sparse_from_state(value).toarray())
    return np.asarray(to_array(value))


# --------------------------------------------------------------------------- FLAME model pickle


def load_flame_model(
    path: str | Path, expect: str = "2020", *, landmark_embedding: str | Path | None = None
) -> FlameModelData:
    """Read a FLAME model pickle into ``FlameModelData`` (float32 / int64, the layer's layout).

    ``expect``: "2020" (chumpy format required, 400 blendshapes, 5 joints), "2023" or "any".
    ``landmark_embedding``: optionally also read ``landmark_embedding.npy`` into ``.landmarks``.
    """
    path = Path(path)
    if expect not in FLAME_VERSIONS:
        raise ValueError(f"expect must be one of {FLAME_VERSIONS}, got {expect!r}")
    what = f"a FLAME {'2020 ' if expect == '2020' else ''}model pickle (generic_model.pkl)"
    raw, saw_chumpy = restricted_unpickle(path, what, allow_chumpy=True)
    if not isinstance(raw, dict):
        raise AssetError(f"{path}: not {what} (the pickle holds a {type(raw).__name__}, "
                         "expected a dict of FLAME fields)")
    missing = [k for k in FLAME_FIELDS if k not in raw]
    if missing:
        raise AssetError(f"{path}: not {what} (missing field(s) {missing}; found {sorted(map(str, raw))[:12]})")
    if expect == "2020" and not saw_chumpy:
        raise AssetError(
            f"{path}: expected FLAME 2020 (generic_model.pkl, whose arrays are chumpy objects) but this file "
            "holds plain numpy arrays, as FLAME 2023 does (or a de-chumpied copy of an older FLAME). "
            "MICA and OFER were trained with FLAME 2020; if this is a converted FLAME 2020 file, pass "
            "--flame-version any (expect='any')."
        )
    try:
        data = flame_data_from_fields(raw)
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise AssetError(f"{path}: not {what} (bad field: {_first_line(exc)})") from None
    _check_flame_shapes(data, path, what, expect)
    version = "2020" if expect == "2020" else ("2023" if expect == "2023" else ("2020" if saw_chumpy else "2023"))
    landmarks = (
        load_landmark_embedding(landmark_embedding, num_faces=data.faces.shape[0]) if landmark_embedding else None
    )
    return FlameModelData(**{**data.__dict__, "landmarks": landmarks, "version": version})


def flame_data_from_fields(raw: dict[str, Any]) -> FlameModelData:
    """The pickle's fields (arrays or stand-ins) in the layer's layout, converted as the official loaders do."""
    v_template = _dense(raw["v_template"]).astype(np.float32)
    n_vertices = v_template.shape[0]
    posedirs = _dense(raw["posedirs"])  # (V, 3, P)
    posedirs = posedirs.reshape(n_vertices * 3, -1).T.astype(np.float32)  # (P, 3V)
    kintree = _dense(raw["kintree_table"])
    parents = kintree[0].astype(np.float32).astype(np.int64)  # the official path goes through float32
    parents[0] = -1
    return FlameModelData(
        faces=_dense(raw["f"]).astype(np.int64),
        v_template=v_template,
        shapedirs=_dense(raw["shapedirs"]).astype(np.float32),
        posedirs=posedirs,
        J_regressor=_dense(raw["J_regressor"]).astype(np.float32),
        parents=parents,
        lbs_weights=_dense(raw["weights"]).astype(np.float32),
    )


def _check_flame_shapes(data: FlameModelData, path: Path, what: str, expect: str) -> None:
    n_v = data.v_template.shape[0]
    problems = []
    if data.v_template.ndim != 2 or data.v_template.shape[1] != 3:
        problems.append(f"v_template {data.v_template.shape}, expected (V, 3)")
    if data.shapedirs.ndim != 3 or data.shapedirs.shape[:2] != (n_v, 3) or data.shapedirs.shape[2] < N_SHAPE:
        problems.append(f"shapedirs {data.shapedirs.shape}, expected ({n_v}, 3, >= {N_SHAPE})")
    n_j = data.J_regressor.shape[0]
    if data.J_regressor.shape != (n_j, n_v):
        problems.append(f"J_regressor {data.J_regressor.shape}, expected (J, {n_v})")
    if data.lbs_weights.shape != (n_v, n_j):
        problems.append(f"weights {data.lbs_weights.shape}, expected ({n_v}, {n_j})")
    if data.posedirs.shape != (9 * (n_j - 1), 3 * n_v):
        problems.append(f"posedirs has {data.posedirs.shape[0]} pose correctives, expected 9 x "
                        f"(J - 1) = {9 * (n_j - 1)}")
    if data.parents.shape != (n_j,) or np.any(data.parents[1:] < 0) or np.any(data.parents[1:] >= np.arange(1, n_j)):
        problems.append(f"kintree_table parents {data.parents.tolist()} are not a tree over {n_j} joints")
    if data.faces.ndim != 2 or data.faces.shape[1] != 3 or data.faces.min() < 0 or data.faces.max() >= n_v:
        problems.append(f"f {data.faces.shape} is not (F, 3) with vertex indices below {n_v}")
    if expect == "2020":
        if data.shapedirs.ndim == 3 and data.shapedirs.shape[2] != FLAME2020_SHAPEDIRS:
            problems.append(f"{data.shapedirs.shape[2]} blendshapes, FLAME 2020 has {FLAME2020_SHAPEDIRS}")
        if n_j != N_JOINTS:
            problems.append(f"{n_j} joints, FLAME has {N_JOINTS}")
    if problems:
        raise AssetError(f"{path}: not {what}: " + "; ".join(problems))


def flame_description(data: FlameModelData) -> str:
    topology = (
        ""
        if data.num_vertices == OFFICIAL_NUM_VERTICES
        else f" (not the official {OFFICIAL_NUM_VERTICES}-vertex topology)"
    )
    return (
        f"FLAME {data.version}: {data.num_vertices} vertices, {data.faces.shape[0]} faces, "
        f"{N_SHAPE} shape + {data.num_expression} expression components, {data.J_regressor.shape[0]} joints{topology}"
    )


# --------------------------------------------------------------------------- landmark embedding


def load_landmark_embedding(path: str | Path, *, num_faces: int | None = None) -> LandmarkEmbedding:
    """Read ``landmark_embedding.npy`` (see the module docstring for how it is unpickled safely)."""
    path = Path(path)
    what = "a FLAME landmark embedding (landmark_embedding.npy: a dict in a 0-d object array)"
    obj, _ = restricted_unpickle(path, what, allow_chumpy=False, allow_torch=True, header_npy=True)
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        obj = obj.item()
    if not isinstance(obj, dict):
        raise AssetError(f"{path}: not {what} (holds a {type(obj).__name__}, expected a dict)")
    return landmark_embedding_from_dict(obj, source=str(path), num_faces=num_faces)


def landmark_embedding_from_dict(
    obj: dict[str, Any], *, source: str, num_faces: int | None = None
) -> LandmarkEmbedding:
    """Check and convert the embedding dict (numpy arrays or torch tensors) to int64 / float32 arrays."""
    what = "a FLAME landmark embedding"
    missing = [k for k in LANDMARK_KEYS if k not in obj]
    if missing:
        raise AssetError(f"{source}: not {what} (missing key(s) {missing}; found {sorted(map(str, obj))})")
    arrays: dict[str, np.ndarray] = {}
    for key in LANDMARK_KEYS:
        array = to_array(obj[key])
        if tuple(array.shape) != LANDMARK_SHAPES[key]:
            raise AssetError(f"{source}: {key} has shape {tuple(array.shape)}, expected {LANDMARK_SHAPES[key]}")
        is_index = key.endswith("faces_idx")
        if is_index and not np.issubdtype(array.dtype, np.integer):
            raise AssetError(f"{source}: {key} has dtype {array.dtype}, expected integer face indices")
        arrays[key] = array.astype(np.int64 if is_index else np.float32)
        if is_index and (arrays[key].min() < 0 or (num_faces is not None and arrays[key].max() >= num_faces)):
            raise AssetError(f"{source}: {key} holds face indices outside [0, {num_faces}) for this FLAME model")
    return LandmarkEmbedding(**arrays)


# --------------------------------------------------------------------------- MediaPipe dense embedding


def load_mediapipe_embedding(path: str | Path, *, num_faces: int | None = None) -> MediaPipeEmbedding:
    """Read ``mediapipe_landmark_embedding.npz`` (plain arrays: read without pickle) and check it: the keys
    ``lmk_face_idx`` (105,) int, ``lmk_b_coords`` (105, 3) float, ``landmark_indices`` (105,) int, face
    indices in [0, ``num_faces``), distinct FaceMesh indices in [0, 468), finite weights."""
    path = Path(path)
    what = "a FLAME MediaPipe landmark embedding (mediapipe_landmark_embedding.npz)"
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise AssetError(f"{path}: not {what} (a single .npy array, expected an .npz archive)")
        with archive:
            obj = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # not a zip, or an entry needing pickle
        raise AssetError(f"{path}: not {what} ({exc})") from exc
    return mediapipe_embedding_from_dict(obj, source=str(path), num_faces=num_faces)


def mediapipe_embedding_from_dict(
    obj: dict[str, Any], *, source: str, num_faces: int | None = None
) -> MediaPipeEmbedding:
    """Check and convert the embedding's arrays to int64 / float32 (see :func:`load_mediapipe_embedding`)."""
    what = "a FLAME MediaPipe landmark embedding"
    missing = [k for k in MEDIAPIPE_KEYS if k not in obj]
    if missing:
        raise AssetError(f"{source}: not {what} (missing key(s) {missing}; found {sorted(map(str, obj))})")
    faces, bary, indices = (np.asarray(obj[k]) for k in MEDIAPIPE_KEYS)
    n = MEDIAPIPE_POINTS
    for key, array, shape in (("lmk_face_idx", faces, (n,)), ("lmk_b_coords", bary, (n, 3)),
                              ("landmark_indices", indices, (n,))):
        if tuple(array.shape) != shape:
            raise AssetError(f"{source}: {key} has shape {tuple(array.shape)}, expected {shape}")
    for key, array in (("lmk_face_idx", faces), ("landmark_indices", indices)):
        if not np.issubdtype(array.dtype, np.integer):
            raise AssetError(f"{source}: {key} has dtype {array.dtype}, expected integers")
    if not np.issubdtype(bary.dtype, np.floating) or not np.isfinite(bary).all():
        raise AssetError(f"{source}: lmk_b_coords must be finite floats (got {bary.dtype})")
    if faces.min() < 0 or (num_faces is not None and faces.max() >= num_faces):
        raise AssetError(f"{source}: lmk_face_idx holds face indices outside [0, {num_faces}) for this FLAME model")
    if indices.min() < 0 or indices.max() >= FACEMESH_POINTS:
        raise AssetError(f"{source}: landmark_indices holds FaceMesh indices outside [0, {FACEMESH_POINTS})")
    if len(np.unique(indices)) != n:
        raise AssetError(f"{source}: landmark_indices names a FaceMesh point twice")
    return MediaPipeEmbedding(faces.astype(np.int64), bary.astype(np.float32), indices.astype(np.int64))


# --------------------------------------------------------------------------- masks


def load_flame_masks(path: str | Path, *, num_vertices: int | None = None) -> dict[str, np.ndarray]:
    """Read ``FLAME_masks.pkl``: region name -> int64 vertex indices."""
    path = Path(path)
    what = "FLAME vertex masks (FLAME_masks.pkl: a dict region -> vertex indices)"
    obj, _ = restricted_unpickle(path, what, allow_chumpy=False)
    if not isinstance(obj, dict):
        raise AssetError(f"{path}: not {what} (holds a {type(obj).__name__})")
    missing = [r for r in FLAME_MASK_REGIONS if r not in obj]
    if missing:
        raise AssetError(f"{path}: not {what} (missing region(s) {missing}; found {sorted(map(str, obj))})")
    masks: dict[str, np.ndarray] = {}
    for name, value in obj.items():
        array = np.asarray(to_array(value))
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer) or array.size == 0:
            raise AssetError(f"{path}: region {name!r} is {array.dtype} {array.shape}, expected a non-empty "
                             "1-D array of vertex indices")
        limit = num_vertices if num_vertices is not None else OFFICIAL_NUM_VERTICES
        if array.min() < 0 or array.max() >= limit:
            raise AssetError(f"{path}: region {name!r} holds vertex indices outside [0, {limit})")
        masks[str(name)] = array.astype(np.int64)
    return masks


# --------------------------------------------------------------------------- validators (registry.py)


def validate_flame2020_model(path: Path) -> str:
    return flame_description(load_flame_model(path, expect="2020"))


def validate_landmark_embedding(path: Path) -> str:
    embedding = load_landmark_embedding(path)
    return (
        f"landmark embedding: {embedding.static_lmk_faces_idx.shape[0]} static + "
        f"{embedding.dynamic_lmk_faces_idx.shape[0]}x{embedding.dynamic_lmk_faces_idx.shape[1]} dynamic contour + "
        f"{embedding.full_lmk_faces_idx.shape[1]} full landmarks"
    )


def validate_mediapipe_embedding(path: Path) -> str:
    """Checks the file alone; the face indices are checked against FLAME 2020's face count."""
    embedding = load_mediapipe_embedding(path, num_faces=OFFICIAL_NUM_FACES)
    return (f"MediaPipe embedding: {embedding.lmk_face_idx.shape[0]} FaceMesh points on the FLAME surface")


def validate_flame_masks(path: Path) -> str:
    masks = load_flame_masks(path)
    return f"FLAME masks: {len(masks)} regions (face: {masks['face'].size} vertices)"
