"""Flame-pack speed through the local mesh, before vs after a change, in one run (issue 18).

    python benchmarks/bench_flame_speed.py                 # mica, ofer, fuse; N=10 and 100; 1 and 4 clients
    python benchmarks/bench_flame_speed.py --quick         # a few minutes: fewer images, N=100 only for fuse
    python benchmarks/bench_flame_speed.py --baseline REF --variants before,after,after-batched

Each variant's mesh (gateway + mica, ofer, fusion as processes, flame pack on synthetic official-format
weights written by ``facefuse assets synthesize --size full``) runs from its own source tree in a child
process of this script: ``before`` from a detached git worktree of ``--baseline`` (made once under
/tmp), ``after`` from this tree with its default flags, ``after-batched`` from this tree with the ofer
service batching across faces (``--max-batch 8``, opt-in: see docs/scaling.md). A cell is METHOD, N
samples and C concurrent clients, each client on its own channel streaming ``--images`` copies of
skimage's astronaut (every method warmed up once first). Per face: wall = the cell's wall time / faces
(so with 4 clients it is the inverse throughput), latency = an image's chunk sent to its result, CPU =
the CPU seconds of the four service processes over the cell / faces (per service too). Preview: the
tree's ``render_preview`` of a fused mesh (``timing.timed``, median of 3). The machine's load average
is recorded around every cell: on a shared machine the numbers are noisy.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench_load import _one_stream, _percentile, _photo  # same streaming client and photo as the load benchmark

from timing import timed

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BASELINE_REF = "f4f12f7"
SERVICES = ("gateway", "mica", "ofer", "fusion")
VARIANT_ARGS: dict[str, dict[str, list[str]]] = {
    "before": {},
    "after": {},
    "after-posed": {},
    "after-fast": {},
    "after-batched": {"ofer": ["--max-batch", "8"]},
    "after-ofer2": {"ofer": ["--torch-threads", "2"], "mica": ["--torch-threads", "1"],
                    "fusion": ["--torch-threads", "1"]},
    "after-noprefetch": {"ofer": ["--rank-prefetch", "off"]},
    "after-onelane": {"ofer": ["--rank-lane", "off"]},
    "after-onelane-noprefetch": {"ofer": ["--rank-lane", "off", "--rank-prefetch", "off"]},
    "after-float32": {},
}
"""Service flags of each variant (``after-noprefetch``: IdRank's context computed in Rank, after the sampler,
as before the rank prefetch; docs/performance.md#rank-prefetch)."""
VARIANT_OPTIONS: dict[str, dict[str, Any]] = {
    "after": {"neutral_only": True},
    "after-posed": {},
    "after-fast": {"neutral_only": True, "steps": 20},
    "after-batched": {"neutral_only": True},
    "after-ofer2": {"neutral_only": True},
    "after-noprefetch": {"neutral_only": True},
    "after-onelane": {"neutral_only": True},
    "after-onelane-noprefetch": {"neutral_only": True},
    "after-float32": {"neutral_only": True},
}
"""Request options of each variant (ProcessOptions fields). ``after`` does the same work as ``before``, the
neutral identity shape (``neutral_only``); ``after-posed`` adds the posed-face fit (issue 14, on by
default); ``after-fast`` is ``--quality fast`` (20 DDIM steps: within 0.1 mm of the default, not bit-equal)."""
VARIANT_ENV: dict[str, dict[str, str]] = {"after-float32": {"FACEFUSE_NUMERICS": "fast-float32"}}
"""Service environment of each variant: ``after-float32`` runs ArcFace and FaRL in float32 even on a CPU with
bfloat16 matrix units (AMX), where ``fast`` runs them in bfloat16 (docs/performance.md#numerics-modes)."""


def _cpu_seconds(pid: int) -> float:
    """utime + stime of one process (its threads included), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def run_cell(mesh: Any, data: bytes, method: str, samples: int, clients: int,
             args: argparse.Namespace) -> dict[str, Any]:
    pids = {name: mesh.processes[name].process.pid for name in SERVICES}
    stream_args = argparse.Namespace(method=method, samples=samples, images=args.images, deadline_s=args.deadline_s,
                                     options=VARIANT_OPTIONS.get(args.variant, {}))
    record: dict[str, Any] = {"latencies": [], "failed_results": [], "failed_streams": [], "refused": 0}
    load_before = _load()
    cpu_before = {name: _cpu_seconds(pid) for name, pid in pids.items()}
    started = time.perf_counter()
    record["started"] = started
    threads = [threading.Thread(target=_one_stream, args=(mesh.gateway_address, i, data, stream_args, record))
               for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(args.deadline_s + 30)
    wall = time.perf_counter() - started
    cpu = {name: _cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
    faces = len(record["latencies"]) - len(record["failed_results"])
    per = max(faces, 1)
    return {
        "faces": faces,
        "wall_s": round(wall, 3),
        "wall_per_face_s": round(wall / per, 3),
        "faces_per_s": round(faces / wall, 3) if wall > 0 else None,
        "latency_p50_s": _percentile(record["latencies"], 50),
        "cpu_per_face_s": round(sum(cpu.values()) / per, 3),
        "cpu_per_face_by_service_s": {name: round(value / per, 3) for name, value in cpu.items()},
        "failures": (record["failed_results"] + record["failed_streams"])[:3],
        "load_before": load_before,
        "load_after": _load(),
    }


def preview_time(mesh: Any, data: bytes) -> dict[str, Any]:
    """The tree's preview renderer on one fused mesh (the client's preview.png call: spread colours)."""
    import grpc
    import numpy as np

    from facefuse import render, wire
    from facefuse.v1 import gateway_pb2, gateway_pb2_grpc

    with grpc.insecure_channel(mesh.gateway_address, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        chunk = gateway_pb2.ImageChunk(image_id="preview", data=data, last=True,
                                       options=gateway_pb2.ProcessOptions(method="fuse", num_samples=10))
        (result,) = list(gateway_pb2_grpc.GatewayStub(ch).Process(iter([chunk]), timeout=600))
    rec = result.reconstruction
    vertices, faces = wire.to_numpy(rec.mesh.vertices), wire.to_numpy(rec.mesh.faces)
    colors = render.spread_colors(wire.to_numpy(rec.vertex_spread)) if rec.HasField("vertex_spread") else None
    wall, cpu = timed(lambda: render.render_preview(vertices, np.asarray(faces), colors=colors), 3)
    return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "vertices": len(vertices)}


def _distinct_photos(count: int) -> list[bytes]:
    """``count`` versions of the photo that differ in every pixel (brightness steps of 3 grey levels), so
    that no two faces of a stream have the same image tensors (the ofer service keys its IdRank prefetch
    on them; real streams are different photos)."""
    import numpy as np
    import skimage.data
    from PIL import Image

    photos = []
    for k in range(count):
        image = np.clip(skimage.data.astronaut().astype(np.int16) + 3 * k - 3 * (count // 2), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=92)
        photos.append(buffer.getvalue())
    return photos


def run_variant(args: argparse.Namespace) -> dict[str, Any]:
    """In the child process: this tree's mesh, warmed up, then every cell in turn."""
    import facefuse
    from facefuse.servers.local import LocalMesh

    data: bytes | list[bytes] = _distinct_photos(args.images) if args.distinct else _photo()
    cells: list[tuple[str, int, int]] = [
        (method, samples, clients)
        for samples in args.samples
        for method in args.methods
        if not (args.quick and samples > 10 and method != "fuse")
        for clients in args.clients
    ]
    out: dict[str, Any] = {"source": str(Path(facefuse.__file__).resolve().parents[1]), "cells": {}}
    env = {"FACEFUSE_ASSETS": str(args.assets), **VARIANT_ENV.get(args.variant, {})}
    with LocalMesh(assets=args.assets, pack="flame", env=env,
                   extra_args=VARIANT_ARGS[args.variant], start_timeout_s=600) as mesh:
        warm: dict[str, Any] = {"latencies": [], "failed_results": [], "failed_streams": [], "refused": 0,
                                "started": time.perf_counter()}
        for method in args.methods:
            _one_stream(mesh.gateway_address, -1, data,
                        argparse.Namespace(method=method, samples=10, images=1, deadline_s=args.deadline_s,
                                           options=VARIANT_OPTIONS.get(args.variant, {})), warm)
        out["warmup_failures"] = warm["failed_results"] + warm["failed_streams"]
        try:
            out["preview"] = preview_time(mesh, data if isinstance(data, bytes) else data[0])
        except Exception as exc:  # a tree without the preview (or a changed signature): say so, go on
            out["preview"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        for method, samples, clients in cells:
            label = f"{method} N={samples} clients={clients}"
            runs = []
            for _ in range(args.repeats):
                runs.append(run_cell(mesh, data, method, samples, clients, args))
                time.sleep(0.5 if args.repeats > 1 else 0)  # nothing of the last run left in flight
            runs.sort(key=lambda run: run["wall_per_face_s"])
            out["cells"][label] = {**runs[len(runs) // 2],
                                   "runs_wall_per_face_s": [run["wall_per_face_s"] for run in runs]}
            print(f"{args.variant} {label}: {json.dumps(out['cells'][label])}", file=sys.stderr, flush=True)
    return out


def baseline_tree(ref: str) -> Path:
    """A detached worktree of ``ref`` under /tmp (made once; the checkout's files stay untouched)."""
    root = Path(f"/tmp/facefuse-bench-before-{ref}")
    if not (root / "src" / "facefuse").is_dir():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(root), ref], check=True,
                       capture_output=True)
    return root


