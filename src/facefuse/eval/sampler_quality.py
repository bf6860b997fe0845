"""How far cheaper sampling (fewer DDIM steps, fewer samples) moves the fused shape, on an exact denoiser.

A random network is no denoiser, so step counts cannot be judged on synthetic weights. Here OFER is
replaced by the exact ε-model of Gaussian data (``gaussian_data_eps``): per identity the "true" shape
distribution is N(μ, diag(τ²)), with prior spread s_k falling from 2 to 0.1 over the 300 coefficients
(like FLAME's), μ = the identity's shape, τ = ``OFER_SPREAD``·s; MICA's estimate is μ plus N(0, 0.3²)
(the fusion's own ``sigma_mica``). The fused shape (default ``gaussian`` strategy, full visibility) from
``samples`` samples drawn with ``steps`` DDIM steps is compared with the fused shape of the default
setting (40 steps, 10 samples) from the same initial noise (the first rows of one x_T), as the RMS over
vertices of the per-vertex distance in mm. The sampler error and the sample-count error both show up
there; seeds make every number reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from facefuse.fusion.space import ShapeSpace
from facefuse.fusion.strategies import DEFAULT_STRATEGY, FusionInputs, fuse
from facefuse.models.diffusion import (
    DEFAULT_DDIM_STEPS,
    DDIMSampler,
    OfficialSampler,
    SamplingTables,
    gaussian_data_eps,
)

SHAPE_DIM = 300
DEFAULT_SAMPLES = 10
OFER_SPREAD = 0.5
MICA_NOISE = 0.3


@dataclass(frozen=True)
class FusedGap:
    """RMS vertex distance (mm) between a setting's fused shape and the default setting's, over identities."""

    sampler: str  # "ddim" or "official"
    steps: int
    samples: int
    mean_rms_mm: float
    max_rms_mm: float


def _identity(generator: torch.Generator, prior_std: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    mean = prior_std * torch.randn(SHAPE_DIM, generator=generator, dtype=torch.float64)
    mica = (mean + MICA_NOISE * torch.randn(SHAPE_DIM, generator=generator, dtype=torch.float64)).numpy()
    return mean, mica


def _fused_mm(space: ShapeSpace, mica: np.ndarray, samples: torch.Tensor) -> np.ndarray:
    inputs = FusionInputs(mica_shape=mica.astype(np.float32), samples=samples.numpy().astype(np.float32), scores=None)
    return fuse(DEFAULT_STRATEGY, inputs, space).vertices_mm.astype(np.float64)


def fused_gaps(
    space: ShapeSpace, settings: list[tuple[str, int, int]], *, identities: int = 16, seed: int = 0
) -> list[FusedGap]:
    """One :class:`FusedGap` per (sampler, steps, samples) setting; ``sampler`` is "ddim" or "official"
    (steps ignored: the official loop's 251 evaluations)."""
    tables = SamplingTables.linear()
    prior_std = torch.linspace(2.0, 0.1, SHAPE_DIM, dtype=torch.float64)
    width = max([DEFAULT_SAMPLES, *(samples for _, _, samples in settings)])
    distances: list[list[float]] = [[] for _ in settings]
    for index in range(identities):
        generator = torch.Generator().manual_seed(seed * 100_003 + index)
        mean, mica = _identity(generator, prior_std)
        x_T = torch.randn(width, SHAPE_DIM, generator=generator)
        eps = gaussian_data_eps(tables, OFER_SPREAD * prior_std, mean)
        reference = DDIMSampler(DEFAULT_DDIM_STEPS).sample(eps, tables, DEFAULT_SAMPLES,
                                                           initial_noise=x_T[:DEFAULT_SAMPLES])
        reference_mm = _fused_mm(space, mica, reference)
        for slot, (sampler, steps, samples) in enumerate(settings):
            if samples < 2:
                raise ValueError("the gaussian fusion needs at least 2 samples")
            chosen = OfficialSampler() if sampler == "official" else DDIMSampler(steps)
            drawn = chosen.sample(eps, tables, samples, initial_noise=x_T[:samples])
            gap = np.linalg.norm(_fused_mm(space, mica, drawn) - reference_mm, axis=1)
            distances[slot].append(float(np.sqrt(np.mean(gap**2))))
    return [
        FusedGap(sampler, steps if sampler == "ddim" else 251, samples, float(np.mean(d)), float(np.max(d)))
        for (sampler, steps, samples), d in zip(settings, distances, strict=True)
    ]
