"""Fusion profiles: what bench now --tune writes is what the fusion service reads; anything else is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from facefuse.errors import AssetError, InvalidInputError
from facefuse.fusion.profile import PROFILE_FORMAT, FusionProfile, read_profile, write_profile


def test_roundtrip_and_strategy_defaults(tmp_path: Path) -> None:
    profile = FusionProfile("gaussian", {"sigma_mica": 1.0, "ofer_bias": 0.1}, {"split": "val", "median_mm": 1.2},
                            "0.1.0")
    path = write_profile(tmp_path / "p.json", profile)
    loaded = read_profile(path)
    assert (loaded.strategy, loaded.options, loaded.validation, loaded.facefuse_version) == (
        profile.strategy, profile.options, profile.validation, profile.facefuse_version)
    strategy = loaded.create()
    assert strategy.params["sigma_mica"] == 1.0 and strategy.params["ofer_bias"] == 0.1
    assert strategy.params["occlusion_gain"] == 1.0  # untouched options keep the strategy's defaults
    details = loaded.info_details()
    assert details["fusion_profile"] == str(path) and details["profile_validation_median_mm"] == "1.2"


@pytest.mark.parametrize(("change", "message"), [
    ({"format": "other"}, "not a facefuse fusion profile"),
    ({"version": 2}, "version 2"),
    ({"strategy": "nope"}, "unknown fusion strategy 'nope'"),
    ({"options": {"w": float("nan")}}, "not a finite number"),
    ({"options": {"w": True}}, "not a finite number"),
    ({"options": {"bogus": 1.0}}, "bogus"),
    ({"options": [1, 2]}, "mapping of numbers"),
])
def test_bad_profiles_are_refused(tmp_path: Path, change: dict, message: str) -> None:
    data = {"format": PROFILE_FORMAT, "version": 1, "strategy": "linear", "options": {"w": 0.5}, **change}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InvalidInputError, match=message):
        read_profile(path)


def test_unreadable_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(AssetError, match="not found"):
        read_profile(tmp_path / "absent.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(AssetError, match="not a readable JSON"):
        read_profile(broken)
    with pytest.raises(InvalidInputError):  # never written when the service would refuse it
        write_profile(tmp_path / "bad.json", FusionProfile("linear", {"w": float("inf")}))
    assert not (tmp_path / "bad.json").exists()
