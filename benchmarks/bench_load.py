"""Load on the local open-pack mesh: many concurrent gateway streams, before and after a change, in one run.

    python benchmarks/bench_load.py                                  # before = commit 67ff244, after = this tree
    python benchmarks/bench_load.py --loads detect:16:1,mica:16:1

Each variant's mesh (gateway + mica, ofer, fusion as processes, no assets: the open pack, default
flags) runs from its own source tree (``PYTHONPATH``) in a child process of this script, and takes
each load in turn. A load is METHOD:STREAMS:IMAGES: STREAMS clients at once, each on its own channel,
each sending IMAGES copies of skimage's astronaut on one stream and reading its results, every stream
with a deadline. Reported per load: latency per image (its chunk sent to its result received),
failures (a non-OK result, or a stream ended by an error other than RESOURCE_EXHAUSTED), streams
refused with RESOURCE_EXHAUSTED (counted apart: a clear "come back later", not a failure), health
latency of every service probed every ~100 ms during the load (a probe without an answer within
``--probe-timeout-s`` counts as that long), and RSS per service before and at its peak during the load
(sampled every 200 ms; psutil if installed, else /proc).

What the default loads measure: ``detect`` is the gateway's own work per image (decode, detection,
alignment, crops) and its streaming, i.e. what the gateway's limits govern; ``fuse`` adds the model
services (MICA, OFER sampling with ``--samples`` and ranking, fusion); ``detect:80:1`` goes past the
gateway's default cap of 64 streams.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BASELINE_COMMIT = "67ff244"
DEFAULT_LOADS = "detect:64:2,fuse:64:2,detect:80:1"


def _rss_bytes(pid: int) -> int | None:
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss)
    except ImportError:
        pass
    except Exception:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


class Prober(threading.Thread):
    """Health-checks one service every ``period_s`` until stopped; records each probe's latency."""

    def __init__(self, address: str, period_s: float, timeout_s: float) -> None:
        super().__init__(daemon=True)
        self.address, self.period_s, self.timeout_s = address, period_s, timeout_s
        self.latencies: list[float] = []
        self.failed = 0
        self.stop = threading.Event()

    def run(self) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self.stop.is_set():
                started = time.perf_counter()
                try:
                    stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=self.timeout_s)
                    self.latencies.append(time.perf_counter() - started)
                except grpc.RpcError:
                    self.failed += 1
                    self.latencies.append(max(time.perf_counter() - started, self.timeout_s))
                self.stop.wait(max(0.0, self.period_s - (time.perf_counter() - started)))


class RssSampler(threading.Thread):
    def __init__(self, pids: dict[str, int], period_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pids, self.period_s = pids, period_s
        self.peak = {name: 0 for name in pids}
        self.stop = threading.Event()

    def run(self) -> None:
        while True:
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], _rss_bytes(pid) or 0)
            if self.stop.wait(self.period_s):
                return


def _one_stream(address: str, index: int, data: bytes | list[bytes], args: argparse.Namespace,
                record: dict[str, Any]) -> None:
    """One client: its own channel, ``args.images`` images (``data``, or the photos of a list in turn), every
    result read; outcome into ``record``."""
    import grpc

    from facefuse.v1 import gateway_pb2, gateway_pb2_grpc

    sent: dict[str, float] = {}

    def requests() -> Any:
        for i in range(args.images):
            image_id = f"s{index}-i{i}"
            sent[image_id] = time.perf_counter()
            yield gateway_pb2.ImageChunk(
                image_id=image_id,
                data=data if isinstance(data, bytes) else data[i % len(data)],
                last=True,
                options=gateway_pb2.ProcessOptions(method=args.method, num_samples=args.samples, seed=index,
                                                   **getattr(args, "options", {})),
            )

    with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        try:
            for result in stub.Process(requests(), timeout=args.deadline_s):
                record["latencies"].append(time.perf_counter() - sent.get(result.image_id, record["started"]))
                if result.status.code != 0:
                    record["failed_results"].append(
                        f"{result.image_id}: {result.status.code} {result.status.message[:120]}"
                    )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                record["refused"] += 1
            else:
                record["failed_streams"].append(f"stream {index}: {exc.code().name} {(exc.details() or '')[:120]}")


@dataclass(frozen=True)
class Load:
    method: str
    streams: int
    images: int

    @property
    def label(self) -> str:
        return f"{self.method}: {self.streams} streams x {self.images} image(s)"

    @classmethod
    def parse(cls, text: str) -> Load:
        method, streams, images = text.split(":")
        return cls(method, int(streams), int(images))


