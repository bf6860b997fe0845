"""The flame pack: the official MICA / OFER checkpoints and FLAME 2020, loaded from the user's folder."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from facefuse.assets.registry import asset_path
from facefuse.face.types import AlignedFace
from facefuse.models.flame import METRES_TO_MM, NOW7_FROM_LMK68, FlameModelData, LandmarkEmbedding, barycentric_landmarks
from facefuse.packs.base import BackendStatus, ShapeResult

TOPOLOGY = "flame2020"


def load_flame(directory: Path) -> FlameModelData:
    """FLAME 2020 with its landmark embedding, from the assets folder (errors name the file)."""
    from facefuse.assets.flame_file import load_flame_model

    return load_flame_model(asset_path(directory, "flame2020"), expect="2020",
                            landmark_embedding=asset_path(directory, "landmark_embedding"))


def landmark_function(flame: FlameModelData, embedding: LandmarkEmbedding | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """vertices (V,3) in any unit -> the 68 iBUG landmarks (68,3) in the same unit."""
    lmk = embedding or flame.landmarks
    if lmk is None:
        raise ValueError("no landmark embedding")
    faces = torch.as_tensor(flame.faces)
    idx = torch.as_tensor(lmk.full_lmk_faces_idx[0])
    bary = torch.as_tensor(lmk.full_lmk_bary_coords[0], dtype=torch.float64)

    def landmarks(vertices: np.ndarray) -> np.ndarray:
        v = torch.as_tensor(np.asarray(vertices, np.float64))[None]
        return barycentric_landmarks(v, faces, idx, bary)[0].numpy()

    return landmarks


class MicaBackend:
    """MICA on ``mica.tar``: aligned ArcFace blobs -> β (300), neutral FLAME mesh and landmarks in mm."""

    def __init__(self, mica: torch.nn.Module, device: str, source: str) -> None:
        self.mica = mica
        self.device = device
        flame = mica.flame  # type: ignore[attr-defined]
        self.faces = flame.faces_tensor.cpu().numpy().astype(np.int32)
        self.status = BackendStatus("mica", "mica", "flame", True, False, "ready", device=device,
                                    details={"checkpoint": source, "vertices": str(flame.num_vertices)})

    @classmethod
    def from_assets(cls, directory: Path, device: str = "auto") -> "MicaBackend":
        from facefuse.assets.mica_checkpoint import load_mica
        from facefuse.servers.common import resolve_device

        device = resolve_device(device)
        path = asset_path(directory, "mica")
        mica = load_mica(path, flame=load_flame(directory), device=device)
        return cls(mica, device, str(path))

    @torch.inference_mode()
    def predict(self, faces: Sequence[AlignedFace]) -> list[ShapeResult]:
        blob = torch.from_numpy(np.stack([f.arcface_blob for f in faces])).to(self.device)
        out = self.mica(blob)
        vertices_mm = (out.vertices * METRES_TO_MM).float()
        landmarks_mm = self.mica.flame.landmarks68(vertices_mm)  # type: ignore[attr-defined]
        results = []
        for i in range(len(faces)):
            lmk68 = landmarks_mm[i].cpu().numpy()
            results.append(ShapeResult(
                vertices_mm=vertices_mm[i].cpu().numpy(), faces=self.faces, topology=TOPOLOGY,
                shape=out.shape[i].float().cpu().numpy(), identity=out.identity[i].float().cpu().numpy(),
                landmarks68_mm=lmk68, kpt7_mm=lmk68[list(NOW7_FROM_LMK68)]))
        return results
