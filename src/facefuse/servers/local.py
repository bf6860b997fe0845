"""Run the whole mesh as local processes on free loopback ports: how the demo and the tests run it.

Each service binds port 0 and writes the port it got to a file, so there is no race for ports. The
runner starts the three model services, then the gateway pointed at them, waits until every process
answers health with SERVING for the overall service, and stops them all (SIGTERM, then SIGKILL after
the grace period) on exit. ``replicas`` runs several processes of a model service (``ofer``, ``ofer-2``,
...); the gateway gets their addresses as one list and spreads its calls over them (docs/scaling.md).
"""

from __future__ import annotations

import contextlib
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

from facefuse.errors import BackendUnavailableError, InvalidInputError

SERVICES = ("mica", "ofer", "fusion")
MAX_LOCAL_REPLICAS = 16


def replica_names(service: str, count: int) -> list[str]:
    """Process names of a service's replicas: the first keeps the service's name, then ``ofer-2``, ..."""
    return [service if i == 1 else f"{service}-{i}" for i in range(1, count + 1)]


def parse_replicas(text: str) -> dict[str, int]:
    """``ofer=2,mica=2`` -> {"ofer": 2, "mica": 2}; services not named run once."""
    counts: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in SERVICES or not (value.strip().isascii() and value.strip().isdigit()):
            raise InvalidInputError(f"--replicas {text!r}: expected SERVICE=COUNT[,...] with SERVICE one of {SERVICES}")
        count = int(value)
        if not 1 <= count <= MAX_LOCAL_REPLICAS:
            raise InvalidInputError(f"--replicas {part!r}: COUNT must be 1..{MAX_LOCAL_REPLICAS}")
        counts[name] = count
    return counts


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
            raise BackendUnavailableError(
                f"{proc.name} exited with code {proc.process.returncode}:\n{_tail(proc.log_path)}"
            )
        if proc.port_file.is_file() and proc.port_file.read_text().strip():
            proc.port = int(proc.port_file.read_text())
            return proc.port
        time.sleep(0.05)
    raise BackendUnavailableError(
        f"{proc.name} did not start listening within {timeout_s:.0f} s:\n{_tail(proc.log_path)}"
    )


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
    replicas: dict[str, int] = field(default_factory=dict)  # e.g. {"ofer": 2}: processes per model service
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

    def replicas_of(self, service: str) -> list[ServiceProcess]:
        """The running processes of one model service, first replica first."""
        return [self.processes[n] for n in replica_names(service, self.replicas.get(service, 1)) if n in self.processes]

    def _spawn(self, name: str, args: list[str], service: str | None = None) -> ServiceProcess:
        assert self.workdir is not None
        port_file = self.workdir / f"{name}.port"
        port_file.unlink(missing_ok=True)
        log_path = self.workdir / f"{name}.log"
        # Several processes share the machine's cores: numpy's BLAS threads would only thrash (docs/open-pack.md).
        env = {"OPENBLAS_NUM_THREADS": "1", **os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        metrics_port = free_port() if self.metrics else 0
        service = service or name
        command = [sys.executable, "-m", f"facefuse.servers.{service}", "--port", "0", "--port-file", str(port_file),
                   "--grace", str(self.grace_s), "--metrics-port", str(metrics_port), *args,
                   *self.extra_args.get(service, [])]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        proc = ServiceProcess(name, process, port_file, log_path, metrics_port=metrics_port)
        self.processes[name] = proc
        return proc

    def start(self) -> LocalMesh:
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="facefuse-mesh-")
            self.workdir = Path(self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        assets = ["--assets", str(self.assets)] if self.assets else []
        parse_replicas(",".join(f"{name}={count}" for name, count in self.replicas.items()))  # names and counts
        try:
            model_args = [*assets, "--pack", self.pack]
            device_args = [*model_args, "--device", self.device]
            service_args = {"mica": device_args, "ofer": device_args, "fusion": model_args}
            backends = {service: [self._spawn(name, service_args[service], service)
                                  for name in replica_names(service, self.replicas.get(service, 1))]
                        for service in SERVICES}
            for procs in backends.values():
                for proc in procs:
                    wait_for_port(proc, self.start_timeout_s)
            # Several replicas: one ip:port list, which the gateway balances round robin (rpc.options).
            addresses = [arg for service, procs in backends.items()
                         for arg in (f"--{service}", ",".join(p.address for p in procs))]
            gateway = self._spawn("gateway", [*assets, *addresses])
            wait_for_port(gateway, self.start_timeout_s)
            for proc in self.processes.values():
                wait_serving(proc.address, proc.name, self.start_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM everything (gateway first), SIGKILL what outlives the grace period."""
        order = ["gateway", *(n for n in self.processes if n != "gateway")]
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

    def __enter__(self) -> LocalMesh:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _signal(process: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
