"""The --quality presets: one mapping onto the request options, and the tolerance that chose ``fast``."""

from __future__ import annotations

import argparse

import pytest
import torch

from facefuse.assets.synthetic.flame import synthetic_flame_data
from facefuse.client.commands.bench import _sampling
from facefuse.client.quality import FAST_TOLERANCE_MM, QUALITY_PRESETS, sampling_options
from facefuse.errors import InvalidInputError
from facefuse.eval.sampler_quality import fused_gaps
from facefuse.fusion.space import ShapeSpace


def test_presets_map_onto_the_request_options_and_explicit_flags_win() -> None:
    assert sampling_options(None, samples=None, steps=None, sampler=None) == (None, None, None)
    assert sampling_options(None, samples=7, steps=12, sampler="official") == (7, 12, "official")
    assert sampling_options("fast", samples=None, steps=None, sampler=None) == (10, 20, "fast")
    assert sampling_options("default", samples=None, steps=None, sampler=None) == (10, None, "fast")
    assert sampling_options("official", samples=None, steps=None, sampler=None) == (10, None, "official")
    assert sampling_options("fast", samples=30, steps=25, sampler=None) == (30, 25, "fast")
    with pytest.raises(InvalidInputError, match="quality"):
        sampling_options("turbo", samples=None, steps=None, sampler=None)


def test_bench_sampling_settings_use_the_preset() -> None:
    args = argparse.Namespace(quality="fast", samples=None, steps=0, sampler="", seed=3, option=[], workers=1)
    settings = _sampling(args)
    assert (settings.num_samples, settings.steps, settings.sampler, settings.seed) == (10, 20, "fast", 3)
    args = argparse.Namespace(quality=None, samples=None, steps=0, sampler="", seed=0, option=[], workers=1)
    settings = _sampling(args)
    assert (settings.num_samples, settings.steps, settings.sampler) == (10, 0, "")


def test_fast_preset_within_tolerance_of_the_default_on_the_exact_denoiser() -> None:
    space = ShapeSpace.from_flame(synthetic_flame_data("small", torch.Generator().manual_seed(0)))
    fast = QUALITY_PRESETS["fast"]
    chosen, fewer_steps, fewer_samples = fused_gaps(
        space, [("ddim", fast.steps, fast.num_samples), ("ddim", 15, 10), ("ddim", 40, 5)], identities=4, seed=1
    )
    assert 0 < chosen.max_rms_mm <= FAST_TOLERANCE_MM
    # the next cheaper settings break the tolerance: 20 steps is the cheapest step count that keeps it
    assert fewer_steps.mean_rms_mm > FAST_TOLERANCE_MM
    assert fewer_samples.mean_rms_mm > 5 * FAST_TOLERANCE_MM


def test_reconstruct_sends_the_preset_in_the_request_options(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from facefuse.client import cli

    sent: list[dict[str, object]] = []
    monkeypatch.setattr(cli, "_run", lambda args, method, options: sent.append(options) or 0)
    monkeypatch.setattr(cli, "_write_report", lambda out: None)
    assert cli.main(["reconstruct", "photo.jpg", "-o", str(tmp_path), "--quality", "fast"]) == 0
    assert cli.main(["reconstruct", "photo.jpg", "-o", str(tmp_path), "--quality", "official", "--samples", "4"]) == 0
    assert cli.main(["reconstruct", "photo.jpg", "-o", str(tmp_path)]) == 0
    picked = [(o["num_samples"], o["steps"], o["sampler_mode"]) for o in sent]
    assert picked == [(10, 20, "fast"), (4, None, "official"), (None, None, None)]
