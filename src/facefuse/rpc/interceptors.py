"""One server interceptor: errors -> status codes, request ids, one log line and metrics per call.

Handlers raise facefuse errors and never touch status codes themselves; the interceptor maps them the
same way for unary and streaming RPCs (including errors raised while a response stream is being
iterated). Anything that is not a facefuse error is our bug: INTERNAL, logged with its traceback and
the request id, and the client sees only the request id and the exception's type.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import grpc

from facefuse.errors import FacefuseError
from facefuse.rpc.logs import LOG, REQUEST_ID_KEY, current_request_id, log_event, new_request_id
from facefuse.rpc.status import status_code_for

QUIET_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")
"""Probes and reflection run every few seconds: they are counted but not logged per call."""


class CallObserver(Protocol):
    """Told about every call (e.g. Prometheus metrics); must be cheap and never raise."""

    def call_started(self, method: str) -> None: ...

    def call_finished(self, method: str, code: grpc.StatusCode, seconds: float) -> None: ...


def request_id_of(context: grpc.ServicerContext) -> str:
    """The caller's request id from the metadata, or a new one; only short, printable ids are accepted."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and 0 < len(value) <= 64 and value.isprintable():
            return value
    return new_request_id()


def request_metadata(request_id: str | None = None) -> tuple[tuple[str, str], ...]:
    """Metadata for a downstream call, carrying the current request id."""
    rid = request_id or current_request_id.get()
    return ((REQUEST_ID_KEY, rid),) if rid else ()


class _Call:
    """The bookkeeping of one call: its request id, start time and the code it ended with."""

    def __init__(self, method: str, context: grpc.ServicerContext, observers: Sequence[CallObserver]) -> None:
        self.method = method
        self.context = context
        self.observers = observers
        self.request_id = request_id_of(context)
        self.started = time.perf_counter()
        self.code = grpc.StatusCode.OK
        self.token = current_request_id.set(self.request_id)
        context.set_trailing_metadata(((REQUEST_ID_KEY, self.request_id),))
        for observer in observers:
            observer.call_started(method)

    def fail(self, exc: BaseException) -> None:
        """Turn ``exc`` into the call's status (raises, as ``context.abort`` does)."""
        aborted = _code_of(self.context)
        if aborted is not None:  # the handler aborted on purpose: keep its code
            self.code = aborted
            raise exc
        if isinstance(exc, FacefuseError):
            self.code = status_code_for(exc)
            self.context.abort(self.code, str(exc))
        self.code = grpc.StatusCode.INTERNAL
        LOG.error("internal error in %s (request %s)", self.method, self.request_id, exc_info=exc)
        self.context.abort(self.code, f"internal error ({type(exc).__name__}); request id {self.request_id}")

    def finish(self) -> None:
        seconds = time.perf_counter() - self.started
        if self.code == grpc.StatusCode.OK and not self.context.is_active():
            self.code = grpc.StatusCode.CANCELLED
        for observer in self.observers:
            observer.call_finished(self.method, self.code, seconds)
        if not self.method.startswith(QUIET_METHODS):
            log_event("rpc", rpc=self.method, code=self.code.name, ms=round(seconds * 1000, 2))
        current_request_id.reset(self.token)


def _code_of(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    code = getattr(context, "code", None)
    try:
        value = code() if callable(code) else None
    except Exception:
        return None
    return value if isinstance(value, grpc.StatusCode) and value != grpc.StatusCode.OK else None


class ServerInterceptor(grpc.ServerInterceptor):
    """Wraps every handler of a server: see the module docstring."""

    def __init__(self, observers: Sequence[CallObserver] = ()) -> None:
        self.observers = tuple(observers)

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
                          handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary), handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(method, handler.unary_stream), handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(method, handler.stream_unary), handler.request_deserializer, handler.response_serializer)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._streaming(method, handler.stream_stream),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return handler

    def _unary(self, method: str, behaviour: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
        def run(request: Any, context: grpc.ServicerContext) -> Any:
            call = _Call(method, context, self.observers)
            try:
                return behaviour(request, context)
            except Exception as exc:
                call.fail(exc)
                raise
            finally:
                call.finish()

        return run

    def _streaming(
        self, method: str, behaviour: Callable[[Any, grpc.ServicerContext], Iterator[Any]]
    ) -> Callable[..., Any]:
        def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            call = _Call(method, context, self.observers)
            try:
                yield from behaviour(request, context)
            except Exception as exc:
                call.fail(exc)
                raise
            finally:
                call.finish()

        return run
