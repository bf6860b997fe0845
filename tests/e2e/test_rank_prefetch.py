"""IdRank's context computed while the face's Sample runs (the ofer service's ``RankContextPrefetch``).

The prefetch calls the same ``OferBackend.rank_context`` that Rank calls, on the same tensors, so the
scores must be bit for bit those of a service without it, in every numerics mode.
The prefetch's own bounds (queue, entries, deadline, drop) are tested with a stand-in computation.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from ofer_faces import random_aligned_face

from facefuse import wire
from facefuse.errors import CancelledError, DeadlineError
from facefuse.face.types import AlignedFace
from facefuse.packs.base import StopCheck
from facefuse.packs.flame import OferBackend
from facefuse.servers.base import ServerOptions, start_server
from facefuse.servers.ofer import PREFETCH_NICE, SERVICE_NAME, OferServicer, RankContextPrefetch
from facefuse.v1 import ofer_pb2, ofer_pb2_grpc


def _sample_then_rank(servicer: OferServicer, face: AlignedFace) -> tuple[np.ndarray, np.ndarray]:
    """The gateway's order: Sample (with the FaRL input), then Rank of the samples."""
    running = start_server(lambda s: ofer_pb2_grpc.add_OferServiceServicer_to_server(servicer, s), [SERVICE_NAME],
                           ServerOptions())
    message = wire.face_message(face, 0, (100, 100))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = ofer_pb2_grpc.OferServiceStub(channel)
            chunks = stub.Sample(ofer_pb2.SampleRequest(face=message, num_samples=6, seed=3, steps=8), timeout=120)
            samples = np.concatenate([wire.to_numpy(c.shapes) for c in chunks])
            reply = stub.Rank(ofer_pb2.RankRequest(face=message, candidates=wire.from_numpy(samples)), timeout=120)
            return samples, np.array(wire.to_numpy(reply.scores))
    finally:
        running.stop(0)
        if servicer.prefetch is not None:
            servicer.prefetch.close()


class _Spy:
    """Counts the prefetch's computations and the Rank calls that got a context handed over."""

    def __init__(self, backend: OferBackend) -> None:
        self.backend = backend
        self.prefetched = 0
        self.handed_over = 0

    def wrap(self, servicer: OferServicer) -> OferServicer:
        assert servicer.prefetch is not None
        compute = servicer.prefetch._compute

        def counted(face: AlignedFace, check: StopCheck) -> object:
            self.prefetched += 1
            return compute(face, check)

        servicer.prefetch._compute = counted
        rank = self.backend.rank

        def spied_rank(*args: object, **kwargs: object) -> np.ndarray:
            self.handed_over += "context" in kwargs
            return rank(*args, **kwargs)  # type: ignore[arg-type]

        servicer.backend = type("SpiedBackend", (), {"rank": staticmethod(spied_rank), "sample": self.backend.sample,
                                                     "status": self.backend.status})()  # type: ignore[assignment]
        return servicer


def test_scores_with_the_prefetch_equal_those_without_bit_for_bit(ofer_backend_per_numerics: OferBackend) -> None:
    backend = ofer_backend_per_numerics
    face = random_aligned_face(1)
    spy = _Spy(backend)
    samples, overlapped = _sample_then_rank(spy.wrap(OferServicer(backend)), face)
    assert spy.prefetched == 1 and spy.handed_over == 1  # the context really came from the prefetch
    plain_samples, plain = _sample_then_rank(OferServicer(backend, rank_prefetch=False), face)
    assert np.array_equal(samples, plain_samples)
    assert np.array_equal(overlapped, plain)
    assert np.array_equal(overlapped, backend.rank(face, samples))  # and the library call, in this thread


def test_a_sample_without_the_farl_input_prefetches_nothing(synthetic_assets_dir: Path) -> None:
    backend = OferBackend.from_assets(synthetic_assets_dir, "cpu")
    servicer = OferServicer(backend)
    assert servicer.prefetch is not None
    face = random_aligned_face(2, farl=False)
    running = start_server(lambda s: ofer_pb2_grpc.add_OferServiceServicer_to_server(servicer, s), [SERVICE_NAME],
                           ServerOptions())
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = ofer_pb2_grpc.OferServiceStub(channel)
            list(stub.Sample(ofer_pb2.SampleRequest(face=wire.face_message(face, 0, (100, 100)), num_samples=2,
                                                    steps=4), timeout=120))
        assert len(servicer.prefetch) == 0
    finally:
        running.stop(0)
        servicer.prefetch.close()


