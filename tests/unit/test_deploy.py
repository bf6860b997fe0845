"""Deploy files, statically: compose (docker-compose 1.29 and the Compose v2 schema), the Dockerfile's stages,
requirements and conda environments. tests/compose/ builds and runs them for real (make test-compose)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGES = {"mica": "services/mica", "ofer": "services/ofer", "fusion": "services/fusion", "gateway": "gateway"}


COMPOSE_FILES = ("docker-compose.yml", "docker-compose.gpu.yml")
COMPOSE_COMBINATIONS = (("docker-compose.yml",), ("docker-compose.yml", "docker-compose.gpu.yml"))
HEALTH_NAMES = {"mica": "facefuse.v1.MicaService", "ofer": "facefuse.v1.OferService",
                "fusion": "facefuse.v1.FusionService", "gateway": "facefuse.v1.Gateway"}


def _load_yaml(path: Path) -> dict:
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=True).load(path.read_text())


def _compose_v1() -> str:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose (v1.29) is not installed (.ci/run installs Debian's docker-compose)")
    return binary


@pytest.mark.parametrize("files", COMPOSE_COMBINATIONS, ids=["+".join(c) for c in COMPOSE_COMBINATIONS])
def test_compose_v1_parses_every_combination_of_files(files: tuple[str, ...]) -> None:
    args = [a for f in files for a in ("-f", str(ROOT / f))]
    result = subprocess.run(
        [_compose_v1(), *args, "config", "-q"], check=False, capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_files_match_the_compose_v2_schema(name: str) -> None:
    """The Compose Specification schema that Compose v2 validates against (vendored by check-jsonschema,
    so nothing is downloaded here). Each file alone: an override file is a valid compose file too."""
    import json
    from importlib import resources

    import jsonschema

    schema = json.loads(
        resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    )
    jsonschema.validate(_load_yaml(ROOT / name), schema)


def test_the_schema_check_catches_what_v2_refuses() -> None:
    import json
    from importlib import resources

    import jsonschema

    schema = json.loads(
        resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    )
    broken = _load_yaml(ROOT / "docker-compose.yml")
    broken["services"]["mica"]["healthcheck"]["retires"] = 3  # a typo v2 rejects
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def _config(*files: str, env: dict[str, str] | None = None) -> dict:
    """The merged, interpolated configuration as docker-compose v1 resolves it."""
    import os

    args = [a for f in files for a in ("-f", str(ROOT / f))]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FACEFUSE_")}
    result = subprocess.run(
        [_compose_v1(), *args, "config"],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={**clean, **(env or {})},
    )
    assert result.returncode == 0, result.stderr
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=True).load(result.stdout)


def test_compose_default_is_cpu_ready_checked_read_only_and_loopback() -> None:
    config = _config("docker-compose.yml")
    services = config["services"]
    assert set(services) == {*IMAGES, "client"}
    client = services.pop("client")  # a tool run on demand, not part of `up`
    assert client["profiles"] == ["client"] and client["build"]["target"] == "client"
    assert client["image"] == "facefuse/client:0.1.0" and "ports" not in client
    for name, service in services.items():
        assert service["build"]["target"] == name and service["image"] == f"facefuse/{name}:0.1.0"
        assert "deploy" not in service, f"{name}: GPU reservations belong in docker-compose.gpu.yml"
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD-SHELL" and "facefuse.servers.probe 127.0.0.1:" in test[1], test
        assert test[1].endswith(HEALTH_NAMES[name]), f"{name}: the healthcheck must probe readiness, not liveness"
        assert any(v.endswith(":/assets:ro") for v in service["volumes"]), f"{name}: assets must be mounted read-only"
        assert service["restart"] == "unless-stopped"
        for port in service["ports"]:
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    assert {n: c["condition"] for n, c in services["gateway"]["depends_on"].items()} == dict.fromkeys(
        ("mica", "ofer", "fusion"), "service_healthy")
    assert "TORCH_SOURCE" not in services["gateway"]["build"].get("args", {}), "the gateway has no torch"
    opened = _config("docker-compose.yml", env={"FACEFUSE_BIND": "0.0.0.0"})["services"]["gateway"]["ports"]
    assert opened[0].startswith("0.0.0.0:50050:")


def test_compose_passes_the_detection_threshold_to_the_gateway() -> None:
    """Empty by default (the gateway then uses the detector's own threshold); set, it reaches the gateway."""
    from facefuse.servers.gateway import DET_THRESH_ENV

    assert _config("docker-compose.yml")["services"]["gateway"]["environment"][DET_THRESH_ENV] in ("", None)
    chosen = _config("docker-compose.yml", env={DET_THRESH_ENV: "0.35"})["services"]["gateway"]["environment"]
    assert chosen[DET_THRESH_ENV] == "0.35"


def test_client_image_installs_what_reconstruct_imports_and_no_torch() -> None:
    """The client image holds neither torch nor models (what it must hold: the test below)."""
    names = {_norm(n) for n in _requirement_names(ROOT / "client" / "requirements.txt")}
    assert "torch" not in names and "insightface" not in names and "onnxruntime" not in names
    lines = (ROOT / "Dockerfile").read_text().split("FROM base AS client", 1)[1].splitlines()
    assert any("client/requirements.txt" in line for line in lines)
    assert any(line.startswith("USER facefuse") for line in lines)
    assert "!client/requirements.txt" in (ROOT / ".dockerignore").read_text().split()


def test_gpu_override_reserves_gpus_for_mica_and_ofer_only() -> None:
    services = _config("docker-compose.yml", "docker-compose.gpu.yml")["services"]
    for name in ("mica", "ofer"):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert "cuda" in services[name]["command"]
    for name in ("mica", "ofer", "fusion"):
        assert services[name]["build"]["args"]["TORCH_SOURCE"] == "pypi"
    assert "deploy" not in services["fusion"] and "deploy" not in services["gateway"]


def _dockerfile_stages() -> dict[str, tuple[str, list[str]]]:
    """Stage name -> (the stage it is built FROM, its instructions), continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: dict[str, tuple[str, list[str]]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        line = line.strip()
        match = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)$", line, re.IGNORECASE)
        if match:
            current = []
            stages[match.group(2)] = (match.group(1), current)
        elif current is not None and line and not line.startswith("#"):
            current.append(line)
    return stages


def _ancestry(stages: dict[str, tuple[str, list[str]]], name: str) -> list[str]:
    chain = [name]
    while chain[-1] in stages:
        chain.append(stages[chain[-1]][0])
    return chain


@pytest.mark.parametrize("name,folder", IMAGES.items())
def test_each_service_image_is_a_thin_non_root_stage(name: str, folder: str) -> None:
    stages = _dockerfile_stages()
    lines = stages[name][1]
    chain = _ancestry(stages, name)
    assert "base" in chain, "every image builds on the shared base layer"
    assert ("torch" in chain) == (name != "gateway"), chain
    assert f"facefuse.servers.{name}" in next(line for line in lines if line.startswith("ENTRYPOINT"))
    healthcheck = next(line for line in lines if line.startswith("HEALTHCHECK"))
    assert healthcheck.endswith(HEALTH_NAMES[name]) and "CMD [" not in healthcheck  # shell form = CMD-SHELL
    assert "USER facefuse" in lines and not any(line.startswith("USER root") for line in lines)
    assert any("FACEFUSE_OFFLINE=1" in line and "FACEFUSE_MODELS=" in line for line in lines), "models are baked in"
    assert any(line.startswith("COPY --from=models") for line in lines)
    assert any(f"{folder}/requirements" in line for line in lines)
    assert not any("npm" in line for line in lines), "npm is only in the build stage that fetches the models"
    requirements = (ROOT / folder / "requirements.txt").read_text().split()
    assert {"grpcio", "grpcio-health-checking", "grpcio-reflection", "protobuf"} <= set(requirements)
    if name == "gateway":
        assert (
            "torch" not in requirements
            and "insightface" in (ROOT / folder / "requirements-nodeps.txt").read_text().split()
        )
    else:
        assert "torch" in requirements and "insightface" not in requirements


def test_no_stage_installs_node_or_npm() -> None:
    """The model store fetches the npm tarball over HTTPS itself: the models stage needs only Python."""
    stages = _dockerfile_stages()
    assert "models" in stages
    for name, (_parent, lines) in stages.items():
        assert not any(re.search(r"\b(npm|nodejs)\b", line) for line in lines if not line.startswith("#")), name


def test_torch_source_choices_are_all_handled() -> None:
    stages = _dockerfile_stages()
    run = next(line for line in stages["torch-build"][1] if line.startswith("RUN"))
    for choice in ("pypi)", "index)", "wheels)", "*)"):
        assert choice in run
    assert (ROOT / "deploy" / "wheels").is_dir()  # the Dockerfile copies it, wheel or not


def test_gateway_image_installs_neither_torch_nor_the_libgl_opencv() -> None:
    names = [line.strip() for line in (ROOT / "gateway" / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    closure = _distribution_closure(names)
    assert "torch" not in closure
    assert "opencv-python" not in closure and "opencv-python-headless" in closure


def test_dockerignore_keeps_the_context_small() -> None:
    lines = (ROOT / ".dockerignore").read_text().split()
    assert lines[lines.index("*") :][0] == "*", "a whitelist: everything is excluded first"
    assert "!.git" not in lines and "!assets" not in lines


def _requirement_names(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.parametrize("name,folder", IMAGES.items())
def test_conda_environment_has_the_same_pins(name: str, folder: str) -> None:
    env = _load_yaml(ROOT / folder / "environment.yml")
    assert env["name"] == f"facefuse-{name}"
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    assert "python=3.11" in conda and "pip" in conda
    (pip_section,) = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    pinned = dict(_norm(n).split("==") for n in pip_section)
    constraints = dict(_norm(line).split("==") for line in _requirement_names(ROOT / "constraints.txt"))
    expected = {_norm(n) for n in _requirement_names(ROOT / folder / "requirements.txt")}
    if name == "gateway":
        expected |= {_norm(n) for n in _requirement_names(ROOT / folder / "requirements-nodeps.txt")}
        # insightface installs with its dependencies there: opencv-python replaces -headless (same cv2)
        expected = expected - {"opencv-python-headless"} | {"opencv-python"}
    assert set(pinned) == expected
    assert {n: v for n, v in pinned.items()} == {n: constraints[n] for n in pinned}


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
inputs = FusionInputs(x, np.stack([x, x + 1]), np.zeros(2, np.float32), Visibility({}, visibility))
fuse("region", inputs, setup.space)""",
    "gateway": """
from facefuse.assets.store import ModelStore
from facefuse.face.frontend import FaceFrontEnd
front_end = FaceFrontEnd.from_assets(None, ModelStore())
(det,) = front_end.detect(image)
front_end.estimate_iris(image, det.landmarks)
aligned = front_end.align(image, det)
from facefuse.pipeline.orchestration import pose_fit_input  # the posed-fit request is built in the gateway
assert pose_fit_input(aligned, image.shape[:2], None) is not None""",
}


