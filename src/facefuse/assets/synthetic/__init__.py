"""Synthetic stand-ins for the licence-gated files, in exactly the official formats.

``synthesize(directory)`` writes every file the registry names (where a writer exists) under its
official relative path, each atomically (temp file + ``os.replace``), and records them with their
sha256 in ``facefuse-synthetic.json`` so ``facefuse assets check`` labels them synthetic. Each writer
is ``(path, size, generator) -> None`` and gets a fresh ``torch.Generator`` seeded with ``seed``, so a
file's content depends only on (writer, size, seed), whichever other files are written.

Sizes: ``"full"`` has FLAME's real dimensions; ``"small"`` a smaller FLAME mesh for fast tests (see
``facefuse.assets.synthetic.flame.FLAME_SIZES``). Network checkpoints keep official shapes at both.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

import torch

from facefuse.assets.registry import ASSETS, SYNTHETIC_MANIFEST, synthetic_manifest
from facefuse.assets.store import sha256_file

Writer = Callable[[Path, str, torch.Generator], None]
Progress = Callable[[str, str], None]
SIZES = ("full", "small")

_log = logging.getLogger(__name__)

WRITERS: dict[str, tuple[str, str]] = {
    # relpath (as in facefuse.assets.registry) -> (module, function); imported when used
    "FLAME2020/generic_model.pkl": ("facefuse.assets.synthetic.flame", "write_flame_model"),
    "FLAME2020/landmark_embedding.npy": ("facefuse.assets.synthetic.flame", "write_landmark_embedding"),
    "FLAME2020/FLAME_masks.pkl": ("facefuse.assets.synthetic.flame", "write_flame_masks"),
    "FLAME2020/mediapipe_landmark_embedding.npz": ("facefuse.assets.synthetic.flame", "write_mediapipe_embedding"),
    "mica.tar": ("facefuse.assets.synthetic.mica", "write_mica_checkpoint"),
    "model_idgen_flame20.tar": ("facefuse.assets.synthetic.ofer_idgen", "write_idgen_checkpoint"),
    "model_idrank.tar": ("facefuse.assets.synthetic.ofer_idrank", "write_idrank_checkpoint"),
    "FaRL-Base-Patch16-LAIONFace20M-ep64.pth": ("facefuse.assets.synthetic.ofer_idrank", "write_farl_weights"),
    "frontindices.npy": ("facefuse.assets.synthetic.ofer_idrank", "write_front_indices"),
}


def _selected(only: Iterable[str] | None, include_optional: bool = False) -> list[str]:
    """Relpaths to write, in registry order; ``only`` takes asset names or relpaths. Without ``only``,
    optional assets are written only with ``include_optional``."""
    by_name = {a.name: a.relpath for a in ASSETS}
    registered = [a.relpath for a in ASSETS]
    optional = {a.relpath for a in ASSETS if a.optional}
    order = [r for r in registered if r in WRITERS] + [r for r in WRITERS if r not in registered]
    if only is None:
        return [r for r in order if include_optional or r not in optional]
    wanted = set()
    for item in only:
        relpath = by_name.get(item, item)
        if relpath not in WRITERS:
            raise ValueError(f"no synthetic writer for {item!r}; known: {sorted(by_name)} or {sorted(WRITERS)}")
        wanted.add(relpath)
    return [r for r in order if r in wanted]


def load_writer(relpath: str) -> Writer:
    module_name, func_name = WRITERS[relpath]
    return getattr(importlib.import_module(module_name), func_name)


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Run ``write(temp)`` then move the temp file over ``path``, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(temp)
        os.replace(temp, path)
    finally:
        if temp.exists():
            temp.unlink()


def _run_writer(writer: Writer, temp: Path, *, size: str, generator: torch.Generator) -> None:
    writer(temp, size, generator)


def synthesize(directory: Path, size: str = "full", seed: int = 0, only: set[str] | None = None,
               progress: Progress | None = None, include_optional: bool = False) -> dict[str, Path]:
    """Write synthetic official-format files under ``directory``; returns relpath -> path written.

    Optional assets (``AssetSpec.optional``) are written when named in ``only`` or with
    ``include_optional``: an optional file changes what a pack does (the synthetic MediaPipe embedding's
    FaceMesh correspondences are random, so on a real photo it would pull the posed fit off the face).

    A writer whose module cannot be imported (the OFER writers live in ``synthetic/ofer_*.py``) is
    skipped with a message through ``progress`` and the log; the other files are still written.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    report = progress or (lambda relpath, status: None)
    written: dict[str, Path] = {}
    for relpath in _selected(only, include_optional):
        try:
            writer = load_writer(relpath)
        except (ImportError, AttributeError) as exc:
            message = f"skipped: no writer available ({exc})"
            _log.warning("%s: %s", relpath, message)
            report(relpath, message)
            continue
        report(relpath, "writing")
        path = directory / relpath
        generator = torch.Generator().manual_seed(seed)
        write_atomically(path, partial(_run_writer, writer, size=size, generator=generator))
        written[relpath] = path
        report(relpath, "done")
    manifest = synthetic_manifest(directory)
    manifest.update({relpath: sha256_file(path) for relpath, path in written.items()})
    manifest_path = directory / SYNTHETIC_MANIFEST
    content = json.dumps({"files": manifest, "size": size, "seed": seed}, indent=2, sort_keys=True) + "\n"
    write_atomically(manifest_path, lambda temp: temp.write_text(content))
    return written
