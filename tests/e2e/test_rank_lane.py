"""The ofer service's rank lane: one face's Rank runs beside the next face's Sample (flame pack).

Each call runs the same operations with the same torch thread count whatever the other lane does, so the
samples and scores must be bit for bit those of calls made one at a time. A barrier that both calls must
reach before computing proves that they really ran at the same time (with one lane it times out).
"""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from ofer_faces import random_aligned_face

from facefuse import wire
from facefuse.face.types import AlignedFace
from facefuse.packs.flame import OferBackend
from facefuse.servers.base import ServerOptions, start_server
from facefuse.servers.ofer import SERVICE_NAME, OferServicer
from facefuse.v1 import ofer_pb2, ofer_pb2_grpc

BARRIER_S = 5.0


class _MeetingBackend:
    """The flame backend, but Sample and Rank each wait at a two-party barrier before computing."""

    def __init__(self, backend: OferBackend, concurrent: bool = True) -> None:
        self.backend = backend
        self.status = backend.status
        self.sample_and_rank_concurrently = concurrent
        self.barrier = threading.Barrier(2, timeout=BARRIER_S)

    def sample(self, *args: object, **kwargs: object) -> np.ndarray:
        self.barrier.wait()
        return self.backend.sample(*args, **kwargs)  # type: ignore[arg-type]

    def rank(self, *args: object, **kwargs: object) -> np.ndarray:
        self.barrier.wait()
        return self.backend.rank(*args, **kwargs)  # type: ignore[arg-type]


def _sample_b_while_ranking_a(servicer: OferServicer, a: AlignedFace, a_samples: np.ndarray,
                              b: AlignedFace) -> tuple[np.ndarray, np.ndarray]:
    """Rank face A's samples and Sample face B at once, through the service; B's samples and A's scores."""
    running = start_server(lambda s: ofer_pb2_grpc.add_OferServiceServicer_to_server(servicer, s), [SERVICE_NAME],
                           ServerOptions(max_workers=4))
    results: dict[str, object] = {}
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = ofer_pb2_grpc.OferServiceStub(channel)

            def sample() -> None:
                try:
                    chunks = stub.Sample(ofer_pb2.SampleRequest(face=wire.face_message(b, 0, (100, 100)),
                                                                num_samples=6, seed=5, steps=8), timeout=60)
                    results["samples"] = np.concatenate([wire.to_numpy(c.shapes) for c in chunks])
                except grpc.RpcError as error:
                    results["samples"] = error

            thread = threading.Thread(target=sample)
            thread.start()
            try:
                reply = stub.Rank(ofer_pb2.RankRequest(face=wire.face_message(a, 0, (100, 100)),
                                                       candidates=wire.from_numpy(a_samples)), timeout=60)
                results["scores"] = np.array(wire.to_numpy(reply.scores))
            except grpc.RpcError as error:
                results["scores"] = error
            thread.join(60)
    finally:
        running.stop(0)
        if servicer.prefetch is not None:
            servicer.prefetch.close()
    return results["samples"], results["scores"]  # type: ignore[return-value]


def test_a_rank_beside_a_sample_gives_the_numbers_of_one_call_at_a_time(ofer_backend_per_numerics: OferBackend) -> None:
    backend = ofer_backend_per_numerics
    assert backend.sample_and_rank_concurrently
    a, b = random_aligned_face(1), random_aligned_face(2)
    common = {"mode": "fast", "steps": 8, "start_shape": None, "start_t0": 0, "guide_shape": None,
              "guide_strength": 0.0}
    a_samples = backend.sample(a, 6, seed=3, **common)  # type: ignore[arg-type]
    alone_scores = backend.rank(a, a_samples)
    alone_samples = backend.sample(b, 6, seed=5, **common)  # type: ignore[arg-type]

    meeting = _MeetingBackend(backend)
    samples, scores = _sample_b_while_ranking_a(OferServicer(meeting, rank_prefetch=False),  # type: ignore[arg-type]
                                                a, a_samples, b)
    assert isinstance(samples, np.ndarray) and isinstance(scores, np.ndarray), (samples, scores)
    assert not meeting.barrier.broken  # both calls were computing at the same time
    assert np.array_equal(samples, alone_samples)
    assert np.array_equal(scores, alone_scores)


@pytest.mark.parametrize("why", ["flag", "backend"])
def test_one_lane_when_switched_off_or_the_backend_does_not_allow_it(synthetic_assets_dir: Path, why: str) -> None:
    backend = OferBackend.from_assets(synthetic_assets_dir, "cpu")
    a, b = random_aligned_face(1), random_aligned_face(2)
    a_samples = np.zeros((3, 300), np.float32)
    meeting = _MeetingBackend(backend, concurrent=why == "flag")
    servicer = OferServicer(meeting, rank_prefetch=False, rank_lane=why != "flag")  # type: ignore[arg-type]
    samples, scores = _sample_b_while_ranking_a(servicer, a, a_samples, b)
    # The calls take turns, so whichever went first waited at the barrier for the other in vain.
    assert meeting.barrier.broken
    failed = [r for r in (samples, scores) if isinstance(r, grpc.RpcError)]
    assert failed and all(r.code() == grpc.StatusCode.INTERNAL for r in failed)


def test_the_prefetch_stands_aside_while_the_rank_lane_is_busy(synthetic_assets_dir: Path) -> None:
    backend = OferBackend.from_assets(synthetic_assets_dir, "cpu")
    servicer = OferServicer(backend)
    assert servicer.prefetch is not None
    running = start_server(lambda s: ofer_pb2_grpc.add_OferServiceServicer_to_server(servicer, s), [SERVICE_NAME],
                           ServerOptions())
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = ofer_pb2_grpc.OferServiceStub(channel)

            def sample(face: AlignedFace) -> None:
                list(stub.Sample(ofer_pb2.SampleRequest(face=wire.face_message(face, 0, (100, 100)), num_samples=2,
                                                        steps=4), timeout=60))

            with servicer._rank_lock:  # another face is ranking: both cores are busy already
                sample(random_aligned_face(7))
            assert len(servicer.prefetch) == 0
            sample(random_aligned_face(8))  # an idle service: the face's context is prefetched for its Rank
            assert len(servicer.prefetch) == 1
    finally:
        running.stop(0)
        servicer.prefetch.close()
