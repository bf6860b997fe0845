"""Outside tools the output tests need: the Khronos glTF validator (npm) and headless Chromium (apt).

Each is installed by the test set-up when missing: the validator with npm into facefuse's cache folder
(``$FACEFUSE_HOME/node``, default ``~/.cache/facefuse/node``), Chromium with ``apt-get`` when the tests
run as root. Where that is impossible the test is skipped with the reason, unless
``FACEFUSE_REQUIRE_TOOLS=1`` (set by .ci/run): then it fails, so CI never passes without these checks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from facefuse.assets.idgen_checkpoint import facefuse_home

GLTF_VALIDATOR = "gltf-validator@2.0.0-dev.3.10"
VALIDATE_SCRIPT = Path(__file__).parent / "validate_gltf.js"
INSTALL_TIMEOUT_S = 600
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                  "--force-device-scale-factor=1", "--enable-unsafe-swiftshader", "--use-angle=swiftshader")

"""WebGL runs on SwiftShader (ANGLE's CPU renderer; no GPU is used or needed). ``--disable-gpu`` is left out
on purpose: with it Chromium composites the WebGL canvas in software, and ANGLE then logs a "GPU stall due to
ReadPixels" performance message into the page's console for every frame, which would hide real messages."""


def unavailable(reason: str) -> None:
    """Skip with the reason, or fail where the tools are required (CI)."""
    if os.environ.get("FACEFUSE_REQUIRE_TOOLS") == "1":
        pytest.fail(f"required tool missing: {reason}")
    pytest.skip(f"TOOL MISSING, CHECK NOT RUN: {reason}")


def gltf_validator() -> Path:
    """The validator package folder, installed with npm on first use."""
    prefix = facefuse_home() / "node"
    package = prefix / "node_modules" / "gltf-validator"
    if (package / "package.json").is_file():
        return package
    if shutil.which("npm") is None or shutil.which("node") is None:
        unavailable("Node.js/npm is not installed, so the Khronos glTF validator cannot be installed")
    prefix.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(prefix), GLTF_VALIDATOR],
                          capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    if done.returncode != 0 or not (package / "package.json").is_file():
        unavailable(f"npm install {GLTF_VALIDATOR} failed: {done.stderr.strip()[-400:]}")
    return package


def validate_glb(paths: list[Path]) -> dict[str, dict]:
    """file -> {"errors", "warnings", "messages"} from the Khronos validator."""
    package = gltf_validator()
    if shutil.which("node") is None:
        unavailable("Node.js is not installed, so the Khronos glTF validator cannot run")
    done = subprocess.run(["node", str(VALIDATE_SCRIPT), *map(str, paths)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "GLTF_VALIDATOR": str(package)})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def chromium() -> str:
    """The Chromium binary; Debian's package is installed with apt-get when missing and root."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        unavailable("chromium is not installed and this user cannot apt-get install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=INSTALL_TIMEOUT_S, env=env)
    done = subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], capture_output=True, text=True,
                          timeout=INSTALL_TIMEOUT_S, env=env)
    found = shutil.which("chromium")
    if done.returncode != 0 or found is None:
        unavailable(f"apt-get install chromium failed: {done.stderr.strip()[-400:]}")
    return str(found)


def run_chromium(url: str, *, screenshot: Path | None = None, size: tuple[int, int] = (1200, 1600)) -> tuple[str, str]:
    """Load ``url`` headless in a fresh profile; (DOM after scripts ran, Chromium's log) or a screenshot."""
    with tempfile.TemporaryDirectory(prefix="facefuse-chromium-") as profile:
        action = [f"--screenshot={screenshot}"] if screenshot is not None else ["--dump-dom"]
        done = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr",
                               "--v=0", "--virtual-time-budget=10000", f"--window-size={size[0]},{size[1]}",
                               *action, url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, done.stderr


def console_lines(log: str) -> list[str]:
    """The page's console messages and uncaught errors in Chromium's log (its CONSOLE lines)."""
    return [line for line in log.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))
