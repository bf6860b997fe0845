"""Request bytes that do not parse (truncated, a string that is not UTF-8) are the caller's fault.

gRPC decodes a request before any handler runs and answers a failure with INTERNAL ("Exception
deserializing request!"), which reads as a server bug. Services registered through
:func:`decoding_server` receive the raw bytes instead and decode them in the handler's call, so a
message that does not parse is INVALID_ARGUMENT naming the message type. On a request stream the
stream ends at the bad message: the handler sees a normal end, and the call then ends
INVALID_ARGUMENT after the results it already produced.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc


def _parse(deserialize: Callable[[bytes], Any], raw: bytes) -> Any:
    try:
        return deserialize(raw)
    except Exception as exc:
        raise _BadRequest(
            f"the request does not parse as a message of this RPC ({type(exc).__name__}: {exc})"
        ) from None


class _BadRequest(Exception):
    pass


def _decoding(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
    """The same handler taking raw bytes and decoding them itself."""
    deserialize = getattr(handler, "request_deserializer", None)
    if handler is None or deserialize is None:
        return handler

    def unary_request(behaviour: Callable[..., Any]) -> Callable[..., Any]:
        def run(raw: bytes, context: grpc.ServicerContext) -> Any:
            try:
                request = _parse(deserialize, raw)
            except _BadRequest as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return behaviour(request, context)

        return run

    def stream_request(behaviour: Callable[..., Any], streaming_reply: bool) -> Callable[..., Any]:
        def requests(raws: Iterator[bytes], failure: list[_BadRequest]) -> Iterator[Any]:
            for raw in raws:
                try:
                    yield _parse(deserialize, raw)
                except _BadRequest as exc:
                    failure.append(exc)
                    return

        def run_stream(raws: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[Any]:
            failure: list[_BadRequest] = []
            yield from behaviour(requests(raws, failure), context)
            if failure:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(failure[0]))

        def run_unary(raws: Iterator[bytes], context: grpc.ServicerContext) -> Any:
            failure: list[_BadRequest] = []
            reply = behaviour(requests(raws, failure), context)
            if failure:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(failure[0]))
            return reply

        return run_stream if streaming_reply else run_unary

    wrapped: dict[str, Any] = {"request_deserializer": None}
    if handler.unary_unary is not None:
        wrapped["unary_unary"] = unary_request(handler.unary_unary)
    elif handler.unary_stream is not None:
        wrapped["unary_stream"] = unary_request(handler.unary_stream)
    elif handler.stream_unary is not None:
        wrapped["stream_unary"] = stream_request(handler.stream_unary, streaming_reply=False)
    elif handler.stream_stream is not None:
        wrapped["stream_stream"] = stream_request(handler.stream_stream, streaming_reply=True)
    return handler._replace(**wrapped)  # grpc's handlers are namedtuples


class _DecodingGenericHandler(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self.inner = inner

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return _decoding(self.inner.service(handler_call_details))


class _DecodingServer:
    """What the generated ``add_*Servicer_to_server`` functions see instead of the server."""

    def __init__(self, server: grpc.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: tuple[grpc.GenericRpcHandler, ...]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_DecodingGenericHandler(h) for h in handlers))

    def add_registered_method_handlers(self, service_name: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self._server.add_registered_method_handlers(service_name, {m: _decoding(h) for m, h in handlers.items()})

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


def decoding_server(server: grpc.Server) -> grpc.Server:
    """``server`` for registering services whose requests should be decoded as described above."""
    return _DecodingServer(server)
