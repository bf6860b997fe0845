"""The gateway's readiness follows its backends.

The gateway process can always answer, but a reconstruction needs mica, ofer and fusion ready (without
ofer it falls back to MICA, flagged per face). So the gateway's own health name is SERVING only while
every configured backend reports SERVING for its RPC service's health name (which a backend without its
model files reports NOT_SERVING). Compose's ``depends_on: service_healthy``, load balancers and
``facefuse.servers.probe`` then mean "ready to reconstruct"; the gateway's ``Info`` RPC says which
backend is not ready and why.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from facefuse.rpc.logs import log_event
from facefuse.v1 import fusion_pb2, mica_pb2, ofer_pb2

DEFAULT_INTERVAL_S = 2.0
DEFAULT_TIMEOUT_S = 1.5

BACKEND_HEALTH_NAMES = {
    "mica": mica_pb2.DESCRIPTOR.services_by_name["MicaService"].full_name,
    "ofer": ofer_pb2.DESCRIPTOR.services_by_name["OferService"].full_name,
    "fusion": fusion_pb2.DESCRIPTOR.services_by_name["FusionService"].full_name,
}
"""Backend -> the health name its server sets from its backend's readiness."""


class BackendReadiness:
    """Polls each backend's readiness and publishes whether all of them are SERVING.

    A backend that is not configured (no address) counts as not ready: the gateway cannot reconstruct
    without it. Polling (not the Watch stream) keeps one code path through backend restarts.
    """

    def __init__(self, channels: Mapping[str, grpc.Channel | None], *, interval_s: float = DEFAULT_INTERVAL_S,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        """``channels``: backend name -> the gateway's own channel to it (so replicas, TLS and the
        backend's name all match what the reconstructions use), or None when not configured."""
        unknown = set(channels) - set(BACKEND_HEALTH_NAMES)
        if unknown:
            raise ValueError(f"unknown backends {sorted(unknown)}; known: {sorted(BACKEND_HEALTH_NAMES)}")
        self.backends = list(channels)
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.not_ready: dict[str, str] = {name: "not checked yet" for name in self.backends}
        self._channels = {name: channel for name, channel in channels.items() if channel is not None}
        self._owned: list[grpc.Channel] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_addresses(cls, addresses: Mapping[str, str | None], **settings: float) -> BackendReadiness:
        """Plaintext channels of its own to each address (tests, tools)."""
        readiness = cls({name: grpc.insecure_channel(a) if a else None for name, a in addresses.items()}, **settings)
        readiness._owned = list(readiness._channels.values())
        return readiness

    @property
    def ready(self) -> bool:
        return not self.not_ready

    def check_once(self) -> bool:
        """Ask every backend once; returns (and remembers) whether all are SERVING."""
        not_ready: dict[str, str] = {}
        for name in self.backends:
            channel = self._channels.get(name)
            if channel is None:
                not_ready[name] = "not configured"
                continue
            try:
                stub = health_pb2_grpc.HealthStub(channel)
                status = stub.Check(health_pb2.HealthCheckRequest(service=BACKEND_HEALTH_NAMES[name]),
                                    timeout=self.timeout_s).status
            except grpc.RpcError as exc:
                not_ready[name] = f"unreachable ({exc.code().name})"
                continue
            if status != health_pb2.HealthCheckResponse.SERVING:
                not_ready[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        self.not_ready = not_ready
        return not not_ready

    def start(self, publish: Callable[[bool], None]) -> None:
        """Poll in a daemon thread; call ``publish`` with the first result and then on every change."""
        if self._thread is not None:
            raise RuntimeError("BackendReadiness already started")

        def loop() -> None:
            last: bool | None = None
            while True:
                ready = self.check_once()
                if ready != last:
                    publish(ready)
                    log_event("readiness", ready=ready, not_ready=self.not_ready)
                    last = ready
                if self._stop.wait(self.interval_s):
                    return

        self._thread = threading.Thread(target=loop, name="backend-readiness", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + self.timeout_s * len(self.backends) + 1)
        for channel in self._owned:  # the gateway's channels are the gateway's to close
            channel.close()
