"""The flame pack's files (synthetic official-format assets): every .glb passes the Khronos validator,
and the run's report loads in headless Chromium without console messages."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from web_tools import console_lines, run_chromium, validate_glb

from facefuse.client.cli import main
from facefuse.servers.local import LocalMesh

pytestmark = pytest.mark.slow


def test_flame_pack_glb_files_validate_and_the_report_loads(flame_mesh: LocalMesh, astronaut_png: Path,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = main(["reconstruct", str(astronaut_png), "-o", str(out), "--gateway", flame_mesh.gateway_address,
                 "--no-progress", "--save-branches", "--all-files", "--samples", "2", "--steps", "2"])
    assert code == 0
    face_dir = next(out.rglob("face_00"))
    for name in ("crop112.png", "crop224.png", "kps5.npy", "samples.npz", "mesh_uncertainty.ply"):
        assert (face_dir / name).is_file(), name  # --all-files writes the extras too
    files = sorted(out.rglob("*.glb"))
    assert len(files) >= 2, files  # the fused mesh and at least one branch's
    for name, result in validate_glb(files).items():
        assert result["errors"] == 0, (name, result["messages"])
    dom, log = run_chromium((out / "index.html").as_uri() + "#view=heat")
    assert console_lines(log) == [], console_lines(log)
    assert 'data-viewer-status="ready"' in dom, re.findall(r'data-viewer-[a-z]+="[^"]*"', dom)
    assert 'data-mode="heat"' in dom  # the fused FLAME mesh has a spread to show
