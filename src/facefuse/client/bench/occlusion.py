"""The occlusion benchmark: synthetic occluders of controlled coverage, per region errors."""

from __future__ import annotations

import io
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facefuse import wire
from facefuse.client.bench.connection import GatewayJob, MeshConnection
from facefuse.client.bench.entries import (
    CONTROL_LABEL,
    COVERAGE_KINDS,
    LANDMARK_REGION_RADIUS,
    LANDMARK_REGIONS,
    OCCLUDER_ALIASES,
    REGION_COLUMNS,
    BenchEntry,
    SamplingSettings,
    bench_entries,
)
from facefuse.client.bench.now import read_now_box, subset_dataset
from facefuse.client.bench.predictions import BenchCache, Prediction
from facefuse.client.bench.runner import (
    PredictionSet,
    compute_predictions,
    progress_bar,
    result_message,
    result_ok,
)
from facefuse.client.bench.tables import (
    check_settings,
    format_table,
    write_prediction_files,
    write_table_files,
)
from facefuse.errors import FacefuseError, InvalidInputError


@dataclass(frozen=True)
class OcclusionBenchConfig:
    images: tuple[str, ...]
    out: Path
    methods: tuple[str, ...] = ("mica", "ofer", "fuse")
    strategies: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ("mask", "eye_band", "hand", "rectangle")
    coverages: tuple[float, ...] = (0.1, 0.2, 0.3)
    seed: int = 0
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    now_dataset: Path | None = None
    split: str = "val"
    oracle_mask: bool = False
    assets: str | None = None
    workers: int = 1
    progress: bool = True


@dataclass(frozen=True)
class VariantSpec:
    label: str  # control | mask | eye_band | hand-0.20 | rectangle-0.10
    kind: str  # none for the control
    coverage: float | None  # requested (hand, rectangle)
    seed: int


def occluder_kinds(names: Sequence[str]) -> list[str]:
    kinds = []
    for name in names:
        if name not in OCCLUDER_ALIASES:
            raise InvalidInputError(f"--kinds: unknown occluder {name!r}; expected some of mask, band, hand, rect")
        kinds.append(OCCLUDER_ALIASES[name])
    return list(dict.fromkeys(kinds))


def variant_specs(kinds: Sequence[str], coverages: Sequence[float], seed: int) -> list[VariantSpec]:
    """The control plus one variant per landmark-placed kind and per (sized kind, coverage)."""
    for c in coverages:
        if not 0.0 < c <= 1.0:
            raise InvalidInputError(f"--coverage {c}: expected fractions of the face box in (0, 1]")
    specs = [VariantSpec(CONTROL_LABEL, "none", None, 0)]
    for kind in kinds:
        levels: list[float | None] = list(coverages) if kind in COVERAGE_KINDS else [None]
        for level in levels:
            label = kind if level is None else f"{kind}-{level:.2f}"
            # A stable seed per (run seed, variant): adding kinds or levels leaves the others unchanged.
            specs.append(VariantSpec(label, kind, level, (seed * 1_000_003 + zlib.crc32(label.encode())) % (2**31)))
    return specs


def _png_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="PNG")
    return buffer.getvalue()


def region_vertex_sets(topology: str, num_vertices: int, *, assets: str | None = None,
                       reference: Prediction | None = None) -> tuple[dict[str, np.ndarray], str]:
    """Vertex sets per face region for a topology, and where they come from.

    ``mediapipe468``: the open fusion space's regions (the visibility polygons on the canonical face).
    ``flame2020``: FLAME_masks.pkl from the assets folder when there; else landmark-defined sets
    (eyes, nose, mouth: vertices near the iBUG-68 groups of ``reference``); else overall only.
    """
    all_vertices = np.arange(num_vertices)
    if topology == "mediapipe468":
        from facefuse.assets.canonical_face import load_canonical_face
        from facefuse.packs.open import mediapipe_regions

        regions = mediapipe_regions(load_canonical_face())
        return {
            k: v for k, v in regions.items() if k in REGION_COLUMNS
        }, "fusion regions of the open pack (mediapipe468)"
    if topology == "flame2020":
        from facefuse.assets.registry import asset_path, assets_dir

        directory = assets_dir(assets)
        if directory is not None and asset_path(directory, "flame_masks").is_file():
            from facefuse.assets.flame_file import load_flame_masks

            masks = load_flame_masks(asset_path(directory, "flame_masks"), num_vertices=num_vertices)
            return {
                k: np.asarray(v) for k, v in masks.items() if k in REGION_COLUMNS
            }, "FLAME_masks.pkl (fusion regions)"
        if reference is not None and reference.landmarks68 is not None:
            lmk = reference.landmarks68
            radius = LANDMARK_REGION_RADIUS * float(np.linalg.norm(lmk[36] - lmk[45]))
            sets = {}
            for name, indices in LANDMARK_REGIONS.items():
                d = np.linalg.norm(reference.vertices[:, None, :] - lmk[list(indices)][None], axis=-1).min(axis=1)
                sets[name] = np.flatnonzero(d <= radius)
            return sets, (f"landmark-defined: vertices within {LANDMARK_REGION_RADIUS} x outer-eye distance of the "
                          "iBUG-68 eye/nose/mouth landmarks (no FLAME_masks.pkl)")
    return {"face": all_vertices}, f"overall only (no regions known for topology {topology!r})"


