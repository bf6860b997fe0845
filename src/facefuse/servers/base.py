"""What every facefuse server shares: health, reflection, limits, deadlines, logs, graceful shutdown.

Health has two levels, like liveness and readiness: the overall service ``""`` is SERVING as soon as
the process answers, and each RPC service's own name is SERVING only while its backend is ready (a
placeholder or a backend whose model files are missing reports NOT_SERVING, and its ``Info`` RPC
says why). Failures map to status codes through the ``facefuse.errors`` classes.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from facefuse.errors import (
    AssetError,
    BackendUnavailableError,
    FacefuseError,
    InvalidInputError,
    LimitExceededError,
)
from facefuse.io.atomic import write_text_atomic

LOG = logging.getLogger("facefuse")
DEFAULT_MAX_MESSAGE_MB = 64
DEFAULT_GRACE_S = 5.0

T = TypeVar("T")


def status_code_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC code a facefuse error stands for."""
    if isinstance(exc, InvalidInputError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, LimitExceededError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, AssetError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, BackendUnavailableError):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.INTERNAL


def error_from_rpc(exc: grpc.RpcError, backend: str) -> FacefuseError:
    """Turn a downstream RpcError back into the facefuse error it stands for."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    detail = exc.details() if hasattr(exc, "details") else str(exc)
    message = f"{backend}: {detail}"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidInputError(message)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return LimitExceededError(message)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return AssetError(message)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineError(message)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN):
        return BackendUnavailableError(f"{backend} unavailable: {detail}")
    return FacefuseError(message)


class DeadlineError(FacefuseError, TimeoutError):
    """The caller's deadline passed before the work was done (DEADLINE_EXCEEDED)."""


def unary_errors(method: Callable[..., T]) -> Callable[..., T]:
    """Map facefuse errors raised by a unary handler to status codes; log every call once."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> T:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return method(self, request, context)
        except FacefuseError as exc:
            code = status_code_for(exc)
            context.abort(code, str(exc))
        except grpc.RpcError:
            raise
        except Exception as exc:  # noqa: BLE001 - the boundary: never leak a traceback to the client
            code = grpc.StatusCode.INTERNAL
            LOG.exception("unhandled error in %s", method.__name__)
            context.abort(code, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            log_event("rpc", rpc=method.__name__, code=code.name, ms=round((time.perf_counter() - started) * 1000, 2))
        raise AssertionError("unreachable")  # context.abort raises

    return wrapper


def remaining_seconds(context: grpc.ServicerContext, default: float | None = None, margin: float = 0.05) -> float | None:
    """Time left of the caller's deadline (minus a margin for the reply), to pass downstream."""
    left = caller_time_left(context)
    if left is None:
        return default
    left -= margin
    if left <= 0:
        raise DeadlineError("deadline exceeded before the call could be made")
    return left if default is None else min(left, default)


NO_DEADLINE_S = 1e7
"""grpc reports a call without a deadline as an enormous time remaining; anything above this is 'none'."""


def caller_time_left(context: grpc.ServicerContext) -> float | None:
    """Seconds left of the caller's deadline, or None when the caller set no deadline."""
    left = context.time_remaining()
    return None if left is None or left > NO_DEADLINE_S else left


def log_event(event: str, **fields: Any) -> None:
    if LOG.isEnabledFor(logging.INFO):
        LOG.info(json.dumps({"event": event, **fields}, default=str))


class _JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        try:
            payload = json.loads(message) if message.startswith("{") else {"message": message}
        except ValueError:
            payload = {"message": message}
        entry = {"ts": round(record.created, 3), "level": record.levelname.lower(), "service": self.service, **payload}
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(entry, default=str)


def configure_logging(service: str, level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter(service))
    root = logging.getLogger("facefuse")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 0
    max_message_mb: int = DEFAULT_MAX_MESSAGE_MB
    max_workers: int = 16
    grace_s: float = DEFAULT_GRACE_S
    port_file: Path | None = None
    extra_options: list[tuple[str, Any]] = field(default_factory=list)

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024