def run_load(mesh: Any, data: bytes, load: Load, args: argparse.Namespace) -> dict[str, Any]:
    """One load on a running mesh: every stream at once, health probes and RSS sampling meanwhile."""
    pids = {name: proc.process.pid for name, proc in mesh.processes.items()}
    stream_args = argparse.Namespace(**{**vars(args), "method": load.method, "images": load.images})
    rss_before = {name: _rss_bytes(pid) for name, pid in pids.items()}
    probers = {name: Prober(mesh.address(name), args.probe_period_s, args.probe_timeout_s) for name in pids}
    sampler = RssSampler(pids)
    record: dict[str, Any] = {"latencies": [], "failed_results": [], "failed_streams": [], "refused": 0}
    background: list[Prober | RssSampler] = [*probers.values(), sampler]
    for thread in background:
        thread.start()
    time.sleep(0.5)  # a few probes at rest first
    started = time.perf_counter()
    record["started"] = started
    clients = [
        threading.Thread(target=_one_stream, args=(mesh.gateway_address, i, data, stream_args, record), daemon=True)
        for i in range(load.streams)
    ]
    for client in clients:
        client.start()
    for client in clients:
        client.join(args.deadline_s + 30)
    wall = time.perf_counter() - started
    time.sleep(0.5)
    for thread in background:
        thread.stop.set()
        thread.join(10)
    lat = record["latencies"]
    return {
        "wall_s": round(wall, 2),
        "results": len(lat),
        "latency_s": {"p50": _percentile(lat, 50), "p99": _percentile(lat, 99), "max": max(lat, default=None)},
        "failures": len(record["failed_results"]) + len(record["failed_streams"]),
        "failure_examples": (record["failed_results"] + record["failed_streams"])[:5],
        "refused_streams": record["refused"],
        "health": {
            name: {
                "probes": len(p.latencies),
                "failed": p.failed,
                "p50_s": _percentile(p.latencies, 50),
                "p99_s": _percentile(p.latencies, 99),
                "max_s": max(p.latencies, default=None),
            }
            for name, p in probers.items()
        },
        "rss_mb": {
            name: {"before": round((rss_before[name] or 0) / 2**20, 1), "peak": round(sampler.peak[name] / 2**20, 1)}
            for name in pids
        },
    }


def run_variant(args: argparse.Namespace) -> dict[str, Any]:
    """In the child process: start this tree's mesh, warm it up, run every load in turn."""
    import facefuse
    from facefuse.servers.local import LocalMesh

    data = _photo()
    loads = [Load.parse(text) for text in args.loads.split(",")]
    with LocalMesh(env={"FACEFUSE_ASSETS": ""}, start_timeout_s=300) as mesh:
        warm: dict[str, Any] = {"latencies": [], "failed_results": [], "failed_streams": [], "refused": 0,
                                "started": time.perf_counter()}
        for method in sorted({load.method for load in loads}):
            _one_stream(
                mesh.gateway_address,
                -1,
                data,
                argparse.Namespace(**{**vars(args), "method": method, "images": 1}),
                warm,
            )
        results = {load.label: run_load(mesh, data, load, args) for load in loads}
    return {"source": str(Path(facefuse.__file__).resolve().parents[1]), "loads": results,
            "warmup_failures": warm["failed_results"] + warm["failed_streams"]}


def _photo() -> bytes:
    import skimage.data
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def baseline_tree(commit: str) -> Path:
    """The ``src`` of ``commit``, unpacked once into /tmp (``git archive``: the repository is not touched)."""
    root = Path(f"/tmp/facefuse-baseline-{commit}")
    if not (root / "src" / "facefuse").is_dir():
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", commit, "src"], check=True, capture_output=True
        ).stdout
        root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(root, filter="data")
    return root / "src"


def _fmt(value: float | None, unit: str = "s") -> str:
    return "-" if value is None else f"{value:.3f} {unit}" if unit == "s" else f"{value:.0f} {unit}"