def vertex_distances(prediction: Prediction, reference: Prediction) -> np.ndarray:
    """(V,) mm: per-vertex distance between two predictions of one topology, in the model's own frame."""
    if prediction.vertices.shape != reference.vertices.shape:
        raise InvalidInputError(f"meshes differ: {prediction.vertices.shape} vs {reference.vertices.shape} vertices "
                                f"({prediction.topology} vs {reference.topology})")
    return np.linalg.norm(prediction.vertices.astype(np.float64) - reference.vertices.astype(np.float64), axis=1)


def rigid_distance_and_size(prediction: Prediction, reference: Prediction) -> tuple[float, float]:
    """Mean vertex distance (mm) left after the best rigid alignment onto the reference (what is not
    pose), and the prediction's size relative to the reference (1 / the best similarity scale)."""
    from facefuse.eval.procrustes import similarity_procrustes

    source, target = prediction.vertices.astype(np.float64), reference.vertices.astype(np.float64)
    rigid = similarity_procrustes(source, target, scale=1.0, reflection=False).transform
    similar = similarity_procrustes(source, target, reflection=False).transform
    return float(np.linalg.norm(rigid.apply(source) - target, axis=1).mean()), float(1.0 / similar.scale)


def _now_matches(now_dataset: Path | None, split: str, paths: Sequence[Path]) -> tuple[Any, dict[str, Any]]:
    """NoW entries of the images whose path ends with <subject>/<challenge>/<image>."""
    if now_dataset is None:
        return None, {}
    from facefuse.eval.now import NowLayout

    layout = NowLayout.discover(now_dataset, split)
    by_tail = {item.key: item for item in layout.images()}
    matches = {}
    for path in paths:
        tail = "/".join(Path(path).resolve().parts[-3:])
        if tail in by_tail:
            matches[str(path)] = by_tail[tail]
    return layout, matches


