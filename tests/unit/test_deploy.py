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


_SERVICE_RUN = {
    # What each service does with the open pack (the default without assets), run in a fresh interpreter.
    "mica": """
from facefuse.packs.loading import load_shape_backend
backend = load_shape_backend("open", None, "cpu")
assert backend.status.ready, backend.status.message
backend.predict([face])""",
    "ofer": """
from facefuse.packs.loading import load_generative_backend
backend = load_generative_backend("open", None, "cpu")
assert backend.status.ready, backend.status.message
from facefuse.fusion.visibility import Visibility
samples = backend.sample(face, 2, seed=0, visibility=visibility)
backend.rank(face, samples, visibility=visibility)
backend.sample(face, 2, seed=0, visibility=Visibility({"lips": 0.0}))""",
    "fusion": """
import numpy as np
from facefuse.packs.loading import load_fusion_setup as load_setup
from facefuse.fusion.strategies import FusionInputs, fuse
from facefuse.fusion.visibility import Visibility
setup = load_setup("open", None)
assert setup.space is not None, setup.status.message
x = np.zeros(1404, np.float32)
fuse("region", FusionInputs(x, np.stack([x, x + 1]), np.zeros(2, np.float32), Visibility({}, visibility)), setup.space)""",
    "gateway": """
from facefuse.assets.store import ModelStore
from facefuse.face.frontend import FaceFrontEnd
front_end = FaceFrontEnd.from_assets(None, ModelStore())
(det,) = front_end.detect(image)
front_end.estimate_iris(image, det.landmarks)
front_end.align(image, det)""",
}


def _distribution_closure(names: list[str]) -> set[str]:
    """The requirement names and everything they install (their Requires-Dist, recursively, no extras)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    seen: set[str] = set()
    todo = [norm(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(norm(req.name))
    return seen


OPTIONAL_IMPORTS = {
    "grpcio-tools",  # grpc/__init__ tries it (runtime .proto loading) and carries on without it
    "ml-dtypes",  # facefuse.wire: bfloat16 tensors when installed, refused with a message otherwise
    "charset-normalizer",  # numpy.f2py probes it when scipy imports f2py; optional there
}


@pytest.mark.parametrize("name", list(_SERVICE_RUN))
def test_service_requirements_cover_what_its_open_pack_imports(name: str, tmp_path: Path) -> None:
    """Each image's requirements.txt must install every distribution its code imports on the open-pack path
    (an ImportError there would silently turn the open pack into an unavailable backend in the image)."""
    import json
    import pickle

    import numpy as np
    import skimage.data

    from facefuse.assets.store import ModelStore
    from facefuse.face.frontend import FaceFrontEnd

    image = skimage.data.astronaut()
    front_end = FaceFrontEnd.from_assets(None, ModelStore())
    (det,) = front_end.detect(image)
    det.iris = front_end.estimate_iris(image, det.landmarks).as_detection_iris()
    visibility = np.ones(468)
    visibility[[0, 11, 12, 13, 14, 15, 16, 17, 37, 39, 40, 61, 78, 80, 81, 82, 84, 87, 88, 91, 95, 146, 178, 181, 185,
                191, 267, 269, 270, 291, 308, 310, 311, 312, 314, 317, 318, 321, 324, 375, 402, 405, 409, 415]] = 0.0
    with open(tmp_path / "inputs.pkl", "wb") as f:
        pickle.dump({"image": image, "face": front_end.align(image, det), "visibility": visibility}, f)
    code = f"""
import json, pickle, sys
with open({str(tmp_path / 'inputs.pkl')!r}, "rb") as f:
    globals().update(pickle.load(f))
import facefuse.servers.{name}
{_SERVICE_RUN[name]}
from importlib import metadata
top = {{m.split(".")[0] for m in sys.modules}}
dists = metadata.packages_distributions()
print(json.dumps(sorted(sorted(dists[t]) for t in top if t in dists)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]

    def norm(dist: str) -> str:
        return re.sub(r"[-_.]+", "-", dist).lower()

    # Each imported top-level module, as the distributions that can provide it (cv2: opencv-python or -headless).
    providers = [{norm(d) for d in group} for group in json.loads(out.stdout.strip().splitlines()[-1])]
    folder = IMAGES[name]
    requirements = [line.strip() for line in (ROOT / folder / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    allowed = _distribution_closure(requirements) | {"facefuse", "pip", "setuptools"} | OPTIONAL_IMPORTS
    missing = sorted(" or ".join(sorted(group)) for group in providers if not group & allowed)
    assert not missing, f"{folder}/requirements.txt lacks {sorted(missing)}"
