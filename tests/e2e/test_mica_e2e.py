"""MICA end to end on a real photo with synthetic weights: service, CLI outputs, grpcurl, errors."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from facefuse import wire
from facefuse.assets.checkpoint_io import load_checkpoint
from facefuse.assets.registry import asset_path
from facefuse.client.cli import main
from facefuse.io.meshes import read_mesh
from facefuse.packs.flame import MicaBackend
from facefuse.packs.loading import load_shape_backend
from facefuse.servers.base import ServerOptions, start_server
from facefuse.servers.local import LocalMesh
from facefuse.servers.mica import SERVICE_NAME, MicaServicer
from facefuse.v1 import common_pb2, mica_pb2, mica_pb2_grpc

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def aligned_astronaut():
    import skimage.data

    from facefuse.assets.store import ModelStore
    from facefuse.face.frontend import FaceFrontEnd

    image = skimage.data.astronaut()
    front = FaceFrontEnd.from_assets(None, ModelStore())
    (det,) = front.detect(image)
    return front.align(image, det), image.shape[:2]


def test_reconstruct_mica_writes_every_output(flame_mesh: LocalMesh, astronaut_png: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = main(["reconstruct", str(astronaut_png), "-o", str(out), "--gateway", flame_mesh.gateway_address,
                 "--method", "mica", "--no-progress"])
    assert code == 0
    (entry,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert entry["status"] == "OK" and entry["units"] == "mm" and entry["topology"] == "flame2020"
    face = out / entry["dir"]
    vertices, faces = read_mesh(face / "mesh.obj")
    vertices_ply, _ = read_mesh(face / "mesh.ply")
    shape = np.load(face / "shape.npy")
    assert shape.shape == (300,) and shape.dtype == np.float32
    assert vertices.shape[1] == 3 and faces.shape[1] == 3
    np.testing.assert_allclose(vertices, vertices_ply, atol=1e-3)
    extent = np.ptp(vertices, axis=0)
    assert 50 < extent.max() < 1000, f"a head measured in mm, got extent {extent}"  # metres would be < 1
    kpt7, kpt68 = np.load(face / "kpt7.npy"), np.load(face / "kpt68.npy")
    assert kpt7.shape == (7, 3) and kpt68.shape == (68, 3)
    np.testing.assert_array_equal(kpt7, kpt68[[36, 39, 42, 45, 33, 48, 54]])
    params = np.load(face / "params.npz")
    np.testing.assert_array_equal(params["shape"], shape)
    meta = json.loads((face / "params.json").read_text())
    assert meta["units"]["vertices"] == "mm" and len(meta["shape"]) == 300


def test_service_answer_equals_the_in_process_call(flame_mesh: LocalMesh, mica_assets: Path, aligned_astronaut,
                                                   service_torch_threads: int) -> None:
    aligned, hw = aligned_astronaut
    local = MicaBackend.from_assets(mica_assets, "cpu").predict([aligned])[0]
    with grpc.insecure_channel(flame_mesh.address("mica")) as channel:
        reply = mica_pb2_grpc.MicaServiceStub(channel).Predict(
            mica_pb2.PredictRequest(faces=[wire.face_message(aligned, 0, hw)], return_mesh=True, return_landmarks=True),
            timeout=60,
        )
    remote = reply.predictions[0]
    assert np.array_equal(wire.to_numpy(remote.shape), local.shape)
    assert np.array_equal(wire.to_numpy(remote.mesh.vertices), local.vertices_mm)
    assert np.array_equal(wire.to_numpy(remote.kpt7), local.kpt7_mm)
    assert remote.mesh.vertices.unit == "mm" and reply.backend.ready and not reply.backend.placeholder


def test_grpcurl_calls_predict_with_a_json_request(flame_mesh: LocalMesh, aligned_astronaut) -> None:
    aligned, _ = aligned_astronaut
    grpcurl = (
        str(Path(sys.executable).parent / "grpcurl")
        if (Path(sys.executable).parent / "grpcurl").exists()
        else shutil.which("grpcurl")
    )
    request = {
        "faces": [
            {
                "arcfaceBlob": {
                    "dtype": "FLOAT32",
                    "shape": [3, 112, 112],
                    "data": base64.b64encode(aligned.arcface_blob.astype("<f4").tobytes()).decode(),
                }
            }
        ]
    }
    out = subprocess.run(
        [grpcurl, "-plaintext", "-d", "@", flame_mesh.address("mica"), "facefuse.v1.MicaService/Predict"],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    shape = json.loads(out.stdout)["predictions"][0]["shape"]
    assert shape["dtype"] == "FLOAT32" and shape["shape"] == ["300"]
    assert np.frombuffer(base64.b64decode(shape["data"]), "<f4").shape == (300,)


@pytest.mark.parametrize("damage", ["rename", "shape", "section"])
def test_a_damaged_checkpoint_is_failed_precondition_naming_it(mica_assets: Path, tmp_path: Path, damage: str) -> None:
    for name in ("flame2020", "landmark_embedding"):
        target = asset_path(tmp_path, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(asset_path(mica_assets, name))
    checkpoint = load_checkpoint(asset_path(mica_assets, "mica"))
    if damage == "rename":
        checkpoint["arcface"]["layer9.0.conv1.weight"] = checkpoint["arcface"].pop("layer1.0.conv1.weight")
        expected = "layer1.0.conv1.weight"
    elif damage == "shape":
        checkpoint["flameModel"]["regressor.output.weight"] = torch.zeros(300, 299)
        expected = "regressor.output.weight"
    else:
        del checkpoint["flameModel"]
        expected = "flameModel"
    torch.save(checkpoint, asset_path(tmp_path, "mica"))
    backend = load_shape_backend("flame", tmp_path, "cpu")
    assert not backend.status.ready and expected in backend.status.message
    servicer = MicaServicer(backend)
    running = start_server(lambda server: mica_pb2_grpc.add_MicaServiceServicer_to_server(servicer, server),
                           [SERVICE_NAME], ServerOptions())
    face = common_pb2.Face(arcface_blob=wire.from_numpy(np.zeros((3, 112, 112), np.float32)))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel, pytest.raises(grpc.RpcError) as caught:
            mica_pb2_grpc.MicaServiceStub(channel).Predict(mica_pb2.PredictRequest(faces=[face]), timeout=30)
    finally:
        running.stop(0)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert expected in caught.value.details()
