"""Time the open pack per face on this CPU, in process: front end, deterministic, GP sampling, rank, fuse.

Per face = BlazeFace + FaceMesh (detect) + iris + alignment crops, the metric FaceMesh mesh, N = 10
samples (GP conditioned on the seen vertices and on one noise-imputed FaceMesh completion each; mouth
hidden), ranking of the 10 (8 more imputed FaceMesh runs), and 'region' fusion (the strategy meant for
the open pack); 'gaussian' fusion is timed separately (it eigen-decomposes a 1404 x 1404 covariance).
The GP-only sampler and ranker (no imputation, the previous default) are timed alongside. One-time
costs (model load, the GP's eigen-decomposition, the open shape space) are reported apart. Median wall
time over repeats, process CPU time alongside.

    .venv/bin/python benchmarks/bench_open_pack.py [--repeats 10] [--gallery docs/gallery]

``--gallery DIR`` also renders the previews of docs/open-pack.md (astronaut, and the astronaut with a
flat patch over the mouth: deterministic alone, and fused with the GP completion) into DIR.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import skimage.data

from facefuse.assets.store import ModelStore
from facefuse.face.frontend import FaceFrontEnd
from facefuse.fusion.strategies import FusionInputs, fuse
from facefuse.fusion.visibility import Visibility
from facefuse.packs.open import load_open_generative_backend, load_open_shape_backend, open_shape_space

from timing import timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--gallery", type=str, default=None, help="folder to render the preview PNGs into")
    args = parser.parse_args()

    t0 = time.perf_counter()
    store = ModelStore()
    front_end = FaceFrontEnd.from_assets(None, store)
    shape_backend = load_open_shape_backend("cpu", store)
    t1 = time.perf_counter()
    generative = load_open_generative_backend("cpu", store)
    gp_only = load_open_generative_backend("cpu", store, imputation=False)
    t2 = time.perf_counter()
    space = open_shape_space(store)
    t3 = time.perf_counter()
    image = skimage.data.astronaut()

    def front() -> object:
        return aligned_face(front_end, image)

    face = front()
    (result,) = shape_backend.predict([face])
    v = result.vertices_mm
    visibility = np.where(v[:, 1] < v[2, 1] - 10.0, 0.0, 1.0)  # below the nose: hidden
    samples = generative.sample(face, args.samples, seed=0, start_shape=result.shape, visibility=visibility)
    scores = generative.rank(face, samples, visibility=visibility)
    inputs = FusionInputs(result.shape, samples, scores, Visibility({}, visibility))

    def whole() -> object:
        f = front()
        (r,) = shape_backend.predict([f])
        s = generative.sample(f, args.samples, seed=0, start_shape=r.shape, visibility=visibility)
        sc = generative.rank(f, s, visibility=visibility)
        return fuse("region", FusionInputs(r.shape, s, sc, Visibility({}, visibility)), space)

    rows = [
        ("front end (detect + iris + align)", front),
        ("deterministic (metric mesh)", lambda: shape_backend.predict([face])),
        (
            f"sampling N={args.samples} (GP + imputation)",
            lambda: generative.sample(face, args.samples, seed=0, start_shape=result.shape, visibility=visibility),
        ),
        (f"rank N={args.samples} (GP + imputation)", lambda: generative.rank(face, samples, visibility=visibility)),
        (
            f"sampling N={args.samples} (GP only)",
            lambda: gp_only.sample(face, args.samples, seed=0, start_shape=result.shape, visibility=visibility),
        ),
        (f"rank N={args.samples} (GP only)", lambda: gp_only.rank(face, samples, visibility=visibility)),
        ("fuse 'region'", lambda: fuse("region", inputs, space)),
        ("fuse 'gaussian'", lambda: fuse("gaussian", inputs, space)),
        ("per face, all of the above with 'region'", whole),
    ]
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, numpy {np.__version__}")
    print(
        f"one-time: front end + deterministic {t1 - t0:.2f} s, GP build {t2 - t1:.2f} s (rank {generative.gpmm.rank}), "
        f"open space {t3 - t2:.2f} s"
    )
    for name, fn in rows:
        wall, cpu = timed(fn, args.repeats)
        print(f"{name:46s} {wall * 1000:8.1f} ms wall  {cpu * 1000:8.1f} ms CPU")
    if args.gallery:
        render_gallery(args.gallery, front_end, shape_backend, generative, space)


def aligned_face(front_end: FaceFrontEnd, image: np.ndarray) -> object:
    """The one face of ``image``, with its iris (the open pack's metric scale), aligned."""
    (det,) = front_end.detect(image)
    det.iris = front_end.estimate_iris(image, det.landmarks).as_detection_iris()
    return front_end.align(image, det)


def render_gallery(folder: str, front_end, shape_backend, generative, space) -> None:
    from pathlib import Path

    from PIL import Image

    from facefuse.io.atomic import write_bytes_atomic
    from facefuse.io.meshes import heat_colors
    from facefuse.packs.open import vertex_visibility_from_mask
    from facefuse.render import render_preview

    out = Path(folder)
    image = skimage.data.astronaut()

    def photo_colours(picture, landmarks):
        cols = np.clip(np.rint(landmarks[:, 0]).astype(int), 0, picture.shape[1] - 1)
        rows = np.clip(np.rint(landmarks[:, 1]).astype(int), 0, picture.shape[0] - 1)
        return picture[rows, cols]

    def save(name, pixels):
        import io

        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", optimize=True)
        write_bytes_atomic(out / name, buffer.getvalue())
        print("wrote", out / name)

    face = aligned_face(front_end, image)
    (reference,) = shape_backend.predict([face])
    landmarks = face.detection.landmarks
    save("astronaut_open_shaded.png", render_preview(reference.vertices_mm, reference.faces, size=256))
    save("astronaut_open_photo_colours.png",
         render_preview(reference.vertices_mm, reference.faces, photo_colours(image, landmarks), size=256))
    pts = landmarks[space.regions["lips"], :2]
    x0, y0 = (pts.min(0) - 4).astype(int)
    x1, y1 = (pts.max(0) + 4).astype(int)
    occluded = image.copy()
    occluded[y0:y1, x0:x1] = (90, 90, 100)
    mask = np.zeros(image.shape[:2], bool)
    mask[y0:y1, x0:x1] = True
    box = face.detection.box.astype(int)
    save("astronaut_occluded_input.png", occluded[max(box[1] - 20, 0):box[3] + 20, max(box[0] - 20, 0):box[2] + 20])
    occ_face = aligned_face(front_end, occluded)
    visibility = vertex_visibility_from_mask(mask, occ_face.detection.landmarks)
    (deterministic,) = shape_backend.predict([occ_face])
    samples = generative.sample(occ_face, 10, seed=0, start_shape=deterministic.shape, visibility=visibility)
    scores = generative.rank(occ_face, samples, visibility=visibility)
    fused = fuse("region", FusionInputs(deterministic.shape, samples, scores, Visibility({}, visibility)), space)
    save(
        "astronaut_occluded_deterministic.png", render_preview(deterministic.vertices_mm, deterministic.faces, size=256)
    )
    save("astronaut_occluded_fused.png", render_preview(fused.vertices_mm, deterministic.faces, size=256))
    save(
        "astronaut_occluded_fused_spread.png",
        render_preview(
            fused.vertices_mm, deterministic.faces, heat_colors(fused.vertex_spread_mm, vmax=8.0)[:, :3], size=256
        ),
    )


if __name__ == "__main__":
    main()
