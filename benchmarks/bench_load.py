"""Load on the local open-pack mesh: many concurrent gateway streams, before and after a change, in one run.

    python benchmarks/bench_load.py                       # before = commit 67ff244, after = this tree
    python benchmarks/bench_load.py --streams 16 --images 1 --method mica

Each variant's mesh (gateway + mica, ofer, fusion as processes, no assets: the open pack) runs from its
own source tree (``PYTHONPATH``), in a child process of this script. Every stream is its own channel,
sends ``--images`` copies of skimage's astronaut and reads its results; a deadline bounds every stream.
Reported per variant: latency per image (from the image's last chunk sent to its result), failures
(a non-OK result, or a stream that ended with an error other than RESOURCE_EXHAUSTED), streams refused
with RESOURCE_EXHAUSTED (counted apart: a clear "come back later", not a failure), health-check
latency of every service probed every ~100 ms during the load (a probe that gets no answer within
``--probe-timeout-s`` counts as that long and as failed), and peak RSS per service process during the
load (sampled every 200 ms; psutil if installed, else /proc).

With ``--method detect`` (the default) the load is the gateway's own work per image (decode,
detection, alignment, crops) plus its streaming, i.e. what the gateway's limits govern; the model
services only answer health checks. ``mica``, ``ofer`` or ``fuse`` put the model services under load too.
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
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BASELINE_COMMIT = "67ff244"


def _rss_bytes(pid: int) -> int | None:
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss)
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - the process is gone
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


def _one_stream(address: str, index: int, data: bytes, args: argparse.Namespace, record: dict[str, Any]) -> None:
    """One client: its own channel, ``args.images`` images, every result read; outcome into ``record``."""
    import grpc

    from facefuse.v1 import gateway_pb2, gateway_pb2_grpc

    sent: dict[str, float] = {}

    def requests() -> Any:
        for i in range(args.images):
            image_id = f"s{index}-i{i}"
            sent[image_id] = time.perf_counter()
            yield gateway_pb2.ImageChunk(image_id=image_id, data=data, last=True,
                                         options=gateway_pb2.ProcessOptions(method=args.method, num_samples=args.samples,
                                                                            seed=index))

    with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        try:
            for result in stub.Process(requests(), timeout=args.deadline_s):
                record["latencies"].append(time.perf_counter() - sent.get(result.image_id, record["started"]))
                if result.status.code != 0:
                    record["failed_results"].append(f"{result.image_id}: {result.status.code} {result.status.message[:120]}")
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                record["refused"] += 1
            else:
                record["failed_streams"].append(f"stream {index}: {exc.code().name} {(exc.details() or '')[:120]}")


def run_variant(args: argparse.Namespace) -> dict[str, Any]:
    """In the child process: start this tree's mesh, load it, measure."""
    import facefuse
    from facefuse.servers.local import LocalMesh

    data = _photo()
    with LocalMesh(env={"FACEFUSE_ASSETS": ""}, start_timeout_s=300) as mesh:
        pids = {name: proc.process.pid for name, proc in mesh.processes.items()}
        warm: dict[str, Any] = {"latencies": [], "failed_results": [], "failed_streams": [], "refused": 0,
                                "started": time.perf_counter()}
        _one_stream(mesh.gateway_address, -1, data, argparse.Namespace(**{**vars(args), "images": 1}), warm)
        idle_rss = {name: _rss_bytes(pid) for name, pid in pids.items()}
        probers = {name: Prober(mesh.address(name), args.probe_period_s, args.probe_timeout_s) for name in pids}
        sampler = RssSampler(pids)
        record: dict[str, Any] = {"latencies": [], "failed_results": [], "failed_streams": [], "refused": 0}
        for thread in [*probers.values(), sampler]:
            thread.start()
        time.sleep(0.5)  # a few probes at rest first
        started = time.perf_counter()
        record["started"] = started
        clients = [threading.Thread(target=_one_stream, args=(mesh.gateway_address, i, data, args, record), daemon=True)
                   for i in range(args.streams)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(args.deadline_s + 30)
        wall = time.perf_counter() - started
        for thread in [*probers.values(), sampler]:
            thread.stop.set()
            thread.join(10)
    lat = record["latencies"]
    return {
        "source": str(Path(facefuse.__file__).resolve().parents[1]),
        "streams": args.streams, "images_per_stream": args.images, "method": args.method,
        "wall_s": round(wall, 2),
        "results": len(lat),
        "latency_s": {"p50": _percentile(lat, 50), "p99": _percentile(lat, 99), "max": max(lat, default=None)},
        "failures": len(record["failed_results"]) + len(record["failed_streams"]),
        "failure_examples": (record["failed_results"] + record["failed_streams"])[:5],
        "refused_streams": record["refused"],
        "health": {name: {"probes": len(p.latencies), "failed": p.failed, "p50_s": _percentile(p.latencies, 50),
                          "p99_s": _percentile(p.latencies, 99), "max_s": max(p.latencies, default=None)}
                   for name, p in probers.items()},
        "rss_mb": {name: {"idle": round((idle_rss[name] or 0) / 2**20, 1), "peak_under_load": round(sampler.peak[name] / 2**20, 1)}
                   for name in pids},
        "warmup_failures": warm["failed_results"] + warm["failed_streams"],
    }


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
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "src"], check=True, capture_output=True).stdout
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
    lines = [f"# Load: {args.streams} concurrent gateway streams x {args.images} image(s), method `{args.method}`, open pack",
             "", f"{meta['machine']}; {meta['when']}; `{meta['command']}`.",
             (f"before = commit {args.baseline}, after = this tree. A stream's deadline: {args.deadline_s:g} s; "
              f"health probed every {args.probe_period_s:g} s per service (a probe without an answer in "
              f"{args.probe_timeout_s:g} s counts as that long)."), "",
             "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]

    def row(label: str, cell: Any) -> None:
        lines.append(f"| {label} | " + " | ".join(cell(variants[n]) for n in names) + " |")

    row("wall time", lambda v: _fmt(v.get("wall_s")))
    row("results", lambda v: str(v.get("results", "-")))
    row("latency per image p50", lambda v: _fmt(v.get("latency_s", {}).get("p50")))
    row("latency per image p99", lambda v: _fmt(v.get("latency_s", {}).get("p99")))
    row("failures (goal 0)", lambda v: str(v.get("failures", v.get("error", "-"))))
    row("streams refused (RESOURCE_EXHAUSTED)", lambda v: str(v.get("refused_streams", "-")))
    for service in ("gateway", "mica", "ofer", "fusion"):
        row(f"health p99 {service} (goal < 1 s)", lambda v, s=service: _fmt(v.get("health", {}).get(s, {}).get("p99_s")))
        row(f"health probes failed {service}", lambda v, s=service: str(v.get("health", {}).get(s, {}).get("failed", "-")))
    for service in ("gateway", "mica", "ofer", "fusion"):
        row(f"RSS {service} idle -> peak", lambda v, s=service: (
            f"{v['rss_mb'][s]['idle']:.0f} -> {v['rss_mb'][s]['peak_under_load']:.0f} MB" if "rss_mb" in v else "-"))
    for name in names:
        if variants[name].get("failure_examples"):
            lines += ["", f"{name}, first failures: " + "; ".join(f"`{e}`" for e in variants[name]["failure_examples"])]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--images", type=int, default=2, help="images per stream")
    parser.add_argument("--method", default="detect", choices=["detect", "mica", "ofer", "fuse"])
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
