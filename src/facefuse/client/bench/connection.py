"""The mesh as the benchmarks use it: the gateway stream with per-image options, direct fusion calls."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc
import numpy as np

from facefuse import wire
from facefuse.client.bench.predictions import Branches, Prediction
from facefuse.errors import InvalidInputError
from facefuse.v1 import fusion_pb2, fusion_pb2_grpc, gateway_pb2

# The mesh: gateway stream with per-image options, direct fusion calls


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
                 max_message_mb: int = 64, det_thresh: float | None = None) -> None:
        if local == (gateway is not None):
            raise InvalidInputError("pass either --gateway HOST:PORT or --local")
        self._local = local
        self._assets = assets
        self._pack = pack
        self._gateway_address = gateway
        self._fusion_address = fusion
        self.timeout_s = timeout_s
        self.max_message_mb = max_message_mb
        self.det_thresh = det_thresh  # None: the gateway's; else sent with every image
        self.mesh: Any = None
        self.client: Any = None
        self._fusion_channel: grpc.Channel | None = None
        self.fusion: fusion_pb2_grpc.FusionServiceStub | None = None
        self.counters = BenchCounters()
        self.fingerprint = ""
        self.strategies: list[str] = []
        self.default_strategy = ""

    def __enter__(self) -> MeshConnection:
        from facefuse.client.api import GatewayClient
        from facefuse.rpc.options import channel_options

        try:
            if self._local:
                from facefuse.servers.local import LocalMesh

                print("starting a local mesh...", file=sys.stderr, flush=True)
                self.mesh = LocalMesh(assets=self._assets, pack=self._pack).start()
                self._gateway_address = self.mesh.gateway_address
                self._fusion_address = self.mesh.address("fusion")
            if self._gateway_address is None:
                raise InvalidInputError("no gateway: give --gateway ADDRESS or --local")
            self.client = GatewayClient(
                self._gateway_address, timeout_s=self.timeout_s, max_message_mb=self.max_message_mb
            )
            self.client.wait_ready()
            info = self.client.info()
            backends = sorted(
                [b.service, b.backend, b.pack, b.message if not b.ready else "ready"] for b in info.backends)
            # A different detection threshold can find other faces: cached branches must not be shared.
            self.fingerprint = json.dumps([*backends, info.front_end]
                                          + ([f"det_thresh={self.det_thresh}"] if self.det_thresh is not None else []))
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

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
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
        from facefuse.rpc.status import error_from_rpc

        try:
            return fn(request, timeout=self.timeout_s or 600.0)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"fusion service {self._fusion_address}") from None

    def process(self, jobs: Sequence[GatewayJob], method: str,
                options: dict[str, Any]) -> Iterator[tuple[GatewayJob, gateway_pb2.FaceResult]]:
        """Stream the jobs through the gateway, each with its own face box; results in completion order."""
        from facefuse.client.api import image_chunks, process_options
        from facefuse.rpc.status import error_from_rpc

        by_id = {job.job_id: job for job in jobs}

        def chunks() -> Iterator[gateway_pb2.ImageChunk]:
            from facefuse.client.api import ImageInput

            for job in jobs:
                extra: dict[str, Any] = {"boxes": [job.box]} if job.box is not None else {"selection": "largest"}
                if self.det_thresh is not None:
                    extra["det_thresh"] = self.det_thresh
                extra["neutral_only"] = True  # benchmarks evaluate the neutral shape: no posed-face fit
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
            raise InvalidInputError(
                f"re-fusing strategy {strategy!r} needs the fusion service: pass --fusion HOST:PORT (or use --local)"
            )
        request = fusion_pb2.FuseRequest(
            strategy=strategy,
            options=options,
            samples=wire.from_numpy(branches.samples),
            scores=wire.from_numpy(branches.scores),
        )
        if strategy != "ofer":  # the gateway's own ofer result is fused without MICA
            request.mica_shape.CopyFrom(wire.from_numpy(branches.mica.shape))
        visibility = branches.visibility_message()
        if visibility is not None:
            request.visibility.CopyFrom(visibility)
        reply = self._fusion_call(self.fusion.Fuse, request)
        self.counters.fusion_calls += 1
        return Prediction.from_message(reply.shape, reply.mesh, reply.kpt7, reply.landmarks68, f"fusion {strategy}")