def _distribution_closure(names: list[str]) -> set[str]:
    """The requirement names and everything they install (their Requires-Dist, recursively, no extras)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [_norm(n) for n in names]
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
                todo.append(_norm(req.name))
    return seen


OPTIONAL_IMPORTS = {
    "grpcio-tools",  # grpc/__init__ tries it (runtime .proto loading) and carries on without it
    "ml-dtypes",  # facefuse.wire: bfloat16 tensors when installed, refused with a message otherwise
    "charset-normalizer",  # numpy.f2py probes it when scipy imports f2py; optional there
    "tqdm",  # torch.hub uses it when installed and a stand-in otherwise (the posed fit imports torch in fusion)
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

    # Each imported top-level module, as the distributions that can provide it (cv2: opencv-python or -headless).
    providers = [{_norm(d) for d in group} for group in json.loads(out.stdout.strip().splitlines()[-1])]
    folder = IMAGES[name]
    requirements = _requirement_names(ROOT / folder / "requirements.txt")
    no_deps = ROOT / folder / "requirements-nodeps.txt"  # installed with --no-deps: themselves, not their closure
    installed_alone = {_norm(n) for n in _requirement_names(no_deps)} if no_deps.is_file() else set()
    allowed = (
        _distribution_closure(requirements) | installed_alone | {"facefuse", "pip", "setuptools"} | OPTIONAL_IMPORTS
    )
    missing = sorted(" or ".join(sorted(group)) for group in providers if not group & allowed)
    assert not missing, f"{folder}/requirements.txt lacks {sorted(missing)}"


@pytest.mark.slow
def test_client_requirements_cover_what_reconstruct_imports(tmp_path: Path) -> None:
    """`facefuse reconstruct` (open pack, one photo, the run report) in a fresh interpreter: every
    distribution it imports must be installed by client/requirements.txt, the client image's list."""
    import json

    import imageio.v3 as iio
    import skimage.data

    from facefuse.servers.local import LocalMesh

    iio.imwrite(tmp_path / "a.png", skimage.data.astronaut())
    with LocalMesh(pack="open") as mesh:
        code = f"""
import json, sys
from facefuse.client.cli import main
rc = main(["reconstruct", {str(tmp_path / "a.png")!r}, "-o", {str(tmp_path / "out")!r},
           "--gateway", {mesh.gateway_address!r}, "--no-progress"])
from importlib import metadata
top = {{m.split(".")[0] for m in sys.modules}}
dists = metadata.packages_distributions()
print(json.dumps([rc, sorted(sorted(dists[t]) for t in top if t in dists)]))
"""
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rc, groups = json.loads(out.stdout.strip().splitlines()[-1])
    assert rc == 0 and (tmp_path / "out" / "index.html").is_file()
    allowed = (_distribution_closure(_requirement_names(ROOT / "client" / "requirements.txt"))
               | {"facefuse", "pip", "setuptools"} | OPTIONAL_IMPORTS)
    missing = sorted(" or ".join(sorted(g)) for g in ({_norm(d) for d in group} for group in groups) if not g & allowed)
    assert not missing, f"client/requirements.txt lacks {missing}"
