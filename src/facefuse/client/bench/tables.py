"""Result tables (text, CSV, JSON) and per-item prediction files."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from facefuse.client.bench.predictions import Prediction
from facefuse.errors import InvalidInputError
from facefuse.io.atomic import (
    write_json_atomic,
    write_npy_atomic,
    write_text_atomic,
)


def _cell(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table, number columns right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [bool(rows) and all(row[i] is None or isinstance(row[i], (int, float)) for row in rows)
               for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if numeric[i] else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def write_table_files(out: Path, stem: str, headers: Sequence[str], rows: Sequence[Sequence[Any]],
                      summary: dict[str, Any]) -> dict[str, str]:
    """``stem.csv`` (the table) and ``stem.json`` (the summary), atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(headers)
    for row in rows:
        writer.writerow(["" if v is None or (isinstance(v, float) and not math.isfinite(v)) else
                         (f"{v:.6f}" if isinstance(v, float) else v) for v in row])
    csv_path = write_text_atomic(out / f"{stem}.csv", buffer.getvalue())
    json_path = write_json_atomic(out / f"{stem}.json", summary, sort_keys=False)
    return {"csv": str(csv_path), "json": str(json_path)}


def check_settings(out: Path, name: str, settings: dict[str, Any]) -> None:
    """Outputs of one folder must come from one set of settings (the cache itself is keyed, files are not)."""
    path = out / name
    if path.is_file():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            previous = None
        if previous is not None and previous != json.loads(json.dumps(settings)):
            changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
            raise InvalidInputError(f"{out} holds a run with other settings ({', '.join(changed)} differ, see {path}); "
                                    "use another -o folder (the cache can be shared by copying OUT/cache)")
    write_json_atomic(path, settings)


def write_prediction_files(folder: Path, stem: str, prediction: Prediction) -> None:
    """NoW submission layout: ``stem.obj`` (mm) and ``stem.npy`` (7x3 mm)."""
    from facefuse.io.meshes import write_obj

    write_obj(folder / f"{stem}.obj", prediction.vertices, prediction.faces)
    write_npy_atomic(folder / f"{stem}.npy", prediction.kpt7.astype(np.float32))
