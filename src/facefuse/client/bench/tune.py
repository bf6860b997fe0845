"""``bench now --tune``: choose the fusion strategy and options on the NoW validation split.

The branches (MICA's shape, OFER's samples and IdRank scores) come from one gateway pass per image,
cached like every bench run, so MICA and OFER run once; every candidate is then a fusion call per
image on the cached branches, measured with the NoW protocol in memory. The best candidate (lowest
median, then mean) is written as a fusion profile (:mod:`facefuse.fusion.profile`) that the fusion
service loads with ``--fusion-profile``.

Only strategies that do not steer the sampler or ranker are searched (``linear``, ``gaussian``,
``region``): the steering ones (``pool``, ``sdedit``, ``guided``) would need a gateway pass per
candidate. Only the validation split is accepted: the test split is for reporting, never tuning.

The report also measures how well IdRank selects among OFER's samples: ``ranked`` (IdRank's pick,
= ``ofer``), ``random`` (all samples pooled: the error distribution of a uniformly random pick) and
``oracle`` (per image the sample with the lowest median error, which needs the ground truth), and
the share of the random -> oracle gap the ranking closes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from facefuse.client.bench.connection import GatewayJob, MeshConnection
from facefuse.client.bench.entries import BenchEntry, SamplingSettings
from facefuse.client.bench.predictions import BenchCache, Branches, Prediction
from facefuse.client.bench.runner import branch_cache_key, compute_predictions, progress_bar
from facefuse.client.bench.tables import check_settings, format_table, write_table_files
from facefuse.errors import FacefuseError, InvalidInputError

TUNE_SPLIT = "val"
TUNE_GRID: dict[str, tuple[dict[str, float], ...]] = {
    "linear": tuple({"w": w} for w in (0.25, 0.5, 0.75)),
    "gaussian": tuple({"sigma_mica": s, "ofer_bias": b} for s in (0.1, 0.3, 1.0) for b in (0.1, 0.3, 1.0)),
    "region": tuple({"smooth": s} for s in (0.0, 2.0)),
}
"""Searched candidates (w = 0 and 1 of ``linear`` are the ofer and mica baselines, always reported)."""
SEED_BLEND = ("linear", {"w": 0.5})
"""The seed project's linear blend as a baseline: facefuse's ``linear`` at its default weight."""


@dataclass(frozen=True)
class NowTuneConfig:
    dataset: Path
    out: Path
    profile: Path | None = None  # default OUT/fusion_profile.json
    split: str = TUNE_SPLIT
    challenge: str = "all"
    metrical: bool = False
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    limit: int | None = None
    progress: bool = True


@dataclass
class _Scored:
    name: str
    kind: str  # baseline | candidate | selection
    strategy: str
    options: dict[str, float]
    errors: list[np.ndarray]
    failures: int = 0

    def stats(self) -> dict[str, Any]:
        from facefuse.eval.now import error_statistics

        pooled = np.concatenate(self.errors) if self.errors else np.zeros(0, np.float32)
        return {**error_statistics(pooled), "images": len(self.errors), "failed": self.failures}


def _options_text(options: dict[str, float]) -> str:
    return ",".join(f"{k}={v:g}" for k, v in sorted(options.items())) or "-"


def run_now_tune(config: NowTuneConfig, conn: MeshConnection) -> dict[str, Any]:
    """Search the grid on the validation split, write the profile, return the comparison (and write it)."""
    from facefuse import __version__
    from facefuse.client.bench.now import now_jobs
    from facefuse.eval.now import CHALLENGES, NowLayout, measure_prediction
    from facefuse.fusion.profile import FusionProfile, write_profile

    if config.split != TUNE_SPLIT:
        raise InvalidInputError(f"--tune searches on the validation split only (--split {TUNE_SPLIT}); the "
                                f"{config.split!r} split is for reporting results, never for tuning")
    if conn.fusion is None:
        raise InvalidInputError("--tune re-fuses cached branches with the fusion service: pass --fusion HOST:PORT "
                                "(or use --local)")
    if config.challenge != "all" and config.challenge not in CHALLENGES:
        raise InvalidInputError(f"--challenge {config.challenge!r}: expected all or one of {sorted(CHALLENGES)}")
    layout = NowLayout.discover(config.dataset, config.split)
    items = layout.images(None if config.challenge == "all" else CHALLENGES[config.challenge])
    if config.limit is not None:
        items = items[: config.limit]
    if not items:
        raise InvalidInputError(f"{layout.image_list} lists no image for challenge {config.challenge!r}")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    check_settings(out, "bench_now_settings.json", {**config.sampling.as_dict(), "mesh": conn.fingerprint})
    jobs, notes = now_jobs(layout, items)
    cache = BenchCache(out / "cache", conn.fingerprint)
    entries = [BenchEntry("mica"), BenchEntry("ofer")]
    preds = compute_predictions(conn, cache, jobs, entries, config.sampling, progress=config.progress)
    branches = _all_branches(cache, jobs, preds.branches, config.sampling)
    by_key = {item.key: item for item in items}

    def measure(job_id: str, prediction: Prediction) -> np.ndarray:
        return measure_prediction(layout, by_key[job_id], prediction.vertices, prediction.faces, prediction.kpt7,
                                  metrical=config.metrical)

    rows: list[_Scored] = []
    for entry in entries:
        scored = _Scored(f"{entry.name} alone", "baseline", entry.name, {}, [])
        for job_id, prediction in preds.predictions.get(entry.name, {}).items():
            _add(scored, lambda: measure(job_id, prediction))  # noqa: B023 - called at once
        scored.failures += len(preds.failures.get(entry.name, {}))
        rows.append(scored)

    # IdRank's selection among the samples: ranked vs random vs oracle
    ranked = _Scored("ofer ranked (IdRank pick)", "selection", "ofer", {}, [])
    random_pick = _Scored("ofer random pick (all samples pooled)", "selection", "ofer", {}, [])
    oracle = _Scored("ofer oracle pick (best sample by ground truth)", "selection", "ofer", {}, [])
    bar = progress_bar(len(branches), "samples (fusion: one mesh per sample)", config.progress)
    for job_id, branch in branches.items():
        try:
            per_sample = [measure(job_id, conn.fuse("ofer", replace(branch, samples=branch.samples[i:i + 1],
                                                                    scores=np.zeros(1, np.float32)), {}))
                          for i in range(len(branch.samples))]
        except FacefuseError:
            for scored in (ranked, random_pick, oracle):
                scored.failures += 1
        else:
            ranked.errors.append(per_sample[int(np.argmax(branch.scores))])
            random_pick.errors.append(np.concatenate(per_sample))
            oracle.errors.append(per_sample[int(np.argmin([np.median(e) for e in per_sample]))])
        bar.update(1)
    bar.close()

    candidates = [(strategy, options) for strategy, grid in TUNE_GRID.items() if strategy in conn.strategies
                  for options in grid]
    searched: list[_Scored] = []
    bar = progress_bar(len(candidates) * len(branches), "candidates (fusion on cached branches)", config.progress)
    for strategy, options in candidates:
        is_seed = (strategy, options) == SEED_BLEND
        scored = _Scored(f"{strategy} {_options_text(options)}" + (" (seed's linear blend)" if is_seed else ""),
                         "candidate", strategy, dict(options), [])
        for job_id, branch in branches.items():
            _add(scored, lambda: measure(job_id, conn.fuse(strategy, branch, options)))  # noqa: B023
            bar.update(1)
        searched.append(scored)
    bar.close()
    complete = [s for s in searched if s.failures == 0 and s.errors]
    if not complete:
        raise InvalidInputError("no fusion candidate could be measured on every image; see the table: "
                                + "; ".join(f"{s.name}: {s.failures} failed" for s in searched))
    best = min(complete, key=lambda s: (s.stats()["median_mm"], s.stats()["mean_mm"]))
    best_stats = best.stats()

    validation = {"benchmark": "NoW", "split": config.split, "challenge": config.challenge,
                  "variant": "metrical" if config.metrical else "non-metrical", "dataset": str(config.dataset),
                  "images": best_stats["images"], "median_mm": best_stats["median_mm"],
                  "mean_mm": best_stats["mean_mm"], "std_mm": best_stats["std_mm"],
                  "settings": config.sampling.as_dict(), "mesh": conn.fingerprint,
                  "baselines": {s.name: s.stats() for s in rows}}
    profile = FusionProfile(best.strategy, best.options, validation, __version__)
    profile_path = write_profile(config.profile or out / "fusion_profile.json", profile)

    gap = _gap_closed(random_pick.stats(), ranked.stats(), oracle.stats())
    headers = ["name", "kind", "strategy", "options", "images", "failed", "median_mm", "mean_mm", "std_mm"]
    table_rows = []
    for scored in [*rows, *(s for s in searched if s.strategy == "linear" and s.options == SEED_BLEND[1]),
                   ranked, random_pick, oracle, *searched]:
        st = scored.stats()
        chosen = " <- chosen" if scored is best else ""
        table_rows.append([scored.name + chosen, scored.kind, scored.strategy, _options_text(scored.options),
                           st["images"], st["failed"], st["median_mm"], st["mean_mm"], st["std_mm"]])
    summary = {
        "benchmark": "NoW", "mode": "tune", "split": config.split, "challenge": config.challenge,
        "tuned_on": f"the {config.split} split ({len(items)} listed images); the test split is never used for tuning",
        "dataset": str(config.dataset), "settings": config.sampling.as_dict(), "mesh": conn.fingerprint,
        "counters": conn.counters.as_dict(), "notes": notes, "columns": headers, "rows": table_rows,
        "chosen": {"strategy": best.strategy, "options": best.options, **best_stats},
        "selection": {"ranked": ranked.stats(), "random": random_pick.stats(), "oracle": oracle.stats(),
                      "gap_closed": gap},
        "profile": str(profile_path),
    }
    summary["files"] = write_table_files(out, "bench_now_tune", headers, table_rows, summary)
    summary["table"] = format_table(headers, table_rows)
    return summary


def _add(scored: _Scored, compute: Any) -> None:
    try:
        scored.errors.append(compute())
    except FacefuseError:
        scored.failures += 1


def _gap_closed(random: dict[str, Any], ranked: dict[str, Any], oracle: dict[str, Any]) -> float | None:
    """(random − ranked) / (random − oracle) on the median: 1 = IdRank picks like the oracle, 0 = like chance."""
    r, k, o = random.get("median_mm"), ranked.get("median_mm"), oracle.get("median_mm")
    if r is None or k is None or o is None:
        return None
    return None if r - o <= 1e-12 else (r - k) / (r - o)


def _all_branches(cache: BenchCache, jobs: Sequence[GatewayJob], loaded: dict[str, Branches],
                  settings: SamplingSettings) -> dict[str, Branches]:
    """Every job's branches: those the run loaded, else the cache (a rerun may not have needed them)."""
    out: dict[str, Branches] = {}
    for job in jobs:
        if job.job_id in loaded:
            out[job.job_id] = loaded[job.job_id]
            continue
        data = cache.load("branches", branch_cache_key(cache, job, settings))
        if data is not None:
            out[job.job_id] = Branches.from_arrays(data)
    return out
