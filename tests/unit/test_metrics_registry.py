"""Metrics on in-process servers: one registry per server, the side port freed on stop, queue depth of a lock."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from facefuse.rpc import metrics
from facefuse.servers.base import RunningServer, ServerOptions, start_server
from facefuse.servers.local import free_port

HEALTH_CHECK = "grpc.health.v1.Health/Check"


def _health_server(metrics_port: int) -> RunningServer:
    return start_server(lambda server: None, [], ServerOptions(metrics_port=metrics_port))


def _checks(running: RunningServer, times: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(times):
            stub.Check(health_pb2.HealthCheckRequest(), timeout=5)


def _health_checks_counted(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "facefuse_rpc_requests_total" and sample.labels == {"rpc": HEALTH_CHECK, "code": "OK"}:
                return sample.value
    return 0.0


def test_two_servers_in_one_process_count_their_own_calls() -> None:
    first, second = _health_server(free_port()), _health_server(free_port())
    try:
        assert first.metrics is not None and second.metrics is not None
        _checks(first, 3)
        _checks(second, 1)
        assert _health_checks_counted(first.metrics.port) == 3
        assert _health_checks_counted(second.metrics.port) == 1
    finally:
        first.stop(0)
        second.stop(0)
    with pytest.raises(urllib.error.URLError):  # the side port is closed with the server
        _health_checks_counted(first.metrics.port)
    assert metrics.active() is None


def test_without_a_metrics_port_there_is_no_endpoint() -> None:
    running = _health_server(0)
    try:
        assert running.metrics is None and metrics.active() is None
        metrics.observe_batch("b", 3)  # recording with metrics off is a no-op, not an error
    finally:
        running.stop(0)


def test_waiting_for_a_lock_counts_in_the_queue_depth() -> None:
    running = _health_server(free_port())
    lock = threading.Lock()
    try:
        assert running.metrics is not None
        registry = running.metrics.metrics.registry

        def depth() -> float | None:
            return registry.get_sample_value("facefuse_queue_depth", {"queue": "model"})

        lock.acquire()
        entered = threading.Event()

        def waiter() -> None:
            with metrics.queued(lock, "model"):
                entered.set()

        thread = threading.Thread(target=waiter)
        thread.start()
        for _ in range(100):
            if depth() == 1:
                break
            time.sleep(0.01)
        assert depth() == 1 and not entered.is_set()
        lock.release()
        thread.join(timeout=5)
        assert entered.is_set() and depth() == 0 and not lock.locked()
    finally:
        running.stop(0)
