"""The official, licence-gated files facefuse can use: where each goes, what it is for, how it is checked.

facefuse never ships or downloads these files. The user accepts each licence, downloads the file and
puts it in one folder (``--assets DIR`` or ``FACEFUSE_ASSETS``); ``facefuse assets check`` then says,
file by file, whether it was found and is valid. Each entry names the validator that owns its format
(a ``module:function`` taking the path, returning a one-line description, raising ``AssetError``).
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from facefuse.assets.store import sha256_file
from facefuse.errors import AssetError

ASSETS_ENV = "FACEFUSE_ASSETS"
SYNTHETIC_MANIFEST = "facefuse-synthetic.json"
"""Written by ``facefuse assets synthesize``: file -> sha256 of the random stand-ins it made."""


@dataclass(frozen=True)
class AssetSpec:
    name: str
    relpath: str
    purpose: str
    source: str
    validator: str
    used_by: tuple[str, ...]
    optional: bool = False
    """An optional file adds something when present (checked like the others); nothing needs it."""

    def load_validator(self) -> Callable[[Path], str]:
        module_name, func_name = self.validator.split(":")
        return getattr(importlib.import_module(module_name), func_name)


@dataclass(frozen=True)
class AssetStatus:
    spec: AssetSpec
    path: Path
    found: bool
    valid: bool
    synthetic: bool
    message: str


_FLAME_SITE = "https://flame.is.tue.mpg.de (register, accept the FLAME licence, download FLAME 2020)"
_MICA_SITE = "https://github.com/Zielon/MICA (its install script, after accepting the MICA licence)"
_OFER_SITE = "https://ofer.is.tue.mpg.de/download.php (register, accept the OFER licence)"

ASSETS: tuple[AssetSpec, ...] = (
    AssetSpec(
        "flame2020",
        "FLAME2020/generic_model.pkl",
        "FLAME 2020 model: shape/expression/pose bases, LBS",
        _FLAME_SITE,
        "facefuse.assets.flame_file:validate_flame2020_model",
        ("mica", "ofer", "fusion"),
    ),
    AssetSpec(
        "landmark_embedding",
        "FLAME2020/landmark_embedding.npy",
        "68 landmarks (NoW 7) on the FLAME surface",
        _MICA_SITE + " (data/FLAME2020/landmark_embedding.npy)",
        "facefuse.assets.flame_file:validate_landmark_embedding",
        ("mica", "ofer", "fusion"),
    ),
    AssetSpec(
        "flame_masks",
        "FLAME2020/FLAME_masks.pkl",
        "FLAME vertex regions (face, nose, lips, eyes...) for region fusion",
        _FLAME_SITE + " (FLAME_masks.zip)",
        "facefuse.assets.flame_file:validate_flame_masks",
        ("fusion",),
    ),
    AssetSpec(
        "mediapipe_embedding",
        "FLAME2020/mediapipe_landmark_embedding.npz",
        "optional: 105 MediaPipe FaceMesh points on the FLAME surface (denser posed-face fit)",
        _FLAME_SITE + " (the MediaPipe landmark embedding: mediapipe_landmark_embedding.npz)",
        "facefuse.assets.flame_file:validate_mediapipe_embedding",
        ("fusion",),
        optional=True,
    ),
    AssetSpec(
        "mica",
        "mica.tar",
        "MICA: ArcFace IResNet-100 + mapping network (identity -> 300 FLAME shape coefficients)",
        _MICA_SITE,
        "facefuse.assets.mica_checkpoint:validate_mica_checkpoint",
        ("mica",),
    ),
    AssetSpec(
        "idgen",
        "model_idgen_flame20.tar",
        "OFER IdGen: diffusion sampler of FLAME 2020 shapes",
        _OFER_SITE,
        "facefuse.assets.idgen_checkpoint:validate_idgen_checkpoint",
        ("ofer",),
    ),
    AssetSpec(
        "idrank",
        "model_idrank.tar",
        "OFER IdRank: ArcFace + FaRL conditioned ranker of shape samples",
        _OFER_SITE,
        "facefuse.assets.idrank_checkpoint:validate_idrank_checkpoint",
        ("ofer",),
    ),
    AssetSpec(
        "farl",
        "FaRL-Base-Patch16-LAIONFace20M-ep64.pth",
        "FaRL ViT-B/16 image tower weights (IdRank context)",
        "https://github.com/FacePerceiver/FaRL (FaRL-Base-Patch16-LAIONFace20M-ep64)",
        "facefuse.assets.idrank_checkpoint:validate_farl_weights",
        ("ofer",),
    ),
    AssetSpec(
        "frontindices",
        "frontindices.npy",
        "the 1785 front-face FLAME vertices IdRank scores",
        _OFER_SITE + " (pretrained/frontindices.npy)",
        "facefuse.assets.idrank_checkpoint:validate_front_indices",
        ("ofer",),
    ),
    AssetSpec(
        "scrfd",
        "antelopev2/scrfd_10g_bnkps.onnx",
        "SCRFD-10GF face detector with 5 key-points (insightface antelopev2)",
        "insightface antelopev2 model pack (non-commercial research licence; see the insightface model zoo)",
        "facefuse.face.scrfd:validate_scrfd_model",
        ("gateway",),
    ),
)


def assets_dir(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The user's assets folder: the explicit argument, else ``FACEFUSE_ASSETS``, else none."""
    value = explicit if explicit is not None else os.environ.get(ASSETS_ENV)
    return Path(value).expanduser() if value else None


def spec(name: str) -> AssetSpec:
    for item in ASSETS:
        if item.name == name:
            return item
    raise KeyError(f"unknown asset {name!r}; known: {[a.name for a in ASSETS]}")


def asset_path(directory: str | os.PathLike[str], name: str) -> Path:
    return Path(directory) / spec(name).relpath


def synthetic_manifest(directory: Path) -> dict[str, str]:
    manifest = directory / SYNTHETIC_MANIFEST
    if not manifest.is_file():
        return {}
    try:
        data = json.loads(manifest.read_text())
        return {str(k): str(v) for k, v in data.get("files", {}).items()}
    except (ValueError, AttributeError):
        return {}


def check_asset(
    directory: str | os.PathLike[str], item: AssetSpec, manifest: dict[str, str] | None = None
) -> AssetStatus:
    directory = Path(directory)
    path = directory / item.relpath
    if not path.is_file():
        return AssetStatus(item, path, False, False, False, "not found")
    manifest = synthetic_manifest(directory) if manifest is None else manifest
    try:
        message = item.load_validator()(path)
        valid = True
    except AssetError as exc:
        message, valid = str(exc), False
    except (ImportError, AttributeError) as exc:
        message, valid = f"no validator available yet ({exc})", False
    synthetic = item.relpath in manifest and manifest[item.relpath] == sha256_file(path)
    return AssetStatus(item, path, True, valid, synthetic, message)


def check_assets(directory: str | os.PathLike[str]) -> list[AssetStatus]:
    directory = Path(directory)
    manifest = synthetic_manifest(directory)
    return [check_asset(directory, item, manifest) for item in ASSETS]
