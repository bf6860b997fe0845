"""The report page from a hand-written results.jsonl: escaping, failures, folders outside OUT ignored."""

from __future__ import annotations

import json

import numpy as np
import pytest

from facefuse.client.report import build_report
from facefuse.errors import InvalidInputError
from facefuse.io.gltf import write_glb


def _line(**fields) -> str:
    base = {"key": "k", "image_id": "a.jpg", "input": "/nonexistent/a.jpg", "face_index": 0, "num_faces": 1,
            "status": "OK", "message": "", "method": "fuse", "files": []}
    return json.dumps({**base, **fields})


def test_report_escapes_text_lists_failures_and_reads_only_inside_out(tmp_path):
    out, outside = tmp_path / "out", tmp_path / "outside"
    vertices = np.array([[0, 0, 0], [10, 0, 0], [0, 10, 0]], float)
    write_glb(outside / "mesh.glb", vertices, np.array([[0, 1, 2]]))
    write_glb(out / "k2" / "face_00" / "mesh.glb", vertices, np.array([[0, 1, 2]]))
    (out / "results.jsonl").write_text("\n".join([
        _line(key="k1", image_id="bad.jpg", face_index=-1, num_faces=0, status="INVALID_ARGUMENT",
              message="truncated <script>alert(1)</script>"),
        _line(key="k2", image_id="good.jpg", dir="k2/face_00", seconds=1.5),
        _line(key="k3", image_id="sneaky.jpg", dir="../outside", seconds=2.0),
    ]) + "\n")
    page = build_report(out).read_text()
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page
    assert "Failures" in page and "INVALID_ARGUMENT" in page
    assert page.count('<canvas data-face="') == 1  # good.jpg's mesh; sneaky.jpg's folder is outside OUT
    faces = json.loads(page.split('id="facefuse-faces">')[1].split("</script>")[0])
    assert [f["id"] for f in faces] == ["good.jpg #0"]
    assert "time per face, median (s)</th><td>1.750" in page
    with pytest.raises(InvalidInputError, match=r"no results\.jsonl"):
        build_report(tmp_path / "empty")
