"""Benchmarks through the mesh: NoW per method and fusion strategy, and occlusion robustness.

Both benchmarks share one way of getting predictions, built so that comparing strategies costs one
pass of the expensive branches:

* **branch pass**: each image goes through the gateway once, ``method="fuse"`` with
  ``save_branches``; MICA's output (shape, mesh, 7 NoW points), OFER's samples and IdRank scores and
  the visibility estimate are cached per image (``OUT/cache/branches``);
* **re-fusion**: ``ofer`` and every strategy that only combines the branches (``linear``,
  ``gaussian``, ``region``, ``mica``, ``ofer``) is computed by calling the fusion service's ``Fuse``
  RPC directly with the cached branches: the same request the gateway would send;
* **steering strategies** (``pool``, ``sdedit``, ``guided``) change what the generator samples or
  how the ranker scores, so they need the ofer service again: those go through the gateway once
  more, per strategy.

Every prediction is cached too (``OUT/cache/pred/<entry>``), keyed by the image's bytes, the given
face box, the sampling settings and the mesh's backends, so a rerun resumes: cached items make no
gateway or fusion call. Cache files are npz, written atomically; an unreadable one counts as missing.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import sys
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import numpy as np

from facefuse import wire
from facefuse.errors import AssetError, FacefuseError, InvalidInputError
from facefuse.io.atomic import write_json_atomic, write_npy_atomic, write_npz_atomic, write_text_atomic
from facefuse.v1 import common_pb2, fusion_pb2, fusion_pb2_grpc, gateway_pb2

METHODS = ("mica", "ofer", "fuse")
STEERING_STRATEGIES = ("pool", "sdedit", "guided")
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


# ----------------------------------------------------------------------------------------------
# What is compared
# ----------------------------------------------------------------------------------------------


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
        return self.method == "fuse" and self.strategy in STEERING_STRATEGIES

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


# ----------------------------------------------------------------------------------------------
# Predictions, branches, the cache
# ----------------------------------------------------------------------------------------------


@dataclass
class Prediction:
    """One predicted face: mesh in mm, its 7 NoW points (mm), the shape coefficients."""

    vertices: np.ndarray  # (V, 3) float32 mm
    faces: np.ndarray  # (F, 3) int32
    kpt7: np.ndarray  # (7, 3) float32 mm
    topology: str
    shape: np.ndarray  # (K,) float32
    landmarks68: np.ndarray | None = None  # (68, 3) mm (flame pack)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"vertices": self.vertices, "faces": self.faces, "kpt7": self.kpt7, "shape": self.shape,
               "topology": np.array(self.topology)}
        if self.landmarks68 is not None:
            out["landmarks68"] = self.landmarks68
        return out

    @classmethod
    def from_arrays(cls, data: Any, prefix: str = "") -> "Prediction":
        lmk = f"{prefix}landmarks68"
        return cls(np.asarray(data[f"{prefix}vertices"], np.float32), np.asarray(data[f"{prefix}faces"], np.int32),
                   np.asarray(data[f"{prefix}kpt7"], np.float32), str(data[f"{prefix}topology"]),
                   np.asarray(data[f"{prefix}shape"], np.float32),
                   np.asarray(data[lmk], np.float32) if lmk in data else None)

    @classmethod
    def from_message(cls, shape: common_pb2.Tensor, mesh: common_pb2.Mesh, kpt7: common_pb2.Tensor,
                     landmarks68: common_pb2.Tensor | None, what: str) -> "Prediction":
        if not wire.has(mesh, "vertices") or not wire.has(mesh, "faces"):
            raise InvalidInputError(f"{what}: the result has no mesh")
        if kpt7 is None or not kpt7.shape:
            raise InvalidInputError(f"{what}: the result has no 7 NoW points (kpt7)")
        lmk = wire.to_numpy(landmarks68) if landmarks68 is not None and landmarks68.shape else None
        return cls(np.asarray(wire.to_numpy(mesh.vertices), np.float32), np.asarray(wire.to_numpy(mesh.faces), np.int32),
                   np.asarray(wire.to_numpy(kpt7), np.float32).reshape(7, 3), mesh.topology,
                   np.asarray(wire.to_numpy(shape), np.float32) if shape.shape else np.zeros(0, np.float32),
                   None if lmk is None else np.asarray(lmk, np.float32))


@dataclass
class Branches:
    """What one gateway pass returns that re-fusion needs: MICA, OFER's samples + scores, visibility."""

    mica: Prediction
    samples: np.ndarray  # (N, K) float32
    scores: np.ndarray  # (N,) float32
    visibility_regions: dict[str, float]
    visibility_sources: tuple[str, ...]
    box: np.ndarray  # (4,) px of the face used
    kps5: np.ndarray  # (5, 2) px
    visibility_per_vertex: np.ndarray | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        out = {f"mica_{k}": v for k, v in self.mica.arrays().items()}
        names = sorted(self.visibility_regions)
        out.update({"samples": self.samples, "scores": self.scores, "box": self.box, "kps5": self.kps5,
                    "visibility_names": np.array(names, dtype=str),
                    "visibility_values": np.array([self.visibility_regions[n] for n in names], np.float32),
                    "visibility_sources": np.array(list(self.visibility_sources), dtype=str)})
        if self.visibility_per_vertex is not None:
            out["visibility_per_vertex"] = self.visibility_per_vertex
        return out

    @classmethod
    def from_arrays(cls, data: Any) -> "Branches":
        names = [str(n) for n in data["visibility_names"]]
        values = np.asarray(data["visibility_values"], np.float32)
        return cls(Prediction.from_arrays(data, "mica_"), np.asarray(data["samples"], np.float32),
                   np.asarray(data["scores"], np.float32), {n: float(v) for n, v in zip(names, values)},
                   tuple(str(s) for s in data["visibility_sources"]), np.asarray(data["box"], np.float32),
                   np.asarray(data["kps5"], np.float32),
                   np.asarray(data["visibility_per_vertex"], np.float32) if "visibility_per_vertex" in data else None)

    def visibility_message(self) -> common_pb2.Visibility | None:
        if not self.visibility_regions and not self.visibility_sources and self.visibility_per_vertex is None:
            return None
        message = common_pb2.Visibility(regions=self.visibility_regions, sources=list(self.visibility_sources))
        if self.visibility_per_vertex is not None:
            message.per_vertex.CopyFrom(wire.from_numpy(self.visibility_per_vertex))
        return message


