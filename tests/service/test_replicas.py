"""Replicas on loopback: the gateway spreads calls over two ofer and two mica processes (round robin), and
a replica killed while it holds calls costs no face: gRPC retries them on the other replica."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from facefuse.client.api import GatewayClient, ImageInput
from facefuse.servers.local import LocalMesh

pytestmark = pytest.mark.slow
SAMPLE = "facefuse.v1.OferService/Sample"
RANK = "facefuse.v1.OferService/Rank"
PREDICT = "facefuse.v1.MicaService/Predict"
IMAGES = 16
SAMPLES = 32  # a Sample long enough (~0.1 s+) that the kill lands inside one


def calls(url: str, rpc: str, code: str | None = "OK") -> float:
    """``facefuse_rpc_requests_total`` of one method (one code, or all codes) on one server."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "facefuse_rpc_requests_total" and s.labels.get("rpc") == rpc
               and (code is None or s.labels.get("code") == code))


def in_flight(url: str) -> float:
    """Calls running on a server now (every method but health)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
    except (urllib.error.URLError, OSError):
        return 0.0
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "facefuse_rpc_in_flight" and s.labels.get("rpc") in (SAMPLE, RANK))


def test_a_replica_killed_mid_stream_costs_no_face(tmp_path, astronaut_jpeg: bytes) -> None:
    with LocalMesh(workdir=tmp_path, env={"FACEFUSE_ASSETS": ""}, metrics=True,
                   replicas={"ofer": 2, "mica": 2}) as mesh:
        ofer_1, ofer_2 = mesh.replicas_of("ofer")
        mica_1, mica_2 = mesh.replicas_of("mica")
        before_kill: dict[str, float] = {}
        held_at_kill = [0.0]
        stop = threading.Event()

        def kill_ofer_2_while_busy() -> None:
            """Once both replicas of each service answered calls, kill ofer-2 the moment it holds one."""
            while not stop.is_set():
                served = {name: calls(proc.metrics_url, rpc) for name, proc, rpc in (
                    ("ofer", ofer_1, SAMPLE), ("ofer-2", ofer_2, SAMPLE),
                    ("mica", mica_1, PREDICT), ("mica-2", mica_2, PREDICT))}
                if min(served.values()) >= 1:
                    break
                time.sleep(0.05)
            while not stop.is_set():
                held = in_flight(ofer_2.metrics_url)
                if held >= 1:
                    mesh.kill("ofer-2")
                    before_kill.update(served)
                    held_at_kill[0] = held
                    return
                time.sleep(0.005)

        killer = threading.Thread(target=kill_ofer_2_while_busy, daemon=True)
        killer.start()
        try:
            with GatewayClient(mesh.gateway_address, timeout_s=600) as client:
                images = (ImageInput(f"a{index}", astronaut_jpeg) for index in range(IMAGES))
                results = list(client.process(images, method="fuse", num_samples=SAMPLES, seed=3))
        finally:
            stop.set()
            killer.join(timeout=10)
        after = calls(ofer_1.metrics_url, SAMPLE)

    assert held_at_kill[0] >= 1, "ofer-2 was never killed while it held a call (the stream ended first)"
    assert all(v >= 1 for v in before_kill.values()), f"a replica served no call before the kill: {before_kill}"
    assert len(results) == IMAGES
    assert all(r.status.code == grpc.StatusCode.OK.value[0] for r in results), [r.status for r in results]
    # No face fell back to MICA: the calls ofer-2 held were retried on ofer, not lost.
    assert all(r.reconstruction.fallback == "" and r.reconstruction.strategy != "mica" for r in results), \
        [r.reconstruction.fallback for r in results if r.reconstruction.fallback]
    assert after > before_kill["ofer"]  # the survivor took the Samples after the kill