def run_occlusion_bench(config: OcclusionBenchConfig, conn: MeshConnection) -> dict[str, Any]:
    """Occluded variants of each photo through every entry; how far each shape moves from its own clean one."""
    from facefuse.client.inputs import collect_inputs
    from facefuse.eval.occlusion import occlude
    from facefuse.io.images import decode_image

    entries = bench_entries(config.methods, config.strategies, conn.strategies, conn.default_strategy)
    specs = variant_specs(occluder_kinds(config.kinds), config.coverages, config.seed)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    check_settings(out, "bench_occlusion_settings.json",
                    {**config.sampling.as_dict(), "mesh": conn.fingerprint, "seed": config.seed,
                     "oracle_mask": config.oracle_mask})
    items = [item for item in collect_inputs(list(config.images)) if item.frame < 0]
    if not items:
        raise InvalidInputError(f"no image files in {', '.join(config.images)}")
    layout, now_items = _now_matches(config.now_dataset, config.split, [i.path for i in items])
    cache = BenchCache(out / "cache", conn.fingerprint)
    notes: list[str] = []

    # 1. face box + 5 points per photo (a detect pass; NoW photos use the dataset's box)
    originals: dict[str, bytes] = {}
    given: dict[str, tuple[float, float, float, float] | None] = {}
    for item in items:
        originals[item.image_id] = item.path.read_bytes()
        now_item = now_items.get(str(item.path))
        now_box = None
        if now_item is not None and layout.detected_faces is not None:
            box_path = layout.detected_faces / now_item.subject / now_item.challenge / f"{now_item.stem}.npy"
            now_box = read_now_box(box_path) if box_path.is_file() else None
        given[item.image_id] = now_box
    faces: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    detect_keys = {i: cache.key(d, box=given[i], mask=None, settings={"detect": True}) for i, d in originals.items()}
    to_detect = []
    for image_id, key in detect_keys.items():
        cached = cache.load("detect", key)
        if cached is not None:
            faces[image_id] = (cached["box"], cached["kps5"])
        else:
            to_detect.append(GatewayJob(image_id, originals[image_id], given[image_id]))
    if to_detect:
        bar = progress_bar(len(to_detect), "detect", config.progress)
        for job, result in conn.process(to_detect, "detect", {}):
            if result_ok(result):
                box = np.array(
                    [result.face.box.x1, result.face.box.y1, result.face.box.x2, result.face.box.y2], np.float32
                )
                kps5 = np.asarray(wire.to_numpy(result.face.kps5), np.float32)
                cache.store("detect", detect_keys[job.job_id], {"box": box, "kps5": kps5})
                faces[job.job_id] = (box, kps5)
            else:
                notes.append(f"{job.job_id}: no face ({result_message(result)}); left out")
            bar.update(1)
        bar.close()

    # 2. variants (written under OUT/variants for inspection) and their gateway jobs
    jobs: list[GatewayJob] = []
    variant_rows: dict[str, tuple[str, VariantSpec, float]] = {}  # job id -> (image id, spec, measured coverage)
    reference_ids: dict[str, str] = {}
    for item in items:
        if item.image_id not in faces:
            continue
        box, kps5 = faces[item.image_id]
        box_t = (float(box[0]), float(box[1]), float(box[2]), float(box[3]))
        reference_ids[item.image_id] = f"{item.image_id}|reference"
        jobs.append(GatewayJob(reference_ids[item.image_id], originals[item.image_id], box_t))
        rgb = decode_image(originals[item.image_id], source=item.image_id)
        for spec in specs:
            job_id = f"{item.image_id}|{spec.label}"
            try:
                if spec.kind == "none":
                    image, mask, coverage = rgb, None, 0.0
                else:
                    variant = occlude(rgb, box_t, kps5, spec.kind, coverage=spec.coverage, seed=spec.seed)
                    image, mask, coverage = variant.image, variant.mask, variant.coverage
            except FacefuseError as exc:
                notes.append(f"{item.image_id} {spec.label}: no variant ({exc})")
                continue
            png = _png_bytes(image)
            folder = out / "variants" / item.key
            if not (folder / f"{spec.label}.png").is_file():
                from facefuse.io.atomic import write_bytes_atomic

                write_bytes_atomic(folder / f"{spec.label}.png", png)
            wire_mask = (mask.astype(np.uint8) * 255) if (config.oracle_mask and mask is not None) else None
            jobs.append(GatewayJob(job_id, png, box_t, wire_mask))
            variant_rows[job_id] = (item.image_id, spec, coverage)

    preds = compute_predictions(conn, cache, jobs, entries, config.sampling, progress=config.progress)

    # 3. distances to each entry's own clean result, overall and per region
    region_sets: dict[tuple[str, int], tuple[dict[str, np.ndarray], str]] = {}
    per_image: list[dict[str, Any]] = []
    for entry in entries:
        got = preds.predictions.get(entry.name, {})
        for job_id, (image_id, spec, coverage) in variant_rows.items():
            reference = got.get(reference_ids[image_id])
            prediction = got.get(job_id)
            record: dict[str, Any] = {"name": entry.name, "image": image_id, "variant": spec.label, "kind": spec.kind,
                                      "coverage": spec.coverage, "measured_coverage": round(coverage, 4)}
            if reference is None or prediction is None:
                record["error"] = preds.failures.get(entry.name, {}).get(job_id) or \
                    preds.failures.get(entry.name, {}).get(reference_ids[image_id], "no prediction")
                per_image.append(record)
                continue
            topo_key = (reference.topology, len(reference.vertices))
            if topo_key not in region_sets:
                region_sets[topo_key] = region_vertex_sets(reference.topology, len(reference.vertices),
                                                           assets=config.assets, reference=reference)
            regions, _ = region_sets[topo_key]
            d = vertex_distances(prediction, reference)
            record["mean_mm"] = float(d.mean())
            record["max_mm"] = float(d.max())
            record["rigid_mm"], record["size_ratio"] = rigid_distance_and_size(prediction, reference)
            record["regions_mm"] = {name: float(d[idx].mean()) for name, idx in regions.items() if len(idx)}
            per_image.append(record)
    found = {r for sets, _ in region_sets.values() for r in sets}
    region_names = [r for r in REGION_COLUMNS if r in found] + sorted(found - set(REGION_COLUMNS))
    rows: list[list[Any]] = []
    for entry in entries:
        for spec in specs:
            every = [r for r in per_image if r["name"] == entry.name and r["variant"] == spec.label]
            records = [r for r in every if "mean_mm" in r]
            measured = [r["measured_coverage"] for r in every]

            def mean_of(name: str, records: list[dict[str, Any]] = records) -> float | None:
                return float(np.mean([r[name] for r in records])) if records else None

            row: list[Any] = [entry.name, spec.label, spec.coverage,
                              float(np.mean(measured)) if measured else None, f"{len(records)}/{len(every)}",
                              mean_of("mean_mm"), mean_of("rigid_mm"), mean_of("size_ratio")]
            for region in region_names:
                values = [r["regions_mm"][region] for r in records if region in r["regions_mm"]]
                row.append(float(np.mean(values)) if values else None)
            rows.append(row)
    headers = ["name", "variant", "coverage", "measured_coverage", "images", "mean_mm", "rigid_mm", "size_ratio",
               *[f"{r}_mm" for r in region_names]]

    # 4. NoW error per level, where the photos are NoW images with ground truth
    now_rows = _occlusion_now(config, conn, layout, now_items, items, entries, specs, preds, reference_ids, out) \
        if now_items else []
    summary: dict[str, Any] = {
        "benchmark": "occlusion", "distance": "mean_mm and the region columns: mean per-vertex Euclidean distance (mm) "
        "to the same method's prediction for the clean photo, both in the model's canonical frame (no alignment); "
        "rigid_mm: the same after the best rigid alignment; size_ratio: the occluded prediction's size relative to "
        "the clean one (similarity scale)",
        "regions": {f"{t[0]}": src for t, (_, src) in region_sets.items()},
        "settings": {**config.sampling.as_dict(), "occluder_seed": config.seed, "oracle_mask": config.oracle_mask},
        "mesh": conn.fingerprint, "counters": conn.counters.as_dict(), "notes": notes,
        "columns": headers, "rows": rows, "per_image": per_image,
        "now": {"columns": ["name", "variant", "images", "median_mm", "mean_mm", "std_mm"], "rows": now_rows}
        if now_rows else None,
    }
    summary["files"] = write_table_files(out, "bench_occlusion", headers, rows, summary)
    summary["table"] = format_table(headers, rows)
    if now_rows:
        summary["now_table"] = format_table(summary["now"]["columns"], now_rows)
    return summary


