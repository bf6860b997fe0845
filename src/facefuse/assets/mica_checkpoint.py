"""Loading ``mica.tar`` strictly into ``facefuse.models.mica.Mica``.

Which FLAME does MICA use? The official MICA builds its generator's FLAME from ``generic_model.pkl`` and
then overwrites every FLAME buffer with the copy saved in ``mica.tar['flameModel']`` (``generator.*``).
facefuse does the same: MICA's vertices always come from the checkpoint's FLAME. When the user's FLAME
file is given too, the two are compared, because the fusion service mixes MICA's vertices with vertices
OFER computes from the user's file. A different topology (any array shape differs) cannot be fused and
is refused; different values (beyond ``FLAME_AGREEMENT_ATOL``) still run, as in the official code, so
they are logged as a warning naming each field and the size of the difference, and kept in
``Mica.load_report['flame_differences']``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facefuse.assets.checkpoint_io import check_state_dict, expected_state, load_checkpoint, require_sections
from facefuse.errors import AssetError, CheckpointError
from facefuse.models.flame import N_JOINTS, FlameModelData, LandmarkEmbedding
from facefuse.models.mica import Mica

log = logging.getLogger(__name__)

MICA_SECTIONS = ("arcface", "flameModel")
FLAME_PREFIX = "generator."
FLAME_AGREEMENT_ATOL = 1e-5
"""Largest difference (metres, or unitless for weights) tolerated between the checkpoint's and the file's FLAME."""
_DEFAULT_VERTICES, _DEFAULT_FACES, _DEFAULT_SHAPEDIRS = 5023, 9976, 400


def _skeleton_flame(section: Mapping[str, Any]) -> FlameModelData:
    """Zero FLAME data whose sizes follow the checkpoint's vertex and face counts, all else official.

    The strict load then checks every other buffer's shape against FLAME 2020's layout.
    """

    def rows(key: str, default: int) -> int:
        value = section.get(FLAME_PREFIX + key)
        return int(value.shape[0]) if isinstance(value, torch.Tensor) and value.ndim >= 1 else default

    n_v, n_f = rows("v_template", _DEFAULT_VERTICES), rows("faces_tensor", _DEFAULT_FACES)
    n_pose = 9 * (N_JOINTS - 1)
    f32 = np.float32
    return FlameModelData(
        faces=np.zeros((n_f, 3), np.int64), v_template=np.zeros((n_v, 3), f32),
        shapedirs=np.zeros((n_v, 3, _DEFAULT_SHAPEDIRS), f32), posedirs=np.zeros((n_pose, 3 * n_v), f32),
        J_regressor=np.zeros((N_JOINTS, n_v), f32), parents=np.zeros(N_JOINTS, np.int64),
        lbs_weights=np.zeros((n_v, N_JOINTS), f32),
        landmarks=LandmarkEmbedding(
            np.zeros(51, np.int64), np.zeros((51, 3), f32), np.zeros((79, 17), np.int64),
            np.zeros((79, 17, 3), f32), np.zeros((1, 68), np.int64), np.zeros((1, 68, 3), f32)),
    )


def load_mica(path: str | Path, flame: FlameModelData | None = None, device: str | torch.device = "cpu") -> Mica:
    """Build ``Mica`` from ``mica.tar`` (sections 'arcface' and 'flameModel', strict), in eval mode.

    ``flame``: the user's FLAME 2020 data; when given, it must have the checkpoint's FLAME topology (else
    ``AssetError``); value differences beyond ``FLAME_AGREEMENT_ATOL`` are warned about and reported.
    """
    path = Path(path)
    checkpoint = load_checkpoint(path)
    require_sections(checkpoint, MICA_SECTIONS, str(path))
    for section in MICA_SECTIONS:
        if not isinstance(checkpoint[section], Mapping):
            raise CheckpointError(f"{path}: section {section!r} is a "
                                  f"{type(checkpoint[section]).__name__}, expected a state dict")
    # Built on the meta device: no memory, no default initialisation, no draw from the caller's RNG;
    # the checkpoint's tensors are then assigned in place of the meta ones.
    with torch.device("meta"):
        mica = Mica(_skeleton_flame(checkpoint["flameModel"]))
    for section in MICA_SECTIONS:  # check both before loading either, so errors come fast and complete
        check_state_dict(expected_state(getattr(mica, section)), checkpoint[section], f"{path} section {section!r}")
    for section in MICA_SECTIONS:
        getattr(mica, section).load_state_dict(checkpoint[section], strict=True, assign=True)
    if flame is not None:
        differences = check_flame_agreement(mica.flame.to_data(), flame, source=str(path))
        mica.load_report["flame_differences"] = differences
        if differences:
            log.warning("%s: %s", path, describe_flame_differences(differences))
    return mica.to(device).eval()


def check_flame_agreement(checkpoint_flame: FlameModelData, file_flame: FlameModelData, *, source: str,
                          atol: float = FLAME_AGREEMENT_ATOL) -> dict[str, float]:
    """Field -> largest absolute difference, for fields differing beyond ``atol``.

    Raises ``AssetError`` when a field's shape differs: then MICA's and OFER's meshes cannot be fused.
    """
    pairs = {
        "faces": (checkpoint_flame.faces, file_flame.faces),
        "v_template": (checkpoint_flame.v_template, file_flame.v_template),
        "shapedirs": (checkpoint_flame.shapedirs, file_flame.shapedirs),
        "posedirs": (checkpoint_flame.posedirs, file_flame.posedirs),
        "J_regressor": (checkpoint_flame.J_regressor, file_flame.J_regressor),
        "parents": (checkpoint_flame.parents, file_flame.parents),
        "lbs_weights": (checkpoint_flame.lbs_weights, file_flame.lbs_weights),
    }
    differences: dict[str, float] = {}
    for name, (ours, theirs) in pairs.items():
        if ours.shape != theirs.shape:
            raise AssetError(
                f"{source}: the checkpoint's FLAME {name} has shape {ours.shape} but the FLAME file's has "
                f"{theirs.shape}: the two are not the same FLAME model, so MICA's meshes cannot be fused with "
                "OFER's (MICA needs FLAME 2020)"
            )
        diff = float(np.max(np.abs(ours.astype(np.float64) - theirs.astype(np.float64)))) if ours.size else 0.0
        if diff > atol:
            differences[name] = diff
    return differences


def describe_flame_differences(differences: dict[str, float], atol: float = FLAME_AGREEMENT_ATOL) -> str:
    fields = ", ".join(f"{name} by up to {diff:.3g}" for name, diff in differences.items())
    return (f"the checkpoint's FLAME differs from the FLAME file's ({fields}; tolerance {atol:g}): MICA runs on "
            "the checkpoint's copy, OFER on the file's, so their meshes are not exactly comparable; use the "
            "FLAME 2020 generic_model.pkl that MICA was trained with")


def validate_mica_checkpoint(path: Path) -> str:
    mica = load_mica(path)
    n_params = sum(p.numel() for p in mica.arcface.parameters())
    return (
        f"MICA: ArcFace IResNet-100 ({len(mica.arcface.state_dict())} tensors, {n_params / 1e6:.1f}M parameters) "
        f"+ mapping network + FLAME ({mica.flame.num_vertices} vertices) from the checkpoint"
    )
