"""Batching the samples of several faces into one Unet call (issue 18 item 4), on synthetic weights.

Each face's noise comes from its own seed's generator, so a face's samples do not depend on who else
is in the batch beyond float rounding. Measured on CPU: a lone job through the batched path is bit for
bit its unbatched run; faces batched together differ from their unbatched runs by float rounding only
(~1e-4 of the samples' scale: BLAS blocks a matrix product by its row count, so a row's sums round
differently in a 40-row product than in a 10-row one). That is why batching across faces stays opt-in
(``facefuse-ofer --max-batch``) and why these tests hold the multi-face case to a stated tolerance.
"""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from facefuse import wire
from facefuse.face.types import AlignedFace, Detection
from facefuse.packs.flame import OferBackend, SampleJob
from facefuse.servers.base import ServerOptions, start_server
from facefuse.servers.ofer import SERVICE_NAME, OferServicer
from facefuse.v1 import ofer_pb2, ofer_pb2_grpc

ROUNDING_TOLERANCE = 1e-3
"""Stated bound for faces batched together, relative to the samples' largest magnitude (seen: ~1e-4)."""


@pytest.fixture(scope="module")
def backend(synthetic_assets_dir: Path) -> OferBackend:
    return OferBackend.from_assets(synthetic_assets_dir, "cpu")


def _face(seed: int) -> AlignedFace:
    rng = np.random.default_rng(seed)
    detection = Detection(box=np.array([0, 0, 100, 100], np.float32), score=1.0, kps5=np.zeros((5, 2), np.float32))
    return AlignedFace(detection, np.zeros((112, 112, 3), np.uint8), np.zeros((224, 224, 3), np.uint8),
                       np.zeros((224, 224, 3), np.float32), rng.standard_normal((3, 112, 112)).astype(np.float32))


def _alone(backend: OferBackend, job: SampleJob) -> np.ndarray:
    return backend.sample(job.face, job.num_samples, mode=job.mode, steps=job.steps, seed=job.seed, start_shape=None,
                          start_t0=0, guide_shape=None, guide_strength=0.0)


def test_a_lone_job_through_the_batched_path_is_its_unbatched_run_bit_for_bit(backend: OferBackend) -> None:
    job = SampleJob(_face(1), 7, "fast", 12, 11)  # ("official", its 1000 steps, also matched: too slow to test here)
    (batched,) = backend.sample_batch([job])
    assert np.array_equal(batched, _alone(backend, job))


def test_faces_batched_together_equal_their_unbatched_runs_up_to_rounding(backend: OferBackend) -> None:
    jobs = [SampleJob(_face(k), 4 + k, "fast", 10, 100 + k) for k in range(3)]
    batched = backend.sample_batch(jobs)
    with_others = backend.sample_batch([jobs[0], SampleJob(_face(9), 6, "fast", 10, 5)])[0]
    for job, got in zip(jobs, batched, strict=True):
        alone = _alone(backend, job)
        assert got.shape == alone.shape == (job.num_samples, 300)
        scale = float(np.abs(alone).max())
        np.testing.assert_allclose(got, alone, rtol=0, atol=ROUNDING_TOLERANCE * scale)
    # The same face and seed with other company: the same samples up to the same rounding.
    tolerance = ROUNDING_TOLERANCE * float(np.abs(with_others).max())
    np.testing.assert_allclose(with_others, batched[0], rtol=0, atol=tolerance)
    # Distinct seeds give distinct samples: the batch did not mix faces' noise up.
    assert not np.allclose(batched[0][:4], batched[1][:4], atol=1e-2)


def test_the_batching_service_answers_a_lone_request_bit_for_bit(backend: OferBackend) -> None:
    """ofer with --max-batch 8: a request alone is not held for company and gets the unbatched samples."""
    servicer = OferServicer(backend, max_batch=8, batch_wait_s=5.0)
    running = start_server(lambda s: ofer_pb2_grpc.add_OferServiceServicer_to_server(servicer, s), [SERVICE_NAME],
                           ServerOptions())
    face = _face(3)
    message = wire.face_message(face, 0, (100, 100))
    got: dict[int, np.ndarray] = {}
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = ofer_pb2_grpc.OferServiceStub(channel)

            def call(seed: int) -> None:
                chunks = stub.Sample(ofer_pb2.SampleRequest(face=message, num_samples=5, seed=seed, steps=10),
                                     timeout=120)
                got[seed] = np.concatenate([wire.to_numpy(c.shapes) for c in chunks])

            call(1)
            threads = [threading.Thread(target=call, args=(seed,)) for seed in (2, 3, 4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
    finally:
        running.stop(0)
        assert servicer.batcher is not None
        servicer.batcher.close()
    assert np.array_equal(got[1], _alone(backend, SampleJob(face, 5, "fast", 10, 1)))
    for seed in (2, 3, 4):
        alone = _alone(backend, SampleJob(face, 5, "fast", 10, seed))
        np.testing.assert_allclose(got[seed], alone, rtol=0, atol=ROUNDING_TOLERANCE * float(np.abs(alone).max()))
