"""The run report in a real browser: a small open-pack run, its index.html in headless Chromium.

Checks what a person would see: the page loads with no console message or error, every face's viewer
draws (screenshot pixels inside each canvas), and the uncertainty heat map changes those pixels. Every
.glb the run wrote passes the Khronos validator. Chromium and the validator are installed by the test
set-up when missing (tests/web_tools.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from web_tools import console_lines, read_png, run_chromium, validate_glb

from facefuse.client.cli import main
from facefuse.client.demo import occlude_mouth
from facefuse.client.outputs import EXTRAS
from facefuse.servers.local import LocalMesh

pytestmark = pytest.mark.slow
WINDOW = (1200, 3200)
KEEP_SCREENSHOTS = os.environ.get("FACEFUSE_KEEP_SCREENSHOTS")  # a folder: keep the screenshots to look at
BACKGROUND = np.array([0.96, 0.96, 0.97]) * 255  # the viewer's clear colour


@pytest.fixture(scope="module")
def report_run(open_mesh: LocalMesh, tmp_path_factory: pytest.TempPathFactory, astronaut_jpeg: bytes) -> Path:
    """Two photos (the astronaut, and her copy with the mouth covered) reconstructed by the open pack."""
    import io

    import skimage.data
    from PIL import Image

    folder = tmp_path_factory.mktemp("report-in")
    (folder / "astronaut.jpg").write_bytes(astronaut_jpeg)
    image = skimage.data.astronaut()
    kps5 = np.array([[209, 111], [246, 110], [228, 130], [212, 150], [243, 149]], float)  # her 5 points, by eye
    buffer = io.BytesIO()
    Image.fromarray(occlude_mouth(image, kps5)).save(buffer, format="PNG")
    (folder / "covered.png").write_bytes(buffer.getvalue())
    out = tmp_path_factory.mktemp("report-out")
    code = main(["reconstruct", str(folder), "-o", str(out), "--gateway", open_mesh.gateway_address, "--no-progress"])
    assert code == 0
    return out


def _canvas_rects(dom: str) -> list[tuple[int, int, int, int]]:
    found = re.search(r'data-viewer-rects="([^"]*)"', dom)
    assert found, "the page did not report its viewers"
    return [tuple(int(v) for v in rect.split()) for rect in found.group(1).split(",") if rect]  # type: ignore[misc]


def test_report_opens_in_chromium_and_draws_every_face(report_run: Path, tmp_path: Path) -> None:
    page = report_run / "index.html"
    assert page.is_file(), "reconstruct writes the report at its end"
    assert "http://" not in page.read_text() and "https://" not in page.read_text(), "nothing fetched at view time"
    started = time.perf_counter()
    dom, log = run_chromium(page.as_uri() + "#view=photo", size=WINDOW)
    assert console_lines(log) == [], console_lines(log)
    assert 'data-viewer-status="ready"' in dom, re.findall(r'data-viewer-[a-z]+="[^"]*"', dom)
    rects = _canvas_rects(dom)
    assert len(rects) == 2  # one face per photo

    heat_dom, heat_log = run_chromium(page.as_uri() + "#view=heat", size=WINDOW)
    assert console_lines(heat_log) == [] and 'data-viewer-status="ready"' in heat_dom
    assert _canvas_rects(heat_dom) == rects, "switching colours must not move the page"
    shots = {}
    for mode in ("photo", "heat"):
        shots[mode] = tmp_path / f"{mode}.png"
        run_chromium(f"{page.as_uri()}#view={mode}", screenshot=shots[mode], size=WINDOW)
        if KEEP_SCREENSHOTS:
            Path(KEEP_SCREENSHOTS).mkdir(parents=True, exist_ok=True)
            (Path(KEEP_SCREENSHOTS) / f"report_{mode}.png").write_bytes(shots[mode].read_bytes())
    photo, heat = read_png(shots["photo"]), read_png(shots["heat"])
    for x, y, w, h in rects:
        assert y + h <= WINDOW[1], "the canvases must lie inside the screenshot"
        crop_photo, crop_heat = photo[y:y + h, x:x + w].astype(float), heat[y:y + h, x:x + w].astype(float)
        drawn = np.abs(crop_photo - BACKGROUND).sum(axis=2) > 12
        assert drawn.mean() > 0.1, "a viewer's canvas is blank"
        changed = np.abs(crop_photo - crop_heat).sum(axis=2) > 30
        assert changed.mean() > 0.05, "the heat map did not change the viewer's pixels"
    assert time.perf_counter() - started < 60
    top = min(y for _, y, _, _ in rects)
    np.testing.assert_array_equal(photo[:top], heat[:top])  # summary, tables, first photo: untouched by the toggle


def test_every_glb_of_the_run_passes_the_khronos_validator(report_run: Path) -> None:
    files = sorted(report_run.rglob("*.glb"))
    assert len(files) == 4  # per face mesh.glb and mesh_posed.glb (the posed fit, docs/posed-face.md)
    assert sum(f.name == "mesh_posed.glb" for f in files) == 2
    for name, result in validate_glb(files).items():
        assert result["errors"] == 0, (name, result["messages"])


def test_open_pack_outputs_carry_a_photo_texture_and_a_fixed_scale_heat_map(report_run: Path) -> None:
    import trimesh

    for face_dir in sorted(p.parent for p in report_run.rglob("mesh.glb")):
        mesh = trimesh.load(str(face_dir / "mesh.glb"), force="mesh", process=False)
        assert mesh.visual.kind == "texture" and mesh.visual.material.baseColorTexture.size == (512, 512)
        obj = trimesh.load(str(face_dir / "mesh.obj"), force="mesh", process=False)
        assert obj.visual.kind == "texture" and len(obj.vertices) == 468
        assert (face_dir / "texture.png").is_file() and (face_dir / "uncertainty.png").is_file()
        assert not any((face_dir / name).exists() for name in EXTRAS), "extras only with --all-files"


def test_report_and_view_commands(report_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import urllib.request

    (report_run / "index.html").unlink()
    assert main(["report", str(report_run)]) == 0
    assert (report_run / "index.html").is_file() and "report:" in capsys.readouterr().out
    assert main(["report", str(report_run / "nope")]) == 2
    assert "no results.jsonl" in capsys.readouterr().err

    server = subprocess.Popen([sys.executable, "-m", "facefuse.client.cli", "view", str(report_run), "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()  # type: ignore[union-attr]
        address = re.search(r"http://127\.0\.0\.1:\d+/index\.html", line)
        assert address, line
        with urllib.request.urlopen(address.group(0), timeout=10) as reply:
            assert reply.read() == (report_run / "index.html").read_bytes()
    finally:
        server.terminate()
        assert server.wait(timeout=10) == 0