def branches_from_result(result: gateway_pb2.FaceResult) -> Branches:
    """The branches of a ``fuse`` + ``save_branches`` result."""
    by_name = {b.name: b.reconstruction for b in result.branches}
    rec = result.reconstruction
    if "mica" not in by_name:
        detail = f" ({rec.fallback})" if rec.fallback else ""
        raise InvalidInputError(f"{result.image_id}: the gateway returned no mica branch{detail}")
    mica = by_name["mica"]
    if not wire.has(rec, "samples"):
        raise InvalidInputError(f"{result.image_id}: the gateway returned no OFER samples")
    samples = np.asarray(wire.to_numpy(rec.samples), np.float32)
    scores = np.asarray(wire.to_numpy(rec.sample_scores), np.float32) if wire.has(rec, "sample_scores") \
        else np.zeros(len(samples), np.float32)
    face = result.face
    vis = rec.visibility if rec.HasField("visibility") else None
    return Branches(
        mica=Prediction.from_message(mica.shape, mica.mesh, mica.kpt7, mica.landmarks68, f"{result.image_id} mica branch"),
        samples=samples, scores=scores,
        visibility_regions={k: float(v) for k, v in (vis.regions.items() if vis is not None else [])},
        visibility_sources=tuple(vis.sources) if vis is not None else (),
        box=np.array([face.box.x1, face.box.y1, face.box.x2, face.box.y2], np.float32),
        kps5=np.asarray(wire.to_numpy(face.kps5), np.float32) if wire.has(face, "kps5") else np.zeros((5, 2), np.float32),
        visibility_per_vertex=np.asarray(wire.to_numpy(vis.per_vertex), np.float32)
        if vis is not None and wire.has(vis, "per_vertex") else None)


class BenchCache:
    """npz files under ``root``, one per (kind, key); keys hash everything that changes the content."""

    def __init__(self, root: Path, fingerprint: str) -> None:
        self.root = Path(root)
        self.fingerprint = fingerprint

    def key(self, data: bytes, *, box: Sequence[float] | None, mask: np.ndarray | None,
            settings: dict[str, Any] | None) -> str:
        digest = hashlib.sha256()
        digest.update(hashlib.sha256(data).digest())
        digest.update(json.dumps({"box": None if box is None else [round(float(v), 3) for v in box],
                                  "settings": settings, "mesh": self.fingerprint}, sort_keys=True).encode())
        if mask is not None:
            digest.update(hashlib.sha256(np.ascontiguousarray(mask, np.uint8).tobytes()).digest())
        return digest.hexdigest()[:32]

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / f"{key}.npz"

    def load(self, kind: str, key: str) -> dict[str, np.ndarray] | None:
        path = self.path(kind, key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError, zlib.error):
            return None  # a damaged cache file is recomputed

    def store(self, kind: str, key: str, arrays: dict[str, np.ndarray]) -> None:
        write_npz_atomic(self.path(kind, key), arrays)


# ----------------------------------------------------------------------------------------------
# The mesh: gateway stream with per-image options, direct fusion calls
# ----------------------------------------------------------------------------------------------


@dataclass
class GatewayJob:
    """One image for the gateway, with its own options (face box) and optional occluder mask."""

    job_id: str
    data: bytes
    box: tuple[float, float, float, float] | None = None
    mask: np.ndarray | None = None


@dataclass
class BenchCounters:
    gateway_images: int = 0
    fusion_calls: int = 0
    cached: int = 0
    failed: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"gateway_images": self.gateway_images, "fusion_calls": self.fusion_calls,
                "cached_items": self.cached, "failed_items": self.failed}