def write_report(variants: dict[str, dict[str, Any]], args: argparse.Namespace, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{os.cpu_count()}-core CPU, shared with other jobs (numbers are noisy)",
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "python benchmarks/bench_load.py " + " ".join(sys.argv[1:]), "baseline": args.baseline}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "variants": variants}, indent=2) + "\n")
    names = list(variants)
    lines = ["# Load on the open-pack mesh: concurrent gateway streams, before and after", "",
             f"{meta['machine']}; {meta['when']}; `{meta['command']}`.",
             (f"before = commit {args.baseline}, after = this tree; both meshes run the gateway's default flags. "
              f"A stream's deadline: {args.deadline_s:g} s; health probed every {args.probe_period_s:g} s per service "
              f"(a probe without an answer in {args.probe_timeout_s:g} s counts as that long). Latency per image: "
              "from its chunk sent to its result received. Failures: a non-OK result or a stream ended by an error "
              "other than RESOURCE_EXHAUSTED; refusals are counted apart.")]
    for name in names:
        if "error" in variants[name]:
            lines += ["", f"**{name} did not run**: `{variants[name]['error']}`"]
    for label in [load.label for load in (Load.parse(t) for t in args.loads.split(","))]:
        per = {n: variants[n].get("loads", {}).get(label, {}) for n in names}
        lines += ["", f"## {label}", "", "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]

        def row(title: str, cell: Any, per: dict[str, dict[str, Any]] = per, lines: list[str] = lines) -> None:
            lines.append(f"| {title} | " + " | ".join(cell(per[n]) if per[n] else "-" for n in names) + " |")

        row("wall time", lambda v: _fmt(v["wall_s"]))
        row("results", lambda v: str(v["results"]))
        row("latency per image p50", lambda v: _fmt(v["latency_s"]["p50"]))
        row("latency per image p99", lambda v: _fmt(v["latency_s"]["p99"]))
        row("failures (goal 0)", lambda v: str(v["failures"]))
        row("streams refused (RESOURCE_EXHAUSTED)", lambda v: str(v["refused_streams"]))
        for service in ("gateway", "mica", "ofer", "fusion"):
            row(
                f"health p99 / max, {service} (goal < 1 s)",
                lambda v, s=service: (
                    f"{_fmt(v['health'][s]['p99_s'])} / {_fmt(v['health'][s]['max_s'])}"
                    + (
                        f", {v['health'][s]['failed']} of {v['health'][s]['probes']} failed"
                        if v["health"][s]["failed"]
                        else ""
                    )
                ),
            )
        for service in ("gateway", "mica", "ofer", "fusion"):
            row(f"RSS {service}: before -> peak", lambda v, s=service: (
                f"{v['rss_mb'][s]['before']:.0f} -> {v['rss_mb'][s]['peak']:.0f} MB"))
        for name in names:
            if per[name].get("failure_examples"):
                lines += ["", f"{name}, first failures: " + "; ".join(f"`{e}`" for e in per[name]["failure_examples"])]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", default=DEFAULT_LOADS,
                        help="comma-separated METHOD:STREAMS:IMAGES, run in turn on each variant's mesh")
    parser.add_argument("--samples", type=int, default=4, help="OFER samples per face (ofer, fuse)")
    parser.add_argument("--deadline-s", type=float, default=240.0, help="deadline of every stream")
    parser.add_argument("--probe-period-s", type=float, default=0.1)
    parser.add_argument("--probe-timeout-s", type=float, default=5.0)
    parser.add_argument("--baseline", default=BASELINE_COMMIT, help="commit measured as 'before'")
    parser.add_argument("--variants", default="before,after")
    parser.add_argument("--out", type=Path, default=RESULTS / "load")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_variant(args)))
        return
    sources = {"before": baseline_tree(args.baseline), "after": REPO / "src"}
    variants: dict[str, dict[str, Any]] = {}
    child_args = sys.argv[1:]
    for name in args.variants.split(","):
        env = {**os.environ, "PYTHONPATH": str(sources[name]), "OPENBLAS_NUM_THREADS": "1"}
        print(f"{name}: {sources[name]} ...", file=sys.stderr, flush=True)
        try:
            done = subprocess.run([sys.executable, __file__, *child_args, "--child"], env=env, capture_output=True,
                                  text=True, timeout=args.deadline_s + 600, check=False)
            lines = done.stdout.strip().splitlines()
            variants[name] = json.loads(lines[-1]) if done.returncode == 0 and lines else {
                "error": f"exit {done.returncode}: {done.stderr.strip()[-400:]}"}
        except subprocess.TimeoutExpired:
            variants[name] = {"error": "the variant's run outlived its time limit"}
        print(f"{name}: {json.dumps(variants[name])[:600]}", file=sys.stderr, flush=True)
    write_report(variants, args, args.out)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
