"""Open pack under a mouth occluder, on every real face that ships with the installed packages.

For each face (skimage's astronaut; the six faces of insightface's t1.jpg; insightface's 112 px Tom Hanks
crop, enlarged 3x onto a grey canvas so the detector finds it) and each occluder (flat grey, black, and
the colour of the skin above the mouth) over the lips' bounding box + 4 px: the mean distance (mm) of
the hidden vertices to the unoccluded reconstruction of the same photo, after a similarity fit on the
visible vertices, for

* ``deterministic``: metric FaceMesh on the occluded photo alone (the mica slot);
* ``gp``: region fusion with the GP completion given the visible vertices (the previous sampler);
* ``gp+imputation``: region fusion with the GP completion that also sees noise-imputed FaceMesh
  completions (the open pack's sampler, facefuse.face.imputation);
* ``canonical``: the mean face.

N = 10 samples, seed 0, 'region' fusion. Not a NoW number: the reference is FaceMesh's own unoccluded
reconstruction, not a scan. Writes benchmarks/results/open_occlusion.{md,json}.

    .venv/bin/python benchmarks/study_open_occlusion.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import numpy as np
import skimage.data

from facefuse.assets.store import ModelStore
from facefuse.face.frontend import FaceFrontEnd
from facefuse.fusion.strategies import FusionInputs, fuse
from facefuse.fusion.visibility import Visibility
from facefuse.geometry import umeyama
from facefuse.packs.open import (
    load_open_generative_backend,
    load_open_shape_backend,
    open_shape_space,
    vertex_visibility_from_mask,
)

OCCLUDERS = ("grey", "black", "skin")
METHODS = ("deterministic", "gp", "gp+imputation", "canonical")
MARGIN_PX = 4


def photos() -> dict[str, np.ndarray]:
    import insightface
    from PIL import Image

    folder = Path(insightface.__file__).parent / "data" / "images"
    hanks = np.asarray(Image.open(folder / "Tom_Hanks_54745.png").convert("RGB").resize((336, 336), Image.BICUBIC))
    canvas = np.full((536, 536, 3), 128, np.uint8)
    canvas[100:436, 100:436] = hanks
    return {"astronaut": skimage.data.astronaut(), "t1": np.asarray(Image.open(folder / "t1.jpg").convert("RGB")),
            "hanks": canvas}


def occlude(image: np.ndarray, lips_px: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    x0, y0 = (lips_px.min(0) - MARGIN_PX).astype(int)
    x1, y1 = (lips_px.max(0) + MARGIN_PX).astype(int)
    colour = {"grey": (90, 90, 100), "black": (0, 0, 0)}.get(kind)
    if colour is None:
        colour = image[max(y0 - 30, 0):max(y0 - 10, 1), x0:x1].reshape(-1, 3).mean(0).astype(np.uint8)
    occluded = image.copy()
    occluded[y0:y1, x0:x1] = colour
    mask = np.zeros(image.shape[:2], bool)
    mask[y0:y1, x0:x1] = True
    return occluded, mask


def hidden_error(vertices: np.ndarray, truth: np.ndarray, hidden: np.ndarray) -> float:
    aligned = umeyama(vertices, truth, (~hidden).astype(float)).apply(vertices)
    return float(np.linalg.norm(aligned[hidden] - truth[hidden], axis=1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    store = ModelStore()
    front_end = FaceFrontEnd.from_assets(None, store)
    shape_backend = load_open_shape_backend("cpu", store)
    samplers = {"gp": load_open_generative_backend("cpu", store, imputation=False),
                "gp+imputation": load_open_generative_backend("cpu", store)}
    space = open_shape_space(store)

    def faces_of(image):
        out = []
        for det in front_end.detect(image):
            det.iris = front_end.estimate_iris(image, det.landmarks).as_detection_iris()
            out.append(front_end.align(image, det))
        return out

    rows, skipped = [], []
    for photo, image in photos().items():
        for k, reference in enumerate(faces_of(image)):
            name = f"{photo}{k}" if photo == "t1" else photo
            (clean,) = shape_backend.predict([reference])
            truth = clean.vertices_mm.astype(np.float64)
            centre = reference.detection.kps5[2]
            for kind in OCCLUDERS:
                occluded, mask = occlude(image, reference.detection.landmarks[space.regions["lips"], :2], kind)
                found = [f for f in faces_of(occluded)
                         if np.linalg.norm(f.detection.kps5[2] - centre) < 0.3 * reference.detection.width]
                if not found:
                    skipped.append(f"{name}/{kind}: the face is not detected once occluded")
                    continue
                (face,) = found
                visibility = vertex_visibility_from_mask(mask, face.detection.landmarks)
                hidden = visibility < 0.5
                if hidden.sum() < 20:
                    skipped.append(f"{name}/{kind}: only {hidden.sum()} landmarks under the patch "
                                   "(FaceMesh moved the mouth)")
                    continue
                (deterministic,) = shape_backend.predict([face])
                row = {"face": name, "occluder": kind, "hidden": int(hidden.sum()),
                       "face_px": float(reference.detection.width),
                       "deterministic": hidden_error(deterministic.vertices_mm, truth, hidden),
                       "canonical": hidden_error(space.template_mm, truth, hidden)}
                for method, sampler in samplers.items():
                    samples = sampler.sample(face, 10, seed=0, start_shape=deterministic.shape, visibility=visibility)
                    scores = sampler.rank(face, samples, visibility=visibility)
                    fused = fuse(
                        "region", FusionInputs(deterministic.shape, samples, scores, Visibility({}, visibility)), space
                    )
                    row[method] = hidden_error(fused.vertices_mm, truth, hidden)
                rows.append(row)
                print(f"{name:10s} {kind:6s} " + "  ".join(f"{m} {row[m]:5.2f}" for m in METHODS), flush=True)

    table = np.array([[row[m] for m in METHODS] for row in rows])
    det = table[:, 0]
    summary = {m: {"mean": float(table[:, i].mean()), "median": float(np.median(table[:, i])),
                   "better_than_deterministic": int((table[:, i] < det).sum())} for i, m in enumerate(METHODS)}
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    lines = ["# Open pack, mouth occluded: mean distance (mm) of hidden vertices to the unoccluded reconstruction", "",
             f"{len(rows)} cases, N = 10 samples, seed 0, 'region' fusion; {machine}. Lower is better.", "",
             "| face | occluder | hidden | " + " | ".join(METHODS) + " |", "|---|---|---|" + "---|" * len(METHODS)]
    for row in rows:
        lines.append(
            f"| {row['face']} | {row['occluder']} | {row['hidden']} | "
            + " | ".join(f"{row[m]:.2f}" for m in METHODS)
            + " |"
        )
    for stat in ("mean", "median"):
        lines.append(f"| **{stat}** | | | " + " | ".join(f"**{summary[m][stat]:.2f}**" for m in METHODS) + " |")
    lines.append("| **better than deterministic** | | | " + " | ".join(
        f"{summary[m]['better_than_deterministic']}/{len(rows)}" for m in METHODS) + " |")
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped) + "."]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_occlusion.md").write_text("\n".join(lines) + "\n")
    (out / "open_occlusion.json").write_text(json.dumps({"machine": machine, "rows": rows, "summary": summary,
                                                         "skipped": skipped}, indent=1) + "\n")
    print("\n".join(lines[-4:]))
    print("wrote", out / "open_occlusion.md")


if __name__ == "__main__":
    main()