class MeshConnection:
    """The gateway and the fusion service of a running mesh, or a ``LocalMesh`` started for the run."""

    def __init__(self, *, gateway: str | None = None, fusion: str | None = None, local: bool = False,
                 assets: str | None = None, pack: str = "auto", timeout_s: float | None = None,
                 max_message_mb: int = 64) -> None:
        if local == (gateway is not None):
            raise InvalidInputError("pass either --gateway HOST:PORT or --local")
        self._local_args = {"assets": assets, "pack": pack} if local else None
        self._gateway_address = gateway
        self._fusion_address = fusion
        self.timeout_s = timeout_s
        self.max_message_mb = max_message_mb
        self.mesh: Any = None
        self.client: Any = None
        self._fusion_channel: grpc.Channel | None = None
        self.fusion: fusion_pb2_grpc.FusionServiceStub | None = None
        self.counters = BenchCounters()
        self.fingerprint = ""
        self.strategies: list[str] = []
        self.default_strategy = ""

    def __enter__(self) -> "MeshConnection":
        from facefuse.client.api import GatewayClient
        from facefuse.servers.base import channel_options

        try:
            if self._local_args is not None:
                from facefuse.servers.local import LocalMesh

                print("starting a local mesh...", file=sys.stderr, flush=True)
                self.mesh = LocalMesh(**self._local_args).start()
                self._gateway_address = self.mesh.gateway_address
                self._fusion_address = self.mesh.address("fusion")
            self.client = GatewayClient(self._gateway_address, timeout_s=self.timeout_s, max_message_mb=self.max_message_mb)
            self.client.wait_ready()
            info = self.client.info()
            self.fingerprint = json.dumps(sorted([b.service, b.backend, b.pack, b.message if not b.ready else "ready"]
                                                 for b in info.backends) + [info.front_end])
            if self._fusion_address:
                self._fusion_channel = grpc.insecure_channel(self._fusion_address,
                                                             options=channel_options(self.max_message_mb))
                self.fusion = fusion_pb2_grpc.FusionServiceStub(self._fusion_channel)
                listing = self._fusion_call(self.fusion.ListStrategies, fusion_pb2.ListStrategiesRequest())
                self.strategies = list(listing.names)
                self.default_strategy = listing.default_strategy
            else:
                from facefuse.fusion.strategies import DEFAULT_STRATEGY, strategy_names

                self.strategies, self.default_strategy = strategy_names(), DEFAULT_STRATEGY
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self._fusion_channel is not None:
            self._fusion_channel.close()
        if self.mesh is not None:
            self.mesh.stop()
            self.mesh = None

    def _fusion_call(self, fn: Any, request: Any) -> Any:
        from facefuse.servers.base import error_from_rpc

        try:
            return fn(request, timeout=self.timeout_s or 600.0)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"fusion service {self._fusion_address}") from None

    def process(self, jobs: Sequence[GatewayJob], method: str,
                options: dict[str, Any]) -> Iterator[tuple[GatewayJob, gateway_pb2.FaceResult]]:
        """Stream the jobs through the gateway, each with its own face box; results in completion order."""
        from facefuse.client.api import image_chunks, process_options
        from facefuse.servers.base import error_from_rpc

        by_id = {job.job_id: job for job in jobs}

        def chunks() -> Iterator[gateway_pb2.ImageChunk]:
            from facefuse.client.api import ImageInput

            for job in jobs:
                extra = {"boxes": [job.box]} if job.box is not None else {"selection": "largest"}
                self.counters.gateway_images += 1
                yield from image_chunks([ImageInput(job.job_id, job.data, job.mask)],
                                        process_options(method, **options, **extra))

        try:
            for result in self.client.stub.Process(chunks(), timeout=self.timeout_s):
                job = by_id.get(result.image_id)
                if job is not None:
                    yield job, result
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"gateway {self._gateway_address}") from None

    def fuse(self, strategy: str, branches: Branches, options: dict[str, float]) -> Prediction:
        """The fusion service's answer for cached branches: the request the gateway would send."""
        if self.fusion is None:
            raise InvalidInputError(f"re-fusing strategy {strategy!r} needs the fusion service: pass --fusion HOST:PORT "
                                    "(or use --local)")
        request = fusion_pb2.FuseRequest(strategy=strategy, options=options,
                                         samples=wire.from_numpy(branches.samples), scores=wire.from_numpy(branches.scores))
        if strategy != "ofer":  # the gateway's own ofer result is fused without MICA
            request.mica_shape.CopyFrom(wire.from_numpy(branches.mica.shape))
        visibility = branches.visibility_message()
        if visibility is not None:
            request.visibility.CopyFrom(visibility)
        reply = self._fusion_call(self.fusion.Fuse, request)
        self.counters.fusion_calls += 1
        return Prediction.from_message(reply.shape, reply.mesh, reply.kpt7, reply.landmarks68, f"fusion {strategy}")


# ----------------------------------------------------------------------------------------------
# Computing every entry's prediction for a set of images
# ----------------------------------------------------------------------------------------------


@dataclass
class PredictionSet:
    """entry name -> job id -> prediction; failures keep their message."""

    predictions: dict[str, dict[str, Prediction]] = field(default_factory=dict)
    failures: dict[str, dict[str, str]] = field(default_factory=dict)
    branches: dict[str, Branches] = field(default_factory=dict)

    def fail(self, entry: str, job_id: str, message: str) -> None:
        self.failures.setdefault(entry, {})[job_id] = message


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled or total == 0, file=sys.stderr, dynamic_ncols=True)


def _ok(result: gateway_pb2.FaceResult) -> bool:
    return result.face_index >= 0 and result.status.code == 0