class _Blocking:
    """A stand-in context computation that runs until released, checking its stop check as a network does."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started: list[int] = []
        self.stopped: list[tuple[int, str]] = []

    def __call__(self, face: AlignedFace, check: StopCheck) -> object:
        seed = int(face.arcface_blob.flat[0] * 1e6)
        self.started.append(seed)
        try:
            while not self.release.wait(0.01):
                check()
        except (CancelledError, DeadlineError) as exc:
            self.stopped.append((seed, type(exc).__name__))
            raise
        return ("context", seed)


def _wait_until(condition: object, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def _never() -> None:
    return None


@pytest.fixture
def blocking() -> Iterator[tuple[_Blocking, RankContextPrefetch]]:
    work = _Blocking()
    prefetch = RankContextPrefetch(work, entries=2, waiting=1)
    yield work, prefetch
    work.release.set()
    prefetch.close()


def test_the_prefetch_is_bounded_and_drops_the_oldest_waiting_job(
    blocking: tuple[_Blocking, RankContextPrefetch]
) -> None:
    work, prefetch = blocking
    faces = [random_aligned_face(k) for k in range(4)]
    seeds = [int(f.arcface_blob.flat[0] * 1e6) for f in faces]
    prefetch.start(faces[0], None)
    _wait_until(lambda: work.started == [seeds[0]])  # running on the one worker
    prefetch.start(faces[1], None)  # waits
    prefetch.start(faces[2], None)  # replaces face 1 in the queue (one waiting job at most)
    assert len(prefetch) == 2
    assert prefetch.take(faces[1], _never) is None  # dropped: its Rank computes the context itself
    prefetch.start(faces[3], None)  # replaces face 2; entries stay <= 2
    assert len(prefetch) == 2
    work.release.set()
    assert prefetch.take(faces[0], _never) == ("context", seeds[0])
    assert prefetch.take(faces[3], _never) in (("context", seeds[3]), None)
    assert seeds[1] not in work.started and seeds[2] not in work.started  # dropped jobs never ran
    assert len(prefetch) == 0


def test_a_rank_finding_its_job_still_queued_computes_it_itself(
    blocking: tuple[_Blocking, RankContextPrefetch]
) -> None:
    work, prefetch = blocking
    first, second = random_aligned_face(10), random_aligned_face(11)
    prefetch.start(first, None)
    _wait_until(lambda: len(work.started) == 1)
    prefetch.start(second, None)
    assert prefetch.take(second, _never) is None  # queued behind another face: not waited for
    work.release.set()
    assert prefetch.take(first, _never) is not None
    assert len(work.started) == 1


def test_a_discarded_or_late_job_stops(blocking: tuple[_Blocking, RankContextPrefetch]) -> None:
    work, prefetch = blocking
    face, late = random_aligned_face(20), random_aligned_face(21)
    prefetch.start(face, None)
    _wait_until(lambda: len(work.started) == 1)
    prefetch.discard(face)  # its Sample failed or its caller went away
    _wait_until(lambda: len(work.stopped) == 1)
    assert work.stopped[0][1] == "CancelledError" and len(prefetch) == 0
    prefetch.start(late, time.monotonic() + 0.2)  # the Sample call's deadline
    _wait_until(lambda: len(work.stopped) == 2)
    assert work.stopped[1][1] == "DeadlineError"
    assert prefetch.take(late, _never) is None  # failed: Rank computes (and reports) it as before


def test_a_rank_waiting_for_its_context_honours_its_own_deadline(
    blocking: tuple[_Blocking, RankContextPrefetch]
) -> None:
    work, prefetch = blocking
    face = random_aligned_face(30)
    prefetch.start(face, None)
    _wait_until(lambda: len(work.started) == 1)

    def gone() -> None:
        raise DeadlineError("deadline exceeded during the call")

    with pytest.raises(DeadlineError):
        prefetch.take(face, gone)
    _wait_until(lambda: len(work.stopped) == 1)  # and the abandoned job stops too


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread priorities are set on Linux only")
def test_the_prefetch_thread_runs_at_a_lower_priority(blocking: tuple[_Blocking, RankContextPrefetch]) -> None:
    _, prefetch = blocking
    here = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    worker = prefetch._executor.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
    assert worker.result(timeout=10) == min(here + PREFETCH_NICE, 19)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == here  # only that thread
