"""Faces per second through the local mesh with 1 vs 2 (or more) replicas of the ofer service.

    python benchmarks/bench_replicas.py [--replicas 1,2] [--images 24] [--streams 2] [--samples 32]

For each replica count a fresh mesh starts (open pack unless --assets), one warm-up image goes through,
then ``--streams`` concurrent Process streams send ``--images`` photos in all (method ``--method``) and
the wall time from the first image sent to the last face back gives faces per second. Every face must
come back OK and without a fallback, or the run is refused. Replicas only add throughput where there
are free cores (or GPUs) for them: the machine's CPU count and load are printed with the numbers.
Results go to benchmarks/results/replicas-<pack>.{json,md} with --write.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path

from facefuse.client.api import GatewayClient, ImageInput
from facefuse.servers.local import LocalMesh

RESULTS = Path(__file__).resolve().parent / "results"


def _photo() -> bytes:
    import skimage.data
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def run_streams(address: str, photo: bytes, images: int, streams: int, method: str, samples: int) -> float:
    """Seconds for ``images`` photos over ``streams`` concurrent streams; raises if any face failed."""
    failures: list[str] = []
    per_stream = [images // streams + (1 if i < images % streams else 0) for i in range(streams)]

    def one(stream: int, count: int) -> None:
        with GatewayClient(address, timeout_s=3600) as client:
            batch = (ImageInput(f"s{stream}-{i}", photo) for i in range(count))
            for result in client.process(batch, method=method, num_samples=samples, seed=7):
                if result.status.code != 0 or result.reconstruction.fallback:
                    failures.append(result.status.message or result.reconstruction.fallback)

    threads = [threading.Thread(target=one, args=(i, n)) for i, n in enumerate(per_stream)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    if failures:
        raise SystemExit(f"{len(failures)} face(s) failed: {failures[:3]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", default="1,2", help="ofer replica counts to compare")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--streams", type=int, default=2)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--method", default="ofer", choices=["ofer", "fuse"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--assets", default=None)
    parser.add_argument("--write", action="store_true", help="write benchmarks/results/replicas-<pack>.{json,md}")
    args = parser.parse_args()
    photo = _photo()
    rows = []
    for count in (int(c) for c in args.replicas.split(",")):
        env = {} if args.assets else {"FACEFUSE_ASSETS": ""}
        with LocalMesh(assets=args.assets, env=env, replicas={"ofer": count}) as mesh:
            run_streams(mesh.gateway_address, photo, args.streams, args.streams, args.method, args.samples)  # warm-up
            times = [run_streams(mesh.gateway_address, photo, args.images, args.streams, args.method, args.samples)
                     for _ in range(args.repeats)]
        median = statistics.median(times)
        rows.append({"ofer_replicas": count, "seconds": [round(t, 3) for t in times],
                     "faces_per_s": round(args.images / median, 3)})
        print(f"ofer x{count}: {args.images / median:.2f} faces/s (median of {[round(t, 2) for t in times]} s)",
              flush=True)
    machine = {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2), "python": platform.python_version(),
               "platform": platform.platform()}
    setup = {k: getattr(args, k) for k in ("images", "streams", "samples", "method", "repeats")}
    setup["pack"] = "flame" if args.assets else "open"
    print(json.dumps({"machine": machine, "setup": setup}))
    if args.write:
        RESULTS.mkdir(exist_ok=True)
        name = f"replicas-{setup['pack']}"
        (RESULTS / f"{name}.json").write_text(json.dumps({"machine": machine, "setup": setup, "rows": rows}, indent=2))
        base = rows[0]["faces_per_s"]
        lines = ["| ofer replicas | faces/s | vs first row | runs (s) |", "|---|---|---|---|"]
        lines += [f"| {r['ofer_replicas']} | {r['faces_per_s']:.2f} | {r['faces_per_s'] / base:.2f}x | "
                  f"{', '.join(str(t) for t in r['seconds'])} |" for r in rows]
        header = (f"Machine: {machine['cpus']} CPUs (load {machine['load_avg_1m']} at the end), {machine['platform']}; "
                  f"{setup['pack']} pack, method {setup['method']}, {setup['samples']} samples, {setup['images']} "
                  f"images over {setup['streams']} streams, median of {setup['repeats']}.\n\n")
        (RESULTS / f"{name}.md").write_text(header + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
