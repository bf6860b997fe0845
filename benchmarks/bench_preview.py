"""Preview rendering, old vs new in one run: the per-triangle loop (from a git ref) against the vectorised
renderer, on a FLAME-sized mesh (synthetic, 5023 vertices, 9976 triangles), and what the result path
waits for when faces are written with previews inline vs on the worker pool.

    python benchmarks/bench_preview.py                  # old = git f4f12f7 (before this work)
    python benchmarks/bench_preview.py --ref main~5     # any ref that has src/facefuse/render.py

Writes benchmarks/results/preview.md and preview.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np

from facefuse.assets.synthetic.flame import synthetic_flame_mesh
from facefuse.render import render_preview, render_uncertainty

from timing import timed

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def old_renderer(ref: str) -> ModuleType:
    """``src/facefuse/render.py`` as it was at ``ref``, loaded as its own module."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:src/facefuse/render.py"], check=True,
                            capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader(f"render_at_{ref}", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, f"render@{ref}", "exec"), module.__dict__)
    return module


def result_path_seconds(faces: int, workers: int) -> tuple[float, float]:
    """Seconds until write_face returned for ``faces`` faces (what the result stream waits for), and until
    every preview was on disk, with previews inline (workers=0) or on the pool."""
    from facefuse.client.outputs import PreviewWriter, write_face
    from facefuse.client.validate import CheckedFace, CheckedReconstruction

    vertices, triangles = synthetic_flame_mesh("full")
    rec = CheckedReconstruction(method="fuse", strategy="bench", confidence=0.5, fallback="", topology="flame2020",
                                vertices=(vertices * 1000).astype(np.float32), faces=triangles,
                                vertex_spread=np.linspace(0, 6, len(vertices)).astype(np.float32))
    face = CheckedFace(face_index=0, num_faces=1, seconds=0.0, box=np.array([100.0, 100, 300, 300]), score=0.9,
                       detector="bench", kps5=np.zeros((5, 2)), reconstruction=rec)
    photo = np.zeros((400, 400, 3), np.uint8)
    with tempfile.TemporaryDirectory() as folder:
        pool = PreviewWriter(workers=workers, pending=2 * max(workers, 1)) if workers else None
        start = time.perf_counter()
        for i in range(faces):
            write_face(Path(folder), f"img{i}", face, photo, previews=pool)
        returned = time.perf_counter() - start
        if pool is not None:
            pool.close()
        return returned, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default="f4f12f7", help="git ref of the old renderer (default: before this work)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--faces", type=int, default=8, help="faces written in the result-path measurement")
    args = parser.parse_args()
    old = old_renderer(args.ref)
    vertices, faces = synthetic_flame_mesh("full")
    vertices = vertices * 1000.0
    colors = np.random.default_rng(0).integers(0, 256, size=(len(vertices), 3), dtype=np.uint8)
    spread = np.linspace(0.0, 6.0, len(vertices))
    rows = []

    def measure(name: str, fn, repeats: int) -> None:
        wall, cpu = timed(fn, repeats)
        rows.append({"case": name, "wall_s": round(wall, 4), "cpu_s": round(cpu, 4)})
        print(f"{name:58s} wall {wall:7.3f} s  cpu {cpu:7.3f} s", flush=True)

    measure(f"old preview (per-triangle loop, {args.ref})", lambda: old.render_preview(vertices, faces), 2)
    measure("new preview, same fill-the-frame image", lambda: render_preview(vertices, faces, field_mm=None),
            args.repeats)
    measure("new preview, fixed 260 mm field + ruler (default)", lambda: render_preview(vertices, faces),
            args.repeats)
    measure("new preview, vertex colours", lambda: render_preview(vertices, faces, colors), args.repeats)
    measure(f"old uncertainty.png ({args.ref})", lambda: old.render_uncertainty(vertices, faces, spread), 2)
    measure("new uncertainty.png", lambda: render_uncertainty(vertices, faces, spread), args.repeats)
    same = [np.array_equal(old.render_preview(vertices, faces, c), render_preview(vertices, faces, c, field_mm=None))
            for c in (None, colors)]
    print(f"identical images (plain, coloured): {same}")
    inline_return, _ = result_path_seconds(args.faces, 0)
    pooled_return, pooled_done = result_path_seconds(args.faces, 2)
    print(f"{args.faces} faces written: inline {inline_return:.2f} s; pool: write_face returned after "
          f"{pooled_return:.2f} s, previews done after {pooled_done:.2f} s")
    result = {"mesh": {"vertices": len(vertices), "triangles": len(faces)}, "size_px": 384, "rows": rows,
              "identical_to_old": same, "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
              "result_path": {"faces": args.faces, "inline_s": round(inline_return, 3),
                              "pool_returned_s": round(pooled_return, 3), "pool_done_s": round(pooled_done, 3)},
              "python": sys.version.split()[0]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "preview.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Preview rendering: old vs new", "",
             f"FLAME-sized synthetic mesh ({len(vertices)} vertices, {len(faces)} triangles), two 384² views; "
             f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} when run "
             "(`python benchmarks/bench_preview.py`).", "",
             "| case | wall s | CPU s |", "|---|---|---|"]
    lines += [f"| {r['case']} | {r['wall_s']:.3f} | {r['cpu_s']:.3f} |" for r in rows]
    lines += ["", f"Same image as the old renderer (fill-the-frame scale): plain {same[0]}, coloured {same[1]}.", "",
              f"Writing {args.faces} FLAME faces (mesh files, preview.png, uncertainty.png, overlay.png): "
              f"previews inline {inline_return:.2f} s; on the 2-thread pool write_face returns after "
              f"{pooled_return:.2f} s (the result stream goes on) and all previews are on disk after "
              f"{pooled_done:.2f} s.", ""]
    (RESULTS / "preview.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
