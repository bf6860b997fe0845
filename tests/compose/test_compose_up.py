"""`docker compose up` for real: the four images built, the mesh healthy, called through published ports.

The tests run in file order on one compose project (conftest.compose_mesh): open pack first, then a killed
ofer, then the flame pack on synthetic official-format assets; a separate container shows a service
without its files reporting NOT_SERVING. Everything is torn down with `down -v` at the end.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from compose_harness import HEALTH_NAMES, SERVICES, ComposeMesh, free_port, grpcurl
from grpc_health.v1 import health_pb2

from facefuse.client.cli import main
from facefuse.servers.local import health_status, wait_serving
from facefuse.v1 import common_pb2, mica_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
IMAGES = {name: f"facefuse/{name}:0.1.0" for name in SERVICES}
RECONSTRUCT_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def astronaut_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import skimage.data
    from PIL import Image

    path = tmp_path_factory.mktemp("photos") / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()).save(path)
    return path


def _reconstruct(mesh: ComposeMesh, photo: Path, out: Path, *extra: str) -> dict[str, Any]:
    started = time.monotonic()
    code = main(["reconstruct", str(photo), "-o", str(out), "--gateway", mesh.address("gateway"), "--no-progress",
                 "--timeout", str(RECONSTRUCT_TIMEOUT_S), *extra])
    mesh.timings[f"reconstruct {out.name}_s"] = time.monotonic() - started
    assert code == 0, f"facefuse reconstruct exited {code}; gateway log:\n{mesh.logs('gateway')}"
    (entry,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert entry["status"] == "OK", entry
    return entry


def _check_mesh_files(face: Path, topology_vertices: int) -> np.ndarray:
    from facefuse.io.meshes import read_mesh

    vertices, faces = read_mesh(face / "mesh.obj")
    assert vertices.shape == (topology_vertices, 3) and faces.shape[1] == 3 and np.all(np.isfinite(vertices))
    extent = np.ptp(vertices, axis=0)
    assert 50 < extent.max() < 1000, f"a head measured in mm, got extent {extent}"
    for name in ("mesh.ply", "mesh.glb", "preview.png", "params.json", "params.npz", "shape.npy"):
        assert (face / name).stat().st_size > 0, name
    return vertices


def _run_in_image(mesh: ComposeMesh, image: str, script: str) -> str:
    return mesh.client.containers.run(image, ["-c", script], entrypoint=["sh"], remove=True).decode().strip()


def test_images_are_non_root_and_the_gateway_has_no_torch_and_no_libgl(compose_mesh: ComposeMesh) -> None:
    for image in IMAGES.values():
        config = compose_mesh.client.images.get(image).attrs["Config"]
        assert config["User"] == "facefuse", f"{image} runs as {config['User'] or 'root'}"
        assert _run_in_image(compose_mesh, image, "id -u") == "10001"
        # the open pack's models are in the image, verified; no npm at run time
        listed = _run_in_image(compose_mesh, image, 'command -v npm node || true; ls "$FACEFUSE_MODELS"')
        assert "npm" not in listed and "node" not in listed.split() and "blazeface_full_range.tflite" in listed, listed
    probe = ("import importlib.util as u, cv2; print(u.find_spec('torch') is None, u.find_spec('cv2') is not None,"
             " cv2.imdecode is not None)")
    assert _run_in_image(compose_mesh, IMAGES["gateway"], f'python -c "{probe}"').splitlines()[-1] == "True True True"
    ldd = _run_in_image(
        compose_mesh,
        IMAGES["gateway"],
        "for f in $(python -c 'import cv2, os; print(os.path.dirname(cv2.__file__))')/*.so; do ldd $f; done",
    )
    assert "libGL" not in ldd and "not found" not in ldd, ldd
    assert _run_in_image(compose_mesh, IMAGES["mica"], "python -c 'import torch; print(torch.__version__)'").startswith(
        "2.13.0"
    )


def test_grpcurl_lists_and_health_checks_all_four(compose_mesh: ComposeMesh) -> None:
    for name in SERVICES:
        address = compose_mesh.address(name)
        listed = subprocess.run(
            [grpcurl(), "-plaintext", address, "list"], check=False, capture_output=True, text=True, timeout=30
        )
        assert listed.returncode == 0, listed.stderr
        assert {HEALTH_NAMES[name], "grpc.health.v1.Health"} <= set(listed.stdout.split()), listed.stdout
        for service in ("", HEALTH_NAMES[name]):
            check = subprocess.run(
                [
                    grpcurl(),
                    "-plaintext",
                    "-d",
                    json.dumps({"service": service}),
                    address,
                    "grpc.health.v1.Health/Check",
                ],
                check=False,
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert check.returncode == 0 and json.loads(check.stdout)["status"] == "SERVING", (name, service, check)


def test_published_ports_are_loopback_only_and_assets_read_only(compose_mesh: ComposeMesh) -> None:
    for name, container in compose_mesh.containers().items():
        bindings = [b for spec in (container.attrs["HostConfig"]["PortBindings"] or {}).values() for b in spec]
        assert bindings and all(b["HostIp"] == "127.0.0.1" for b in bindings), (name, bindings)
        (assets,) = [m for m in container.attrs["Mounts"] if m["Destination"] == "/assets"]
        assert assets["RW"] is False, (name, assets)


def test_reconstruct_the_astronaut_with_the_open_pack(
    compose_mesh: ComposeMesh, astronaut_png: Path, tmp_path: Path
) -> None:
    entry = _reconstruct(compose_mesh, astronaut_png, tmp_path / "open", "--samples", "4", "--seed", "3")
    assert entry["topology"] == "mediapipe468" and entry["units"] == "mm" and "fallback" not in entry, entry
    face = tmp_path / "open" / entry["dir"]
    _check_mesh_files(face, 468)
    assert 0.0 <= entry["confidence"] <= 1.0
    assert json.loads((face / "params.json").read_text())["model"].endswith("(open pack)")


def test_the_client_image_reconstructs_a_shard_over_the_compose_network(
    compose_mesh: ComposeMesh, astronaut_png: Path, tmp_path: Path
) -> None:
    """What the Kubernetes Job runs (deploy/k8s/jobs): the client image, `reconstruct --shard`, the
    gateway by its service name; compose's `client` profile, as the README shows it."""
    data, results = tmp_path / "data", tmp_path / "results"
    data.mkdir()
    results.mkdir()
    results.chmod(0o777)  # the image runs as uid 10001
    (data / "astronaut.png").write_bytes(astronaut_png.read_bytes())
    started = time.monotonic()
    compose_mesh.compose("--profile", "client", "build", "client", timeout=1200)
    compose_mesh.timings["client image build_s"] = round(time.monotonic() - started)
    compose_mesh.compose("--profile", "client", "run", "--rm", "--no-deps", "-v", f"{data}:/data:ro",
                         "-v", f"{results}:/results", "client", "reconstruct", "/data", "-o", "/results",
                         "--shard", "0/1", "--samples", "4", "--no-progress", timeout=600)
    lines = [json.loads(line) for line in (results / "shard-0-of-1" / "results.jsonl").read_text().splitlines()]
    (entry,) = [line for line in lines if line.get("face_index", -1) >= 0]
    assert entry["status"] == "OK" and entry["topology"] == "mediapipe468", entry
    _check_mesh_files(results / "shard-0-of-1" / entry["dir"], 468)
    image = compose_mesh.client.images.get("facefuse/client:0.1.0")
    assert image.attrs["Config"]["User"] == "facefuse"


