"""Time the built-in NoW evaluation per image on this CPU.

A synthetic subject stands in for the licence-gated data: a 100k-vertex "scan" sampled on a
head-sized surface (denser on the face, 0.3 mm noise, about half of it inside the NoW crop) and a
FLAME-sized prediction (a 5k-vertex, 10k-triangle head in a random pose, with noisy landmarks).
Times are process CPU seconds (the machine may be shared) with wall time alongside. Reports the crop
size, the time of one exact distance query over the crop, and the time per image for the
non-metrical and metrical variants (median over repeats), plus an exactness spot check.

    .venv/bin/python benchmarks/bench_eval.py [--repeats 3] [--scan-vertices 100000]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import trimesh

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from facefuse.eval.geometry import TriangleMeshDistance, closest_points_on_triangles
from facefuse.eval.now import align_and_measure, crop_scan, read_mesh, read_scan_vertices

from eval_fixtures import apply, head_mesh, mesh_landmarks, random_similarity


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
    parser.add_argument("--e2e-per-challenge", type=int, default=5,
                        help="end-to-end run: images per challenge and subject (2 subjects); 0 skips it")
    parser.add_argument("--workers", type=int, default=2)
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
        read_scan_vertices(scan_path)
        t_scan = time.process_time() - t0
        t0 = time.process_time()
        read_mesh(pred_path)
        t_pred = time.process_time() - t0
    print(f"reading: {len(scan) // 1000}k-vertex scan OBJ {t_scan:.2f} s CPU (once per subject), prediction OBJ "
          f"{t_pred * 1000:.0f} ms CPU")
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
        print(f"{label}: one exact query over the crop {t_query * 1000:.0f} ms CPU, |query - brute "
              f"force| max {worst:.2e} mm")
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

    if args.e2e_per_challenge > 0:
        end_to_end(args.e2e_per_challenge, args.workers)


def end_to_end(per_challenge: int, workers: int) -> None:
    """The whole runner (files, crop, workers, outputs) on a synthetic NoW-layout dataset."""
    from facefuse.eval.now import NowEvalConfig, run_now_evaluation

    from eval_fixtures import make_now_dataset

    with tempfile.TemporaryDirectory() as tmp:
        fx = make_now_dataset(Path(tmp), n_subjects=2, images_per_challenge=per_challenge, head_subdivisions=5,
                              scan_subdivisions=2, missing=0)
        scan_file = next((fx.root / "NoW_Dataset" / "final_release_version" / "scans").rglob("*.obj"))
        n_scan = len(read_scan_vertices(scan_file))
        t0 = time.perf_counter()
        summary = run_now_evaluation(NowEvalConfig(fx.root, fx.predictions, Path(tmp) / "out", workers=workers,
                                                   progress=False))
        wall = time.perf_counter() - t0
    n = summary["n_images_evaluated"]
    print(f"end to end: {n} images, {n_scan}-vertex scans ({summary['overall']['n_points'] // n} points in the crop), "
          f"10242-vertex predictions, {workers} workers: {wall:.1f} s wall, {wall / n:.2f} s/image; "
          f"median error {summary['overall']['median_mm']:.2e} mm (exact copies: ~0 expected)")


if __name__ == "__main__":
    main()
