"""Choose and assemble the backend of each model slot from what the user has.

``auto`` takes the flame pack when the official files are in the assets folder, else the open pack.
A backend that cannot be built (files missing, corrupt, wrong version) becomes an
``UnavailableBackend`` carrying the reason: the service still starts, reports NOT_SERVING for its RPC
service in health, and answers FAILED_PRECONDITION with that reason.
"""

from __future__ import annotations

from pathlib import Path

from facefuse.assets.registry import asset_path, assets_dir
from facefuse.errors import AssetError
from facefuse.packs.base import GenerativeBackend, ShapeBackend, UnavailableBackend

MICA_FILES = ("mica", "flame2020", "landmark_embedding")
OFER_FILES = ("idgen", "idrank", "frontindices", "flame2020", "landmark_embedding")


def _missing(directory: Path | None, names: tuple[str, ...]) -> list[str]:
    if directory is None:
        return list(names)
    return [str(asset_path(directory, n)) for n in names if not asset_path(directory, n).is_file()]


def _choose(pack: str, directory: Path | None, names: tuple[str, ...], service: str) -> str | UnavailableBackend:
    missing = _missing(directory, names)
    if pack == "flame" or (pack == "auto" and not missing):
        if missing:
            where = "no assets folder given (--assets or FACEFUSE_ASSETS)" if directory is None else f"missing {', '.join(missing)}"
            return UnavailableBackend(service, f"flame pack: {where}; run `facefuse assets check --dir DIR`")
        return "flame"
    return "open"


def load_shape_backend(pack: str, assets: str | Path | None, device: str) -> ShapeBackend:
    directory = assets_dir(assets)
    choice = _choose(pack, directory, MICA_FILES, "mica")
    if isinstance(choice, UnavailableBackend):
        return choice
    try:
        if choice == "flame":
            from facefuse.packs.flame import MicaBackend

            return MicaBackend.from_assets(directory, device)  # type: ignore[arg-type]
        from facefuse.packs.open import load_open_shape_backend

        return load_open_shape_backend(device)
    except AssetError as exc:
        return UnavailableBackend("mica", str(exc))
    except ImportError as exc:
        return UnavailableBackend("mica", f"{choice} pack backend not available in this build ({exc})")


def load_generative_backend(pack: str, assets: str | Path | None, device: str) -> GenerativeBackend:
    directory = assets_dir(assets)
    choice = _choose(pack, directory, OFER_FILES, "ofer")
    if isinstance(choice, UnavailableBackend):
        return choice
    try:
        if choice == "flame":
            from facefuse.packs.flame import OferBackend

            return OferBackend.from_assets(directory, device)  # type: ignore[arg-type]
        from facefuse.packs.open import load_open_generative_backend

        return load_open_generative_backend(device)
    except AssetError as exc:
        return UnavailableBackend("ofer", str(exc))
    except ImportError as exc:
        return UnavailableBackend("ofer", f"{choice} pack backend not available in this build ({exc})")