def compute_predictions(conn: MeshConnection, cache: BenchCache, jobs: Sequence[GatewayJob], entries: Sequence[BenchEntry],
                        settings: SamplingSettings, *, progress: bool = True) -> PredictionSet:
    """Every entry's prediction for every job, from the cache where it is there (see the module doc)."""
    out = PredictionSet()
    refused = [e.name for e in entries if e.method != "mica" and not e.steered]
    if refused and conn.fusion is None:
        raise InvalidInputError(f"{', '.join(refused)} are re-fused from cached branches by the fusion service: "
                                "pass --fusion HOST:PORT (or use --local)")
    branch_settings = {k: v for k, v in settings.as_dict().items() if k != "strategy_options"}
    keys = {job.job_id: cache.key(job.data, box=job.box, mask=job.mask, settings=branch_settings) for job in jobs}
    options = dict(settings.strategy_options)
    pred_keys = {job.job_id: cache.key(job.data, box=job.box, mask=job.mask, settings=settings.as_dict()) for job in jobs}

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
        bar = _progress(len(to_run), "branches (gateway: mica + ofer)", progress)
        pass_options = {**settings.gateway_options(), "strategy": BRANCH_PASS_STRATEGY, "save_branches": True}
        try:
            for job, result in conn.process(to_run, "fuse", pass_options):
                if _ok(result):
                    try:
                        branches = branches_from_result(result)
                    except FacefuseError as exc:
                        _fail_all(out, entries, job.job_id, str(exc), conn)
                    else:
                        cache.store("branches", keys[job.job_id], branches.arrays())
                        out.branches[job.job_id] = branches
                else:
                    _fail_all(out, entries, job.job_id, _result_message(result), conn)
                bar.update(1)
        finally:
            bar.close()

    # 3. entries from the branches: mica directly, the others through the fusion service
    for entry in (e for e in entries if not e.steered):
        todo = [j for j in jobs if j.job_id not in out.predictions.get(entry.name, {}) and j.job_id in out.branches]
        bar = _progress(len(todo), f"{entry.name} ({entry.source})", progress)
        for job in todo:
            branches = out.branches[job.job_id]
            _keep(out, cache, conn, entry, job.job_id, pred_keys[job.job_id],
                  lambda: branches.mica if entry.method == "mica" else conn.fuse(entry.strategy or entry.method, branches, options))
            bar.update(1)
        bar.close()

    # 4. steering strategies: the gateway once more per strategy
    for entry in (e for e in entries if e.steered):
        todo = [j for j in jobs if j.job_id not in out.predictions.get(entry.name, {})
                and j.job_id not in out.failures.get(entry.name, {})]
        if not todo:
            continue
        bar = _progress(len(todo), f"{entry.name} ({entry.source})", progress)
        try:
            for job, result in conn.process(todo, "fuse", {**settings.gateway_options(), "strategy": entry.strategy}):
                _keep(out, cache, conn, entry, job.job_id, pred_keys[job.job_id],
                      lambda: _steered_prediction(result, f"{job.job_id} {entry.name}"))
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


def _steered_prediction(result: gateway_pb2.FaceResult, where: str) -> Prediction:
    rec = result.reconstruction
    if not _ok(result):
        raise InvalidInputError(_result_message(result))
    if rec.fallback:
        raise InvalidInputError(f"the gateway fell back: {rec.fallback}")
    return Prediction.from_message(rec.shape, rec.mesh, rec.kpt7, rec.landmarks68, where)


def _fail_all(out: PredictionSet, entries: Sequence[BenchEntry], job_id: str, message: str, conn: MeshConnection) -> None:
    conn.counters.failed += 1
    for entry in entries:
        if job_id not in out.predictions.get(entry.name, {}):
            out.fail(entry.name, job_id, message)


def _result_message(result: gateway_pb2.FaceResult) -> str:
    from facefuse.client.outputs import code_name

    return f"{code_name(result.status.code)}: {result.status.message}"


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