def test_killed_ofer_gives_flagged_mica_fallback_and_start_recovers(compose_mesh: ComposeMesh, astronaut_png: Path,
                                                                    tmp_path: Path) -> None:
    gateway = compose_mesh.address("gateway")
    compose_mesh.compose("kill", "ofer")
    ofer = compose_mesh.containers()["ofer"]
    ofer.reload()
    assert ofer.attrs["State"]["Running"] is False, "the engine restarted a container the user killed"
    # the gateway stays live, its readiness follows the backend
    deadline = time.monotonic() + 30
    while health_status(gateway, HEALTH_NAMES["gateway"]) != NOT_SERVING and time.monotonic() < deadline:
        time.sleep(0.5)
    assert health_status(gateway, HEALTH_NAMES["gateway"]) == NOT_SERVING
    assert health_status(gateway) == SERVING
    entry = _reconstruct(compose_mesh, astronaut_png, tmp_path / "fallback", "--samples", "4")
    assert "ofer unavailable" in entry.get("fallback", "") and entry["strategy"] == "mica", entry
    _check_mesh_files(tmp_path / "fallback" / entry["dir"], 468)

    started = time.monotonic()
    compose_mesh.compose("start", "ofer")
    wait_serving(compose_mesh.address("ofer"), "ofer", 180, service=HEALTH_NAMES["ofer"])  # ready again ...
    compose_mesh.timings["ofer start to ready_s"] = time.monotonic() - started
    wait_serving(gateway, "gateway", 60, service=HEALTH_NAMES["gateway"])  # ... and the gateway sees it
    compose_mesh.wait_healthy(("ofer", "gateway"))
    entry = _reconstruct(compose_mesh, astronaut_png, tmp_path / "recovered", "--samples", "4")
    assert "fallback" not in entry and entry["strategy"] != "mica", entry


