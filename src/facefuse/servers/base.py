"""What every facefuse server shares: start-up, health, reflection, limits, graceful shutdown, its CLI.

Health has two levels, like liveness and readiness: the overall service ``""`` is SERVING as soon as
the process answers, and each RPC service's own name is SERVING only while its backend is ready (a
placeholder or a backend whose model files are missing reports NOT_SERVING, and its ``Info`` RPC
says why). The transport itself (status codes, deadlines, options, the interceptor) is ``facefuse.rpc``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from facefuse.errors import FacefuseError, InvalidInputError
from facefuse.io.atomic import write_text_atomic
from facefuse.rpc.interceptors import CallObserver, ServerInterceptor
from facefuse.rpc.logs import configure_logging, log_event
from facefuse.rpc.metrics import MetricsEndpoint, ServerMetrics
from facefuse.rpc.options import DEFAULT_GRACE_S, DEFAULT_MAX_MESSAGE_MB, server_options
from facefuse.rpc.request_decoding import decoding_server
from facefuse.rpc.security import BearerTokenInterceptor, ServerTls, read_token

RPC_LIMIT_PER_WORKER = 4
"""Default ``--max-concurrent-rpcs`` per worker thread: a short queue absorbs bursts, a flood is refused."""


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 0
    max_message_mb: int = DEFAULT_MAX_MESSAGE_MB
    max_workers: int = 16
    max_concurrent_rpcs: int | None = None
    grace_s: float = DEFAULT_GRACE_S
    port_file: Path | None = None
    extra_options: list[tuple[str, Any]] = field(default_factory=list)
    observers: list[CallObserver] = field(default_factory=list)
    metrics_port: int = 0  # Prometheus /metrics on this port of ``host``; 0 = off
    tls: ServerTls | None = None  # None = plaintext (docs/scaling.md#security)
    auth_token: str | None = None  # calls other than health need ``authorization: Bearer <token>``
    reflection: bool = True
    health_port: int = 0  # also serve health alone, plaintext, on this port (kubelet probes cannot speak TLS); 0 = off
    max_connection_age_s: float = 0.0  # close client connections this old, so clients re-resolve DNS; 0 = never

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024

    @property
    def rpc_limit(self) -> int:
        """RPCs running or waiting for a thread; gRPC refuses more with RESOURCE_EXHAUSTED (default 4 x workers)."""
        return self.max_concurrent_rpcs or RPC_LIMIT_PER_WORKER * self.max_workers


class ReadinessFeed(Protocol):
    """A readiness that changes while the server runs (the gateway's follows its backends)."""

    def start(self, publish: Callable[[bool], None]) -> None: ...


Readiness = Mapping[str, "bool | ReadinessFeed"]
"""Per RPC service name: ready at start (bool) or a feed the server starts once bound (NOT_SERVING till then)."""


STOP_WAIT_S = 2.0
"""After the grace period cancelled what was left, how long handlers get to notice it and return."""

_SERVER_NUMBERS = itertools.count(1)


@dataclass
class RunningServer:
    server: grpc.Server
    health: health.HealthServicer
    port: int
    service_names: tuple[str, ...]
    metrics: MetricsEndpoint | None = None
    executor: futures.ThreadPoolExecutor | None = None
    worker_prefix: str = ""
    health_server: grpc.Server | None = None

    def set_ready(self, service_name: str, ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set(service_name, status)

    def stop(self, grace_s: float = DEFAULT_GRACE_S, wait_s: float = STOP_WAIT_S) -> bool:
        """Report NOT_SERVING, refuse new calls, let calls in flight finish within the grace period, then
        cancel the rest. Cancelling fires each call's context callbacks, so its ``Deadline`` says the
        caller is gone and the work stops at its next check. True when every handler returned within
        ``wait_s`` after that; False when some handler is still running (it ignores cancellation)."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()
        if self.health_server is not None:
            self.health_server.stop(0).wait()
        if self.metrics is not None:
            self.metrics.close()
        if self.executor is None:
            return True
        self.executor.shutdown(wait=False, cancel_futures=True)
        until = time.monotonic() + wait_s
        for thread in threading.enumerate():
            if thread.name.startswith(self.worker_prefix):
                thread.join(max(0.0, until - time.monotonic()))
        busy = [t.name for t in threading.enumerate() if t.name.startswith(self.worker_prefix) and t.is_alive()]
        if busy:
            log_event(
                "abandoned", handlers=len(busy), reason="still running after the grace period and its cancellation"
            )
        return not busy


def start_server(
    register: Callable[[grpc.Server], None],
    service_names: Sequence[str],
    options: ServerOptions,
    ready: Readiness | None = None,
) -> RunningServer:
    """Start a server with the services ``register`` adds, health and reflection; returns once bound."""
    metrics = ServerMetrics().serve(options.host, options.metrics_port) if options.metrics_port else None
    try:
        return _start_grpc(register, service_names, options, ready, metrics)
    except BaseException:
        if metrics is not None:
            metrics.close()
        raise


def _start_grpc(register: Callable[[grpc.Server], None], service_names: Sequence[str], options: ServerOptions,
                ready: Readiness | None, metrics: MetricsEndpoint | None) -> RunningServer:
    observers = [*options.observers, *([metrics.metrics] if metrics is not None else [])]
    credentials = options.tls.credentials() if options.tls is not None else None  # bad files fail before binding
    # The auth check sits inside ServerInterceptor, so refused calls are logged and counted too.
    auth = [BearerTokenInterceptor(options.auth_token)] if options.auth_token else []
    age = [("grpc.max_connection_age_ms", int(options.max_connection_age_s * 1000)),
           # calls in flight on an old connection get the longest gateway deadline to finish
           ("grpc.max_connection_age_grace_ms", 600_000)] if options.max_connection_age_s > 0 else []
    worker_prefix = f"facefuse-rpc-{next(_SERVER_NUMBERS)}_"
    executor = futures.ThreadPoolExecutor(max_workers=options.max_workers, thread_name_prefix=worker_prefix)
    server = grpc.server(
        executor,
        options=server_options(options.max_message_mb) + age + list(options.extra_options),
        interceptors=[ServerInterceptor(observers), *auth],
        maximum_concurrent_rpcs=options.rpc_limit,
    )
    register(decoding_server(server))  # undecodable request bytes: INVALID_ARGUMENT, not gRPC's INTERNAL
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = tuple(service_names)
    if options.reflection:
        reflection.enable_server_reflection((*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{options.host}:{options.port}"
    if credentials is not None:
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {options.host}:{options.port}")
    health_server = _health_only_server(health_servicer, options) if options.health_port else None
    server.start()
    running = RunningServer(server, health_servicer, port, names, metrics, executor, worker_prefix, health_server)
    running.set_ready("", True)
    for name in names:
        value = (ready or {}).get(name, True)
        running.set_ready(name, value is True)
        if not isinstance(value, bool):
            value.start(functools.partial(running.set_ready, name))
    if options.port_file is not None:
        write_text_atomic(options.port_file, str(port))
    log_event("listening", host=options.host, port=port, services=list(names),
              metrics_port=metrics.port if metrics is not None else None,
              tls="mtls" if options.tls is not None and options.tls.client_ca else "tls" if options.tls else "off",
              auth="token" if options.auth_token else "off", reflection=options.reflection)
    return running


def _health_only_server(health_servicer: health.HealthServicer, options: ServerOptions) -> grpc.Server:
    """The same health answers on a plaintext side port with nothing else on it: Kubernetes' native gRPC
    probes speak plaintext only, and a TLS server's own port would refuse them."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"),
                         options=server_options(1), maximum_concurrent_rpcs=8)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if server.add_insecure_port(f"{options.host}:{options.health_port}") == 0:
        raise OSError(f"could not bind the health port {options.host}:{options.health_port}")
    server.start()
    return server


def serve_until_signal(running: RunningServer, grace_s: float = DEFAULT_GRACE_S) -> bool:
    """Block until SIGTERM/SIGINT, then shut down gracefully (see ``RunningServer.stop``); True when
    every call had ended."""
    stop = threading.Event()

    def _handle(signum: int, _frame: Any) -> None:
        log_event("shutdown", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _handle)
    signal.signal(signal.SIGINT, _handle)
    while not stop.wait(0.5):
        pass
    drained = running.stop(grace_s)
    log_event("stopped", drained=drained)
    return drained


def server_arg_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 in containers)")
    parser.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one")
    parser.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    parser.add_argument("--max-message-mb", type=int, default=DEFAULT_MAX_MESSAGE_MB, help="gRPC message size limit")
    parser.add_argument("--workers", type=int, default=16, help="RPC worker threads")
    parser.add_argument("--max-concurrent-rpcs", type=int, default=None,
                        help="RPCs running or queued before new ones get RESOURCE_EXHAUSTED; default 4 x --workers")
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE_S, help="seconds calls in flight get on SIGTERM")
    parser.add_argument("--metrics-port", type=_port_number, default=0,
                        help="serve Prometheus metrics over HTTP on this port of --host; 0 = off")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    security = parser.add_argument_group("security (docs/scaling.md#security)")
    security.add_argument("--tls-cert", type=Path, help="serve TLS with this PEM certificate (chain); needs --tls-key")
    security.add_argument("--tls-key", type=Path, help="the PEM private key of --tls-cert")
    security.add_argument("--tls-ca", type=Path,
                          help="mutual TLS: accept only clients whose certificate this PEM CA signed")
    security.add_argument("--auth-token-file", type=Path,
                          help="refuse calls without 'authorization: Bearer <token in this file>' (UNAUTHENTICATED); "
                               "health stays open")
    security.add_argument("--no-reflection", dest="reflection", action="store_false",
                          help="do not serve the gRPC reflection service")
    security.add_argument("--health-port", type=_port_number, default=0,
                          help="also serve the health service alone, plaintext, on this port (probes of a TLS "
                               "server); 0 = off")
    parser.add_argument("--max-connection-age-s", type=float, default=0.0,
                        help="close client connections after this many seconds (calls in flight finish), so "
                             "clients re-resolve DNS and find new replicas; 0 = never")
    return parser