def _cell(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table, number columns right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [bool(rows) and all(row[i] is None or isinstance(row[i], (int, float)) for row in rows)
               for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if numeric[i] else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def write_table_files(out: Path, stem: str, headers: Sequence[str], rows: Sequence[Sequence[Any]],
                      summary: dict[str, Any]) -> dict[str, str]:
    """``stem.csv`` (the table) and ``stem.json`` (the summary), atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(headers)
    for row in rows:
        writer.writerow(["" if v is None or (isinstance(v, float) and not math.isfinite(v)) else
                         (f"{v:.6f}" if isinstance(v, float) else v) for v in row])
    csv_path = write_text_atomic(out / f"{stem}.csv", buffer.getvalue())
    json_path = write_json_atomic(out / f"{stem}.json", summary, sort_keys=False)
    return {"csv": str(csv_path), "json": str(json_path)}


def _check_settings(out: Path, name: str, settings: dict[str, Any]) -> None:
    """Outputs of one folder must come from one set of settings (the cache itself is keyed, files are not)."""
    path = out / name
    if path.is_file():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            previous = None
        if previous is not None and previous != json.loads(json.dumps(settings)):
            changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
            raise InvalidInputError(f"{out} holds a run with other settings ({', '.join(changed)} differ, see {path}); "
                                    "use another -o folder (the cache can be shared by copying OUT/cache)")
    write_json_atomic(path, settings)


def write_prediction_files(folder: Path, stem: str, prediction: Prediction) -> None:
    """NoW submission layout: ``stem.obj`` (mm) and ``stem.npy`` (7x3 mm)."""
    from facefuse.io.meshes import write_obj

    write_obj(folder / f"{stem}.obj", prediction.vertices, prediction.faces)
    write_npy_atomic(folder / f"{stem}.npy", prediction.kpt7.astype(np.float32))


# ----------------------------------------------------------------------------------------------
# NoW
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NowBenchConfig:
    dataset: Path
    out: Path
    methods: tuple[str, ...] = ("mica", "ofer", "fuse")
    strategies: tuple[str, ...] = ()
    split: str = "val"
    challenge: str = "all"  # all | neutral | expression | occlusion | selfie
    per_challenge: bool = False
    metrical: bool = False
    sampling: SamplingSettings = SamplingSettings()
    workers: int = 1
    limit: int | None = None
    progress: bool = True


def read_now_box(path: Path) -> tuple[float, float, float, float]:
    """A NoW ``detected_face`` file: a pickled dict with left/top/right/bottom (read without running code)."""
    from facefuse.assets.flame_file import restricted_unpickle

    what = "a NoW face box (.npy holding a dict with left, top, right, bottom)"
    try:
        array = np.load(path, allow_pickle=False)
        values = np.asarray(array, np.float64).reshape(-1)
    except ValueError:
        obj, _ = restricted_unpickle(path, what, allow_chumpy=False, header_npy=True)
        if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
            obj = obj.item()
        if not isinstance(obj, dict) or not {"left", "top", "right", "bottom"} <= set(obj):
            raise AssetError(f"{path}: not {what}") from None
        values = np.array([float(obj["left"]), float(obj["top"]), float(obj["right"]), float(obj["bottom"])])
    except OSError as exc:
        raise AssetError(f"{path}: unreadable ({exc})") from None
    if values.shape != (4,) or not np.all(np.isfinite(values)) or values[2] <= values[0] or values[3] <= values[1]:
        raise AssetError(f"{path}: not {what}: got {values.tolist()}")
    return tuple(float(v) for v in values)  # type: ignore[return-value]


def now_jobs(layout: Any, items: Sequence[Any]) -> tuple[list[GatewayJob], list[str]]:
    """Gateway jobs for NoW images (id = the list entry), with the dataset's face boxes; notes on what is off."""
    if layout.pictures is None:
        raise AssetError(f"no iphone_pictures/ folder under {layout.root}: the NoW images are needed")
    jobs, notes = [], []
    for item in items:
        path = layout.pictures / item.subject / item.challenge / item.image
        if not path.is_file():
            notes.append(f"{item.key}: image not found ({path})")
            continue
        box = None
        if layout.detected_faces is not None:
            box_path = layout.detected_faces / item.subject / item.challenge / f"{item.stem}.npy"
            if box_path.is_file():
                box = read_now_box(box_path)
        if box is None:
            notes.append(f"{item.key}: no detected_face box; the largest detected face is used")
        jobs.append(GatewayJob(item.key, path.read_bytes(), box))
    return jobs, notes


def subset_dataset(folder: Path, layout: Any, items: Sequence[Any], split: str) -> Path:
    """A NoW dataset view listing only ``items``: its own image list, links to the real scans."""
    from facefuse.eval.now import IMAGE_LISTS

    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / IMAGE_LISTS[split], "".join(f"{item.key}\n" for item in items))
    for name, target in (("scans", layout.scans), ("scans_lmks_onlypp", layout.scan_landmarks)):
        link = folder / name
        if target is not None and not link.exists():
            os.symlink(Path(target).resolve(), link, target_is_directory=True)
    return folder


def run_now_bench(config: NowBenchConfig, conn: MeshConnection) -> dict[str, Any]:
    """Predict the NoW images with every entry, evaluate each, return the comparison (and write it)."""
    from facefuse.eval.now import CHALLENGES, NowEvalConfig, NowLayout, run_now_evaluation

    if config.challenge != "all" and config.challenge not in CHALLENGES:
        raise InvalidInputError(f"--challenge {config.challenge!r}: expected all or one of {sorted(CHALLENGES)}")
    layout = NowLayout.discover(config.dataset, config.split)
    items = layout.images(None if config.challenge == "all" else CHALLENGES[config.challenge])
    dataset = Path(config.dataset)
    if config.limit is not None and config.limit < len(items):
        items = items[: config.limit]
        dataset = subset_dataset(Path(config.out) / "now_subset", layout, items, config.split)
    if not items:
        raise InvalidInputError(f"{layout.image_list} lists no image for challenge {config.challenge!r}")
    entries = bench_entries(config.methods, config.strategies, conn.strategies, conn.default_strategy)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, "bench_now_settings.json", {**config.sampling.as_dict(), "mesh": conn.fingerprint})
    jobs, notes = now_jobs(layout, items)
    cache = BenchCache(out / "cache", conn.fingerprint)
    preds = compute_predictions(conn, cache, jobs, entries, config.sampling, progress=config.progress)

    by_key = {item.key: item for item in items}
    rows, results = [], {}
    challenge_names = [c for c in CHALLENGES if config.challenge in ("all", c)]
    for entry in entries:
        folder = out / "predictions" / entry.name
        for job_id, prediction in preds.predictions.get(entry.name, {}).items():
            item = by_key[job_id]
            target = folder / item.subject / item.challenge
            if not (target / f"{item.stem}.obj").is_file() or not (target / f"{item.stem}.npy").is_file():
                write_prediction_files(target, item.stem, prediction)
        folder.mkdir(parents=True, exist_ok=True)
        eval_config = NowEvalConfig(dataset=dataset, predictions=folder, output=out / "eval" / entry.name,
                                    split=config.split, challenge=config.challenge, metrical=config.metrical, unit="mm",
                                    workers=config.workers, progress=config.progress)
        try:
            summary = run_now_evaluation(eval_config)
        except InvalidInputError as exc:  # nothing to evaluate for this entry
            summary = {"overall": {"median_mm": None, "mean_mm": None, "std_mm": None, "n_points": 0},
                       "per_challenge": {}, "n_images_evaluated": 0, "n_images_listed": len(items), "error": str(exc)}
        overall = summary["overall"]
        row: list[Any] = [entry.name, entry.source, f"{summary['n_images_evaluated']}/{summary['n_images_listed']}",
                          overall["median_mm"], overall["mean_mm"], overall["std_mm"]]
        if config.per_challenge:
            for name in challenge_names:
                st = summary["per_challenge"].get(name, {})
                row += [st.get("median_mm"), st.get("mean_mm"), st.get("std_mm")]
        rows.append(row)
        results[entry.name] = {
            "method": entry.method, "strategy": entry.strategy or None, "source": entry.source,
            "n_images_listed": summary["n_images_listed"], "n_images_evaluated": summary["n_images_evaluated"],
            "overall": overall, "per_challenge": summary["per_challenge"],
            "failed_predictions": preds.failures.get(entry.name, {}), "evaluation": str(out / "eval" / entry.name),
            **({"error": summary["error"]} if "error" in summary else {}),
        }
    headers = ["name", "source", "images", "median_mm", "mean_mm", "std_mm"]
    if config.per_challenge:
        headers += [f"{c}_{s}" for c in challenge_names for s in ("median_mm", "mean_mm", "std_mm")]
    topologies = sorted({p.topology for v in preds.predictions.values() for p in v.values()})
    summary_out = {
        "benchmark": "NoW", "split": config.split, "challenge": config.challenge,
        "variant": "metrical" if config.metrical else "non-metrical", "dataset": str(config.dataset),
        "settings": config.sampling.as_dict(), "topology": topologies, "mesh": conn.fingerprint,
        "counters": conn.counters.as_dict(), "notes": notes, "columns": headers, "rows": rows, "entries": results,
    }
    summary_out["files"] = write_table_files(out, "bench_now", headers, rows, summary_out)
    summary_out["table"] = format_table(headers, rows)
    return summary_out


