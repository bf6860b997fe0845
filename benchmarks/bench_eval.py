"""Time the built-in NoW evaluation per image on this CPU.

A synthetic subject stands in for the licence-gated data: a 100k-vertex "scan" sampled on a
head-sized surface (denser on the face, 0.3 mm noise, about half of it inside the NoW crop) and a
FLAME-sized prediction (a 5k-vertex, 10k-triangle head in a random pose, with noisy landmarks).
Times are process CPU seconds (the machine may be shared) with wall time alongside. Reports the crop size, the time of one exact distance query over the crop, and the time per image
for the non-metrical and metrical variants (median over repeats), plus an exactness spot check.

    .venv/bin/python benchmarks/bench_eval.py [--repeats 3] [--scan-vertices 100000]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import trimesh

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from eval_fixtures import apply, head_mesh, mesh_landmarks, random_similarity  # noqa: E402

from facefuse.eval.geometry import TriangleMeshDistance, closest_points_on_triangles  # noqa: E402
from facefuse.eval.now import align_and_measure, crop_scan, read_mesh  # noqa: E402
import tempfile  # noqa: E402


def sample_scan(head: trimesh.Trimesh, n: int, rng: np.random.Generator) -> np.ndarray:
    tri = head.triangles
    area = head.area_faces
    centre_z = tri.mean(axis=1)[:, 2]
    weight = area * np.where(centre_z > 0, 12.0, 1.0)
    face = rng.choice(len(tri), size=n, p=weight / weight.sum())
    u, v = rng.random(n), rng.random(n)
    flip = u + v > 1
    u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
    pts = tri[face, 0] + u[:, None] * (tri[face, 1] - tri[face, 0]) + v[:, None] * (tri[face, 2] - tri[face, 0])
    return pts + rng.normal(0, 0.3, size=pts.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scan-vertices", type=int, default=100_000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    gt_head = head_mesh(6)  # the true surface the scanner saw (fine)
    # FLAME has 5023 vertices / 9976 triangles; icosphere heads bracket it (2562/5120, 10242/20480).
    scan = sample_scan(gt_head, args.scan_vertices, rng)
    lmk = mesh_landmarks(gt_head)
    idx = crop_scan(scan, lmk)
    points = scan[idx]

    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
    print(f"scan vertices {len(scan)}, inside the NoW crop {len(points)}")
    with tempfile.TemporaryDirectory() as tmp:
        # File reading: the scan once per subject (cached per worker), the prediction once per image.
        scan_mesh = trimesh.Trimesh(scan, np.zeros((0, 3), dtype=np.int64), process=False)
        scan_path = Path(tmp) / "scan.obj"
        scan_path.write_text("".join(f"v {x:.6f} {y:.6f} {z:.6f}\n" for x, y, z in scan_mesh.vertices))
        pred_path = Path(tmp) / "pred.obj"
        head_mesh(4).export(pred_path)
        t0 = time.process_time()
        read_mesh(scan_path, need_faces=False)
        t_scan = time.process_time() - t0
        t0 = time.process_time()
        read_mesh(pred_path)
        t_pred = time.process_time() - t0
    print(f"reading: 100k-vertex scan OBJ {t_scan:.2f} s CPU (once per subject), prediction OBJ {t_pred * 1000:.0f} ms CPU")
    for label, pred in (("prediction 2562 v / 5120 f", head_mesh(4)), ("prediction 10242 v / 20480 f", head_mesh(5))):
        ps, prot, pt = random_similarity(rng, scale=1.0)
        pv = apply(pred.vertices, ps, prot, pt)
        pl = apply(mesh_landmarks(pred) + rng.normal(0, 1.5, size=(7, 3)), ps, prot, pt)
        surface = TriangleMeshDistance(pred.vertices, pred.faces)
        t0 = time.process_time()
        q = surface.query(points)
        t_query = time.process_time() - t0
        # Exactness spot check against all triangles for 200 points.
        sub = rng.choice(len(points), 200, replace=False)
        tri = pred.triangles
        worst = 0.0
        for i in sub:
            p = np.repeat(points[i : i + 1], len(tri), axis=0)
            _, d = closest_points_on_triangles(p, tri[:, 0], tri[:, 1], tri[:, 2])
            worst = max(worst, abs(d.min() - q.distances[i]))
        print(f"{label}: one exact query over the crop {t_query * 1000:.0f} ms CPU, |query - brute force| max {worst:.2e} mm")
        for metrical in (False, True):
            times, walls = [], []
            for _ in range(args.repeats):
                t0, w0 = time.process_time(), time.perf_counter()
                res = align_and_measure(points, lmk, pv, pred.faces, pl, metrical=metrical)
                times.append(time.process_time() - t0)
                walls.append(time.perf_counter() - w0)
            print(
                f"  {'metrical' if metrical else 'non-metrical'}: {np.median(times):.2f} s CPU/image "
                f"(wall {np.median(walls):.2f} s), {res.iterations} iterations, converged {res.converged}, "
                f"median error {np.median(res.errors):.3f} mm"
            )


if __name__ == "__main__":
    main()