def ensure_assets(directory: Path) -> Path:
    if not (directory / "mica.tar").is_file():
        subprocess.run([sys.executable, "-m", "facefuse.client.cli", "assets", "synthesize", "--dir", str(directory),
                        "--size", "full"], check=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    return directory


def write_report(variants: dict[str, dict[str, Any]], args: argparse.Namespace, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{os.cpu_count()}-core CPU (shared: see the load averages)",
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "python benchmarks/bench_flame_speed.py " + " ".join(sys.argv[1:]),
            "baseline": args.baseline}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "variants": variants}, indent=2) + "\n")
    names = list(variants)
    lines = ["# Flame pack through the local mesh: per-face wall and CPU, before and after", "",
             f"{meta['machine']}; {meta['when']}; `{meta['command']}`; before = {args.baseline}.",
             "wall/face = cell wall time / faces (inverse throughput); CPU/face = the four services' CPU "
             "seconds / faces; load = 1-min load average before -> after the cell.", ""]
    for name in names:
        if "error" in variants[name]:
            lines.append(f"**{name} did not run**: `{variants[name]['error']}`")
    labels: list[str] = []
    for name in names:
        labels += [label for label in variants[name].get("cells", {}) if label not in labels]
    lines += ["| cell | " + " | ".join(f"{n} wall/face | {n} CPU/face | {n} load" for n in names) + " |",
              "|---|" + "---|---|---|" * len(names)]
    for label in labels:
        cells = []
        for name in names:
            cell = variants[name].get("cells", {}).get(label)
            if not cell:
                cells += ["-", "-", "-"]
                continue
            fail = f" ({len(cell['failures'])} failed)" if cell["failures"] else ""
            cells += [f"{cell['wall_per_face_s']:.2f} s{fail}", f"{cell['cpu_per_face_s']:.2f} s",
                      f"{cell['load_before'][0]:.1f}->{cell['load_after'][0]:.1f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    repeated = [(name, label, cell["runs_wall_per_face_s"]) for name in names
                for label, cell in variants[name].get("cells", {}).items()
                if len(cell.get("runs_wall_per_face_s", [])) > 1]
    if repeated:
        lines += ["", "Repeated cells (the table shows the median run), every run's wall/face in s, sorted:", ""]
        lines += [f"- {name}, {label}: {', '.join(f'{value:.2f}' for value in runs)}" for name, label, runs in repeated]
    lines += ["", "| preview (render_preview of a fused mesh) | " + " | ".join(names) + " |",
              "|---|" + "---|" * len(names)]
    lines.append("| wall / CPU | " + " | ".join(
        (f"{p['wall_s']:.3f} s / {p['cpu_s']:.3f} s" if "wall_s" in p else p.get("error", "-"))
        for p in (variants[n].get("preview", {}) for n in names)) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", type=Path, default=Path("/tmp/facefuse-bench-assets-full"),
                        help="synthetic official-format weights (written here with --size full when missing)")
    parser.add_argument("--baseline", default=BASELINE_REF, help="git ref measured as 'before'")
    parser.add_argument("--variants", default="before,after,after-batched")
    parser.add_argument("--methods", default="mica,ofer,fuse")
    parser.add_argument("--samples", default="10,100", help="OFER samples per face (N), comma-separated")
    parser.add_argument("--clients", default="1,4", help="concurrent clients, comma-separated")
    parser.add_argument("--images", type=int, default=3, help="images each client streams per cell")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every cell this many times and report the median run (all runs' wall/face too); "
                             "with --images 1 that is a lone face's latency, measured several times")
    parser.add_argument("--distinct", action="store_true",
                        help="each image of a stream a slightly different photo (brightness steps) instead of copies")
    parser.add_argument("--quick", action="store_true",
                        help="2 images per client and N=100 for fuse only (a few minutes per variant)")
    parser.add_argument("--deadline-s", type=float, default=1200.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "flame_speed")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="after", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick and args.images == parser.get_default("images"):
        args.images = 2
    args.methods = args.methods.split(",")
    args.samples = [int(n) for n in args.samples.split(",")]
    args.clients = [int(n) for n in args.clients.split(",")]
    if args.child:
        print(json.dumps(run_variant(args)))
        return
    unknown = set(args.variants.split(",")) - set(VARIANT_ARGS)
    if unknown:
        raise SystemExit(f"unknown variant(s) {sorted(unknown)}; known: {sorted(VARIANT_ARGS)}")
    args.assets = ensure_assets(args.assets)
    variants: dict[str, dict[str, Any]] = {}
    for name in args.variants.split(","):
        tree = baseline_tree(args.baseline) if name == "before" else REPO
        env = {**os.environ, "PYTHONPATH": str(tree / "src")}
        print(f"{name}: {tree} (load {_load()}) ...", file=sys.stderr, flush=True)
        command = [sys.executable, __file__, *sys.argv[1:], "--child", "--variant", name, "--assets", str(args.assets)]
        try:
            done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=False,
                                  timeout=args.deadline_s + 3600)
            lines = done.stdout.strip().splitlines()
            variants[name] = json.loads(lines[-1]) if done.returncode == 0 and lines else {
                "error": f"exit {done.returncode}"}
        except subprocess.TimeoutExpired:
            variants[name] = {"error": "the variant's run outlived its time limit"}
    write_report(variants, args, args.out)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
