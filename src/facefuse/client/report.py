"""``OUT/index.html``: one self-contained page that shows a whole run, readable offline and from file://.

Everything the page needs is inside it: photos and overlays as data URIs, each face's ``mesh.glb`` as
base64 for the viewer, and the viewer itself (``report_assets/viewer.js``, a small WebGL viewer written
for facefuse: no third-party code, nothing fetched at view time). Per-vertex colours for the uncertainty
heat map (the fixed mm scale of :func:`facefuse.render.spread_colors`) and for visibility are computed
here, so the page does no colour science. Only the files of this run's ``results.jsonl`` are read.
"""

from __future__ import annotations

import base64
import html
import io
import json
import statistics
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from facefuse.client.outputs import RESULTS, ResultsLog
from facefuse.errors import InvalidInputError
from facefuse.io.atomic import write_text_atomic
from facefuse.render import SPREAD_SCALE_MM, spread_colors

REPORT = "index.html"
MAX_VIEWERS = 60  # faces with an interactive viewer (each embeds its mesh); the rest show their preview
MAX_PHOTO_SIDE = 960  # pixels: photos are downscaled to this for the page
MAX_EMBED_BYTES = 8 << 20  # a face file larger than this is not embedded
SCALE_SOURCE = {"flame2020": "MICA (metric FLAME identity)", "mediapipe468": "open pack (canonical face, mm)"}
HIDDEN_RGB, SEEN_RGB, UNKNOWN_RGB = (220, 40, 40), (40, 170, 70), (170, 170, 175)


def _metric_scale(entry: dict[str, Any]) -> object:
    """Which model sets the size, and, where the open pack measured it, whether from the iris or the default."""
    model = SCALE_SOURCE.get(str(entry.get("topology")), entry.get("topology"))
    source = entry.get("scale_source")
    if not source:
        return model
    confidence = entry.get("scale_confidence")
    shown = f"{confidence:.2f}" if isinstance(confidence, (int, float)) else "?"
    return f"{model}: {source} (confidence {shown})"


def _asset(name: str) -> str:
    return resources.files("facefuse.client.report_assets").joinpath(name).read_text(encoding="utf-8")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _face_dir(out: Path, entry: dict[str, Any]) -> Path:
    """The face's folder; a ``dir`` that leaves OUT (an edited results.jsonl) names nothing: OUT/.missing."""
    folder = (out / str(entry.get("dir", ""))).resolve()
    return folder if folder.is_relative_to(out.resolve()) and entry.get("dir") else out / ".missing"


def _data_uri(path: Path) -> str | None:
    if not path.is_file() or path.stat().st_size > MAX_EMBED_BYTES:
        return None
    return "data:image/png;base64," + _b64(path.read_bytes())