def _port_number(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0..65535)")
    return port


def options_from_args(args: argparse.Namespace) -> ServerOptions:
    if args.max_connection_age_s < 0:
        raise InvalidInputError(f"--max-connection-age-s {args.max_connection_age_s}; expected >= 0 (0 = never)")
    return ServerOptions(
        host=args.host, port=args.port, max_message_mb=args.max_message_mb, max_workers=args.workers,
        max_concurrent_rpcs=args.max_concurrent_rpcs, grace_s=args.grace, port_file=args.port_file,
        metrics_port=args.metrics_port, tls=_server_tls(args), reflection=args.reflection,
        health_port=args.health_port, max_connection_age_s=args.max_connection_age_s,
        auth_token=read_token(args.auth_token_file) if args.auth_token_file is not None else None,
    )


def _server_tls(args: argparse.Namespace) -> ServerTls | None:
    if args.tls_cert is None and args.tls_key is None:
        if args.tls_ca is not None:
            raise InvalidInputError("--tls-ca (mutual TLS) needs --tls-cert and --tls-key")
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise InvalidInputError("TLS needs both --tls-cert and --tls-key")
    return ServerTls(args.tls_cert, args.tls_key, args.tls_ca)


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
        _server_tls(args)  # flag mistakes show before the models load
        if getattr(args, "torch_threads", None) is not None:  # the services that run torch (threads.py)
            from facefuse.servers.threads import apply_torch_threads

            apply_torch_threads(args.torch_threads)
        register, names, ready = build(args)  # may settle defaults (the gateway's --workers)
        running = start_server(register, names, options_from_args(args), ready)
    except (FacefuseError, OSError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    drained = serve_until_signal(running, args.grace)
    # Leave at once: the interpreter's teardown of loaded models took 1.5-3 s on a busy CPU, past the
    # grace an orchestrator allows, and a handler that ignores cancellation would keep it from exiting
    # at all (it joins the worker threads); such a leftover is flagged by the exit code.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if drained else 1)
