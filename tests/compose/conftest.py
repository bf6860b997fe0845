"""Fixtures of the container test (make test-compose); collected only with ``pytest --compose``
(tests/conftest.py), since they build images and start containers."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from compose_harness import (
    BUILD_TIMEOUT_S,
    HEALTHY_TIMEOUT_S,
    PORT_VARIABLES,
    PROJECT,
    SERVICES,
    ComposeMesh,
    free_port,
    no_engine,
)


@pytest.fixture(scope="session")
def docker_client() -> Any:
    try:
        import docker
    except ImportError:
        no_engine("the docker SDK is not installed")
    try:
        client = docker.from_env(timeout=300)
        client.ping()
    except Exception as exc:
        no_engine(f"no Docker API at {os.environ.get('DOCKER_HOST', 'the default socket')} ({exc})")
    return client


@pytest.fixture(scope="session")
def compose_mesh(docker_client: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeMesh]:
    """Build the images, `up -d` the default compose file (open pack: an empty assets folder), wait healthy;
    afterwards `down -v` and check that nothing of the project is left."""
    assets = tmp_path_factory.mktemp("assets-empty")
    assets.chmod(0o755)
    ports = {name: free_port() for name in SERVICES}
    env = {**os.environ, "FACEFUSE_ASSETS": str(assets), **{PORT_VARIABLES[n]: str(p) for n, p in ports.items()}}
    # docker-compose v1 gives up on an engine that stays silent 60 s (a long build step on a loaded machine).
    env.setdefault("COMPOSE_HTTP_TIMEOUT", "900")
    env.pop("FACEFUSE_BIND", None)
    mesh = ComposeMesh(docker_client, ports, assets, env)
    mesh.compose("down", "-v", "-t", "0", "--remove-orphans", timeout=300)  # leftovers of an interrupted run
    try:
        started = time.monotonic()
        mesh.compose("build", timeout=BUILD_TIMEOUT_S)
        mesh.timings["build_s"] = time.monotonic() - started
        started = time.monotonic()
        mesh.compose("up", "-d", "--no-build", timeout=HEALTHY_TIMEOUT_S)
        mesh.timings["healthy_s"] = mesh.wait_healthy() + (time.monotonic() - started)
        yield mesh
    finally:
        mesh.compose("down", "-v", "-t", "10", "--remove-orphans", timeout=300)
        left = mesh.containers()
        volumes = docker_client.volumes.list(filters={"label": f"com.docker.compose.project={PROJECT}"})
        print(f"\ncompose timings: {', '.join(f'{k} {v:.0f} s' for k, v in mesh.timings.items())}")
        assert not left and not volumes, (
            f"down -v left containers {sorted(left)} and volumes {[v.name for v in volumes]}"
        )
