"""Choose and assemble the backend of each model slot from what the user has.

``auto`` takes the flame pack when the official files are in the assets folder, else the open pack.
A backend that cannot be built (files missing, corrupt, wrong version) becomes an
``UnavailableBackend`` carrying the reason: the service still starts, reports NOT_SERVING for its RPC
service in health, and answers FAILED_PRECONDITION with that reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

from facefuse.assets.registry import asset_path, assets_dir
from facefuse.errors import AssetError
from facefuse.packs.base import FusionSetup, GenerativeBackend, ShapeBackend, UnavailableBackend

MICA_FILES = ("mica", "flame2020", "landmark_embedding")
OFER_FILES = ("idgen", "idrank", "frontindices", "flame2020", "landmark_embedding")
FUSION_FILES = ("flame2020",)


def _missing(directory: Path | None, names: tuple[str, ...]) -> list[str]:
    if directory is None:
        return list(names)
    return [str(asset_path(directory, n)) for n in names if not asset_path(directory, n).is_file()]


def _choose(pack: str, directory: Path | None, names: tuple[str, ...], service: str) -> str | UnavailableBackend:
    missing = _missing(directory, names)
    if pack == "flame" or (pack == "auto" and not missing):
        if missing:
            where = (
                "no assets folder given (--assets or FACEFUSE_ASSETS)"
                if directory is None
                else f"missing {', '.join(missing)}"
            )
            return UnavailableBackend(service, f"flame pack: {where}; run `facefuse assets check --dir DIR`")
        return "flame"
    return "open"


def _load(slot: str, pack: str, assets: str | Path | None, device: str, files: tuple[str, ...],
          flame_class: str, open_function: str) -> object:
    import importlib

    directory = assets_dir(assets)
    choice = _choose(pack, directory, files, slot)
    if isinstance(choice, UnavailableBackend):
        return choice
    try:
        if choice == "flame":
            return getattr(importlib.import_module("facefuse.packs.flame"), flame_class).from_assets(directory, device)
        return getattr(importlib.import_module("facefuse.packs.open"), open_function)(device)
    except AssetError as exc:
        return UnavailableBackend(slot, str(exc))
    except ImportError as exc:
        return UnavailableBackend(slot, f"{choice} pack backend not available in this build ({exc})")


def load_shape_backend(pack: str, assets: str | Path | None, device: str) -> ShapeBackend:
    """The mica service's backend: MICA (flame pack) or metric FaceMesh (open pack)."""
    return cast(ShapeBackend, _load("mica", pack, assets, device, MICA_FILES, "MicaBackend", "load_open_shape_backend"))


def load_generative_backend(pack: str, assets: str | Path | None, device: str) -> GenerativeBackend:
    """The ofer service's backend: IdGen + IdRank (flame pack) or the GP sampler (open pack)."""
    return cast(GenerativeBackend,
                _load("ofer", pack, assets, device, OFER_FILES, "OferBackend", "load_open_generative_backend"))


def load_fusion_setup(pack: str, assets: str | Path | None) -> FusionSetup:
    """The fusion service's setup: FLAME's shape space (flame pack) or the canonical face's (open pack)."""
    directory = assets_dir(assets)
    choice = _choose(pack, directory, FUSION_FILES, "fusion")
    if isinstance(choice, UnavailableBackend):
        return FusionSetup(None, choice.status)
    try:
        if choice == "flame" and directory is not None:  # _choose picks flame only when its files are there
            from facefuse.packs.flame import flame_fusion_setup

            return flame_fusion_setup(directory)
        from facefuse.packs.open import open_fusion_setup

        return open_fusion_setup()
    except AssetError as exc:
        return FusionSetup(None, UnavailableBackend("fusion", str(exc)).status)
