"""What is compared: bench entries and sampling settings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from facefuse.errors import InvalidInputError

METHODS = ("mica", "ofer", "fuse")
"""Strategies that steer the sampler or ranker with MICA's shape: they need the ofer service again."""
BRANCH_PASS_STRATEGY = "mica"
"""Strategy of the gateway's branch pass: its own fused output is not used, so the cheapest one."""
OCCLUDER_ALIASES = {"band": "eye_band", "eyes": "eye_band", "rect": "rectangle", "eye_band": "eye_band",
                    "rectangle": "rectangle", "mask": "mask", "hand": "hand"}
COVERAGE_KINDS = ("hand", "rectangle")
"""Occluders sized by a coverage level; the others are placed by the landmarks."""
CONTROL_LABEL = "control"
"""The clean photo's own pixels, re-encoded as PNG like every variant: its distance to the reference
measures the pipeline's own noise (0 when the mesh is deterministic)."""
REGION_COLUMNS = ("face", "eye_region", "nose", "lips", "forehead", "left_cheek", "right_cheek")
LANDMARK_REGIONS = {"eyes": tuple(range(36, 48)), "nose": tuple(range(27, 36)), "mouth": tuple(range(48, 68))}
"""Fallback regions (FLAME topology without FLAME_masks.pkl): iBUG-68 landmark groups."""
LANDMARK_REGION_RADIUS = 0.3
"""A fallback region holds the vertices within this fraction of the outer-eye distance of its landmarks."""


@dataclass(frozen=True)
class BenchEntry:
    """One row of a comparison: a method, and for ``fuse`` a strategy."""

    method: str
    strategy: str = ""

    @property
    def name(self) -> str:
        return self.method if self.method != "fuse" else f"fuse-{self.strategy}"

    @property
    def steered(self) -> bool:
        """True when the strategy steers the sampler or ranker, so cached branches cannot be re-fused."""
        from facefuse.fusion.strategies import STRATEGIES

        strategy = STRATEGIES.get(self.strategy)
        return self.method == "fuse" and strategy is not None and strategy.steering({}, 1.0).mica_first

    @property
    def source(self) -> str:
        if self.method == "mica":
            return "mica branch (cached)"
        if self.steered:
            return "gateway again (steers the sampler/ranker)"
        return "fusion RPC on cached branches"


def parse_list(text: str | Sequence[str] | None) -> list[str]:
    """'a,b, c' -> ['a', 'b', 'c'] (order kept, duplicates dropped)."""
    if text is None:
        return []
    parts = text.split(",") if isinstance(text, str) else [p for t in text for p in str(t).split(",")]
    return list(dict.fromkeys(p.strip() for p in parts if p.strip()))


def bench_entries(methods: Sequence[str], strategies: Sequence[str], known_strategies: Sequence[str],
                  default_strategy: str) -> list[BenchEntry]:
    """Rows for the methods; ``fuse`` gives one row per strategy (the fusion service's default if none)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InvalidInputError(f"--methods: unknown {unknown}; expected some of {list(METHODS)}")
    if not methods:
        raise InvalidInputError("--methods: name at least one of mica, ofer, fuse")
    bad = [s for s in strategies if s not in known_strategies]
    if bad:
        raise InvalidInputError(f"--strategies: unknown {bad}; the fusion service knows {list(known_strategies)}")
    if strategies and "fuse" not in methods:
        raise InvalidInputError("--strategies needs method fuse in --methods")
    entries: list[BenchEntry] = []
    for method in methods:
        if method == "fuse":
            entries.extend(BenchEntry("fuse", s) for s in (strategies or [default_strategy]))
        else:
            entries.append(BenchEntry(method))
    return entries


@dataclass(frozen=True)
class SamplingSettings:
    """What changes the branches' outputs (and so the cache keys)."""

    num_samples: int = 10
    seed: int = 0
    steps: int = 0
    sampler: str = ""
    strategy_options: tuple[tuple[str, float], ...] = ()

    def gateway_options(self) -> dict[str, Any]:
        return {"num_samples": self.num_samples, "seed": self.seed, "steps": self.steps or None,
                "sampler_mode": self.sampler or None, "strategy_options": dict(self.strategy_options)}

    def as_dict(self) -> dict[str, Any]:
        return {"num_samples": self.num_samples, "seed": self.seed, "steps": self.steps, "sampler": self.sampler,
                "strategy_options": dict(self.strategy_options)}
