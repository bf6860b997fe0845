"""Fusion profiles: a strategy and its options chosen on a validation set, written and read as JSON.

``facefuse bench now --tune`` writes one (see :mod:`facefuse.client.bench.tune`); the fusion service
loads one (``--fusion-profile``) and then uses that strategy, with those options as its defaults, for
every request that names no strategy (the gateway asks the fusion service for its default), and
shows the profile in ``Info``. The file records the validation numbers and the facefuse version it
came from, so a profile is never mistaken for a tested default.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facefuse.errors import AssetError, InvalidInputError
from facefuse.fusion.strategies import FusionStrategy, create_strategy

PROFILE_FORMAT = "facefuse-fusion-profile"
PROFILE_VERSION = 1
PROFILE_ENV = "FACEFUSE_FUSION_PROFILE"
"""Default of the fusion service's ``--fusion-profile`` (so a mesh started by other tools can pass it)."""
MAX_PROFILE_BYTES = 1 << 20


@dataclass(frozen=True)
class FusionProfile:
    strategy: str
    options: dict[str, float]
    validation: dict[str, Any] = field(default_factory=dict)
    facefuse_version: str = ""
    source: str = ""

    def create(self) -> FusionStrategy:
        """The strategy with the profile's options as its defaults (validated by the strategy itself)."""
        return create_strategy(self.strategy, **self.options)

    def as_dict(self) -> dict[str, Any]:
        return {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, "facefuse_version": self.facefuse_version,
                "strategy": self.strategy, "options": dict(self.options), "validation": self.validation}

    def info_details(self) -> dict[str, str]:
        """What the fusion service shows in ``Info``."""
        details = {"fusion_profile": self.source, "profile_strategy": self.strategy,
                   "profile_options": json.dumps(self.options, sort_keys=True),
                   "profile_facefuse_version": self.facefuse_version}
        for key in ("split", "images", "median_mm", "mean_mm"):
            if key in self.validation:
                details[f"profile_validation_{key}"] = str(self.validation[key])
        return details


def parse_profile(data: Any, source: str) -> FusionProfile:
    """Check a decoded profile: format, version, a known strategy, finite options it accepts."""
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
        raise InvalidInputError(f"{source}: not a facefuse fusion profile (format must be {PROFILE_FORMAT!r})")
    if data.get("version") != PROFILE_VERSION:
        raise InvalidInputError(f"{source}: profile version {data.get('version')!r}; this facefuse reads "
                                f"version {PROFILE_VERSION}")
    strategy, options = data.get("strategy"), data.get("options", {})
    if not isinstance(strategy, str) or not isinstance(options, dict):
        raise InvalidInputError(f"{source}: 'strategy' must be a name and 'options' a mapping of numbers")
    clean: dict[str, float] = {}
    for key, value in options.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidInputError(f"{source}: options[{key!r}] = {value!r} is not a finite number")
        clean[str(key)] = float(value)
    validation = data.get("validation", {})
    profile = FusionProfile(strategy, clean, validation if isinstance(validation, dict) else {},
                            str(data.get("facefuse_version", "")), source)
    profile.create()  # unknown strategy or option: InvalidInputError naming it
    return profile


def read_profile(path: str | os.PathLike[str]) -> FusionProfile:
    path = Path(path)
    try:
        if path.stat().st_size > MAX_PROFILE_BYTES:
            raise AssetError(f"{path}: {path.stat().st_size} bytes; a fusion profile is at most {MAX_PROFILE_BYTES}")
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AssetError(f"{path}: fusion profile not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise AssetError(f"{path}: not a readable JSON fusion profile ({exc})") from None
    return parse_profile(data, str(path))


def write_profile(path: str | os.PathLike[str], profile: FusionProfile) -> Path:
    from facefuse.io.atomic import write_json_atomic

    parse_profile(profile.as_dict(), str(path))  # never write one the service would refuse
    return write_json_atomic(Path(path), profile.as_dict(), sort_keys=False)
