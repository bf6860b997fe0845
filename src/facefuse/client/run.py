"""Stream inputs through the gateway and write every face's files, resuming where a run stopped."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facefuse.client.api import GatewayClient, ImageInput
from facefuse.client.inputs import InputItem, read_bytes
from facefuse.client.outputs import ResultsLog, code_name, image_error_entry, summarize, write_face
from facefuse.errors import FacefuseError


@dataclass
class RunReport:
    processed: int = 0
    skipped: int = 0
    faces: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return sum(n for s, n in self.statuses.items() if s not in ("OK", "NOT_FOUND"))


def run_stream(items: list[InputItem], out: Path, client: GatewayClient, method: str, *,
               options: dict[str, Any] | None = None, progress: bool = True, masks: dict[str, np.ndarray] | None = None) -> RunReport:
    out.mkdir(parents=True, exist_ok=True)
    log = ResultsLog.open(out)
    todo = [item for item in items if not log.is_done(item.image_id, method)]
    report = RunReport(skipped=len(items) - len(todo))
    by_id = {item.image_id: item for item in todo}
    decoded: dict[str, np.ndarray | None] = {}
    arrived: dict[str, int] = {}
    new_entries: list[dict[str, Any]] = []
    started = time.perf_counter()

    def images() -> Iterator[ImageInput]:
        for item in todo:
            try:
                data = read_bytes(item)
            except (OSError, FacefuseError) as exc:
                entry = {"image_id": item.image_id, "input": str(item.path), "face_index": -1, "num_faces": 0,
                         "status": "INVALID_ARGUMENT", "message": str(exc), "method": method, "files": []}
                log.append(entry)
                new_entries.append(entry)
                bar.update(1)
                continue
            yield ImageInput(item.image_id, data, (masks or {}).get(item.image_id))

    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="img", desc=method, disable=not progress or not todo, file=sys.stderr)
    try:
        for result in client.process(images(), method=method, **(options or {})):
            item = by_id.get(result.image_id)
            input_path = str(item.path) if item else ""
            if result.face_index < 0 or code_name(result.status.code) != "OK":
                entry = image_error_entry(result, method, input_path)
            else:
                if result.image_id not in decoded:
                    decoded[result.image_id] = _decode_for_overlay(item)
                entry = {"image_id": result.image_id, "input": input_path, "face_index": result.face_index,
                         "num_faces": result.num_faces, "status": "OK", "message": "", "method": method,
                         "seconds": round(result.seconds, 3)}
                entry.update(write_face(out, item.key if item else result.image_id, result, decoded[result.image_id],
                                        method=method))
                report.faces += 1
            log.append(entry)
            new_entries.append(entry)
            arrived[result.image_id] = arrived.get(result.image_id, 0) + 1
            if result.face_index < 0 or arrived[result.image_id] >= max(result.num_faces, 1):
                bar.update(1)
                decoded.pop(result.image_id, None)
    finally:
        bar.close()
        log.compact()
    report.processed = len(todo)
    report.statuses = summarize(new_entries)
    report.seconds = time.perf_counter() - started
    return report


def _decode_for_overlay(item: InputItem | None) -> np.ndarray | None:
    if item is None:
        return None
    try:
        from facefuse.client.inputs import read_rgb

        return read_rgb(item)
    except (OSError, FacefuseError):
        return None
