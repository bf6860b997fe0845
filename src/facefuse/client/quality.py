"""The ``--quality`` presets: how many OFER samples, which sampler and how many DDIM steps a request asks for.

One table, mapped onto the request options that already travel through the mesh (``num_samples``,
``steps``, ``sampler_mode``); explicit ``--samples`` / ``--steps`` / ``--sampler`` override a preset.

How the presets were chosen (``benchmarks/study_sampler_quality.py``, ``facefuse.eval.sampler_quality``):
on an exact denoiser (Gaussian data, no network) the fused shape of each setting is compared with the
default's (40 DDIM steps, 10 samples, same initial noise) as the RMS vertex distance in mm. ``fast``
keeps that within ``FAST_TOLERANCE_MM`` for every identity measured (16 identities; 20 steps: mean
0.077 mm, max 0.091 mm; 15 steps: mean 0.13 mm, max 0.15 mm, too far); fewer samples are not offered
because they move the fused shape by 0.6 mm (8 samples) to 1.5 mm (5 samples), as much as going from 10
to 20 samples does (0.76 mm). ``official`` is OFER's own 251-evaluation loop, for replicating the paper
(3.3 mm from the default there: the official loop is the less exact integrator, see
``benchmarks/bench_idgen.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from facefuse.errors import InvalidInputError

FAST_TOLERANCE_MM = 0.1
"""Max RMS vertex distance (mm) of ``fast``'s fused shape from ``default``'s on the exact-denoiser study."""


@dataclass(frozen=True)
class QualityPreset:
    num_samples: int
    steps: int  # DDIM steps; 0 = the service's default (40)
    sampler: str  # "fast" (DDIM) or "official"


QUALITY_PRESETS: dict[str, QualityPreset] = {
    "fast": QualityPreset(num_samples=10, steps=20, sampler="fast"),
    "default": QualityPreset(num_samples=10, steps=0, sampler="fast"),
    "official": QualityPreset(num_samples=10, steps=0, sampler="official"),
}
QUALITY_NAMES = tuple(QUALITY_PRESETS)


def sampling_options(
    quality: str | None, *, samples: int | None, steps: int | None, sampler: str | None
) -> tuple[int | None, int | None, str | None]:
    """(num_samples, steps, sampler) for a request: the preset's values where the user gave none.

    Without a preset the user's values pass through unchanged (None: the service's default)."""
    if quality is None:
        return samples, steps, sampler
    if quality not in QUALITY_PRESETS:
        raise InvalidInputError(f"--quality {quality!r}: expected one of {', '.join(QUALITY_NAMES)}")
    preset = QUALITY_PRESETS[quality]
    return (
        preset.num_samples if samples is None else samples,
        (preset.steps or None) if steps is None else steps,
        preset.sampler if sampler is None else sampler,
    )
