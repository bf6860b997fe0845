"""Cancellation and deadlines in the model services, on real in-process servers on loopback.

Work nobody waits for must not be done: a cancelled or expired call stops its backend work and frees
the service for the next caller; a queued call whose caller left never runs; a batch with no caller
left stops. The backend here is a double with a slow per-step loop (the flame pack's real sampler is
tested the same way in tests/e2e/test_ofer_cancellation_e2e.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence

import grpc
import numpy as np
import pytest

from facefuse import wire
from facefuse.errors import CancelledError, DeadlineError
from facefuse.face.types import AlignedFace
from facefuse.packs.base import BackendStatus, StopCheck
from facefuse.packs.flame import SampleJob
from facefuse.rpc.deadline import Deadline
from facefuse.servers.base import RunningServer, ServerOptions, start_server
from facefuse.servers.batching import DynamicBatcher
from facefuse.servers.ofer import SERVICE_NAME, OferServicer
from facefuse.v1 import common_pb2, ofer_pb2, ofer_pb2_grpc

STEP_S = 0.05
FACE = common_pb2.Face(arcface_blob=wire.from_numpy(np.zeros((3, 112, 112), np.float32)))


class SlowSampler:
    """A generative backend double: ``steps`` steps of ``STEP_S`` each, checking ``stop_check`` between
    steps like the real samplers; records which calls (by seed) started, finished and were stopped."""

    def __init__(self) -> None:
        self.status = BackendStatus("ofer", "slow-double", "test", True, False, "ready")
        self.started: list[int] = []
        self.finished: list[int] = []
        self.stopped: list[int] = []
        self.batches: list[list[int]] = []
        self.running = threading.Event()

    def _steps(self, seed: int, steps: int, stop_check: StopCheck | None) -> None:
        self.started.append(seed)
        self.running.set()
        try:
            for _ in range(steps):
                time.sleep(STEP_S)
                if stop_check is not None:
                    stop_check()
        except (CancelledError, DeadlineError):
            self.stopped.append(seed)
            raise
        finally:
            self.running.clear()
        self.finished.append(seed)

    def sample(
        self,
        face: AlignedFace,
        num_samples: int,
        *,
        mode: str,
        steps: int,
        seed: int,
        start_shape: np.ndarray | None,
        start_t0: int,
        guide_shape: np.ndarray | None,
        guide_strength: float,
        visibility: object | None = None,
        stop_check: StopCheck | None = None,
    ) -> np.ndarray:
        self._steps(seed, steps, stop_check)
        return np.full((num_samples, 4), float(seed), np.float32)

    def sample_batch(self, jobs: Sequence[SampleJob], stop_check: StopCheck | None = None) -> list[np.ndarray]:
        self.batches.append([job.seed for job in jobs])
        self._steps(-len(self.batches), max(job.steps for job in jobs), stop_check)
        return [np.full((job.num_samples, 4), float(job.seed), np.float32) for job in jobs]

    def rank(self, face: AlignedFace, candidates: np.ndarray, visibility: object | None = None,
             stop_check: StopCheck | None = None) -> np.ndarray:
        self._steps(-1000, len(candidates), stop_check)
        return np.zeros(len(candidates), np.float32)


@pytest.fixture
def ofer(request: pytest.FixtureRequest) -> Iterator[tuple[SlowSampler, ofer_pb2_grpc.OferServiceStub, RunningServer]]:
    backend = SlowSampler()
    servicer = OferServicer(backend, **getattr(request, "param", {}))  # type: ignore[arg-type]
    running = start_server(lambda s: ofer_pb2_grpc.add_OferServiceServicer_to_server(servicer, s), [SERVICE_NAME],
                           ServerOptions())
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    yield backend, ofer_pb2_grpc.OferServiceStub(channel), running
    channel.close()
    running.stop(0)
    if servicer.batcher is not None:
        servicer.batcher.close()


def _request(seed: int, steps: int) -> ofer_pb2.SampleRequest:
    return ofer_pb2.SampleRequest(face=FACE, num_samples=2, seed=seed, steps=steps)


def _wait_until(condition, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    until = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < until, "timed out waiting"
        time.sleep(0.01)


def _served_in(stub: ofer_pb2_grpc.OferServiceStub, seed: int) -> float:
    """Seconds until a short Sample (2 steps) is answered, checking the answer is the caller's own."""
    started = time.monotonic()
    (chunk,) = list(stub.Sample(_request(seed, steps=2), timeout=10))
    assert np.all(wire.to_numpy(chunk.shapes) == seed)
    return time.monotonic() - started


def test_a_cancelled_sample_stops_and_the_next_caller_is_served_at_once(ofer) -> None:
    backend, stub, _ = ofer
    call = stub.Sample(_request(1, steps=400), timeout=60)  # 20 s of work
    _wait_until(backend.running.is_set)
    call.cancel()
    waited = _served_in(stub, 2)
    assert backend.stopped == [1] and backend.finished == [2]
    assert waited < 1.0, f"the next caller waited {waited:.2f} s behind abandoned work"
    with pytest.raises(grpc.RpcError) as caught:
        list(call)
    assert caught.value.code() == grpc.StatusCode.CANCELLED


def test_an_expired_sample_stops_at_its_deadline(ofer) -> None:
    backend, stub, _ = ofer
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Sample(_request(1, steps=400), timeout=0.5))
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 1.5
    waited = _served_in(stub, 2)
    assert backend.stopped == [1] and backend.finished == [2] and waited < 1.0


