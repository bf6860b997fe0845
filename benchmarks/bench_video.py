"""The video step per frame: tracking, identity fusion, One Euro smoothing, rendering the overlay and
encoding overlay.mp4, on a synthetic video of a static FLAME-sized head with pose noise (1° and 2 mm RMS
per frame), and the jitter of its pose before and after smoothing.

    python benchmarks/bench_video.py                       # 75 frames (3 s at 25 fps), 640² frames
    python benchmarks/bench_video.py --frames 50 --size 480

The frames' posed outputs are written in the posed-face contract's files (as the fitting step writes
them), so this times the client's video step alone, not the mesh's per-frame fit. Writes
benchmarks/results/video.md, video.json and video.png (per-frame time; rotation angle raw vs smoothed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from video_fixtures import FPS, noisy_static_pose, synthetic_video_run

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=75)
    parser.add_argument("--size", type=int, default=640)
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from facefuse.client.video import write_video_outputs

    with tempfile.TemporaryDirectory() as folder:
        out, items, _ = synthetic_video_run(Path(folder), args.frames, size=args.size, mesh_size="full")
        timings: list[float] = []
        summary, = write_video_outputs(out, items, "fuse", timings=timings)
        track = summary["tracks"][0]
        poses = np.load(out / track["dir"] / "poses.npz")
        raw, smooth = poses["global_pose_raw"], poses["global_pose"]
    truth, _, _ = noisy_static_pose(args.frames, seed=3)
    error_raw = np.degrees((Rotation.from_rotvec(raw) * truth.inv()).magnitude())
    error_smooth = np.degrees((Rotation.from_rotvec(smooth) * truth.inv()).magnitude())
    ms = np.array(timings) * 1000.0
    jitter = track["jitter"]
    result = {"frames": args.frames, "size_px": args.size, "fps": FPS, "mesh_vertices": 5023,
              "per_frame_ms": {"median": round(float(np.median(ms)), 1), "p90": round(float(np.percentile(ms, 90)), 1),
                               "mean": round(float(ms.mean()), 1)},
              "jitter": jitter,
              "angle_error_deg": {"raw_mean": round(float(error_raw.mean()), 3),
                                  "smoothed_mean_after_1s": round(float(error_smooth[int(FPS):].mean()), 3)},
              "cpu_count": os.cpu_count(), "load_average": os.getloadavg()}
    print(json.dumps(result, indent=2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "video.json").write_text(json.dumps(result, indent=2) + "\n")
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    left.plot(ms, ".-", lw=0.8)
    left.set_xlabel("frame")
    left.set_ylabel("ms per frame")
    left.set_title(f"video step per frame ({args.size}² frames, FLAME mesh)")
    left.set_ylim(0, None)
    right.plot(error_raw, label=f"raw (jitter {jitter['rotation_deg_raw']:.2f}°/frame)", lw=0.8)
    right.plot(error_smooth, label=f"One Euro (jitter {jitter['rotation_deg']:.2f}°/frame)", lw=1.5)
    right.set_xlabel("frame")
    right.set_ylabel("angle from the true pose (°)")
    right.set_title("static head, 1° RMS pose noise")
    right.legend()
    figure.tight_layout()
    figure.savefig(RESULTS / "video.png", dpi=110)
    lines = ["# Video step per frame", "",
             f"Synthetic {args.frames}-frame video ({args.size}² px, {FPS:g} fps) of a static FLAME-sized head "
             "(5023 vertices) with 1° / 2 mm RMS pose noise per frame; posed outputs given as the fit writes them, "
             f"so this is the client's video step alone. {os.cpu_count()} CPUs, load average "
             f"{os.getloadavg()[0]:.1f} when run (`python benchmarks/bench_video.py`).", "",
             "| per frame | median ms | p90 ms |", "|---|---|---|",
             f"| track + fuse + smooth + render + encode | {result['per_frame_ms']['median']} | "
             f"{result['per_frame_ms']['p90']} |", "",
             "| jitter (RMS change between frames) | raw | smoothed |", "|---|---|---|",
             f"| rotation, ° | {jitter['rotation_deg_raw']} | {jitter['rotation_deg']} |",
             f"| translation, mm | {jitter['translation_mm_raw']} | {jitter['translation_mm']} |", "",
             f"Mean angle from the true pose: raw {result['angle_error_deg']['raw_mean']}°, smoothed "
             f"{result['angle_error_deg']['smoothed_mean_after_1s']}° (after the first second).", "",
             "![per-frame time and pose jitter](video.png)", ""]
    (RESULTS / "video.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
