"""Posed-face fit: time per face on this machine's CPU, and what the fit recovers on known answers.

* flame pack: the synthetic official-format FLAME (size "small", ``facefuse.assets.synthetic``), 50
  expression components + jaw + head pose + translation fitted to 68 landmarks; faces posed with known
  parameters (10 expression components of sd 0.7, jaw, up to ~20° of rotation, 0.6-0.9 m away), projected
  through a 35 mm-equivalent camera with 0.3 px noise. Reports the recovery errors and the time per face
  for batches of 1 and 8 (the fit is batched: one Adam run for the batch).
* open pack: the rigid fit of neutral + residual to the astronaut's 468 FaceMesh points (stored in
  tests/data), with its reprojection error.

    python benchmarks/bench_fitting.py [--repeats 3] [--threads 1] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from facefuse.assets.canonical_face import load_canonical_face
from facefuse.assets.synthetic.flame import synthetic_flame_data
from facefuse.models.camera import (
    axis_angle_to_rotation,
    flame_to_opencv,
    intrinsics,
    project,
    rotation_to_axis_angle,
)
from facefuse.models.fitting import LandmarkFlame, PosedFit, fit_posed_face, flame_landmark_model
from facefuse.models.flame import FlameLayer
from facefuse.models.focal import DEFAULT_FOCAL_35MM, focal_px_from_35mm
from facefuse.packs.open import camera_points, metric_face
from facefuse.packs.posed import FlamePosedFitter, OpenPosedFitter, PoseFitTarget

from timing import timed

ROOT = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 1024, 768


def posed_batch(flame: FlameLayer, batch: int, seed: int, fitted: int = 10) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    shape = torch.randn(batch, 300, generator=g, dtype=f64) * 0.3
    expression = torch.randn(batch, fitted, generator=g, dtype=f64) * 0.7
    jaw = torch.stack([torch.rand(batch, generator=g, dtype=f64) * 0.2,
                       (torch.rand(batch, generator=g, dtype=f64) - 0.5) * 0.04, torch.zeros(batch, dtype=f64)], 1)
    omega = (torch.rand(batch, 3, generator=g, dtype=f64) - 0.5) * 0.6
    rotation = axis_angle_to_rotation(omega) @ flame_to_opencv(batch, f64)
    translation = torch.stack([(torch.rand(batch, generator=g, dtype=f64) - 0.5) * 60,
                               (torch.rand(batch, generator=g, dtype=f64) - 0.5) * 60,
                               600 + torch.rand(batch, generator=g, dtype=f64) * 300], 1)
    camera = intrinsics(torch.full((batch,), focal_px_from_35mm(DEFAULT_FOCAL_35MM, WIDTH, HEIGHT), dtype=f64),
                        WIDTH, HEIGHT)
    landmarks = flame(shape, expression=expression, jaw_pose=jaw).landmarks68 * 1000.0
    target = project(landmarks @ rotation.transpose(1, 2) + translation[:, None], camera)
    target = target + torch.randn(target.shape, generator=g, dtype=f64) * 0.3
    return dict(shape=shape, expression=expression, jaw=jaw, rotation=rotation, translation=translation,
                camera=camera, target=target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    flame = FlameLayer(synthetic_flame_data("small", torch.Generator().manual_seed(0))).double()
    landmarks = LandmarkFlame(flame, flame.full_lmk_faces_idx[0], flame.full_lmk_bary_coords[0])
    report: dict[str, object] = {"machine": f"{platform.processor() or platform.machine()}, "
                                            f"{torch.get_num_threads()} torch thread(s)", "torch": torch.__version__}
    # Accuracy on 8 known faces (fit 50 components; the truth uses 10, the rest should stay ~0).
    case = posed_batch(flame, 8, seed=11)
    weights = torch.ones(8, 68, dtype=torch.float64)
    fit = fit_posed_face(flame_landmark_model(landmarks, case["shape"]), 50, case["target"], weights, case["camera"])
    angle = np.degrees(rotation_to_axis_angle(fit.rotation @ case["rotation"].transpose(1, 2)).norm(dim=-1).numpy())
    depth = ((fit.translation[:, 2] - case["translation"][:, 2]).abs() / case["translation"][:, 2]).numpy()
    truth = torch.nn.functional.pad(case["expression"], (0, 40))
    report["flame_known_answer"] = {
        "faces": 8, "noise_px": 0.3, "fitted_expression": 50,
        "reprojection_px_mean": float(fit.reprojection_error_px.mean()),
        "initial_px_mean": float(fit.initial_error_px.mean()),
        "rotation_error_deg_max": float(angle.max()), "depth_error_pct_max": float(100 * depth.max()),
        "jaw_error_rad_max": float((fit.jaw_pose - case["jaw"]).abs().max()),
        "expression_rms_error": float((fit.expression - truth).pow(2).mean().sqrt()),
    }
    timings = {}
    for batch in (1, 8):
        case = posed_batch(flame, batch, seed=batch)
        weights = torch.ones(batch, 68, dtype=torch.float64)
        model = flame_landmark_model(landmarks, case["shape"])
        wall, cpu = timed(lambda: fit_posed_face(model, 50, case["target"], weights, case["camera"]),  # noqa: B023
                          args.repeats)
        timings[f"flame_batch{batch}_s_per_face"] = {"wall": wall / batch, "cpu": cpu / batch}
    # The service's fit (FlamePosedFitter's pieces: the dynamic contour's whole bank, 50 components) on the
    # full-size synthetic FLAME and the astronaut's FaceMesh points, with the fit's model as it is
    # (IdentityLandmarks) and as it was before it (the landmark layer over the whole bank at every step).
    astronaut = np.load(ROOT / "tests" / "data" / "visibility_astronaut_landmarks468.npy")
    target = PoseFitTarget(astronaut, None, 512, 512, focal_px_from_35mm(DEFAULT_FOCAL_35MM, 512, 512), "default")
    service = FlamePosedFitter(synthetic_flame_data("full", torch.Generator().manual_seed(0)))
    beta = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 300)) * 0.5)
    points, point_weights = service.targets(target)
    service_camera = intrinsics(torch.tensor([target.focal_px], dtype=torch.float64), 512, 512)

    def layer_model(expression: torch.Tensor, jaw: torch.Tensor) -> torch.Tensor:  # the model before
        return service.landmarks(beta, expression, jaw) * 1000.0

    def service_fit(model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> PosedFit:
        with torch.enable_grad():
            return fit_posed_face(model, service.num_expression, torch.from_numpy(points)[None],
                                  torch.from_numpy(point_weights)[None], service_camera, select=service.select)

    models = {"now": flame_landmark_model(service.landmarks, beta), "before": layer_model}
    fits = {name: service_fit(model) for name, model in models.items()}
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for _ in range(args.repeats):  # interleaved: load from other work hits both alike
        for name, model in models.items():
            runs[name].append(timed(lambda model=model: service_fit(model), 1))  # type: ignore[misc]
    for name, values in runs.items():
        timings[f"flame_service_{name}_s_per_face"] = {"wall": float(np.median([w for w, _ in values])),
                                                       "cpu": float(np.median([c for _, c in values]))}
    report["flame_service_fit"] = {
        "what": "FlamePosedFitter's fit, full-size synthetic FLAME, dynamic contour bank, 50 components, "
                "astronaut's 468 points, random identity",
        "reprojection_px": {name: float(fit.reprojection_error_px[0]) for name, fit in fits.items()},
        "translation_difference_mm": float((fits["now"].translation - fits["before"].translation).abs().max()),
    }
    # Open pack: the astronaut's FaceMesh points.
    canonical = load_canonical_face()
    neutral = metric_face(astronaut, canonical).vertices_mm
    fitter = OpenPosedFitter(canonical, camera_points)
    result = fitter(neutral, target)
    assert result is not None
    wall, cpu = timed(lambda: fitter(neutral, target), args.repeats)
    timings["open_s_per_face"] = {"wall": wall, "cpu": cpu}
    report["open_astronaut"] = {"reprojection_px": result.reprojection_error_px,
                                "distance_mm": float(result.translation[2])}
    report["timings"] = timings
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
