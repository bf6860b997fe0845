"""Server base behaviour on real in-process servers: deadlines, limits, batching, status codes."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import grpc
import numpy as np
import pytest

from facefuse import wire
from facefuse.errors import AssetError
from facefuse.face.types import AlignedFace
from facefuse.packs.base import BackendStatus, ShapeResult
from facefuse.pipeline.orchestration import FacePipeline, MeshClients
from facefuse.rpc.deadline import Deadline
from facefuse.servers.base import ServerOptions, start_server
from facefuse.servers.batching import DynamicBatcher
from facefuse.servers.mica import SERVICE_NAME, MicaServicer
from facefuse.v1 import common_pb2, gateway_pb2, mica_pb2, mica_pb2_grpc


class EchoBackend:
    """Returns each face's blob mean as a 'shape', optionally slowly; records batch sizes."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.batch_sizes: list[int] = []
        self.status = BackendStatus("mica", "echo", "test", True, False, "ready")

    def predict(self, faces: Sequence[AlignedFace]) -> list[ShapeResult]:
        self.batch_sizes.append(len(faces))
        time.sleep(self.delay_s)
        return [
            ShapeResult(
                vertices_mm=np.zeros((3, 3), np.float32),
                faces=np.array([[0, 1, 2]], np.int32),
                topology="test",
                shape=np.full(300, float(f.arcface_blob.mean()), np.float32),
            )
            for f in faces
        ]


def _face(value: float) -> common_pb2.Face:
    return common_pb2.Face(arcface_blob=wire.from_numpy(np.full((3, 112, 112), value, np.float32)))


@pytest.fixture
def mica_server(request: pytest.FixtureRequest):
    backend = EchoBackend(**getattr(request, "param", {}))
    servicer = MicaServicer(backend, max_batch=8, batch_wait_s=0.05)
    running = start_server(lambda s: mica_pb2_grpc.add_MicaServiceServicer_to_server(servicer, s), [SERVICE_NAME],
                           ServerOptions(max_message_mb=1))
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    yield backend, mica_pb2_grpc.MicaServiceStub(channel), running
    channel.close()
    running.stop(0)


@pytest.mark.parametrize("mica_server", [{"delay_s": 0.3}], indirect=True)
def test_concurrent_requests_are_batched_and_answered_individually(mica_server) -> None:
    """A lone request runs at once; the ones arriving while it runs (0.3 s) queue and go as one batch."""
    backend, stub, _ = mica_server
    results: dict[int, float] = {}

    def call(i: int) -> None:
        reply = stub.Predict(mica_pb2.PredictRequest(faces=[_face(i / 10)]), timeout=10)
        results[i] = float(wire.to_numpy(reply.predictions[0].shape)[0])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == pytest.approx({i: i / 10 for i in range(8)})
    assert max(backend.batch_sizes) > 1 and sum(backend.batch_sizes) == 8


@pytest.mark.parametrize("mica_server", [{"delay_s": 2.0}], indirect=True)
def test_deadline_expiry_is_deadline_exceeded_not_a_hang(mica_server) -> None:
    _, stub, _ = mica_server
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(mica_pb2.PredictRequest(faces=[_face(0.0)]), timeout=0.3)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 1.5


