"""``make demo``: start the mesh locally, stream sample photos from installed packages, write results.

The photos come from packages the project already installs (scikit-image's astronaut, insightface's
group photo t1.jpg) plus a copy of the astronaut with a synthetic occluder over the mouth; nothing is
downloaded but the open models the model store verifies.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from facefuse.client.api import GatewayClient
from facefuse.client.inputs import collect_inputs
from facefuse.client.run import run_stream
from facefuse.io.atomic import write_bytes_atomic
from facefuse.servers.local import LocalMesh

if TYPE_CHECKING:
    from facefuse.face.frontend import FaceFrontEnd


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def occlude_mouth(image: np.ndarray, kps5: np.ndarray) -> np.ndarray:
    """A flat grey patch over the mouth, sized from the eye and mouth key points."""
    out = image.copy()
    eyes = kps5[:2].mean(axis=0)
    mouth = kps5[3:5].mean(axis=0)
    half_w = 0.9 * np.linalg.norm(kps5[4] - kps5[3])
    half_h = 0.45 * np.linalg.norm(mouth - eyes)
    x1, x2 = int(max(mouth[0] - half_w, 0)), int(min(mouth[0] + half_w, image.shape[1]))
    y1, y2 = int(max(mouth[1] - half_h, 0)), int(min(mouth[1] + half_h, image.shape[0]))
    out[y1:y2, x1:x2] = (128, 128, 128)
    return out


def sample_photos(folder: Path, front_end: FaceFrontEnd | None = None) -> list[Path]:
    import insightface
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    astronaut = skimage.data.astronaut()
    paths = [
        write_bytes_atomic(folder / "astronaut.png", _png(astronaut)),
        write_bytes_atomic(
            folder / "t1.jpg", (Path(insightface.__file__).parent / "data" / "images" / "t1.jpg").read_bytes()
        ),
    ]
    if front_end is not None:
        detections = front_end.detect(astronaut)
        if detections:
            paths.append(
                write_bytes_atomic(
                    folder / "astronaut_mouth_occluded.png", _png(occlude_mouth(astronaut, detections[0].kps5))
                )
            )
    return paths


def run_demo(out: Path, assets: str | None = None, det_thresh: float | None = None) -> int:
    from facefuse.assets.store import ModelStore
    from facefuse.face.frontend import FaceFrontEnd

    out = Path(out)
    print("facefuse demo: fetching and verifying the open models (first run only)...", flush=True)
    front_end = FaceFrontEnd.from_assets(None, ModelStore())
    photos = sample_photos(out / "inputs", front_end)
    print(f"starting the mesh as local processes (assets: {assets or 'none, open pack'})...", flush=True)
    with LocalMesh(assets=assets) as mesh:
        print(f"  gateway at {mesh.gateway_address}", flush=True)
        items = collect_inputs([str(p) for p in photos])
        with GatewayClient(mesh.gateway_address, timeout_s=900) as client:
            info = client.info()
            ready = {b.service: b.ready for b in info.backends}
            common = {"det_thresh": det_thresh}
            report = run_stream(items, out / "detect", client, "detect", options={"return_crops": True, **common})
            failed = report.failed
            print(f"detect: {report.faces} face(s) in {report.seconds:.1f} s -> {out / 'detect'}")
            if all(ready.get(name) for name in ("mica", "ofer", "fusion")):
                rec = run_stream(
                    items, out / "reconstruct", client, "fuse",
                    options={"return_crops": True, "save_branches": True, **common},
                )
                print(f"reconstruct: {rec.faces} face(s) in {rec.seconds:.1f} s -> {out / 'reconstruct'}")
                failed += rec.failed
            elif ready.get("mica"):
                rec = run_stream(items, out / "reconstruct", client, "mica", options={"return_crops": True, **common})
                print(f"reconstruct (mica only): {rec.faces} face(s) in {rec.seconds:.1f} s -> {out / 'reconstruct'}")
                failed += rec.failed
            else:
                for backend in info.backends:
                    print(f"  {backend.service}: {'ready' if backend.ready else 'not ready'} ({backend.message})")
                print(
                    "3D reconstruction needs model backends: put the official files in a folder and pass --assets DIR "
                    "(see `facefuse assets check`); for the open pack the backends above say why they are not ready."
                )
    from facefuse.client.report import build_report

    for run in ("reconstruct", "detect"):
        if (out / run / "results.jsonl").is_file():
            print(f"report: {build_report(out / run)}")
    print(f"done: open {out}/reconstruct/index.html (the run, a 3D viewer per face; or `facefuse view "
          f"{out}/reconstruct`), or look at {out}/reconstruct/*/face_*/ (mesh.glb, mesh.obj, preview.png, "
          f"uncertainty.png, visibility_overlay.png) and {out}/*/results.jsonl")
    if failed:
        print("some images failed; see results.jsonl", file=sys.stderr)
        return 1
    return 0
