"""OFER and fusion through the mesh on synthetic official-format weights: reproducibility, ranking, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest

from facefuse import wire
from facefuse.client.cli import main
from facefuse.packs.flame import OferBackend
from facefuse.servers.local import LocalMesh
from facefuse.v1 import ofer_pb2, ofer_pb2_grpc

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def face_message(aligned_face):
    aligned, hw = aligned_face
    return wire.face_message(aligned, 0, hw)


@pytest.fixture(scope="module")
def aligned_face():
    import skimage.data

    from facefuse.assets.store import ModelStore
    from facefuse.face.farl_preprocess import farl_preprocess
    from facefuse.face.frontend import FaceFrontEnd

    image = skimage.data.astronaut()
    front = FaceFrontEnd.from_assets(None, ModelStore())
    (det,) = front.detect(image)
    aligned = front.align(image, det)
    aligned.farl_input = farl_preprocess(np.clip(aligned.crop_box224 * 255 + 0.5, 0, 255).astype(np.uint8))
    return aligned, image.shape[:2]


def _sample(stub, face, seed: int, n: int = 6, chunk: int = 0, **extra) -> np.ndarray:
    request = ofer_pb2.SampleRequest(face=face, num_samples=n, seed=seed, chunk_size=chunk, steps=8, **extra)
    chunks = list(stub.Sample(request, timeout=300))
    assert [c.offset for c in chunks] == list(range(0, n, chunk or n))
    return np.concatenate([wire.to_numpy(c.shapes) for c in chunks])


def test_same_seed_same_samples_through_the_service(flame_mesh: LocalMesh, face_message, aligned_face,
                                                    synthetic_assets_dir: Path, service_torch_threads: int) -> None:
    with grpc.insecure_channel(flame_mesh.address("ofer")) as channel:
        stub = ofer_pb2_grpc.OferServiceStub(channel)
        first = _sample(stub, face_message, seed=7)
        again = _sample(stub, face_message, seed=7, chunk=4)  # streamed in chunks: same values
        other = _sample(stub, face_message, seed=8)
    assert first.shape == (6, 300) and np.all(np.isfinite(first))
    assert np.array_equal(first, again)
    assert not np.allclose(first, other)
    local = OferBackend.from_assets(synthetic_assets_dir, "cpu").sample(
        aligned_face[0],
        6,
        mode="fast",
        steps=8,
        seed=7,
        start_shape=None,
        start_t0=0,
        guide_shape=None,
        guide_strength=0.0,
    )
    assert np.array_equal(first, local), "the service answers exactly what the library computes"


def test_rank_scores_follow_the_candidates_not_their_order(flame_mesh: LocalMesh, face_message) -> None:
    rng = np.random.default_rng(0)
    candidates = rng.standard_normal((7, 300)).astype(np.float32)
    order = rng.permutation(7)
    with grpc.insecure_channel(flame_mesh.address("ofer")) as channel:
        stub = ofer_pb2_grpc.OferServiceStub(channel)
        scores = wire.to_numpy(
            stub.Rank(
                ofer_pb2.RankRequest(face=face_message, candidates=wire.from_numpy(candidates)), timeout=120
            ).scores
        )
        permuted = wire.to_numpy(
            stub.Rank(
                ofer_pb2.RankRequest(face=face_message, candidates=wire.from_numpy(candidates[order])), timeout=120
            ).scores
        )
    assert scores.shape == (7,) and np.all(np.isfinite(scores))
    np.testing.assert_allclose(permuted, scores[order], rtol=1e-5, atol=1e-5)


def test_sdedit_from_t0_zero_returns_the_start_shape(flame_mesh: LocalMesh, face_message) -> None:
    start = np.random.default_rng(1).standard_normal(300).astype(np.float32)
    with grpc.insecure_channel(flame_mesh.address("ofer")) as channel:
        samples = _sample(ofer_pb2_grpc.OferServiceStub(channel), face_message, seed=3, n=3,
                          start_shape=wire.from_numpy(start), start_t0=0)
    np.testing.assert_array_equal(samples, np.broadcast_to(start, (3, 300)))


def _run(flame_mesh: LocalMesh, photo: Path, out: Path, *extra: str) -> dict:
    code = main(["reconstruct", str(photo), "-o", str(out), "--gateway", flame_mesh.gateway_address, "--no-progress",
                 "--samples", "5", "--steps", "8", "--seed", "11", *extra])
    assert code == 0
    (entry,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert entry["status"] == "OK"
    return entry


def test_reconstruct_ofer_writes_samples_and_spread(flame_mesh: LocalMesh, astronaut_png: Path, tmp_path: Path) -> None:
    entry = _run(flame_mesh, astronaut_png, tmp_path / "ofer", "--method", "ofer", "--all-files")  # samples.npz
    face = tmp_path / "ofer" / entry["dir"]
    samples = np.load(face / "samples.npz")
    assert samples["shapes"].shape == (5, 300) and samples["scores"].shape == (5,)
    best = samples["shapes"][np.argmax(samples["scores"])]
    np.testing.assert_allclose(np.load(face / "shape.npy"), best, rtol=1e-6)
    spread = np.load(face / "uncertainty.npy")
    vertices = np.load(face / "params.npz")["shape"]
    assert spread.ndim == 1 and np.all(spread >= 0) and vertices.shape == (300,)
    assert 0.0 <= entry["confidence"] <= 1.0


@pytest.mark.parametrize("strategy", ["mica", "ofer", "linear", "pool", "gaussian", "sdedit", "guided", "region"])
def test_every_strategy_is_deterministic_through_the_services(
    flame_mesh: LocalMesh, astronaut_png: Path, tmp_path: Path, strategy: str
) -> None:
    shapes = []
    for run in ("a", "b"):
        entry = _run(flame_mesh, astronaut_png, tmp_path / run, "--method", "fuse", "--strategy", strategy)
        assert entry["strategy"] == strategy
        shapes.append(np.load(tmp_path / run / entry["dir"] / "shape.npy"))
    assert np.array_equal(shapes[0], shapes[1])


def test_opt_in_dynamic_batching_across_faces(synthetic_assets_dir: Path, aligned_face) -> None:
    """Concurrent Sample requests run as one batch; each equals its own unbatched run up to float rounding."""
    import threading

    from facefuse.servers.base import ServerOptions, start_server
    from facefuse.servers.ofer import SERVICE_NAME, OferServicer

    backend = OferBackend.from_assets(synthetic_assets_dir, "cpu")
    servicer = OferServicer(backend, max_batch=8, batch_wait_s=0.2)
    running = start_server(
        lambda s: ofer_pb2_grpc.add_OferServiceServicer_to_server(servicer, s), [SERVICE_NAME], ServerOptions()
    )
    aligned, hw = aligned_face
    face = wire.face_message(aligned, 0, hw)
    got: dict[int, np.ndarray] = {}
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = ofer_pb2_grpc.OferServiceStub(channel)

            def call(seed: int) -> None:
                got[seed] = _sample(stub, face, seed=seed, n=3 + seed)

            threads = [threading.Thread(target=call, args=(seed,)) for seed in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        running.stop(0)
    assert servicer.batcher is not None and servicer.batcher.largest_batch > 1
    for seed, shapes in got.items():
        alone = backend.sample(aligned, 3 + seed, mode="fast", steps=8, seed=seed, start_shape=None, start_t0=0,
                               guide_shape=None, guide_strength=0.0)
        assert shapes.shape == alone.shape
        np.testing.assert_allclose(shapes, alone, rtol=1e-3, atol=1e-3 * float(np.abs(alone).max()))
