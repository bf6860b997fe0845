"""The gateway's stream limits on a real gateway server on loopback (a fixed one-face front end, no backends).

Each test holds one class of starvation or memory growth: streams beyond the cap, idle streams, endless
partial images, and a client that stops reading.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from facefuse.face.types import AlignedFace, Detection
from facefuse.pipeline.orchestration import FacePipeline, MeshClients
from facefuse.servers.base import RunningServer, ServerOptions, start_server
from facefuse.servers.gateway import SERVICE_NAME, UNARY_RESERVE, GatewayServicer, StreamLimits
from facefuse.v1 import gateway_pb2, gateway_pb2_grpc

pytestmark = pytest.mark.timeout(60)


class CountingFace:
    """One fixed face per image, found instantly; counts the images it was asked to look at."""

    name = "fixed"

    def __init__(self) -> None:
        self.images = 0
        self._lock = threading.Lock()

    def detect(self, image: np.ndarray) -> list[Detection]:
        with self._lock:
            self.images += 1
        return [Detection(box=[10, 10, 100, 100], score=0.9, kps5=np.full((5, 2), 50.0), detector="fixed")]

    def align(self, image: np.ndarray, detection: Detection) -> AlignedFace:
        return AlignedFace(detection, np.zeros((112, 112, 3), np.uint8), np.zeros((224, 224, 3), np.uint8),
                           np.zeros((224, 224, 3), np.float32), np.zeros((3, 112, 112), np.float32))


@dataclass
class Gateway:
    running: RunningServer
    front_end: CountingFace
    channel: grpc.Channel

    @property
    def stub(self) -> gateway_pb2_grpc.GatewayStub:
        return gateway_pb2_grpc.GatewayStub(self.channel)


@pytest.fixture
def gateway(request: pytest.FixtureRequest) -> Iterator[Gateway]:
    limits = StreamLimits(**getattr(request, "param", {}))
    front_end = CountingFace()
    clients = MeshClients.connect(None, None, None)
    pipeline = FacePipeline(front_end, clients)
    servicer = GatewayServicer(pipeline, limits=limits, image_workers=4)
    running = start_server(lambda s: gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, s), [SERVICE_NAME],
                           ServerOptions(max_workers=limits.max_streams + UNARY_RESERVE))
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    yield Gateway(running, front_end, channel)
    channel.close()
    running.stop(0)
    servicer.close()
    pipeline.close()


def _jpeg() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((120, 120, 3), 128, np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


IMAGE = _jpeg()


def _image(image_id: str, method: str = "detect") -> gateway_pb2.ImageChunk:
    return gateway_pb2.ImageChunk(image_id=image_id, data=IMAGE, last=True,
                                  options=gateway_pb2.ProcessOptions(method=method))


def _silent(stop: threading.Event) -> Iterator[gateway_pb2.ImageChunk]:
    """A request stream that sends nothing until ``stop`` is set."""
    stop.wait(30)
    return
    yield


def _read_all(call: Iterator[gateway_pb2.FaceResult]) -> tuple[grpc.StatusCode, str, list[gateway_pb2.FaceResult]]:
    """Read a response stream to its end: its status code, details and results."""
    results: list[gateway_pb2.FaceResult] = []
    try:
        results.extend(call)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", results
    return grpc.StatusCode.OK, "", results


def _code_of(call: Iterator[gateway_pb2.FaceResult]) -> tuple[grpc.StatusCode, str, int]:
    code, details, results = _read_all(call)
    return code, details, len(results)


def _health_seconds(channel: grpc.Channel) -> float:
    started = time.monotonic()
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=1.0)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    return time.monotonic() - started


def _reflection_seconds(channel: grpc.Channel) -> float:
    started = time.monotonic()
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    (reply,) = list(
        stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=1.0)
    )
    assert SERVICE_NAME in {s.name for s in reply.list_services_response.service}
    return time.monotonic() - started


def _stream_reader_threads() -> int:
    return sum(t.name == "gateway-reader" and t.is_alive() for t in threading.enumerate())


def _wait_until(predicate, timeout_s: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.mark.parametrize("gateway", [{"max_streams": 3, "idle_s": 30}], indirect=True)
def test_streams_beyond_the_cap_are_refused_while_health_answers_within_a_second(gateway: Gateway) -> None:
    stop = threading.Event()
    idle = [gateway.stub.Process(_silent(stop), timeout=30) for _ in range(3)]
    try:
        assert _wait_until(lambda: _stream_reader_threads() == 3, 5), "the idle streams did not start"
        code, details, count = _code_of(gateway.stub.Process(iter([_image("over")]), timeout=5))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and count == 0
        assert "3 concurrent Process streams" in details and "--max-streams" in details
        assert max(_health_seconds(gateway.channel) for _ in range(5)) < 1.0
        assert _reflection_seconds(gateway.channel) < 1.0
        idle[0].cancel()  # a slot frees when its stream goes away: the next stream is served
        assert _wait_until(lambda: _stream_reader_threads() == 2, 5)
        code, details, count = _code_of(gateway.stub.Process(iter([_image("next")]), timeout=10))
        assert (code, count) == (grpc.StatusCode.OK, 1), details
    finally:
        stop.set()
        for call in idle:
            call.cancel()


@pytest.mark.parametrize("gateway", [{"max_streams": 1, "idle_s": 0.5}], indirect=True)
def test_an_idle_stream_is_ended_and_frees_its_slot(gateway: Gateway) -> None:
    stop = threading.Event()
    started = time.monotonic()
    try:
        code, details, _ = _code_of(gateway.stub.Process(_silent(stop), timeout=20))
    finally:
        stop.set()
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "--stream-idle-s" in details
    assert time.monotonic() - started < 3.0
    assert _wait_until(lambda: _stream_reader_threads() == 0, 3), "the idle stream's reader thread outlived it"
    code, details, count = _code_of(gateway.stub.Process(iter([_image("after")]), timeout=10))
    assert (code, count) == (grpc.StatusCode.OK, 1), details


@pytest.mark.parametrize("gateway", [{"max_streams": 2, "idle_s": 0.5}], indirect=True)
def test_a_stream_that_keeps_sending_is_not_idle(gateway: Gateway) -> None:
    def slow_images() -> Iterator[gateway_pb2.ImageChunk]:
        for i in range(4):
            time.sleep(0.3)
            yield _image(f"slow-{i}")

    code, details, count = _code_of(gateway.stub.Process(slow_images(), timeout=20))
    assert (code, count) == (grpc.StatusCode.OK, 4), details


@pytest.mark.parametrize("gateway", [{"buffer_bytes": 1 << 20}], indirect=True)
def test_endless_partial_images_are_refused_over_the_stream_buffer(gateway: Gateway) -> None:
    sent = [0]
    stop = threading.Event()

    def flood() -> Iterator[gateway_pb2.ImageChunk]:
        yield _image("complete")
        for i in range(2000):  # 125 MiB if nothing stopped it
            if stop.is_set():
                return
            sent[0] += 1
            yield gateway_pb2.ImageChunk(image_id=f"partial-{i % 3}", data=bytes(64 << 10))

    try:
        code, details, results = _read_all(gateway.stub.Process(flood(), timeout=30))
    finally:
        stop.set()
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-stream-buffer-mb" in details
    # the complete image sent before the flood still gets its result
    assert [(r.image_id, r.status.code) for r in results] == [("complete", 0)]
    assert sent[0] < 2000


@pytest.mark.parametrize("gateway", [{"in_flight": 2, "max_streams": 1}], indirect=True)
def test_a_client_that_stops_reading_stops_the_gateway_and_can_still_cancel(gateway: Gateway) -> None:
    """Results are ~1 MB each (crops); without back-pressure all 60 images would be processed and queued."""
    call = gateway.stub.Process(iter([_image(f"img-{i}") for i in range(60)]), timeout=30)
    try:
        # let the gateway run until it blocks, then check that it stays blocked
        assert _wait_until(lambda: gateway.front_end.images >= 2, 10)
        time.sleep(2.0)
        plateau = gateway.front_end.images
        time.sleep(1.0)
        assert gateway.front_end.images == plateau < 30, "the gateway kept processing for a client that does not read"
        assert _reflection_seconds(gateway.channel) < 1.0
    finally:
        call.cancel()
    # the blocked stream ends when its client cancels: its slot and reader thread are freed
    assert _wait_until(lambda: _stream_reader_threads() == 0, 3)
    code, details, count = _code_of(gateway.stub.Process(iter([_image("after")]), timeout=10))
    assert (code, count) == (grpc.StatusCode.OK, 1), details


@pytest.mark.parametrize("gateway", [{"in_flight": 2, "max_streams": 1}], indirect=True)
def test_a_blocked_stream_ends_at_its_deadline(gateway: Gateway) -> None:
    call = gateway.stub.Process(iter([_image(f"img-{i}") for i in range(60)]), timeout=2.0)
    assert _wait_until(lambda: gateway.front_end.images >= 2, 5)
    started = time.monotonic()
    assert _wait_until(lambda: _stream_reader_threads() == 0, 5), "the blocked stream outlived its deadline"
    assert time.monotonic() - started < 4.0
    with pytest.raises(grpc.RpcError) as caught:
        list(call)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    code, details, count = _code_of(gateway.stub.Process(iter([_image("after")]), timeout=10))
    assert (code, count) == (grpc.StatusCode.OK, 1), details


@pytest.mark.parametrize(("argv", "expected"), [
    (["--workers", "10"], "--max-streams 64"),
    (["--stream-in-flight", "0"], "stream limits must be positive"),
    (["--image-workers", "0"], "--image-workers must be at least 1"),
])
def test_gateway_flags_that_cannot_work_are_a_usage_error(argv: list[str], expected: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from facefuse.servers import gateway

    assert gateway.main(argv) == 2
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "1025"])
def test_faces_in_flight_out_of_range_is_a_clear_usage_error(value: str) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "facefuse.servers.gateway", "--faces-in-flight", value],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--faces-in-flight must be 1..1024" in done.stderr and "Traceback" not in done.stderr