def channel_options(max_message_mb: int = DEFAULT_MAX_MESSAGE_MB) -> list[tuple[str, Any]]:
    limit = max_message_mb * 1024 * 1024
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


class ReadinessFeed(Protocol):
    """A readiness that changes while the server runs (the gateway's follows its backends)."""

    def start(self, publish: Callable[[bool], None]) -> None: ...


Readiness = Mapping[str, "bool | ReadinessFeed"]
"""Per RPC service name: ready at start (bool) or a feed the server starts once bound (NOT_SERVING till then)."""


@dataclass
class RunningServer:
    server: grpc.Server
    health: health.HealthServicer
    port: int
    service_names: tuple[str, ...]

    def set_ready(self, service_name: str, ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set(service_name, status)

    def stop(self, grace_s: float = DEFAULT_GRACE_S) -> None:
        """Refuse new calls, report NOT_SERVING, let calls in flight finish within the grace period."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()


def start_server(
    register: Callable[[grpc.Server], None],
    service_names: Sequence[str],
    options: ServerOptions,
    ready: Readiness | None = None,
) -> RunningServer:
    """Start a server with the services ``register`` adds, health and reflection; returns once bound."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=options.max_workers),
        options=channel_options(options.max_message_mb) + list(options.extra_options),
        maximum_concurrent_rpcs=None,
    )
    register(server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = tuple(service_names)
    reflection.enable_server_reflection(names + (health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(f"{options.host}:{options.port}")
    if port == 0:
        raise OSError(f"could not bind {options.host}:{options.port}")
    server.start()
    running = RunningServer(server, health_servicer, port, names)
    running.set_ready("", True)
    for name in names:
        value = (ready or {}).get(name, True)
        running.set_ready(name, value is True)
        if not isinstance(value, bool):
            value.start(functools.partial(running.set_ready, name))
    if options.port_file is not None:
        write_text_atomic(options.port_file, str(port))
    log_event("listening", host=options.host, port=port, services=list(names))
    return running


def serve_until_signal(running: RunningServer, grace_s: float = DEFAULT_GRACE_S) -> None:
    """Block until SIGTERM/SIGINT, then shut down gracefully."""
    stop = threading.Event()

    def _handle(signum: int, _frame: Any) -> None:
        log_event("shutdown", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _handle)
    signal.signal(signal.SIGINT, _handle)
    while not stop.wait(0.5):
        pass
    running.stop(grace_s)
    log_event("stopped")


def server_arg_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 in containers)")
    parser.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one")
    parser.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    parser.add_argument("--max-message-mb", type=int, default=DEFAULT_MAX_MESSAGE_MB, help="gRPC message size limit")
    parser.add_argument("--workers", type=int, default=16, help="RPC worker threads")
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE_S, help="seconds calls in flight get on SIGTERM")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def options_from_args(args: argparse.Namespace) -> ServerOptions:
    return ServerOptions(
        host=args.host, port=args.port, max_message_mb=args.max_message_mb, max_workers=args.workers,
        grace_s=args.grace, port_file=args.port_file,
    )


def run_cli(
    prog: str,
    description: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    build: Callable[[argparse.Namespace], tuple[Callable[[grpc.Server], None], Sequence[str], Readiness]],
    argv: Iterable[str] | None = None,
) -> int:
    """Shared ``main`` of the servers: parse, build the servicer, serve until SIGTERM."""
    parser = server_arg_parser(prog, description)
    add_arguments(parser)
    args = parser.parse_args(list(argv) if argv is not None else None)
    configure_logging(prog, args.log_level)
    try:
        register, names, ready = build(args)
        running = start_server(register, names, options_from_args(args), ready)
    except (FacefuseError, OSError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    serve_until_signal(running, args.grace)
    return 0
