"""Which DDIM step and sample counts keep the fused shape within a tolerance of the default (40 steps, 10 samples).

On the exact Gaussian-data denoiser (see ``facefuse.eval.sampler_quality`` for the setting), per setting:
mean and max over identities of the RMS vertex distance (mm) between its fused shape and the default's,
from the same initial noise; and the cost in network evaluations per face. The ``--quality`` presets
(``facefuse.client.quality``) are checked against ``FAST_TOLERANCE_MM``.

    PYTHONPATH=src .venv/bin/python benchmarks/study_sampler_quality.py [--identities 16] [--size small]
"""

from __future__ import annotations

import argparse
import time

import torch

from facefuse.assets.synthetic.flame import synthetic_flame_data
from facefuse.client.quality import FAST_TOLERANCE_MM, QUALITY_PRESETS
from facefuse.eval.sampler_quality import fused_gaps
from facefuse.fusion.space import ShapeSpace
from facefuse.models.diffusion import DEFAULT_DDIM_STEPS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=16)
    parser.add_argument("--size", default="small", choices=["small", "full"], help="synthetic FLAME size")
    parser.add_argument("--steps", default="5,8,10,15,20,25,30", help="DDIM step counts at 10 samples")
    parser.add_argument("--samples", default="3,5,8,20", help="sample counts at 40 steps")
    args = parser.parse_args()
    space = ShapeSpace.from_flame(synthetic_flame_data(args.size, torch.Generator().manual_seed(0)))
    settings = [("official", 0, 10)]
    settings += [("ddim", int(s), 10) for s in args.steps.split(",") if s]
    settings += [("ddim", DEFAULT_DDIM_STEPS, int(n)) for n in args.samples.split(",") if n]
    start = time.perf_counter()
    gaps = fused_gaps(space, settings, identities=args.identities)
    print(f"{args.identities} identities, synthetic FLAME '{args.size}' ({space.num_vertices} vertices), "
          f"{time.perf_counter() - start:.0f} s; reference: DDIM {DEFAULT_DDIM_STEPS} steps, 10 samples")
    print(f"{'sampler':<10}{'steps':>6}{'samples':>8}{'evals':>7}{'mean RMS mm':>13}{'max RMS mm':>12}")
    for gap in gaps:
        print(f"{gap.sampler:<10}{gap.steps:>6}{gap.samples:>8}{gap.steps:>7}{gap.mean_rms_mm:>13.3f}"
              f"{gap.max_rms_mm:>12.3f}")
    fast = QUALITY_PRESETS["fast"]
    (check,) = fused_gaps(space, [("ddim", fast.steps, fast.num_samples)], identities=args.identities)
    verdict = "within" if check.max_rms_mm <= FAST_TOLERANCE_MM else "NOT within"
    print(f"preset fast ({fast.steps} steps, {fast.num_samples} samples): max {check.max_rms_mm:.3f} mm, "
          f"{verdict} the {FAST_TOLERANCE_MM} mm tolerance")


if __name__ == "__main__":
    main()