def test_message_size_limit_is_resource_exhausted(mica_server) -> None:
    _, stub, _ = mica_server
    faces = [_face(0.0) for _ in range(8)]  # 8 x 150 kB > the 1 MiB limit of this server
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(mica_pb2.PredictRequest(faces=faces), timeout=10)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_bad_input_is_invalid_argument_with_the_field_named(mica_server) -> None:
    _, stub, _ = mica_server
    bad = common_pb2.Face(arcface_blob=wire.from_numpy(np.zeros((3, 64, 64), np.float32)))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(mica_pb2.PredictRequest(faces=[bad]), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "faces[0].arcface_blob" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(mica_pb2.PredictRequest(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_gateway_propagates_its_deadline_to_a_slow_backend(astronaut_jpeg: bytes) -> None:
    """A face whose backend is slower than the caller's deadline gets DEADLINE_EXCEEDED promptly."""
    backend = EchoBackend(delay_s=5.0)
    servicer = MicaServicer(backend, max_batch=1, batch_wait_s=0.0)
    running = start_server(
        lambda s: mica_pb2_grpc.add_MicaServiceServicer_to_server(servicer, s), [SERVICE_NAME], ServerOptions()
    )
    clients = MeshClients.connect(f"127.0.0.1:{running.port}", None, None)

    class OneFace:
        name = "fixed"

        def detect(self, image):
            from facefuse.face.types import Detection

            return [Detection(box=[10, 10, 100, 100], score=0.9, kps5=np.full((5, 2), 50.0), detector="fixed")]

        def align(self, image, detection):
            return AlignedFace(detection, np.zeros((112, 112, 3), np.uint8), np.zeros((224, 224, 3), np.uint8),
                               np.zeros((224, 224, 3), np.float32), np.zeros((3, 112, 112), np.float32))

    pipeline = FacePipeline(OneFace(), clients)
    try:
        started = time.monotonic()
        (result,) = list(pipeline.process_image("a", astronaut_jpeg, gateway_pb2.ProcessOptions(method="mica"),
                                                deadline=Deadline.after(0.5)))
        assert result.status.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        assert time.monotonic() - started < 2.0
    finally:
        pipeline.close()
        clients.close()
        running.stop(0)


def test_batcher_hands_a_batch_failure_to_every_caller() -> None:
    def explode(items, stop_check):
        raise AssetError("no model")

    batcher: DynamicBatcher[int, int] = DynamicBatcher(explode, max_batch=4, max_wait_s=0.01)
    futures = batcher.submit_many([1, 2, 3])
    for future in futures:
        with pytest.raises(AssetError):
            future.result(timeout=5)
    batcher.close()


def test_a_lone_request_does_not_wait_for_a_batch_to_fill() -> None:
    """With a 3 s batch wait, one request with nothing else queued is answered at once (bound: 1 s, generous
    for a busy machine); two items queued together still run as one batch."""
    backend = EchoBackend()
    servicer = MicaServicer(backend, max_batch=8, batch_wait_s=3.0)
    running = start_server(lambda s: mica_pb2_grpc.add_MicaServiceServicer_to_server(servicer, s), [SERVICE_NAME],
                           ServerOptions())
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = mica_pb2_grpc.MicaServiceStub(channel)
            stub.Predict(mica_pb2.PredictRequest(faces=[_face(0.0)]), timeout=10)  # channel and handler warm
            started = time.monotonic()
            reply = stub.Predict(mica_pb2.PredictRequest(faces=[_face(0.5)]), timeout=10)
            elapsed = time.monotonic() - started
    finally:
        running.stop(0)
    assert float(wire.to_numpy(reply.predictions[0].shape)[0]) == pytest.approx(0.5)
    assert elapsed < 1.0
    assert backend.batch_sizes[-1] == 1


def test_items_queued_behind_a_running_batch_fill_the_next_one() -> None:
    started = threading.Event()
    release = threading.Event()
    sizes: list[int] = []

    def run(items: Sequence[int], _stop: object) -> list[int]:
        sizes.append(len(items))
        started.set()
        release.wait(10)
        return [2 * item for item in items]

    batcher: DynamicBatcher[int, int] = DynamicBatcher(run, max_batch=8, max_wait_s=0.5)
    try:
        first = batcher.submit(1)
        assert started.wait(5)
        rest = batcher.submit_many([2, 3, 4])  # queued while the first batch runs
        release.set()
        assert first.result(10) == 2 and [f.result(10) for f in rest] == [4, 6, 8]
    finally:
        batcher.close()
    assert sizes == [1, 3]
