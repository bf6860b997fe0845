"""The NoW benchmark: every entry through the NoW protocol of facefuse.eval.now."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facefuse.client.bench.connection import GatewayJob, MeshConnection
from facefuse.client.bench.entries import SamplingSettings, bench_entries
from facefuse.client.bench.predictions import BenchCache
from facefuse.client.bench.runner import compute_predictions
from facefuse.client.bench.tables import (
    check_settings,
    format_table,
    write_prediction_files,
    write_table_files,
)
from facefuse.errors import AssetError, InvalidInputError
from facefuse.io.atomic import (
    write_text_atomic,
)


@dataclass(frozen=True)
class NowBenchConfig:
    dataset: Path
    out: Path
    methods: tuple[str, ...] = ("mica", "ofer", "fuse")
    strategies: tuple[str, ...] = ()
    split: str = "val"
    challenge: str = "all"  # all | neutral | expression | occlusion | selfie
    per_challenge: bool = False
    metrical: bool = False
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    workers: int = 1
    limit: int | None = None
    progress: bool = True


def read_now_box(path: Path) -> tuple[float, float, float, float]:
    """A NoW ``detected_face`` file: a pickled dict with left/top/right/bottom (read without running code)."""
    from facefuse.assets.flame_file import restricted_unpickle

    what = "a NoW face box (.npy holding a dict with left, top, right, bottom)"
    try:
        array = np.load(path, allow_pickle=False)
        values = np.asarray(array, np.float64).reshape(-1)
    except ValueError:
        obj, _ = restricted_unpickle(path, what, allow_chumpy=False, header_npy=True)
        if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
            obj = obj.item()
        if not isinstance(obj, dict) or not {"left", "top", "right", "bottom"} <= set(obj):
            raise AssetError(f"{path}: not {what}") from None
        values = np.array([float(obj["left"]), float(obj["top"]), float(obj["right"]), float(obj["bottom"])])
    except OSError as exc:
        raise AssetError(f"{path}: unreadable ({exc})") from None
    if values.shape != (4,) or not np.all(np.isfinite(values)) or values[2] <= values[0] or values[3] <= values[1]:
        raise AssetError(f"{path}: not {what}: got {values.tolist()}")
    x1, y1, x2, y2 = (float(v) for v in values)
    return x1, y1, x2, y2


def now_jobs(layout: Any, items: Sequence[Any]) -> tuple[list[GatewayJob], list[str]]:
    """Gateway jobs for NoW images (id = the list entry), with the dataset's face boxes; notes on what is off."""
    if layout.pictures is None:
        raise AssetError(f"no iphone_pictures/ folder under {layout.root}: the NoW images are needed")
    jobs, notes = [], []
    for item in items:
        path = layout.pictures / item.subject / item.challenge / item.image
        if not path.is_file():
            notes.append(f"{item.key}: image not found ({path})")
            continue
        box = None
        if layout.detected_faces is not None:
            box_path = layout.detected_faces / item.subject / item.challenge / f"{item.stem}.npy"
            if box_path.is_file():
                box = read_now_box(box_path)
        if box is None:
            notes.append(f"{item.key}: no detected_face box; the largest detected face is used")
        jobs.append(GatewayJob(item.key, path.read_bytes(), box))
    return jobs, notes


def subset_dataset(folder: Path, layout: Any, items: Sequence[Any], split: str) -> Path:
    """A NoW dataset view listing only ``items``: its own image list, links to the real scans."""
    from facefuse.eval.now import IMAGE_LISTS

    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / IMAGE_LISTS[split], "".join(f"{item.key}\n" for item in items))
    for name, target in (("scans", layout.scans), ("scans_lmks_onlypp", layout.scan_landmarks)):
        link = folder / name
        if target is not None and not link.exists():
            os.symlink(Path(target).resolve(), link, target_is_directory=True)
    return folder