# ----------------------------------------------------------------------------------------------
# Occlusion
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OcclusionBenchConfig:
    images: tuple[str, ...]
    out: Path
    methods: tuple[str, ...] = ("mica", "ofer", "fuse")
    strategies: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ("mask", "eye_band", "hand", "rectangle")
    coverages: tuple[float, ...] = (0.1, 0.2, 0.3)
    seed: int = 0
    sampling: SamplingSettings = SamplingSettings()
    now_dataset: Path | None = None
    split: str = "val"
    oracle_mask: bool = False
    assets: str | None = None
    workers: int = 1
    progress: bool = True


@dataclass(frozen=True)
class VariantSpec:
    label: str  # control | mask | eye_band | hand-0.20 | rectangle-0.10
    kind: str  # none for the control
    coverage: float | None  # requested (hand, rectangle)
    seed: int


def occluder_kinds(names: Sequence[str]) -> list[str]:
    kinds = []
    for name in names:
        if name not in OCCLUDER_ALIASES:
            raise InvalidInputError(f"--kinds: unknown occluder {name!r}; expected some of mask, band, hand, rect")
        kinds.append(OCCLUDER_ALIASES[name])
    return list(dict.fromkeys(kinds))


def variant_specs(kinds: Sequence[str], coverages: Sequence[float], seed: int) -> list[VariantSpec]:
    """The control plus one variant per landmark-placed kind and per (sized kind, coverage)."""
    for c in coverages:
        if not 0.0 < c <= 1.0:
            raise InvalidInputError(f"--coverage {c}: expected fractions of the face box in (0, 1]")
    specs = [VariantSpec(CONTROL_LABEL, "none", None, 0)]
    for kind in kinds:
        levels: list[float | None] = list(coverages) if kind in COVERAGE_KINDS else [None]
        for level in levels:
            label = kind if level is None else f"{kind}-{level:.2f}"
            # A stable seed per (run seed, variant): adding kinds or levels leaves the others unchanged.
            specs.append(VariantSpec(label, kind, level, (seed * 1_000_003 + zlib.crc32(label.encode())) % (2**31)))
    return specs


def _png_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="PNG")
    return buffer.getvalue()


def region_vertex_sets(topology: str, num_vertices: int, *, assets: str | None = None,
                       reference: Prediction | None = None) -> tuple[dict[str, np.ndarray], str]:
    """Vertex sets per face region for a topology, and where they come from.

    ``mediapipe468``: the open fusion space's regions (the visibility polygons on the canonical face).
    ``flame2020``: FLAME_masks.pkl from the assets folder when there; else landmark-defined sets
    (eyes, nose, mouth: vertices near the iBUG-68 groups of ``reference``); else overall only.
    """
    all_vertices = np.arange(num_vertices)
    if topology == "mediapipe468":
        from facefuse.assets.canonical_face import load_canonical_face
        from facefuse.packs.open import mediapipe_regions

        regions = mediapipe_regions(load_canonical_face())
        return {k: v for k, v in regions.items() if k in REGION_COLUMNS}, "fusion regions of the open pack (mediapipe468)"
    if topology == "flame2020":
        from facefuse.assets.registry import asset_path, assets_dir

        directory = assets_dir(assets)
        if directory is not None and asset_path(directory, "flame_masks").is_file():
            from facefuse.assets.flame_file import load_flame_masks

            masks = load_flame_masks(asset_path(directory, "flame_masks"), num_vertices=num_vertices)
            return {k: np.asarray(v) for k, v in masks.items() if k in REGION_COLUMNS}, "FLAME_masks.pkl (fusion regions)"
        if reference is not None and reference.landmarks68 is not None:
            lmk = reference.landmarks68
            radius = LANDMARK_REGION_RADIUS * float(np.linalg.norm(lmk[36] - lmk[45]))
            sets = {}
            for name, indices in LANDMARK_REGIONS.items():
                d = np.linalg.norm(reference.vertices[:, None, :] - lmk[list(indices)][None], axis=-1).min(axis=1)
                sets[name] = np.flatnonzero(d <= radius)
            return sets, (f"landmark-defined: vertices within {LANDMARK_REGION_RADIUS} x outer-eye distance of the "
                          "iBUG-68 eye/nose/mouth landmarks (no FLAME_masks.pkl)")
    return {"face": all_vertices}, f"overall only (no regions known for topology {topology!r})"


def vertex_distances(prediction: Prediction, reference: Prediction) -> np.ndarray:
    """(V,) mm: per-vertex distance between two predictions of one topology, in the model's own frame."""
    if prediction.vertices.shape != reference.vertices.shape:
        raise InvalidInputError(f"meshes differ: {prediction.vertices.shape} vs {reference.vertices.shape} vertices "
                                f"({prediction.topology} vs {reference.topology})")
    return np.linalg.norm(prediction.vertices.astype(np.float64) - reference.vertices.astype(np.float64), axis=1)


