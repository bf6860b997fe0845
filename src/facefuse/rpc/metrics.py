"""Prometheus metrics of one server: calls by RPC and code, latency, in flight, queues, batches, faces, decoding.

Off by default: a server exposes them only when started with ``--metrics-port`` (a side HTTP port on
the same host as its gRPC port). Each server gets its own ``CollectorRegistry`` rather than
prometheus-client's global one, so tests that start several servers in one process never clash over
metric names, and a scrape shows exactly one server.

The per-call metrics come from the interceptor (:class:`ServerMetrics` is a ``CallObserver``). The
others are recorded by the code that knows them, through the small functions at the bottom
(``observe_batch``, ``set_queue_depth``, ``queued``, ``count_face``, ``observe_decode_bytes``). Those
record into the process's active metrics (the last server started with metrics on) and do nothing
when metrics are off, so callers never check a flag. One server per process is how the mesh runs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
"""From a health check (milliseconds) to a 1000-sample official-mode OFER call on a CPU (minutes)."""
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BYTE_BUCKETS = tuple(float(1 << shift) for shift in range(14, 34, 2))
"""16 KiB to 8 GiB in steps of 4: an encoded photo, then what decoding it allocates."""


class ServerMetrics:
    """The metrics of one server, in their own registry; also the interceptor's ``CallObserver``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)  # resident memory, CPU seconds, open files
        PlatformCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter("facefuse_rpc_requests", "RPCs finished, by method and status code",
                                ("rpc", "code"), registry=r)
        self.latency = Histogram("facefuse_rpc_duration_seconds", "RPC wall time (a stream: until its last message)",
                                 ("rpc", "code"), buckets=LATENCY_BUCKETS_S, registry=r)
        self.in_flight = Gauge("facefuse_rpc_in_flight", "RPCs being handled now", ("rpc",), registry=r)
        self.queue_depth = Gauge("facefuse_queue_depth", "work items waiting in a queue (a batcher, a model lock)",
                                 ("queue",), registry=r)
        self.batch_size = Histogram("facefuse_batch_size", "items per batch run by a dynamic batcher",
                                    ("batcher",), buckets=BATCH_BUCKETS, registry=r)
        self.faces = Counter("facefuse_faces", "faces the gateway finished, by method and status code; "
                             "rate() is faces per second", ("method", "code"), registry=r)
        self.decode_bytes = Histogram("facefuse_decode_bytes", "image bytes handed to the decoder (encoded) "
                                      "and the pixel buffer it produced (decoded)", ("kind",),
                                      buckets=BYTE_BUCKETS, registry=r)

    # -- CallObserver --------------------------------------------------------------------------

    def call_started(self, method: str) -> None:
        self.in_flight.labels(_rpc(method)).inc()

    def call_finished(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        rpc = _rpc(method)
        self.in_flight.labels(rpc).dec()
        self.requests.labels(rpc, code.name).inc()
        self.latency.labels(rpc, code.name).observe(seconds)

    def serve(self, host: str, port: int) -> MetricsEndpoint:
        """Serve ``/metrics`` over HTTP on ``host:port`` and make these the process's active metrics."""
        server, thread = start_http_server(port, addr=host.strip("[]"), registry=self.registry)
        activate(self)
        return MetricsEndpoint(self, server, thread, int(server.server_address[1]))


@dataclass
class MetricsEndpoint:
    """A running ``/metrics`` HTTP server; ``close`` stops it and frees the port."""

    metrics: ServerMetrics
    server: Any  # wsgiref's WSGIServer
    thread: threading.Thread
    port: int

    def close(self) -> None:
        deactivate(self.metrics)
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def _rpc(method: str) -> str:
    """``/facefuse.v1.MicaService/Predict`` -> ``facefuse.v1.MicaService/Predict``."""
    return method.lstrip("/")


# -- the process's active metrics, for code that has no server at hand ---------------------------

_active: ServerMetrics | None = None
_active_lock = threading.Lock()


def activate(metrics: ServerMetrics) -> None:
    global _active
    with _active_lock:
        _active = metrics


def deactivate(metrics: ServerMetrics) -> None:
    global _active
    with _active_lock:
        if _active is metrics:
            _active = None


def active() -> ServerMetrics | None:
    return _active


def observe_batch(batcher: str, size: int) -> None:
    metrics = _active
    if metrics is not None:
        metrics.batch_size.labels(batcher).observe(size)


def set_queue_depth(queue: str, depth: int) -> None:
    metrics = _active
    if metrics is not None:
        metrics.queue_depth.labels(queue).set(depth)


@contextmanager
def queued(lock: threading.Lock, queue: str, stop_check: Callable[[], None] | None = None,
           poll_s: float = 0.05) -> Iterator[None]:
    """Hold ``lock``; while waiting for it, count as one item in ``queue``'s depth. With ``stop_check``
    (which raises when the caller is gone), a waiter looks every ``poll_s`` and leaves without running."""
    metrics = _active
    gauge = metrics.queue_depth.labels(queue) if metrics is not None else None
    if gauge is not None:
        gauge.inc()
    try:
        while not lock.acquire(timeout=poll_s):
            if stop_check is not None:
                stop_check()
    finally:
        if gauge is not None:
            gauge.dec()
    try:
        if stop_check is not None:
            stop_check()
        yield
    finally:
        lock.release()


def count_face(method: str, code: int) -> None:
    """One face finished by the gateway with status ``code`` (the numeric gRPC code in its result)."""
    metrics = _active
    if metrics is not None:
        metrics.faces.labels(method, _CODE_NAMES.get(code, str(code))).inc()


def observe_decode_bytes(encoded: int, decoded: int | None = None) -> None:
    """An image's encoded size, and the size of the pixel buffer decoding made (None when it failed)."""
    metrics = _active
    if metrics is not None:
        metrics.decode_bytes.labels("encoded").observe(encoded)
        if decoded is not None:
            metrics.decode_bytes.labels("decoded").observe(decoded)


_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
