"""Computing every entry's prediction for a set of images: one branch pass, re-fusion, steered entries."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from facefuse.client.bench.connection import GatewayJob, MeshConnection
from facefuse.client.bench.entries import (
    BRANCH_PASS_STRATEGY,
    BenchEntry,
    SamplingSettings,
)
from facefuse.client.bench.predictions import (
    BenchCache,
    Branches,
    Prediction,
    branches_from_result,
)
from facefuse.errors import FacefuseError, InvalidInputError
from facefuse.v1 import gateway_pb2


@dataclass
class PredictionSet:
    """entry name -> job id -> prediction; failures keep their message."""

    predictions: dict[str, dict[str, Prediction]] = field(default_factory=dict)
    failures: dict[str, dict[str, str]] = field(default_factory=dict)
    branches: dict[str, Branches] = field(default_factory=dict)

    def fail(self, entry: str, job_id: str, message: str) -> None:
        self.failures.setdefault(entry, {})[job_id] = message


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total, desc=desc, unit="img", disable=not enabled or total == 0, file=sys.stderr, dynamic_ncols=True
    )


def result_ok(result: gateway_pb2.FaceResult) -> bool:
    return result.face_index >= 0 and result.status.code == 0


def branch_cache_key(cache: BenchCache, job: GatewayJob, settings: SamplingSettings) -> str:
    """The cache key of a job's branches: strategy options do not change them, so they are left out."""
    branch_settings = {k: v for k, v in settings.as_dict().items() if k != "strategy_options"}
    return cache.key(job.data, box=job.box, mask=job.mask, settings=branch_settings)


def compute_predictions(
    conn: MeshConnection,
    cache: BenchCache,
    jobs: Sequence[GatewayJob],
    entries: Sequence[BenchEntry],
    settings: SamplingSettings,
    *,
    progress: bool = True,
) -> PredictionSet:
    """Every entry's prediction for every job, from the cache where it is there (see the module doc)."""
    out = PredictionSet()
    refused = [e.name for e in entries if e.method != "mica" and not e.steered]
    if refused and conn.fusion is None:
        raise InvalidInputError(f"{', '.join(refused)} are re-fused from cached branches by the fusion service: "
                                "pass --fusion HOST:PORT (or use --local)")
    keys = {job.job_id: branch_cache_key(cache, job, settings) for job in jobs}
    options = dict(settings.strategy_options)
    pred_keys = {
        job.job_id: cache.key(job.data, box=job.box, mask=job.mask, settings=settings.as_dict()) for job in jobs
    }

    def cached_prediction(entry: BenchEntry, job: GatewayJob) -> Prediction | None:
        data = cache.load(f"pred/{entry.name}", pred_keys[job.job_id])
        return None if data is None else Prediction.from_arrays(data)

    # 1. which jobs still need anything: predictions cached for every entry need no branches
    need_branches: list[GatewayJob] = []
    for job in jobs:
        for entry in entries:
            hit = cached_prediction(entry, job)
            if hit is not None:
                out.predictions.setdefault(entry.name, {})[job.job_id] = hit
        missing = [e for e in entries if job.job_id not in out.predictions.get(e.name, {})]
        if any(not e.steered for e in missing):
            need_branches.append(job)
    out_of_cache = sum(len(v) for v in out.predictions.values())
    conn.counters.cached += out_of_cache

    # 2. branch pass for the jobs whose branches are not cached
    to_run = []
    for job in need_branches:
        data = cache.load("branches", keys[job.job_id])
        if data is not None:
            out.branches[job.job_id] = Branches.from_arrays(data)
        else:
            to_run.append(job)
    if to_run:
        bar = progress_bar(len(to_run), "branches (gateway: mica + ofer)", progress)
        pass_options = {**settings.gateway_options(), "strategy": BRANCH_PASS_STRATEGY, "save_branches": True}
        try:
            for job, result in conn.process(to_run, "fuse", pass_options):
                if result_ok(result):
                    try:
                        branches = branches_from_result(result)
                    except FacefuseError as exc:
                        _fail_all(out, entries, job.job_id, str(exc), conn)
                    else:
                        cache.store("branches", keys[job.job_id], branches.arrays())
                        out.branches[job.job_id] = branches
                else:
                    _fail_all(out, entries, job.job_id, result_message(result), conn)
                bar.update(1)
        finally:
            bar.close()

    # 3. entries from the branches: mica directly, the others through the fusion service
    for entry in (e for e in entries if not e.steered):
        todo = [j for j in jobs if j.job_id not in out.predictions.get(entry.name, {}) and j.job_id in out.branches]
        bar = progress_bar(len(todo), f"{entry.name} ({entry.source})", progress)
        for job in todo:
            branches = out.branches[job.job_id]
            _keep(
                out,
                cache,
                conn,
                entry,
                job.job_id,
                pred_keys[job.job_id],
                functools.partial(_prediction_from_branches, conn, entry, branches, options),
            )
            bar.update(1)
        bar.close()

    # 4. steering strategies: the gateway once more per strategy
    for entry in (e for e in entries if e.steered):
        todo = [j for j in jobs if j.job_id not in out.predictions.get(entry.name, {})
                and j.job_id not in out.failures.get(entry.name, {})]
        if not todo:
            continue
        bar = progress_bar(len(todo), f"{entry.name} ({entry.source})", progress)
        try:
            for job, result in conn.process(todo, "fuse", {**settings.gateway_options(), "strategy": entry.strategy}):
                _keep(out, cache, conn, entry, job.job_id, pred_keys[job.job_id],
                      functools.partial(_steered_prediction, result, f"{job.job_id} {entry.name}"))
                bar.update(1)
        finally:
            bar.close()
    return out


def _keep(out: PredictionSet, cache: BenchCache, conn: MeshConnection, entry: BenchEntry, job_id: str, key: str,
          compute: Callable[[], Prediction]) -> None:
    """Run one prediction: cache and record it, or record its failure (failures are not cached)."""
    try:
        prediction = compute()
    except FacefuseError as exc:
        out.fail(entry.name, job_id, str(exc))
        conn.counters.failed += 1
        return
    cache.store(f"pred/{entry.name}", key, prediction.arrays())
    out.predictions.setdefault(entry.name, {})[job_id] = prediction


def _prediction_from_branches(conn: MeshConnection, entry: BenchEntry, branches: Branches,
                        options: dict[str, float]) -> Prediction:
    """An entry's prediction from cached branches: MICA's as is, any other by re-fusing them."""
    return branches.mica if entry.method == "mica" else conn.fuse(entry.strategy or entry.method, branches, options)


def _steered_prediction(result: gateway_pb2.FaceResult, where: str) -> Prediction:
    rec = result.reconstruction
    if not result_ok(result):
        raise InvalidInputError(result_message(result))
    if rec.fallback:
        raise InvalidInputError(f"the gateway fell back: {rec.fallback}")
    return Prediction.from_message(rec.shape, rec.mesh, rec.kpt7, rec.landmarks68, where)


def _fail_all(
    out: PredictionSet, entries: Sequence[BenchEntry], job_id: str, message: str, conn: MeshConnection
) -> None:
    conn.counters.failed += 1
    for entry in entries:
        if job_id not in out.predictions.get(entry.name, {}):
            out.fail(entry.name, job_id, message)


def result_message(result: gateway_pb2.FaceResult) -> str:
    from facefuse.client.outputs import code_name

    return f"{code_name(result.status.code)}: {result.status.message}"