def rigid_distance_and_size(prediction: Prediction, reference: Prediction) -> tuple[float, float]:
    """Mean vertex distance (mm) left after the best rigid alignment onto the reference (what is not
    pose), and the prediction's size relative to the reference (1 / the best similarity scale)."""
    from facefuse.eval.procrustes import similarity_procrustes

    source, target = prediction.vertices.astype(np.float64), reference.vertices.astype(np.float64)
    rigid = similarity_procrustes(source, target, scale=1.0, reflection=False).transform
    similar = similarity_procrustes(source, target, reflection=False).transform
    return float(np.linalg.norm(rigid.apply(source) - target, axis=1).mean()), float(1.0 / similar.scale)


def _now_matches(now_dataset: Path | None, split: str, paths: Sequence[Path]) -> tuple[Any, dict[str, Any]]:
    """NoW entries of the images whose path ends with <subject>/<challenge>/<image>."""
    if now_dataset is None:
        return None, {}
    from facefuse.eval.now import NowLayout

    layout = NowLayout.discover(now_dataset, split)
    by_tail = {item.key: item for item in layout.images()}
    matches = {}
    for path in paths:
        tail = "/".join(Path(path).resolve().parts[-3:])
        if tail in by_tail:
            matches[str(path)] = by_tail[tail]
    return layout, matches


def run_occlusion_bench(config: OcclusionBenchConfig, conn: MeshConnection) -> dict[str, Any]:
    """Occluded variants of each photo through every entry; how far each shape moves from its own clean one."""
    from facefuse.client.inputs import collect_inputs
    from facefuse.eval.occlusion import occlude
    from facefuse.io.images import decode_image

    entries = bench_entries(config.methods, config.strategies, conn.strategies, conn.default_strategy)
    specs = variant_specs(occluder_kinds(config.kinds), config.coverages, config.seed)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, "bench_occlusion_settings.json",
                    {**config.sampling.as_dict(), "mesh": conn.fingerprint, "seed": config.seed,
                     "oracle_mask": config.oracle_mask})
    items = [item for item in collect_inputs(list(config.images)) if item.frame < 0]
    if not items:
        raise InvalidInputError(f"no image files in {', '.join(config.images)}")
    layout, now_items = _now_matches(config.now_dataset, config.split, [i.path for i in items])
    cache = BenchCache(out / "cache", conn.fingerprint)
    notes: list[str] = []

    # 1. face box + 5 points per photo (a detect pass; NoW photos use the dataset's box)
    originals: dict[str, bytes] = {}
    given: dict[str, tuple[float, float, float, float] | None] = {}
    for item in items:
        originals[item.image_id] = item.path.read_bytes()
        now_item = now_items.get(str(item.path))
        box = None
        if now_item is not None and layout.detected_faces is not None:
            box_path = layout.detected_faces / now_item.subject / now_item.challenge / f"{now_item.stem}.npy"
            box = read_now_box(box_path) if box_path.is_file() else None
        given[item.image_id] = box
    faces: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    detect_keys = {i: cache.key(d, box=given[i], mask=None, settings={"detect": True}) for i, d in originals.items()}
    to_detect = []
    for image_id, key in detect_keys.items():
        data = cache.load("detect", key)
        if data is not None:
            faces[image_id] = (data["box"], data["kps5"])
        else:
            to_detect.append(GatewayJob(image_id, originals[image_id], given[image_id]))
    if to_detect:
        bar = _progress(len(to_detect), "detect", config.progress)
        for job, result in conn.process(to_detect, "detect", {}):
            if _ok(result):
                box = np.array([result.face.box.x1, result.face.box.y1, result.face.box.x2, result.face.box.y2], np.float32)
                kps5 = np.asarray(wire.to_numpy(result.face.kps5), np.float32)
                cache.store("detect", detect_keys[job.job_id], {"box": box, "kps5": kps5})
                faces[job.job_id] = (box, kps5)
            else:
                notes.append(f"{job.job_id}: no face ({_result_message(result)}); left out")
            bar.update(1)
        bar.close()

    # 2. variants (written under OUT/variants for inspection) and their gateway jobs
    jobs: list[GatewayJob] = []
    variant_rows: dict[str, tuple[str, VariantSpec, float]] = {}  # job id -> (image id, spec, measured coverage)
    reference_ids: dict[str, str] = {}
    for item in items:
        if item.image_id not in faces:
            continue
        box, kps5 = faces[item.image_id]
        box_t = tuple(float(v) for v in box)
        reference_ids[item.image_id] = f"{item.image_id}|reference"
        jobs.append(GatewayJob(reference_ids[item.image_id], originals[item.image_id], box_t))
        rgb = decode_image(originals[item.image_id], source=item.image_id)
        for spec in specs:
            job_id = f"{item.image_id}|{spec.label}"
            try:
                if spec.kind == "none":
                    image, mask, coverage = rgb, None, 0.0
                else:
                    variant = occlude(rgb, box_t, kps5, spec.kind, coverage=spec.coverage, seed=spec.seed)
                    image, mask, coverage = variant.image, variant.mask, variant.coverage
            except FacefuseError as exc:
                notes.append(f"{item.image_id} {spec.label}: no variant ({exc})")
                continue
            data = _png_bytes(image)
            folder = out / "variants" / item.key
            if not (folder / f"{spec.label}.png").is_file():
                from facefuse.io.atomic import write_bytes_atomic

                write_bytes_atomic(folder / f"{spec.label}.png", data)
            wire_mask = (mask.astype(np.uint8) * 255) if (config.oracle_mask and mask is not None) else None
            jobs.append(GatewayJob(job_id, data, box_t, wire_mask))
            variant_rows[job_id] = (item.image_id, spec, coverage)

    preds = compute_predictions(conn, cache, jobs, entries, config.sampling, progress=config.progress)

    # 3. distances to each entry's own clean result, overall and per region
    region_sets: dict[tuple[str, int], tuple[dict[str, np.ndarray], str]] = {}
    per_image: list[dict[str, Any]] = []
    for entry in entries:
        got = preds.predictions.get(entry.name, {})
        for job_id, (image_id, spec, coverage) in variant_rows.items():
            reference = got.get(reference_ids[image_id])
            prediction = got.get(job_id)
            record: dict[str, Any] = {"name": entry.name, "image": image_id, "variant": spec.label, "kind": spec.kind,
                                      "coverage": spec.coverage, "measured_coverage": round(coverage, 4)}
            if reference is None or prediction is None:
                record["error"] = preds.failures.get(entry.name, {}).get(job_id) or \
                    preds.failures.get(entry.name, {}).get(reference_ids[image_id], "no prediction")
                per_image.append(record)
                continue
            topo_key = (reference.topology, len(reference.vertices))
            if topo_key not in region_sets:
                region_sets[topo_key] = region_vertex_sets(reference.topology, len(reference.vertices),
                                                           assets=config.assets, reference=reference)
            regions, _ = region_sets[topo_key]
            d = vertex_distances(prediction, reference)
            record["mean_mm"] = float(d.mean())
            record["max_mm"] = float(d.max())
            record["rigid_mm"], record["size_ratio"] = rigid_distance_and_size(prediction, reference)
            record["regions_mm"] = {name: float(d[idx].mean()) for name, idx in regions.items() if len(idx)}
            per_image.append(record)
    found = {r for sets, _ in region_sets.values() for r in sets}
    region_names = [r for r in REGION_COLUMNS if r in found] + sorted(found - set(REGION_COLUMNS))
    rows: list[list[Any]] = []
    for entry in entries:
        for spec in specs:
            every = [r for r in per_image if r["name"] == entry.name and r["variant"] == spec.label]
            records = [r for r in every if "mean_mm" in r]
            measured = [r["measured_coverage"] for r in every]

            def mean_of(name: str) -> float | None:
                return float(np.mean([r[name] for r in records])) if records else None

            row: list[Any] = [entry.name, spec.label, spec.coverage,
                              float(np.mean(measured)) if measured else None, f"{len(records)}/{len(every)}",
                              mean_of("mean_mm"), mean_of("rigid_mm"), mean_of("size_ratio")]
            for region in region_names:
                values = [r["regions_mm"][region] for r in records if region in r["regions_mm"]]
                row.append(float(np.mean(values)) if values else None)
            rows.append(row)
    headers = ["name", "variant", "coverage", "measured_coverage", "images", "mean_mm", "rigid_mm", "size_ratio",
               *[f"{r}_mm" for r in region_names]]

    # 4. NoW error per level, where the photos are NoW images with ground truth
    now_rows = _occlusion_now(config, conn, layout, now_items, items, entries, specs, preds, reference_ids, out) \
        if now_items else []
    summary = {
        "benchmark": "occlusion", "distance": "mean_mm and the region columns: mean per-vertex Euclidean distance (mm) "
        "to the same method's prediction for the clean photo, both in the model's canonical frame (no alignment); "
        "rigid_mm: the same after the best rigid alignment; size_ratio: the occluded prediction's size relative to "
        "the clean one (similarity scale)",
        "regions": {f"{t[0]}": src for t, (_, src) in region_sets.items()},
        "settings": {**config.sampling.as_dict(), "occluder_seed": config.seed, "oracle_mask": config.oracle_mask},
        "mesh": conn.fingerprint, "counters": conn.counters.as_dict(), "notes": notes,
        "columns": headers, "rows": rows, "per_image": per_image,
        "now": {"columns": ["name", "variant", "images", "median_mm", "mean_mm", "std_mm"], "rows": now_rows}
        if now_rows else None,
    }
    summary["files"] = write_table_files(out, "bench_occlusion", headers, rows, summary)
    summary["table"] = format_table(headers, rows)
    if now_rows:
        summary["now_table"] = format_table(summary["now"]["columns"], now_rows)
    return summary


