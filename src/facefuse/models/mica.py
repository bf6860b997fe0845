"""MICA (Zielon et al., ECCV 2022): ArcFace identity -> 300 FLAME shape coefficients -> neutral metric mesh.

Module names follow the official checkpoint: ``Mica.arcface`` loads ``mica.tar['arcface']`` and
``Mica.flameModel`` (a ``MicaGenerator`` with ``regressor`` and ``generator``) loads
``mica.tar['flameModel']``, both strictly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facefuse.models.arcface import ARCFACE_EMBEDDING_DIM, IResNet100
from facefuse.models.flame import N_SHAPE, FlameLayer, FlameModelData

MAPPING_HIDDEN_DIM = 300
MAPPING_LAYERS = 3
LEAKY_SLOPE = 0.2


class MappingNetwork(nn.Module):
    """``hidden + 1`` Linear layers with LeakyReLU(0.2), then a linear ``output`` (§3.1).

    Layers in ``skips`` would take ``[z ; h]``; the official rule gives skips only when hidden > 5,
    so MICA's configuration (hidden = 3) has none.
    """

    def __init__(self, z_dim: int = ARCFACE_EMBEDDING_DIM, hidden_dim: int = MAPPING_HIDDEN_DIM,
                 output_dim: int = N_SHAPE, hidden: int = MAPPING_LAYERS) -> None:
        super().__init__()
        self.skips = [hidden // 2] if hidden > 5 else []
        layers = [nn.Linear(z_dim, hidden_dim)]
        for i in range(hidden):
            in_dim = hidden_dim + z_dim if i + 1 in self.skips else hidden_dim
            layers.append(nn.Linear(in_dim, hidden_dim))
        self.network = nn.ModuleList(layers)
        self.output = nn.Linear(hidden_dim, output_dim)

    def forward(self, z: Tensor) -> Tensor:
        h = z
        for i, layer in enumerate(self.network):
            if i in self.skips:
                h = torch.cat([z, h], dim=-1)
            h = F.leaky_relu(layer(h), negative_slope=LEAKY_SLOPE)
        return self.output(h)


class MicaGenerator(nn.Module):
    """The ``flameModel`` section: ``regressor`` (identity -> β), ``generator`` (FLAME, buffers from the checkpoint)."""

    def __init__(self, flame: FlameModelData) -> None:
        super().__init__()
        self.regressor = MappingNetwork()
        self.generator = FlameLayer(flame)

    def forward(self, identity: Tensor) -> tuple[Tensor, Tensor]:
        """Unit-length identity (B,512) -> (vertices (B,V,3) metres, β (B,300))."""
        shape = self.regressor(identity)
        return self.generator(shape).vertices, shape


class MicaOutput(NamedTuple):
    shape: Tensor  # (B,300) FLAME identity coefficients β
    vertices: Tensor  # (B,V,3) neutral canonical mesh, metres
    identity: Tensor  # (B,512) L2-normalised ArcFace embedding z


class Mica(nn.Module):
    def __init__(self, flame: FlameModelData) -> None:
        super().__init__()
        self.arcface = IResNet100()
        self.flameModel = MicaGenerator(flame)  # camelCase: the checkpoint's section name
        self.load_report: dict[str, object] = {}  # filled by the loader (e.g. FLAME disagreements)

    @property
    def flame(self) -> FlameLayer:
        return self.flameModel.generator

    def forward(self, blob: Tensor) -> MicaOutput:
        """ArcFace blob (B,3,112,112) -> β, vertices (metres), z. ``features`` BN always applied (MICA)."""
        identity = F.normalize(self.arcface(blob, apply_features=True), dim=1)
        vertices, shape = self.flameModel(identity)
        return MicaOutput(shape, vertices, identity)
