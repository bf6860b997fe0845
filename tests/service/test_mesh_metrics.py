"""Prometheus metrics and request ids on the real mesh: one image through the gateway moves each server's
counters with the right labels, and the caller's request id shows up in the logs of every service it touched."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from facefuse.client.api import ImageInput, image_chunks, process_options
from facefuse.rpc.logs import REQUEST_ID_KEY
from facefuse.servers.local import LocalMesh
from facefuse.v1 import gateway_pb2_grpc, mica_pb2, mica_pb2_grpc

pytestmark = pytest.mark.slow
RPCS = {"gateway": ["facefuse.v1.Gateway/Process"],
        "mica": ["facefuse.v1.MicaService/Predict"],
        "ofer": ["facefuse.v1.OferService/Sample", "facefuse.v1.OferService/Rank"],
        "fusion": ["facefuse.v1.FusionService/Fuse"]}
REQUEST_ID = "metrics-test-7f3a"


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a /metrics page, keyed by name and labels."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def listening_ports(pid: int) -> set[int]:
    """TCP ports process ``pid`` listens on, from /proc (its socket inodes matched to LISTEN entries)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def logged_request_ids(log_path: Path, rpc: str) -> list[str]:
    """The request ids of the ``rpc`` log lines for method ``rpc`` in a service's JSON log."""
    ids = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == "rpc" and entry.get("rpc") == f"/{rpc}":
            ids.append(entry.get("request_id"))
    return ids


@pytest.fixture(scope="module")
def metered_mesh(tmp_path_factory: pytest.TempPathFactory, astronaut_jpeg: bytes):
    """The open mesh with metrics on; one image fused through the gateway under a known request id."""
    with LocalMesh(workdir=tmp_path_factory.mktemp("metered"), env={"FACEFUSE_ASSETS": ""}, metrics=True) as mesh:
        with grpc.insecure_channel(mesh.gateway_address) as channel:
            stream = gateway_pb2_grpc.GatewayStub(channel).Process(
                image_chunks([ImageInput("astronaut", astronaut_jpeg)], process_options("fuse", num_samples=4)),
                timeout=240, metadata=((REQUEST_ID_KEY, REQUEST_ID),))
            results = list(stream)
            trailing = dict(stream.trailing_metadata() or ())
        logged = {(name, rpc): logged_request_ids(mesh.processes[name].log_path, rpc)  # before other tests' calls
                  for name, rpcs in RPCS.items() for rpc in rpcs}
        yield mesh, results, trailing, logged


def test_one_image_moves_each_servers_counters(metered_mesh, astronaut_jpeg: bytes) -> None:
    mesh, results, _, _ = metered_mesh
    assert results and all(r.status.code == 0 for r in results), [r.status for r in results]
    faces = len(results)
    scraped = {name: scrape(mesh.metrics_url(name)) for name in RPCS}
    for name, rpcs in RPCS.items():
        for rpc in rpcs:
            calls = value(scraped[name], "facefuse_rpc_requests_total", rpc=rpc, code="OK")
            assert calls >= 1, f"{name}: no OK count for {rpc}"
            assert value(scraped[name], "facefuse_rpc_duration_seconds_count", rpc=rpc, code="OK") == calls
            assert value(scraped[name], "facefuse_rpc_in_flight", rpc=rpc) == 0
        assert value(scraped[name], "process_resident_memory_bytes") > 0
    gateway, mica = scraped["gateway"], scraped["mica"]
    assert value(gateway, "facefuse_rpc_requests_total", rpc="facefuse.v1.Gateway/Process", code="OK") == 1
    assert value(mica, "facefuse_rpc_requests_total", rpc="facefuse.v1.MicaService/Predict", code="OK") == faces
    # one face per Predict call: the mica batcher ran batches holding exactly these faces
    assert value(mica, "facefuse_batch_size_sum", batcher="mica-batcher") == faces
    assert value(mica, "facefuse_batch_size_count", batcher="mica-batcher") >= 1
    assert ("facefuse_queue_depth", frozenset({("queue", "mica-batcher")})) in mica
    assert ("facefuse_queue_depth", frozenset({("queue", "ofer-model")})) in scraped["ofer"]
    # the gateway decoded one JPEG: its encoded size, and a 512x512 RGB uint8 buffer
    assert value(gateway, "facefuse_decode_bytes_count", kind="encoded") == 1
    assert value(gateway, "facefuse_decode_bytes_sum", kind="encoded") == len(astronaut_jpeg)
    assert value(gateway, "facefuse_decode_bytes_sum", kind="decoded") == 512 * 512 * 3
    assert value(gateway, "facefuse_faces_total", method="fuse", code="OK") == faces


def test_error_codes_are_labelled(metered_mesh) -> None:
    mesh, _, _, _ = metered_mesh
    with grpc.insecure_channel(mesh.address("mica")) as channel, pytest.raises(grpc.RpcError) as caught:
        mica_pb2_grpc.MicaServiceStub(channel).Predict(mica_pb2.PredictRequest(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    scraped = scrape(mesh.metrics_url("mica"))
    assert value(scraped, "facefuse_rpc_requests_total", rpc="facefuse.v1.MicaService/Predict",
                 code="INVALID_ARGUMENT") == 1


def test_the_request_id_reaches_every_service_a_face_touches(metered_mesh) -> None:
    _, _, trailing, logged = metered_mesh
    assert trailing.get(REQUEST_ID_KEY) == REQUEST_ID
    for name, rpcs in RPCS.items():
        for rpc in rpcs:
            ids = logged[name, rpc]
            assert ids, f"{name} logged no {rpc} call"
            assert set(ids) == {REQUEST_ID}, f"{name} logged {rpc} under {ids}, not the caller's {REQUEST_ID}"


def test_metrics_listen_on_their_own_port_only_when_asked(metered_mesh, open_mesh: LocalMesh) -> None:
    mesh, _, _, _ = metered_mesh
    for name in RPCS:
        on = mesh.processes[name]
        assert listening_ports(on.process.pid) == {on.port, on.metrics_port}
        off = open_mesh.processes[name]
        assert listening_ports(off.process.pid) == {off.port}, f"{name} listens on more than its gRPC port"
        with pytest.raises(ValueError):
            off.metrics_url  # noqa: B018 - the property raises when metrics are off


def test_a_busy_metrics_port_is_a_clear_start_up_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for bad, expected in ((str(port), "Address already in use"), ("70000", "not a port number")):
            out = subprocess.run([sys.executable, "-m", "facefuse.servers.fusion", "--pack", "open", "--port", "0",
                                  "--metrics-port", bad], capture_output=True, text=True, timeout=120,
                                 env={**os.environ, "FACEFUSE_ASSETS": ""})
            assert out.returncode == 2, out.stderr[-2000:]
            assert expected in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
