"""Time OFER IdGen sampling per face on this CPU: the official 251-evaluation loop vs facefuse's DDIM.

Per face = N shape samples for one identity (N = 10 as gen_mod, N = 100 as OFER's demo), from the
same initial noise x_T for both samplers, so their outputs can be compared sample by sample. The
ArcFace context is computed once (batch 1, ``features`` applied) and is not part of the timings.

Weights are synthetic (official shapes; speed does not depend on the values). Shape differences on
synthetic weights say little about the real model (a random network is no denoiser), so a second
table compares the samplers with an *exact* ε-model: the analytic denoiser of Gaussian data
β ~ N(0, diag(s²)), with s_k falling from 2 to 0.1 like the spread of FLAME shape coefficients. There
DDIM with 1000 steps is the reference (it integrates the probability-flow ODE at the training grid).

    .venv/bin/python benchmarks/bench_idgen.py [--steps 50] [--sweep 10,25,50,100] [--threads 0]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from facefuse.assets.idgen_checkpoint import load_idgen
from facefuse.assets.synthetic.ofer_idgen import write_idgen_checkpoint
from facefuse.models.diffusion import (
    DEFAULT_DDIM_STEPS,
    DDIMSampler,
    OfficialSampler,
    SamplingTables,
    gaussian_data_eps,
)


def timed(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_DDIM_STEPS, help="DDIM steps of the fast sampler")
    parser.add_argument("--sweep", default="10,25,50,100", help="DDIM step counts for the N=10 sweep ('' to skip)")
    parser.add_argument("--sizes", default="10,100")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--checkpoint", type=Path, default=None, help="a model_idgen_flame20.tar (default: synthetic)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average at start {os.getloadavg()[0]:.1f}")

    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint
        if path is None:
            path = Path(tmp) / "model_idgen_flame20.tar"
            write_idgen_checkpoint(path, "small", torch.Generator().manual_seed(0))
        model = load_idgen(path)
    blob = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        context, wall, _ = timed(lambda: model.context(blob))
    print(f"ArcFace context (batch 1): {wall:.2f} s (not included below)")

    tables = SamplingTables.of(model.var_sched)
    header = (f"{'sampler':<22}{'N':>5}{'evals':>7}{'wall s':>9}{'CPU s':>8}{'ms/face':>10}{'speed-up':>10}"
              f"{'mean|Δβ|':>10}{'max|Δβ|':>9}{'mean|β|':>9}")
    print("\nSynthetic weights: official loop vs DDIM, same x_T (Δβ = β_fast − β_official)")
    print(header)
    for n in [int(v) for v in args.sizes.split(",") if v]:
        x_T = torch.randn(n, 300, generator=torch.Generator().manual_seed(n))
        official, w_off, c_off = timed(
            partial(model.sample, context, n, OfficialSampler(), torch.Generator().manual_seed(0), initial_noise=x_T)
        )
        print(
            f"{'official (251 evals)':<22}{n:>5}{251:>7}{w_off:>9.2f}{c_off:>8.2f}{1e3 * w_off:>10.0f}{'1.0x':>10}"
            f"{'':>10}{'':>9}{official.abs().mean():>9.3f}"
        )
        steps = [args.steps] + (
            [int(s) for s in args.sweep.split(",") if s and int(s) != args.steps] if n == 10 else []
        )
        for s in steps:
            fast, w, c = timed(partial(model.sample, context, n, DDIMSampler(s), initial_noise=x_T))
            diff = (fast - official).abs()
            print(f"{f'DDIM {s}':<22}{n:>5}{s:>7}{w:>9.2f}{c:>8.2f}{1e3 * w:>10.0f}{f'{w_off / w:.1f}x':>10}"
                  f"{diff.mean():>10.3f}{diff.max():>9.3f}{fast.abs().mean():>9.3f}")

    print("\nExact Gaussian-data ε (no network): error vs DDIM 1000 steps, N = 200, same x_T")
    sigma = torch.linspace(2.0, 0.1, 300, dtype=torch.float64)
    eps = gaussian_data_eps(tables, sigma)
    x_T = torch.randn(200, 300, generator=torch.Generator().manual_seed(3))
    reference = DDIMSampler(1000).sample(eps, tables, 200, initial_noise=x_T)
    print(f"{'sampler':<22}{'evals':>7}{'mean|Δβ|':>10}{'max|Δβ|':>9}{'std ratio':>11}")
    rows = [("official (251 evals)", 251, OfficialSampler().sample(eps, tables, 200, initial_noise=x_T))]
    for s in (10, 25, 40, 50, 100, 250):
        rows.append((f"DDIM {s}", s, DDIMSampler(s).sample(eps, tables, 200, initial_noise=x_T)))
    for name, evals, out in rows:
        diff = (out - reference).abs()
        ratio = (out.std(dim=0) / sigma).mean()
        print(f"{name:<22}{evals:>7}{diff.mean():>10.4f}{diff.max():>9.4f}{ratio:>11.3f}")
    print("(std ratio: per-coefficient sample std / true std, averaged; 1.0 = the data distribution)")


if __name__ == "__main__":
    main()
