"""The transport layer: status mapping both ways, the deadline type, and the interceptor on a real server."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from facefuse.errors import (
    AssetError,
    BackendError,
    BackendUnavailableError,
    CancelledError,
    DeadlineError,
    InvalidInputError,
    LimitExceededError,
)
from facefuse.rpc.deadline import Deadline
from facefuse.rpc.logs import REQUEST_ID_KEY
from facefuse.rpc.status import error_from_rpc, is_backend_down, status_code_for
from facefuse.servers.base import ServerOptions, start_server
from facefuse.v1 import common_pb2, mica_pb2, mica_pb2_grpc

ROUND_TRIP = [
    (InvalidInputError("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (LimitExceededError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (AssetError("x"), grpc.StatusCode.FAILED_PRECONDITION),
    (BackendUnavailableError("x"), grpc.StatusCode.UNAVAILABLE),
    (DeadlineError("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (CancelledError("x"), grpc.StatusCode.CANCELLED),
]


def _rpc_error(status: grpc.StatusCode, detail: str = "detail") -> grpc.RpcError:
    """What a failed call raises on the client side."""

    class _Failed(grpc.RpcError, grpc.Call):  # type: ignore[misc]
        def code(self) -> grpc.StatusCode:
            return status

        def details(self) -> str:
            return detail

    return _Failed()


@pytest.mark.parametrize(("error", "code"), ROUND_TRIP)
def test_codes_round_trip(error: Exception, code: grpc.StatusCode) -> None:
    assert status_code_for(error) == code
    back = error_from_rpc(_rpc_error(code), "peer")
    assert type(back) is type(error)
    assert "peer" in str(back)


def test_backend_bugs_are_not_outages() -> None:
    """UNKNOWN / INTERNAL from a backend are its bugs: never a reason for a silent fallback."""
    for code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS):
        error = error_from_rpc(_rpc_error(code, "boom"), "ofer")
        assert isinstance(error, BackendError)
        assert not is_backend_down(error)
        assert status_code_for(error) == grpc.StatusCode.INTERNAL
    assert is_backend_down(BackendUnavailableError("x")) and is_backend_down(DeadlineError("x"))
    assert not is_backend_down(InvalidInputError("x"))


def test_deadline() -> None:
    assert Deadline.none().timeout(default=7.0) == 7.0
    assert Deadline.none().remaining() is None
    soon = Deadline.after(10.0)
    timeout = soon.timeout(default=600.0)
    assert timeout is not None and 9.0 < timeout < 10.0
    assert soon.timeout(default=1.0) == 1.0
    past = Deadline.after(-1.0)
    assert past.expired and not past.alive
    with pytest.raises(DeadlineError):
        past.timeout()
    gone = Deadline.after(10.0)
    gone.cancel()
    with pytest.raises(CancelledError):
        gone.check("sampling")


class _Servicer(mica_pb2_grpc.MicaServiceServicer):
    """Raises what each request asks for, to see the interceptor's mapping through a real server."""

    def __init__(self) -> None:
        self.request_ids: list[str] = []

    def Info(self, request: common_pb2.InfoRequest, context: grpc.ServicerContext) -> common_pb2.BackendInfo:
        from facefuse.rpc.logs import current_request_id

        self.request_ids.append(current_request_id.get())
        return common_pb2.BackendInfo(service="test")

    def Predict(self, request: mica_pb2.PredictRequest, context: grpc.ServicerContext) -> mica_pb2.PredictResponse:
        if len(request.faces) == 1:
            raise InvalidInputError("one face is a bad request here")
        if len(request.faces) == 2:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "handler aborted on purpose")
        raise KeyError("our own bug")


@pytest.fixture()
def server() -> Iterator[tuple[grpc.Channel, _Servicer]]:
    servicer = _Servicer()
    running = start_server(lambda s: mica_pb2_grpc.add_MicaServiceServicer_to_server(servicer, s),
                           ["facefuse.v1.MicaService"], ServerOptions())
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield channel, servicer
    finally:
        channel.close()
        running.stop(0)


def test_interceptor_maps_errors(server: tuple[grpc.Channel, _Servicer]) -> None:
    channel, _ = server
    stub = mica_pb2_grpc.MicaServiceStub(channel)
    expected = {1: grpc.StatusCode.INVALID_ARGUMENT, 2: grpc.StatusCode.PERMISSION_DENIED, 3: grpc.StatusCode.INTERNAL}
    for count, code in expected.items():
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(mica_pb2.PredictRequest(faces=[common_pb2.Face()] * count), timeout=10)
        assert info.value.code() == code
    # our bug: the client learns the request id and the exception type, not the message
    assert "request id" in info.value.details() and "KeyError" in info.value.details()
    assert "our own bug" not in info.value.details()


def test_request_id_travels(server: tuple[grpc.Channel, _Servicer]) -> None:
    channel, servicer = server
    stub = mica_pb2_grpc.MicaServiceStub(channel)
    _, call = stub.Info.with_call(common_pb2.InfoRequest(), metadata=((REQUEST_ID_KEY, "abc123"),), timeout=10)
    assert servicer.request_ids[-1] == "abc123"
    assert (REQUEST_ID_KEY, "abc123") in tuple(call.trailing_metadata())
    _, call = stub.Info.with_call(common_pb2.InfoRequest(), timeout=10)  # none given: one is made
    made = dict(call.trailing_metadata())[REQUEST_ID_KEY]
    assert len(made) == 16 and servicer.request_ids[-1] == made
    health = health_pb2_grpc.HealthStub(channel)
    started = time.monotonic()
    assert (
        health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        == health_pb2.HealthCheckResponse.SERVING
    )
    assert time.monotonic() - started < 1.0