def _jpeg_uri(rgb: np.ndarray) -> str:
    from PIL import Image

    image = Image.fromarray(rgb)
    image.thumbnail((MAX_PHOTO_SIDE, MAX_PHOTO_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + _b64(buffer.getvalue())


def _photo_with_boxes(source: str, faces: list[dict[str, Any]]) -> str | None:
    """The input photo with every face's box, or None when it is not a readable image any more."""
    import cv2
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as image:
            rgb = np.array(image.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    thick = max(1, round(max(rgb.shape[:2]) / 400))
    for entry in faces:
        box = entry.get("box")
        if isinstance(box, list) and len(box) == 4:
            x1, y1, x2, y2 = (round(float(v)) for v in box)
            colour = (0, 200, 0) if entry.get("status") == "OK" else (220, 0, 0)
            cv2.rectangle(rgb, (x1, y1), (x2, y2), colour, thick)
            cv2.putText(rgb, str(entry["face_index"]), (x1, max(y1 - 4 * thick, 10)), cv2.FONT_HERSHEY_SIMPLEX,
                        0.5 * thick, colour, thick, cv2.LINE_AA)
    return _jpeg_uri(rgb)


def _visibility_colors(face_dir: Path, entry: dict[str, Any], count: int) -> np.ndarray | None:
    """Per-vertex colours: green seen, red hidden, blended by visibility; grey outside the regions (468 meshes)."""
    from facefuse.fusion.visibility import landmark_visibility

    regions = entry.get("visibility")
    landmarks_path = face_dir / "landmarks.npy"
    if entry.get("topology") != "mediapipe468" or count != 468 or not isinstance(regions, dict) \
            or not landmarks_path.is_file():
        return None
    landmarks = np.load(landmarks_path, allow_pickle=False)
    per_vertex = landmark_visibility(landmarks, {str(k): float(v) for k, v in regions.items()})
    t = np.nan_to_num(per_vertex, nan=0.0)[:, None]
    colours = np.array(HIDDEN_RGB) * (1 - t) + np.array(SEEN_RGB) * t
    colours[np.isnan(per_vertex)] = UNKNOWN_RGB
    return np.rint(colours).astype(np.uint8)


def _face_data(out: Path, entry: dict[str, Any]) -> dict[str, Any] | None:
    """The viewer's data for one face (its .glb, heat and visibility colours), or None without a mesh."""
    import trimesh

    face_dir = _face_dir(out, entry)
    glb = face_dir / "mesh.glb"
    if not glb.is_file() or glb.stat().st_size > MAX_EMBED_BYTES:
        return None
    mesh = trimesh.load(str(glb), force="mesh", process=False)
    count = len(mesh.vertices) if isinstance(mesh, trimesh.Trimesh) else -1
    data: dict[str, Any] = {"id": f"{entry['image_id']} #{entry['face_index']}", "glb": _b64(glb.read_bytes())}
    spread_path = face_dir / "uncertainty.npy"
    if spread_path.is_file():
        spread = np.load(spread_path, allow_pickle=False)
        if spread.shape == (count,):
            data["heat"] = _b64(spread_colors(spread).tobytes())
    visibility = _visibility_colors(face_dir, entry, count)
    if visibility is not None:
        data["visibility"] = _b64(visibility.tobytes())
    return data


def _heat_legend() -> str:
    stops = spread_colors(np.linspace(0.0, SPREAD_SCALE_MM, 9))
    gradient = ", ".join(f"rgb({r},{g},{b})" for r, g, b in stops)
    ticks = "".join(f"<span>{mm:g}</span>" for mm in np.arange(0.0, SPREAD_SCALE_MM + 1e-9, 2.0))
    return (f'<div class="legend heat">spread (mm), one scale for every face'
            f'<div class="bar" style="background: linear-gradient(to right, {gradient})"></div>'
            f'<div class="ticks">{ticks}</div></div>')


def _visibility_legend() -> str:
    def swatch(rgb: tuple[int, int, int], label: str) -> str:
        return f'<span class="swatch" style="background: rgb{rgb}"></span>{label}'

    return (f'<div class="legend visibility">{swatch(SEEN_RGB, "seen")}{swatch(HIDDEN_RGB, "hidden")}'
            f'{swatch(UNKNOWN_RGB, "outside the regions")}</div>')


def _fmt(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}g}" if isinstance(value, float) else html.escape(str(value)) if value is not None else ""


def _face_card(out: Path, entry: dict[str, Any], viewer_index: int | None) -> str:
    e = html.escape
    face_dir = _face_dir(out, entry)
    parts = [f'<div class="face"><h3>face {entry["face_index"]} · <span class="status-{e(entry["status"])}">'
             f'{e(entry["status"])}</span></h3>']
    if viewer_index is not None:
        buttons = "".join(f'<button data-mode="{m}">{label}</button>' for m, label in
                          (("photo", "photo colours"), ("shading", "shading"), ("heat", "uncertainty"),
                           ("visibility", "visibility")))
        parts.append(f'<div class="viewer"><canvas data-face="{viewer_index}" width="320" height="320"></canvas>'
                     f'{buttons}<div class="legends">{_heat_legend()}{_visibility_legend()}</div></div>')
    else:
        preview = _data_uri(face_dir / "preview.png")
        if preview:
            parts.append(f'<img src="{preview}" alt="preview" style="width: 320px">')
    facts = [("method", entry.get("method")), ("strategy", entry.get("strategy")),
             ("confidence", entry.get("confidence")), ("mean spread (mm)", entry.get("spread_mm_mean")),
             ("metric scale", _metric_scale(entry)),
             ("detector", entry.get("detector")), ("detection score", entry.get("score")),
             ("time (s)", entry.get("seconds")), ("folder", entry.get("dir"))]
    parts.append("<dl>" + "".join(f"<dt>{e(k)}</dt><dd>{_fmt(v)}</dd>" for k, v in facts if v is not None) + "</dl>")
    overlays = [(name, _data_uri(face_dir / name)) for name in ("overlay.png", "visibility_overlay.png")]
    shown = "".join(f'<img src="{uri}" alt="{name}" title="{name}">' for name, uri in overlays if uri)
    if shown:
        parts.append(f'<div class="overlays">{shown}</div>')
    parts.append("</div>")
    return "".join(parts)


def build_report(out: Path) -> Path:
    """Write ``OUT/index.html`` from ``OUT/results.jsonl`` and the files it lists; returns its path."""
    out = Path(out)
    if not (out / RESULTS).is_file():
        raise InvalidInputError(f"{out}: no {RESULTS} here (not a facefuse output folder)")
    log = ResultsLog.open(out)
    inputs = [sorted(faces.values(), key=lambda x: int(x["face_index"])) for _, faces in sorted(log.lines.items())]
    entries = [entry for faces in inputs for entry in faces]
    e = html.escape

    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry["status"]] = counts.get(entry["status"], 0) + 1
    seconds = [float(x["seconds"]) for x in entries if isinstance(x.get("seconds"), (int, float))]
    faces_ok = [x for x in entries if x["status"] == "OK" and x["face_index"] >= 0]
    summary: list[tuple[str, object]] = [("inputs", len(inputs)), ("faces written", len(faces_ok)),
               *((f"status {k}", v) for k, v in sorted(counts.items()))]
    if seconds:
        summary += [("time per face, median (s)", f"{statistics.median(seconds):.3f}"),
                    ("time per face, max (s)", f"{max(seconds):.3f}")]
    body = ["<h1>facefuse run</h1>", f"<p>{e(str(out.resolve()))}</p>", "<h2>Summary</h2><table>",
            *(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in summary), "</table>"]

    header = ("input", "face", "status", "method", "strategy", "confidence", "mean spread (mm)", "time (s)")
    rows = []
    for x in entries:
        cells = (x.get("image_id"), x["face_index"], x["status"], x.get("method"), x.get("strategy"),
                 x.get("confidence"), x.get("spread_mm_mean"), x.get("seconds"))
        rows.append("<tr>" + "".join(f'<td data-value="{e(str(c)) if c is not None else ""}">{_fmt(c)}</td>'
                                     for c in cells) + "</tr>")
    body += ["<h2>Faces</h2><table class=\"sortable\"><thead><tr>",
             *(f"<th>{h}</th>" for h in header), "</tr></thead><tbody>", *rows, "</tbody></table>"]
    failures = [x for x in entries if x["status"] not in ("OK", "NOT_FOUND")]
    if failures:
        body.append("<h2 class=\"failed\">Failures</h2><ul>")
        body += [f"<li><b>{e(str(x.get('image_id')))}</b> face {x['face_index']}: {e(x['status'])}: "
                 f"{e(str(x.get('message', '')))}</li>" for x in failures]
        body.append("</ul>")

    viewers: list[dict[str, Any]] = []
    for faces in inputs:
        first = faces[0]
        body.append(f"<h2>{e(str(first.get('image_id')))}</h2>")
        photo = _photo_with_boxes(str(first.get("input", "")), faces) if first.get("input") else None
        if photo:
            body.append(f'<div class="photo"><img src="{photo}" alt="photo with face boxes"></div>')
        cards = []
        for entry in faces:
            if entry["face_index"] < 0:
                cards.append(f'<p class="{"failed" if entry["status"] != "NOT_FOUND" else ""}">{e(entry["status"])}: '
                             f'{e(str(entry.get("message", "")))}</p>')
                continue
            index = None
            if entry["status"] == "OK" and len(viewers) < MAX_VIEWERS:
                data = _face_data(out, entry)
                if data is not None:
                    index = len(viewers)
                    viewers.append(data)
            cards.append(_face_card(out, entry, index))
        body.append('<div class="faces">' + "".join(cards) + "</div>")

    faces_json = json.dumps(viewers, separators=(",", ":")).replace("</", "<\\/")
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<title>facefuse run</title><style>" + _asset("report.css") + "</style></head><body>"
            + "\n".join(body)
            + "<script type=\"application/json\" id=\"facefuse-faces\">" + faces_json + "</script>"
            + "<script>" + _asset("viewer.js").replace("</", "<\\/") + "</script></body></html>\n")
    return write_text_atomic(out / REPORT, page)


def serve_report(out: Path, port: int = 8765) -> int:
    """Serve OUT (its report written first when missing) on 127.0.0.1 until Ctrl-C or SIGTERM."""
    import functools
    import http.server
    import signal
    import threading

    out = Path(out)
    if not 0 <= port <= 65535:
        raise InvalidInputError(f"--port {port}: not a port number")
    if not (out / REPORT).is_file():
        build_report(out)

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per request would drown the address

    handler = functools.partial(QuietHandler, directory=str(out))
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError as exc:
        raise InvalidInputError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}") from None
    host, bound = server.server_address[:2]
    print(f"serving {out} at http://{host!s}:{bound}/{REPORT} (Ctrl-C stops)", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