def test_a_service_with_an_empty_assets_folder_says_which_file_is_missing(compose_mesh: ComposeMesh,
                                                                            tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o755)
    port = free_port()
    container = compose_mesh.client.containers.run(
        IMAGES["mica"], ["--pack", "flame"], detach=True, ports={"50051/tcp": ("127.0.0.1", port)},
        volumes={str(empty): {"bind": "/assets", "mode": "ro"}}, labels={"facefuse.test": "empty-assets"})
    address = f"127.0.0.1:{port}"
    try:
        wait_serving(address, "mica (empty assets)", 180)  # live ...
        assert health_status(address, HEALTH_NAMES["mica"]) == NOT_SERVING  # ... and not ready
        with grpc.insecure_channel(address) as channel:
            info = mica_pb2_grpc.MicaServiceStub(channel).Info(common_pb2.InfoRequest(), timeout=10)
        assert not info.ready and "/assets/mica.tar" in info.message, info.message
    finally:
        container.remove(force=True)


def test_flame_pack_with_synthetic_assets_mounted_read_only(compose_mesh: ComposeMesh, astronaut_png: Path,
                                                            tmp_path: Path) -> None:
    assets = tmp_path / "flame-assets"
    assert main(["assets", "synthesize", "--dir", str(assets), "--size", "small"]) == 0
    for path in [assets, *assets.rglob("*")]:  # the containers run as uid 10001: world-readable, not writable
        path.chmod(0o755 if path.is_dir() else 0o644)
    tmp_path.chmod(0o755)
    started = time.monotonic()
    compose_mesh.compose("up", "-d", "--no-build", env={"FACEFUSE_ASSETS": str(assets)})
    compose_mesh.timings["flame up to healthy_s"] = compose_mesh.wait_healthy() + (time.monotonic() - started)
    from facefuse.client.api import GatewayClient

    with GatewayClient(compose_mesh.address("gateway"), timeout_s=30) as client:
        packs = {b.service: b.pack for b in client.info().backends}
    assert packs == {"mica": "flame", "ofer": "flame", "fusion": "flame"}, packs
    for container in compose_mesh.containers().values():
        (mount,) = [m for m in container.attrs["Mounts"] if m["Destination"] == "/assets"]
        assert mount["Source"] == str(assets) and mount["RW"] is False, mount
    entry = _reconstruct(
        compose_mesh, astronaut_png, tmp_path / "flame", "--samples", "5", "--steps", "8", "--seed", "11"
    )
    assert entry["topology"] == "flame2020" and "fallback" not in entry, entry
    from facefuse.assets.flame_file import load_flame_model

    template = load_flame_model(assets / "FLAME2020" / "generic_model.pkl").v_template  # the synthetic model's size
    _check_mesh_files(tmp_path / "flame" / entry["dir"], len(template))
    assert np.load(tmp_path / "flame" / entry["dir"] / "shape.npy").shape == (300,)
