"""Run the whole mesh as local processes on free loopback ports: how the demo and the tests run it.

Each service binds port 0 and writes the port it got to a file, so there is no race for ports. The
runner starts the three model services, then the gateway pointed at them, waits until every process
answers health with SERVING for the overall service, and stops them all (SIGTERM, then SIGKILL after
the grace period) on exit.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from facefuse.errors import BackendUnavailableError

SERVICES = ("mica", "ofer", "fusion")


@dataclass
class ServiceProcess:
    name: str
    process: subprocess.Popen[bytes]
    port_file: Path
    log_path: Path
    port: int = 0
    metrics_port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        if not self.metrics_port:
            raise ValueError(f"{self.name} runs without metrics (LocalMesh(metrics=True) turns them on)")
        return f"http://127.0.0.1:{self.metrics_port}/metrics"


def wait_for_port(proc: ServiceProcess, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.process.poll() is not None:
            raise BackendUnavailableError(f"{proc.name} exited with code {proc.process.returncode}:\n{_tail(proc.log_path)}")
        if proc.port_file.is_file() and proc.port_file.read_text().strip():
            proc.port = int(proc.port_file.read_text())
            return proc.port
        time.sleep(0.05)
    raise BackendUnavailableError(f"{proc.name} did not start listening within {timeout_s:.0f} s:\n{_tail(proc.log_path)}")


def free_port() -> int:
    """A loopback port free right now (the metrics side port cannot be 0: that means off)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def health_status(address: str, service: str = "", timeout_s: float = 2.0) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s).status


def wait_serving(address: str, name: str, timeout_s: float, service: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            if health_status(address, service) == health_pb2.HealthCheckResponse.SERVING:
                return
            last = "NOT_SERVING"
        except grpc.RpcError as exc:
            last = exc.code().name
        time.sleep(0.1)
    raise BackendUnavailableError(f"{name} at {address} is not SERVING after {timeout_s:.0f} s ({last})")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class LocalMesh:
    """Context manager: ``with LocalMesh(assets=...) as mesh: mesh.gateway_address``."""

    assets: str | os.PathLike[str] | None = None
    pack: str = "auto"
    device: str = "cpu"
    start_timeout_s: float = 180.0
    grace_s: float = 5.0
    workdir: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    extra_args: dict[str, list[str]] = field(default_factory=dict)
    metrics: bool = False  # every service serves Prometheus metrics on a free side port (``metrics_url``)
    processes: dict[str, ServiceProcess] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def gateway_address(self) -> str:
        return self.processes["gateway"].address

    def address(self, name: str) -> str:
        return self.processes[name].address

    def metrics_url(self, name: str) -> str:
        return self.processes[name].metrics_url

    def _spawn(self, name: str, args: list[str]) -> ServiceProcess:
        assert self.workdir is not None
        port_file = self.workdir / f"{name}.port"
        port_file.unlink(missing_ok=True)
        log_path = self.workdir / f"{name}.log"
        # Several processes share the machine's cores: numpy's BLAS threads would only thrash (docs/open-pack.md).
        env = {"OPENBLAS_NUM_THREADS": "1", **os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        metrics_port = free_port() if self.metrics else 0
        command = [sys.executable, "-m", f"facefuse.servers.{name}", "--port", "0", "--port-file", str(port_file),
                   "--grace", str(self.grace_s), "--metrics-port", str(metrics_port), *args, *self.extra_args.get(name, [])]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        proc = ServiceProcess(name, process, port_file, log_path, metrics_port=metrics_port)
        self.processes[name] = proc
        return proc

    def start(self) -> "LocalMesh":
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="facefuse-mesh-")
            self.workdir = Path(self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        assets = ["--assets", str(self.assets)] if self.assets else []
        try:
            model_args = [*assets, "--pack", self.pack]
            backends = [self._spawn("mica", [*model_args, "--device", self.device]),
                        self._spawn("ofer", [*model_args, "--device", self.device]),
                        self._spawn("fusion", model_args)]
            for proc in backends:
                wait_for_port(proc, self.start_timeout_s)
            gateway = self._spawn("gateway", [*assets, "--mica", backends[0].address, "--ofer", backends[1].address,
                                              "--fusion", backends[2].address])
            wait_for_port(gateway, self.start_timeout_s)
            for proc in self.processes.values():
                wait_serving(proc.address, proc.name, self.start_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM everything (gateway first), SIGKILL what outlives the grace period."""
        order = ["gateway", *SERVICES]
        live = [self.processes[n] for n in order if n in self.processes and self.processes[n].process.poll() is None]
        for proc in live:
            _signal(proc.process, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s + 5
        for proc in live:
            try:
                proc.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                _signal(proc.process, signal.SIGKILL)
                proc.process.wait(timeout=5)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def kill(self, name: str) -> None:
        """Kill one service hard (for fault tests)."""
        proc = self.processes[name]
        _signal(proc.process, signal.SIGKILL)
        proc.process.wait(timeout=10)

    def __enter__(self) -> "LocalMesh":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def _signal(process: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            process.send_signal(sig)
        except ProcessLookupError:
            pass