def run_now_bench(config: NowBenchConfig, conn: MeshConnection) -> dict[str, Any]:
    """Predict the NoW images with every entry, evaluate each, return the comparison (and write it)."""
    from facefuse.eval.now import (
        CHALLENGES,
        NowEvalConfig,
        NowLayout,
        run_now_evaluation,
    )

    if config.challenge != "all" and config.challenge not in CHALLENGES:
        raise InvalidInputError(f"--challenge {config.challenge!r}: expected all or one of {sorted(CHALLENGES)}")
    layout = NowLayout.discover(config.dataset, config.split)
    items = layout.images(None if config.challenge == "all" else CHALLENGES[config.challenge])
    dataset = Path(config.dataset)
    if config.limit is not None and config.limit < len(items):
        items = items[: config.limit]
        dataset = subset_dataset(Path(config.out) / "now_subset", layout, items, config.split)
    if not items:
        raise InvalidInputError(f"{layout.image_list} lists no image for challenge {config.challenge!r}")
    entries = bench_entries(config.methods, config.strategies, conn.strategies, conn.default_strategy)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    check_settings(out, "bench_now_settings.json", {**config.sampling.as_dict(), "mesh": conn.fingerprint})
    jobs, notes = now_jobs(layout, items)
    cache = BenchCache(out / "cache", conn.fingerprint)
    preds = compute_predictions(conn, cache, jobs, entries, config.sampling, progress=config.progress)

    by_key = {item.key: item for item in items}
    rows, results = [], {}
    challenge_names = [c for c in CHALLENGES if config.challenge in ("all", c)]
    for entry in entries:
        folder = out / "predictions" / entry.name
        for job_id, prediction in preds.predictions.get(entry.name, {}).items():
            item = by_key[job_id]
            target = folder / item.subject / item.challenge
            if not (target / f"{item.stem}.obj").is_file() or not (target / f"{item.stem}.npy").is_file():
                write_prediction_files(target, item.stem, prediction)
        folder.mkdir(parents=True, exist_ok=True)
        eval_config = NowEvalConfig(dataset=dataset, predictions=folder, output=out / "eval" / entry.name,
                                    split=config.split, challenge=config.challenge, metrical=config.metrical, unit="mm",
                                    workers=config.workers, progress=config.progress)
        try:
            summary = run_now_evaluation(eval_config)
        except InvalidInputError as exc:  # nothing to evaluate for this entry
            summary = {"overall": {"median_mm": None, "mean_mm": None, "std_mm": None, "n_points": 0},
                       "per_challenge": {}, "n_images_evaluated": 0, "n_images_listed": len(items), "error": str(exc)}
        overall = summary["overall"]
        row: list[Any] = [entry.name, entry.source, f"{summary['n_images_evaluated']}/{summary['n_images_listed']}",
                          overall["median_mm"], overall["mean_mm"], overall["std_mm"]]
        if config.per_challenge:
            for name in challenge_names:
                st = summary["per_challenge"].get(name, {})
                row += [st.get("median_mm"), st.get("mean_mm"), st.get("std_mm")]
        rows.append(row)
        results[entry.name] = {
            "method": entry.method, "strategy": entry.strategy or None, "source": entry.source,
            "n_images_listed": summary["n_images_listed"], "n_images_evaluated": summary["n_images_evaluated"],
            "overall": overall, "per_challenge": summary["per_challenge"],
            "failed_predictions": preds.failures.get(entry.name, {}), "evaluation": str(out / "eval" / entry.name),
            **({"error": summary["error"]} if "error" in summary else {}),
        }
    headers = ["name", "source", "images", "median_mm", "mean_mm", "std_mm"]
    if config.per_challenge:
        headers += [f"{c}_{s}" for c in challenge_names for s in ("median_mm", "mean_mm", "std_mm")]
    topologies = sorted({p.topology for v in preds.predictions.values() for p in v.values()})
    summary_out = {
        "benchmark": "NoW", "split": config.split, "challenge": config.challenge,
        "variant": "metrical" if config.metrical else "non-metrical", "dataset": str(config.dataset),
        "settings": config.sampling.as_dict(), "topology": topologies, "mesh": conn.fingerprint,
        "counters": conn.counters.as_dict(), "notes": notes, "columns": headers, "rows": rows, "entries": results,
    }
    summary_out["files"] = write_table_files(out, "bench_now", headers, rows, summary_out)
    summary_out["table"] = format_table(headers, rows)
    return summary_out
