"""Synthetic ``mica.tar``: the official sections, keys, shapes and dtypes, with random weights.

``arcface`` (925 tensors, official IResNet-100 shapes at every size) and ``flameModel`` (26 tensors:
the mapping network, random, plus the FLAME buffers of the synthetic FLAME of the same seed and size,
so ``load_mica(..., flame=<the synthetic FLAME file>)`` passes its agreement check).
"""

from __future__ import annotations

from pathlib import Path

import torch

from facefuse.assets.synthetic.flame import synthetic_flame_data
from facefuse.assets.synthetic.random_weights import expected_state_of, random_state
from facefuse.models.arcface import IResNet100
from facefuse.models.flame import FlameLayer
from facefuse.models.mica import MappingNetwork

ARCFACE_RESIDUAL_BN = ("bn3.weight",)
"""The last BN of each residual branch starts near 0.2 so 49 residual additions keep activations finite."""


def arcface_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A random IResNet-100 state dict with the official 925 keys (shared by MICA and OFER writers)."""
    return random_state(expected_state_of(IResNet100), generator, residual_bn_suffixes=ARCFACE_RESIDUAL_BN)


REGRESSOR_GAINS = {"network.0.weight": 512**0.5, "output.weight": 2.0}
"""The input z has unit norm (entries ~ 1/sqrt(512)); these gains make β come out O(1), like real shape codes."""


def flame_model_state(size: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The ``flameModel`` section: random mapping network + the synthetic FLAME's buffers (26 tensors)."""
    regressor = random_state(expected_state_of(MappingNetwork), generator)
    for key, gain in REGRESSOR_GAINS.items():
        regressor[key] = regressor[key] * gain
    flame_layer = FlameLayer(synthetic_flame_data(size, generator))
    state = {f"regressor.{k}": v for k, v in regressor.items()}
    state.update({f"generator.{k}": v.detach().clone() for k, v in flame_layer.state_dict().items()})
    return state


def mica_state(size: str, generator: torch.Generator) -> dict[str, dict[str, torch.Tensor]]:
    flame_model = flame_model_state(size, generator)
    return {"arcface": arcface_state(generator), "flameModel": flame_model}


def write_mica_checkpoint(path: Path, size: str, generator: torch.Generator) -> None:
    torch.save(mica_state(size, generator), path)
