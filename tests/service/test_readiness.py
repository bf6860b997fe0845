"""The gateway's readiness follows its backends (real health servers on loopback)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from grpc_health.v1 import health_pb2

from facefuse.servers.base import RunningServer, ServerOptions, start_server
from facefuse.servers.local import health_status
from facefuse.servers.readiness import BACKEND_HEALTH_NAMES, BackendReadiness

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
GATEWAY = "facefuse.v1.Gateway"


def _backend(name: str, ready: bool) -> RunningServer:
    """A server with only health and reflection, reporting the backend's readiness name."""
    return start_server(
        lambda server: None, [BACKEND_HEALTH_NAMES[name]], ServerOptions(), {BACKEND_HEALTH_NAMES[name]: ready}
    )


def _eventually(check: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


@pytest.fixture
def backends() -> Iterator[dict[str, RunningServer]]:
    servers = {name: _backend(name, ready=True) for name in BACKEND_HEALTH_NAMES}
    yield servers
    for server in servers.values():
        server.stop(0)


def test_gateway_health_name_follows_its_backends(backends: dict[str, RunningServer]) -> None:
    readiness = BackendReadiness.from_addresses(
        {n: f"127.0.0.1:{s.port}" for n, s in backends.items()}, interval_s=0.1, timeout_s=1.0
    )
    gateway = start_server(lambda server: None, [GATEWAY], ServerOptions(), {GATEWAY: readiness})
    address = f"127.0.0.1:{gateway.port}"
    try:
        assert health_status(address) == SERVING  # liveness never depends on the backends
        assert _eventually(lambda: health_status(address, GATEWAY) == SERVING)

        backends["ofer"].set_ready(BACKEND_HEALTH_NAMES["ofer"], False)  # e.g. its model files went missing
        assert _eventually(lambda: health_status(address, GATEWAY) == NOT_SERVING)
        assert readiness.not_ready == {"ofer": "NOT_SERVING"}
        backends["ofer"].set_ready(BACKEND_HEALTH_NAMES["ofer"], True)
        assert _eventually(lambda: health_status(address, GATEWAY) == SERVING)

        backends["fusion"].stop(0)  # gone entirely
        assert _eventually(lambda: health_status(address, GATEWAY) == NOT_SERVING)
        assert set(readiness.not_ready) == {"fusion"} and readiness.not_ready["fusion"].startswith("unreachable")
        assert health_status(address) == SERVING
    finally:
        readiness.stop()
        gateway.stop(0)


def test_an_unconfigured_backend_means_not_ready(backends: dict[str, RunningServer]) -> None:
    readiness = BackendReadiness.from_addresses(
        {"mica": f"127.0.0.1:{backends['mica'].port}", "ofer": None, "fusion": None}
    )
    try:
        assert readiness.check_once() is False
        assert readiness.not_ready == {"ofer": "not configured", "fusion": "not configured"}
    finally:
        readiness.stop()


def test_unknown_backend_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown backends"):
        BackendReadiness.from_addresses({"gateway": "127.0.0.1:1"})