def _occlusion_now(config: OcclusionBenchConfig, conn: MeshConnection, layout: Any, now_items: dict[str, Any],
                   items: Sequence[Any], entries: Sequence[BenchEntry], specs: Sequence[VariantSpec],
                   preds: PredictionSet, reference_ids: dict[str, str], out: Path) -> list[list[Any]]:
    """NoW errors of each entry at each occlusion level, on the matched NoW photos only."""
    from facefuse.eval.now import NowEvalConfig, run_now_evaluation

    matched = [(item, now_items[str(item.path)]) for item in items if str(item.path) in now_items]
    root = subset_dataset(out / "now" / "dataset", layout, [n for _, n in matched], config.split)
    levels = [("clean", None)] + [(s.label, s) for s in specs if s.kind != "none"]
    rows = []
    for entry in entries:
        got = preds.predictions.get(entry.name, {})
        for label, spec in levels:
            folder = out / "now" / "predictions" / label / entry.name
            written = 0
            for item, now_item in matched:
                job_id = reference_ids.get(item.image_id) if spec is None else f"{item.image_id}|{spec.label}"
                prediction = got.get(job_id) if job_id else None
                if prediction is not None:
                    write_prediction_files(folder / now_item.subject / now_item.challenge, now_item.stem, prediction)
                    written += 1
            if not written:
                rows.append([entry.name, label, f"0/{len(matched)}", None, None, None])
                continue
            summary = run_now_evaluation(NowEvalConfig(dataset=root, predictions=folder,
                                                       output=out / "now" / "eval" / label / entry.name,
                                                       split=config.split, workers=config.workers, progress=False))
            o = summary["overall"]
            rows.append([entry.name, label, f"{summary['n_images_evaluated']}/{summary['n_images_listed']}",
                         o["median_mm"], o["mean_mm"], o["std_mm"]])
    return rows
