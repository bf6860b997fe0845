"""Loading and validating OFER IdRank's files: ``model_idrank.tar``, the FaRL weights, ``frontindices.npy``.

* ``model_idrank.tar``: sections ``net`` (RankMLPNet, 33 keys), ``arcface`` (IResNet-100, 925) and
  ``farl`` (the whole CLIP ViT-B/16, 302), all loaded strictly. Trainer extras (``optimizer``,
  ``scheduler``, ``epoch``, ...) are ignored.
* FaRL ``.pth``: ``{"state_dict": ...}`` with CLIP's key names (image tower under ``visual.``, the
  text tower at the root) plus FaRL's masked-image-modelling extras under ``visual.`` (``mask_token``,
  ``lm_transformer.*``, ``ln_lm.*``, ``lm_head.*``), which CLIP does not have. OFER loads it with
  ``strict=False`` and then overwrites every weight with the ``farl`` section of
  ``model_idrank.tar``, so it never changes IdRank's output; it is loaded only when asked, and the
  loader reports how many CLIP keys it matched instead of hiding it.
* ``frontindices.npy``: int64 (1785,), strictly increasing, inside the FLAME mesh.

Expected key sets come from the modules built on the meta device: no memory, no RNG consumed.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from facefuse.assets.checkpoint_io import (
    check_state_dict,
    expected_state,
    load_checkpoint,
    load_strict,
    require_sections,
)
from facefuse.errors import AssetError, CheckpointError, InvalidInputError
from facefuse.models.arcface import IResNet100
from facefuse.models.clip_vit import ClipViT
from facefuse.models.idrank import FRONT_VERTEX_COUNT, IdRank, RankMLPNet

IDRANK_SECTIONS = ("net", "arcface", "farl")
FLAME2020_VERTEX_COUNT = 5023
FARL_STATE_KEY = "state_dict"
FARL_IMAGE_PREFIX = "visual."
_DDP_PREFIX = "module."

Expected = dict[str, tuple[tuple[int, ...], torch.dtype]]
_log = logging.getLogger(__name__)


@functools.cache
def expected_idrank_sections() -> dict[str, Expected]:
    """Section -> key -> (shape, dtype) that ``model_idrank.tar`` must hold."""
    with torch.device("meta"):
        modules: dict[str, nn.Module] = {"net": RankMLPNet(), "arcface": IResNet100(), "farl": ClipViT()}
    return {name: expected_state(module) for name, module in modules.items()}


def check_idrank_checkpoint(checkpoint: Mapping[str, Any], source: str) -> None:
    """Raise CheckpointError naming the section and keys that differ from the official layout."""
    require_sections(checkpoint, IDRANK_SECTIONS, source)
    for section, expected in expected_idrank_sections().items():
        check_state_dict(expected, checkpoint[section], f"{source} section {section!r}")


def validate_idrank_checkpoint(path: Path) -> str:
    checkpoint = load_checkpoint(path)
    check_idrank_checkpoint(checkpoint, str(path))
    counts = ", ".join(f"{name} {len(checkpoint[name])} keys" for name in IDRANK_SECTIONS)
    return f"OFER IdRank checkpoint ({counts})"


# ----------------------------------------------------------------------------------------------
# FaRL weights


@dataclass(frozen=True)
class FarlLoadReport:
    """What a FaRL ``.pth`` supplied to the CLIP model: matched keys, CLIP keys it lacks, extras."""

    matched: int
    expected: int
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]

    def summary(self) -> str:
        text = f"{self.matched} of {self.expected} CLIP keys matched"
        if self.missing:
            text += f", {len(self.missing)} CLIP keys absent (e.g. {self.missing[0]!r})"
        if self.unexpected:
            text += f", {len(self.unexpected)} extra keys ignored (e.g. {self.unexpected[0]!r})"
        return text


def _farl_state(path: Path) -> dict[str, torch.Tensor]:
    payload = load_checkpoint(path)
    if FARL_STATE_KEY not in payload:
        raise CheckpointError(f"{path}: expected a FaRL checkpoint with a {FARL_STATE_KEY!r} entry; found "
                              f"{sorted(map(str, payload))}")
    state = payload[FARL_STATE_KEY]
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"{path}: {FARL_STATE_KEY!r} is not a non-empty state dict")
    state = {str(k): v for k, v in state.items()}
    if all(k.startswith(_DDP_PREFIX) for k in state):
        state = {k[len(_DDP_PREFIX):]: v for k, v in state.items()}
    return state


def _match_farl(expected: Expected, state: Mapping[str, Any], source: str) -> FarlLoadReport:
    matched = [k for k in expected if k in state]
    missing = tuple(k for k in expected if k not in state)
    unexpected = tuple(k for k in state if k not in expected)
    wrong = []
    for key in matched:
        value = state[key]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            wrong.append(f"{key}: expected a floating-point tensor, found {type(value).__name__}")
        elif tuple(value.shape) != expected[key][0]:
            wrong.append(f"{key}: shape {tuple(value.shape)}, expected {expected[key][0]}")
    if wrong:
        raise CheckpointError(
            f"{source}: " + "; ".join(wrong[:5]) + (f" (+{len(wrong) - 5} more)" if len(wrong) > 5 else "")
        )
    missing_image = [k for k in missing if k.startswith(FARL_IMAGE_PREFIX)]
    if missing_image:
        raise CheckpointError(
            f"{source}: not a FaRL ViT-B/16 checkpoint: image-tower key(s) missing "
            f"{', '.join(repr(k) for k in missing_image[:5])}"
            + (f" (+{len(missing_image) - 5} more)" if len(missing_image) > 5 else "")
        )
    return FarlLoadReport(len(matched), len(expected), missing, unexpected)


def load_farl_weights(model: ClipViT, path: str | os.PathLike[str]) -> FarlLoadReport:
    """Copy a FaRL ``.pth`` into ``model`` like OFER's ``strict=False`` load, but say what matched.

    Every image-tower key must be present with the right shape (FaRL's own loader asserts the same);
    absent text-tower keys and FaRL-only extras are reported, not fatal.
    """
    path = Path(path)
    state = _farl_state(path)
    report = _match_farl(expected_state(model), state, f"{path} [{FARL_STATE_KEY!r}]")
    model.load_state_dict({k: state[k] for k in model.state_dict() if k in state}, strict=False)
    return report


def validate_farl_weights(path: Path) -> str:
    state = _farl_state(Path(path))
    report = _match_farl(expected_idrank_sections()["farl"], state, f"{path} [{FARL_STATE_KEY!r}]")
    return f"FaRL ViT-B/16 weights: {report.summary()}"


# ----------------------------------------------------------------------------------------------
# Front-face vertex indices


def check_front_indices(indices: np.ndarray, source: str, num_vertices: int = FLAME2020_VERTEX_COUNT) -> None:
    """int64 (1785,), strictly increasing (hence unique), within [0, num_vertices)."""
    if indices.dtype != np.int64:
        raise AssetError(f"{source}: front indices must be int64, found {indices.dtype}")
    if indices.shape != (FRONT_VERTEX_COUNT,):
        raise AssetError(f"{source}: front indices must have shape ({FRONT_VERTEX_COUNT},), found {indices.shape}")
    steps = np.diff(indices)
    if (steps <= 0).any():
        at = int(np.argmax(steps <= 0))
        raise AssetError(
            f"{source}: front indices must be strictly increasing and unique; "
            f"entry {at + 1} ({indices[at + 1]}) follows {indices[at]}"
        )
    if indices[0] < 0 or indices[-1] >= num_vertices:
        raise AssetError(f"{source}: front indices span [{indices[0]}, {indices[-1]}], outside the "
                         f"mesh's {num_vertices} vertices")


def load_front_indices(path: str | os.PathLike[str], num_vertices: int = FLAME2020_VERTEX_COUNT) -> torch.Tensor:
    """Read and check ``frontindices.npy``; returns an int64 tensor (1785,)."""
    path = Path(path)
    if not path.is_file():
        raise AssetError(f"{path}: file not found")
    try:
        indices = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise AssetError(f"{path}: not a readable .npy array ({exc})") from None
    if not isinstance(indices, np.ndarray):
        raise AssetError(f"{path}: expected one .npy array, found {type(indices).__name__}")
    check_front_indices(indices, str(path), num_vertices)
    return torch.from_numpy(np.array(indices, dtype=np.int64))


def validate_front_indices(path: Path) -> str:
    indices = load_front_indices(path)
    return f"IdRank front-face indices: {indices.numel()} vertices in [{int(indices[0])}, {int(indices[-1])}]"


# ----------------------------------------------------------------------------------------------


def load_idrank(
    path: str | os.PathLike[str],
    *,
    front_indices_path: str | os.PathLike[str],
    farl_path: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    num_vertices: int = FLAME2020_VERTEX_COUNT,
) -> IdRank:
    """Build IdRank and load ``model_idrank.tar`` strictly (sections net, arcface, farl).

    ``farl_path`` (optional) is loaded first, as OFER does, and then overwritten by the ``farl``
    section; it therefore only checks the file, and a file that fails that check is reported in
    ``load_report['farl_file']`` and the log, not raised. Construction consumes the default torch RNG in the
    official order (see :class:`~facefuse.models.idrank.IdRank`).
    """
    path = Path(path)
    front_indices = load_front_indices(front_indices_path, num_vertices)
    checkpoint = load_checkpoint(path)
    check_idrank_checkpoint(checkpoint, str(path))
    try:
        model = IdRank(front_indices)
    except InvalidInputError as exc:  # pragma: no cover - indices were validated above
        raise AssetError(str(exc)) from None
    if farl_path is not None:
        # Optional: every weight it could supply is overwritten by the 'farl' section below, so a file that
        # cannot be read only loses a check, never the backend.
        try:
            report = load_farl_weights(model.farl, farl_path)
        except AssetError as exc:  # CheckpointError included
            model.load_report["farl_file"] = f"ignored (unreadable; the 'farl' section supplies the weights): {exc}"
            _log.warning("FaRL weights %s not used: %s; IdRank uses the 'farl' section of %s", farl_path, exc, path)
        else:
            model.load_report["farl_file"] = f"{report.summary()} (then overwritten by the 'farl' section)"
            _log.info("FaRL weights %s: %s (then overwritten by the 'farl' section)", farl_path, report.summary())
    for section in IDRANK_SECTIONS:
        load_strict(getattr(model, section), checkpoint[section], f"{path} section {section!r}")
    return model.to(device).eval()
