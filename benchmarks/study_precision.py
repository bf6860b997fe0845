"""What the numerics modes do to the flame pack's outputs, end to end through the local mesh.

The same photos go through three meshes (gateway + mica, ofer, fusion as processes, flame pack on the
synthetic official-format weights of ``facefuse assets synthesize --size full``), one per
``FACEFUSE_NUMERICS`` mode, with the default request (``fuse``, gaussian, N=10, seed 0, the posed face)
and the same seed. Compared per face, each mode against the one before it:

* ``fast-float32`` vs ``reproduce-official``: the optimised layers in float32 (float32 rounding only);
* ``fast`` vs ``fast-float32``: ArcFace and FaRL in bfloat16 on a CPU with AMX (float16 on CUDA), nothing
  else changed. On a CPU without AMX ``fast`` is ``fast-float32`` and the deviations are zero.

Reported: vertex distance in mm (max and RMS over vertices) of the fused mesh, the MICA branch's mesh
and the OFER branch's mesh (IdRank's pick), the largest |Δ| of the N sampled coefficients, whether
IdRank picked the same sample, the posed face's rotation (degrees) and translation (mm), and the
reprojection error. Faces: skimage's astronaut, the six faces of insightface's t1.jpg, insightface's Tom
Hanks crop on a grey canvas.

The weights are synthetic (random, in the official formats), so these are the deviations of random
networks of the official architectures, not of the trained ones; the trained networks' embeddings are
usually at least as stable under rounding as random ones, but that is not measured here.

    PYTHONPATH=src .venv/bin/python benchmarks/study_precision.py [--assets DIR] [--out benchmarks/results/precision]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODES = ("reproduce-official", "fast-float32", "fast")


def photos() -> dict[str, bytes]:
    """The package-shipped photos of ``study_open_real.py`` (the astronaut, t1's six faces, the Hanks canvas),
    PNG-encoded for the wire."""
    from PIL import Image
    from study_open_real import photos as package_photos

    encoded = {}
    for name, image in package_photos().items():
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        encoded[name] = buffer.getvalue()
    return encoded


def run_mode(mode: str, assets: Path, images: dict[str, bytes]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Every face of every photo through a mesh whose services run ``mode``; arrays per face key."""
    import grpc

    from facefuse import wire
    from facefuse.servers.local import LocalMesh
    from facefuse.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

    faces: dict[str, dict[str, Any]] = {}
    details: dict[str, str] = {}
    env = {"FACEFUSE_ASSETS": str(assets), "FACEFUSE_NUMERICS": mode}
    with LocalMesh(assets=assets, pack="flame", env=env, start_timeout_s=600) as mesh, \
            grpc.insecure_channel(mesh.gateway_address,
                                  options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        for backend in stub.Info(common_pb2.InfoRequest(), timeout=60).backends:
            if backend.service in ("mica", "ofer"):
                details[backend.service] = backend.details.get("image_networks", "?")
        chunks = [gateway_pb2.ImageChunk(image_id=name, data=data, last=True,
                                         options=gateway_pb2.ProcessOptions(method="fuse", num_samples=10, seed=0,
                                                                           save_branches=True))
                  for name, data in images.items()]
        for result in stub.Process(iter(chunks), timeout=1800):
            key = f"{result.image_id}#{result.face_index}"
            if result.status.code != 0:
                raise SystemExit(f"{mode}: {key} failed: {result.status.message}")
            rec = result.reconstruction
            branches = {b.name: b.reconstruction for b in result.branches}
            posed = rec.posed
            faces[key] = {
                "fused": wire.to_numpy(rec.mesh.vertices).astype(np.float64),
                "mica": wire.to_numpy(branches["mica"].mesh.vertices).astype(np.float64),
                "ofer": wire.to_numpy(branches["ofer"].mesh.vertices).astype(np.float64),
                "samples": wire.to_numpy(rec.samples).astype(np.float64),
                "scores": wire.to_numpy(rec.sample_scores).astype(np.float64),
                "rotation": wire.to_numpy(posed.global_pose).astype(np.float64),
                "translation": wire.to_numpy(posed.translation).astype(np.float64),
                "reprojection_px": float(posed.reprojection_error_px),
            }
    return faces, details


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.spatial.transform import Rotation

    relative = Rotation.from_rotvec(a).inv() * Rotation.from_rotvec(b)
    return float(np.degrees(relative.magnitude()))


def compare(new: dict[str, Any], old: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in ("fused", "mica", "ofer"):
        distance = np.linalg.norm(new[part] - old[part], axis=1)
        out[f"{part}_max_mm"] = float(distance.max())
        out[f"{part}_rms_mm"] = float(np.sqrt(np.mean(distance**2)))
    out["samples_max_abs"] = float(np.abs(new["samples"] - old["samples"]).max())
    out["scores_max_abs"] = float(np.abs(new["scores"] - old["scores"]).max())
    out["same_pick"] = float(np.argmax(new["scores"]) == np.argmax(old["scores"]))
    top_two = np.sort(old["scores"])[-2:]
    out["score_gap"] = float(top_two[1] - top_two[0])  # IdRank's best minus its second best, in the reference
    out["rotation_deg"] = _angle_deg(new["rotation"], old["rotation"])
    out["translation_mm"] = float(np.linalg.norm(new["translation"] - old["translation"]))
    out["reprojection_px_delta"] = abs(new["reprojection_px"] - old["reprojection_px"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", type=Path, default=Path("/tmp/facefuse-bench-assets-full"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "precision")
    args = parser.parse_args()
    from bench_flame_speed import ensure_assets

    from facefuse.packs.flame import cpu_has_bfloat16_matrix_units

    assets = ensure_assets(args.assets)
    images = photos()
    runs: dict[str, dict[str, dict[str, Any]]] = {}
    precision: dict[str, dict[str, str]] = {}
    for mode in MODES:
        print(f"{mode} ...", file=sys.stderr, flush=True)
        runs[mode], precision[mode] = run_mode(mode, assets, images)
    pairs = [("fast-float32", "reproduce-official"), ("fast", "fast-float32")]
    keys = sorted(runs[MODES[0]])
    table = {f"{a} vs {b}": {key: compare(runs[a][key], runs[b][key]) for key in keys} for a, b in pairs}
    meta = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or "cpu",
            "amx": cpu_has_bfloat16_matrix_units(), "image_networks": precision, "faces": keys,
            "command": "python benchmarks/study_precision.py " + " ".join(sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "comparisons": table}, indent=2) + "\n")
    columns = ["fused_max_mm", "fused_rms_mm", "mica_max_mm", "mica_rms_mm", "ofer_max_mm", "ofer_rms_mm",
               "samples_max_abs", "scores_max_abs", "same_pick", "score_gap", "rotation_deg", "translation_mm",
               "reprojection_px_delta"]
    lines = ["# Numerics modes: deviation of the flame pack's outputs, end to end", "",
             f"{meta['when']}; `{meta['command']}`; AMX: {meta['amx']}; image networks per mode: "
             f"{json.dumps(precision)}; {len(keys)} faces, synthetic full-size weights, default request "
             "(fuse, gaussian, N=10, seed 0, posed). Max over faces; same_pick: the fraction of faces where IdRank "
             "picked the same sample; score_gap: the smallest gap between IdRank's best and second-best score.", "",
             "| comparison | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for label, per_face in table.items():
        cells = []
        for column in columns:
            values = [row[column] for row in per_face.values()]
            value = float(np.mean(values)) if column == "same_pick" else min(values) if column == "score_gap" \
                else max(values)
            cells.append(f"{value:.3g}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "benchmarks"))
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    main()
