"""Cancellation, deadlines and SIGTERM on the real ofer service (flame pack, synthetic official-format
weights), spawned as ``python -m facefuse.servers.ofer`` on loopback.

A 1000-sample request takes minutes on a CPU; whoever abandons it (cancel, deadline, SIGTERM) must free
the service within about two seconds, because the sampler checks the call between steps and layers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from facefuse import wire
from facefuse.servers.local import ServiceProcess, wait_for_port, wait_serving
from facefuse.servers.ofer import SERVICE_NAME
from facefuse.v1 import common_pb2, ofer_pb2, ofer_pb2_grpc

pytestmark = pytest.mark.slow

FACE = common_pb2.Face(arcface_blob=wire.from_numpy(
    np.random.default_rng(0).standard_normal((3, 112, 112)).astype(np.float32)))
FREED_WITHIN_S = 2.0
"""Beyond a short request's own time: how long the next caller may wait behind abandoned work."""


@pytest.fixture(scope="module")
def ofer_assets(synthetic_assets) -> Path:
    for name in ("flame2020", "landmark_embedding", "idgen", "idrank", "frontindices"):
        synthetic_assets.path(name)
    return synthetic_assets.directory


def spawn_ofer(assets: Path, workdir: Path, grace_s: float) -> ServiceProcess:
    port_file, log_path = workdir / "ofer.port", workdir / "ofer.log"
    port_file.unlink(missing_ok=True)
    command = [sys.executable, "-m", "facefuse.servers.ofer", "--port", "0", "--port-file", str(port_file),
               "--grace", str(grace_s), "--assets", str(assets), "--pack", "flame", "--device", "cpu"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    proc = ServiceProcess("ofer", process, port_file, log_path)
    try:
        wait_for_port(proc, 300)
        wait_serving(proc.address, "ofer", 120, SERVICE_NAME)
    except BaseException:
        process.kill()
        process.wait(10)
        raise
    return proc


def stop(proc: ServiceProcess) -> None:
    if proc.process.poll() is None:
        proc.process.kill()
        proc.process.wait(10)


@pytest.fixture(scope="module")
def ofer(ofer_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    proc = spawn_ofer(ofer_assets, tmp_path_factory.mktemp("ofer-cancel"), grace_s=1.0)
    yield proc
    stop(proc)


def long_sample(stub: ofer_pb2_grpc.OferServiceStub, timeout_s: float = 900) -> grpc.Future:
    """1000 samples, 40 DDIM steps: minutes of work on a CPU."""
    return stub.Sample(ofer_pb2.SampleRequest(face=FACE, num_samples=1000, seed=1), timeout=timeout_s)


def short_sample_s(stub: ofer_pb2_grpc.OferServiceStub) -> float:
    started = time.monotonic()
    (chunk,) = list(stub.Sample(ofer_pb2.SampleRequest(face=FACE, num_samples=1, steps=2, seed=2), timeout=60))
    assert wire.to_numpy(chunk.shapes).shape == (1, 300)
    return time.monotonic() - started


def test_a_cancelled_1000_sample_request_frees_the_service(ofer: ServiceProcess) -> None:
    with grpc.insecure_channel(ofer.address) as channel:
        stub = ofer_pb2_grpc.OferServiceStub(channel)
        alone = short_sample_s(stub)
        call = long_sample(stub)
        time.sleep(3.0)  # well into the sampler
        call.cancel()
        waited = short_sample_s(stub)
        with pytest.raises(grpc.RpcError) as caught:
            list(call)
    assert caught.value.code() == grpc.StatusCode.CANCELLED
    assert waited < alone + FREED_WITHIN_S, f"next caller waited {waited:.2f} s (alone: {alone:.2f} s)"


def test_an_expired_1000_sample_request_frees_the_service(ofer: ServiceProcess) -> None:
    with grpc.insecure_channel(ofer.address) as channel:
        stub = ofer_pb2_grpc.OferServiceStub(channel)
        alone = short_sample_s(stub)
        with pytest.raises(grpc.RpcError) as caught:
            list(long_sample(stub, timeout_s=3.0))
        waited = short_sample_s(stub)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert waited < alone + FREED_WITHIN_S, f"next caller waited {waited:.2f} s (alone: {alone:.2f} s)"


def test_sigterm_during_a_long_sample_exits_within_the_grace_period(ofer_assets: Path, tmp_path: Path) -> None:
    grace_s = 1.0
    proc = spawn_ofer(ofer_assets, tmp_path, grace_s)
    try:
        with grpc.insecure_channel(proc.address) as channel:
            call = long_sample(ofer_pb2_grpc.OferServiceStub(channel))
            time.sleep(3.0)
            proc.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            code = proc.process.wait(timeout=60)
            exited_after = time.monotonic() - signalled
            with pytest.raises(grpc.RpcError) as caught:
                list(call)
    finally:
        stop(proc)
    events = [json.loads(line) for line in proc.log_path.read_text().splitlines() if line.startswith("{")]
    assert code == 0, proc.log_path.read_text()[-2000:]
    assert exited_after < grace_s + 1.5, f"exited {exited_after:.2f} s after SIGTERM (grace {grace_s} s)"
    assert caught.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    assert any(e.get("event") == "stopped" and e.get("drained") is True for e in events)