def _occlusion_now(config: OcclusionBenchConfig, conn: MeshConnection, layout: Any, now_items: dict[str, Any],
                   items: Sequence[Any], entries: Sequence[BenchEntry], specs: Sequence[VariantSpec],
                   preds: PredictionSet, reference_ids: dict[str, str], out: Path) -> list[list[Any]]:
    """NoW errors of each entry at each occlusion level, on the matched NoW photos only."""
    from facefuse.eval.now import NowEvalConfig, run_now_evaluation

    matched = [(item, now_items[str(item.path)]) for item in items if str(item.path) in now_items]
    root = subset_dataset(out / "now" / "dataset", layout, [n for _, n in matched], config.split)
    levels = [("clean", None)] + [(s.label, s) for s in specs if s.kind != "none"]
    rows = []
    for entry in entries:
        got = preds.predictions.get(entry.name, {})
        for label, spec in levels:
            folder = out / "now" / "predictions" / label / entry.name
            written = 0
            for item, now_item in matched:
                job_id = reference_ids.get(item.image_id) if spec is None else f"{item.image_id}|{spec.label}"
                prediction = got.get(job_id) if job_id else None
                if prediction is not None:
                    write_prediction_files(folder / now_item.subject / now_item.challenge, now_item.stem, prediction)
                    written += 1
            if not written:
                rows.append([entry.name, label, f"0/{len(matched)}", None, None, None])
                continue
            summary = run_now_evaluation(NowEvalConfig(dataset=root, predictions=folder,
                                                       output=out / "now" / "eval" / label / entry.name,
                                                       split=config.split, workers=config.workers, progress=False))
            o = summary["overall"]
            rows.append([entry.name, label, f"{summary['n_images_evaluated']}/{summary['n_images_listed']}",
                         o["median_mm"], o["mean_mm"], o["std_mm"]])
    return rows