def test_queued_calls_whose_caller_left_never_run(ofer) -> None:
    backend, stub, _ = ofer
    first = stub.Sample(_request(1, steps=30), timeout=30)  # 1.5 s holding the model
    _wait_until(backend.running.is_set)
    for seed in (2, 3):  # queued behind it, expire in the queue
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Sample(_request(seed, steps=2), timeout=0.3))
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    cancelled = stub.Sample(_request(4, steps=2), timeout=30)  # queued, then cancelled by its caller
    time.sleep(0.2)
    cancelled.cancel()
    assert len(list(first)) == 1
    _served_in(stub, 5)
    assert backend.started == [1, 5], "only calls someone waited for ran"


def test_a_cancelled_rank_frees_the_model(ofer) -> None:
    backend, stub, _ = ofer
    candidates = wire.from_numpy(np.zeros((400, 4), np.float32))  # the double takes one step per candidate
    call = stub.Rank.future(ofer_pb2.RankRequest(face=FACE, candidates=candidates), timeout=60)
    _wait_until(backend.running.is_set)
    call.cancel()
    assert _served_in(stub, 2) < 1.0
    assert backend.stopped == [-1000]


@pytest.mark.parametrize("ofer", [{"max_batch": 4, "batch_wait_s": 0.2}], indirect=True)
def test_a_batch_stops_once_every_caller_left_and_the_next_batch_runs(ofer) -> None:
    backend, stub, _ = ofer
    blocker = stub.Sample(_request(0, steps=400), timeout=60)  # a lone call runs at once, alone
    _wait_until(backend.running.is_set)
    calls = [stub.Sample(_request(seed, steps=400), timeout=60) for seed in (1, 2)]  # queue behind it
    time.sleep(0.3)
    blocker.cancel()
    _wait_until(lambda: len(backend.batches) == 2 and backend.running.is_set())
    assert [sorted(b) for b in backend.batches] == [[0], [1, 2]] and backend.stopped == [-1]
    calls[0].cancel()
    time.sleep(0.3)
    assert backend.stopped == [-1], "one caller still waits: the batch goes on"
    calls[1].cancel()
    waited = _served_in(stub, 3)
    assert backend.stopped == [-1, -2] and [sorted(b) for b in backend.batches] == [[0], [1, 2], [3]]
    assert waited < 1.5  # a lone call: no fill wait


def test_the_batcher_drops_queued_items_whose_caller_is_gone_without_running_them() -> None:
    ran: list[int] = []
    release = threading.Event()

    def run(items: Sequence[int], stop_check: StopCheck) -> list[int]:
        ran.extend(items)
        release.wait(5)
        return list(items)

    batcher: DynamicBatcher[int, int] = DynamicBatcher(run, max_batch=8, max_wait_s=0.0)
    try:
        blocker = batcher.submit(0)
        _wait_until(lambda: ran == [0])
        expired = batcher.submit(1, Deadline.after(0.05))
        gone = Deadline.after(60)
        cancelled = batcher.submit(2, gone)
        gone.cancel()
        withdrawn = batcher.submit(3)
        withdrawn.cancel()
        alive = batcher.submit(4, Deadline.after(60))
        time.sleep(0.1)
        release.set()
        assert blocker.result(5) == 0 and alive.result(5) == 4
        with pytest.raises(DeadlineError):
            expired.result(5)
        with pytest.raises(CancelledError):
            cancelled.result(5)
        assert withdrawn.cancelled()
        assert ran == [0, 4] and batcher.batches_run == 2 and batcher.items_dropped == 3

        nobody = Deadline.after(0.01)
        time.sleep(0.05)
        with pytest.raises(DeadlineError):
            batcher.submit(5, nobody).result(5)
        assert ran == [0, 4] and batcher.batches_run == 2, "a batch with nobody waiting is not run"
    finally:
        release.set()
        batcher.close()


class OneFace:
    """A front end that finds one fixed face in any image."""

    name = "fixed"

    def detect(self, image: np.ndarray) -> list[object]:
        from facefuse.face.types import Detection

        return [Detection(box=[10, 10, 100, 100], score=0.9, kps5=np.full((5, 2), 50.0), detector="fixed")]

    def align(self, image: np.ndarray, detection: object) -> AlignedFace:
        return AlignedFace(detection, np.zeros((112, 112, 3), np.uint8), np.zeros((224, 224, 3), np.uint8),  # type: ignore[arg-type]
                           np.zeros((224, 224, 3), np.float32), np.zeros((3, 112, 112), np.float32))


def test_the_gateway_pipeline_cancels_its_backend_call_when_its_own_caller_leaves(ofer, astronaut_jpeg: bytes) -> None:
    """The end client cancels its gateway stream: the gateway's Sample call is cancelled too and the
    ofer service stops, instead of computing until the propagated timeout."""
    from facefuse.pipeline.orchestration import FacePipeline, MeshClients
    from facefuse.v1 import gateway_pb2

    backend, _, running = ofer
    clients = MeshClients.connect(None, f"127.0.0.1:{running.port}", None)
    pipeline = FacePipeline(OneFace(), clients)
    deadline = Deadline.after(60)
    results: list[object] = []
    options = gateway_pb2.ProcessOptions(method="ofer", num_samples=2, steps=400, seed=1)
    worker = threading.Thread(target=lambda: results.extend(pipeline.process_image("a", astronaut_jpeg, options,
                                                                                   deadline=deadline)))
    try:
        worker.start()
        _wait_until(backend.running.is_set)
        deadline.cancel()  # what the gateway's context callback does when its caller cancels
        _wait_until(lambda: backend.stopped == [1], timeout_s=1.0)
        worker.join(5)
        assert not worker.is_alive()
    finally:
        pipeline.close()
        clients.close()
