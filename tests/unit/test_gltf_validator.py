"""Every kind of .glb facefuse writes passes the Khronos glTF validator (npm gltf-validator) with 0 errors.

The files the real runs write (both packs) are validated in tests/service/test_report.py and
tests/e2e/test_report_flame.py; this covers each layout (plain, vertex colours, texture) directly.
"""

from __future__ import annotations

import numpy as np
from web_tools import validate_glb

from facefuse.io.gltf import write_glb


def test_every_glb_layout_passes_the_khronos_validator(tmp_path):
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(np.arange(5.0), np.arange(5.0)), axis=-1).reshape(-1, 2)
    vertices = np.c_[grid * 10.0, rng.normal(size=len(grid))]
    quads = [(r * 5 + c, r * 5 + c + 1, (r + 1) * 5 + c) for r in range(4) for c in range(4)]
    quads += [(r * 5 + c + 1, (r + 1) * 5 + c + 1, (r + 1) * 5 + c) for r in range(4) for c in range(4)]
    faces = np.array(quads)
    files = [
        write_glb(tmp_path / "plain.glb", vertices, faces),
        write_glb(tmp_path / "rgb.glb", vertices, faces, colors=rng.integers(0, 256, (25, 3), dtype=np.uint8)),
        write_glb(tmp_path / "float_rgba.glb", vertices, faces, colors=rng.uniform(size=(25, 4))),
        write_glb(tmp_path / "textured.glb", vertices, faces, uvs=grid / 4.0,
                  texture=rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)),
    ]
    results = validate_glb(files)
    assert len(results) == len(files)
    for name, result in results.items():
        assert result["errors"] == 0 and result["warnings"] == 0, (name, result["messages"])
