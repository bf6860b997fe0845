"""Deploy files: compose validated statically (no Docker engine here), one image per service."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGES = {"mica": "services/mica", "ofer": "services/ofer", "fusion": "services/fusion", "gateway": "gateway"}


def _compose_binary() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


def test_compose_file_is_valid() -> None:
    binary = _compose_binary()
    if binary is None:
        pytest.skip("docker-compose is not installed (.ci/run installs Debian's docker-compose)")
    result = subprocess.run([*binary, "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    config = result.stdout
    for service in IMAGES:
        assert re.search(rf"^  {service}:$", config, re.M), f"service {service} missing"
    assert config.count("read_only: true") >= 4 or config.count(":/assets:ro") >= 4, "assets must be mounted read-only"
    assert config.count("capabilities:") >= 2 and "driver: nvidia" in config  # GPU reservations for mica and ofer
    assert config.count("healthcheck:") == 4


@pytest.mark.parametrize("name,folder", IMAGES.items())
def test_each_service_has_its_own_image_and_dependencies(name: str, folder: str) -> None:
    dockerfile = (ROOT / folder / "Dockerfile").read_text()
    assert f"facefuse.servers.{name}" in dockerfile and "HEALTHCHECK" in dockerfile
    requirements = (ROOT / folder / "requirements.txt").read_text().split()
    assert {"grpcio", "grpcio-health-checking", "grpcio-reflection", "protobuf"} <= set(requirements)
    if name == "gateway":
        assert "torch" not in requirements and "insightface" in requirements
    else:
        assert "torch" in requirements and "insightface" not in requirements


def test_gateway_code_path_imports_no_torch() -> None:
    code = ("import sys, facefuse.servers.gateway, facefuse.pipeline.orchestration, facefuse.face.frontend;"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
