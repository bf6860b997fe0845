"""The face as photographed, end to end through the mesh: the fusion service's posed-face fit.

Open pack on the astronaut (package-shipped photo) and flame pack on synthetic official-format assets
(random weights: a random FLAME identity, which the fit must still bring onto the detected landmarks).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from facefuse.client.cli import main
from facefuse.io.meshes import read_mesh
from facefuse.servers.local import LocalMesh

OPEN_REPROJECTION_PX = 2.0
"""Measured 0.7 px on the astronaut (512 px photo, face ~180 px): the fitted 468 points' mean distance."""
FLAME_REPROJECTION_PX = 12.0
"""A random synthetic FLAME identity (not a face) on the astronaut's 68 points: measured 5.8 px, face ~105 px."""


@pytest.fixture(scope="module")
def open_mesh_assetless(tmp_path_factory: pytest.TempPathFactory):
    with LocalMesh(workdir=tmp_path_factory.mktemp("open-mesh"), env={"FACEFUSE_ASSETS": ""}) as mesh:
        yield mesh


def _reconstruct(gateway: str, photo: Path, out: Path, *extra: str) -> tuple[dict, Path]:
    code = main(["reconstruct", str(photo), "-o", str(out), "--gateway", gateway, "--method", "fuse",
                 "--samples", "2", "--no-progress", *extra])
    assert code == 0
    (entry,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert entry["status"] == "OK", entry
    return entry, out / entry["dir"]


def _projected(vertices: np.ndarray, intrinsics: np.ndarray) -> np.ndarray:
    return vertices[:, :2] / vertices[:, 2:3] * np.diag(intrinsics)[:2] + intrinsics[:2, 2]


def test_open_pack_posed_face_lands_on_the_astronaut(open_mesh_assetless: LocalMesh, astronaut_png: Path,
                                                     tmp_path: Path) -> None:
    entry, face = _reconstruct(open_mesh_assetless.gateway_address, astronaut_png, tmp_path / "out")
    assert 0 <= entry["reprojection_error_px"] < OPEN_REPROJECTION_PX
    assert entry["focal_source"] == "default"  # a PNG from skimage has no EXIF
    params = np.load(face / "params.npz")
    posed, triangles = read_mesh(face / "mesh_posed.obj")
    neutral, neutral_triangles = read_mesh(face / "mesh.obj")
    np.testing.assert_array_equal(triangles, neutral_triangles)
    assert params["image_size"].tolist() == [512, 512]
    meta = json.loads((face / "params.json").read_text())
    assert meta["focal_source"] == "default" and meta["reprojection_error_px"] == entry["reprojection_error_px"]
    k, rt = params["camera_intrinsics"], params["camera_extrinsics"]
    assert k[0, 2] == pytest.approx(255.5) and k[1, 2] == pytest.approx(255.5)
    np.testing.assert_allclose(rt[:3, 3], params["translation"], atol=1e-4)
    assert 300 < params["translation"][2] < 3000  # a head a metre or so from the camera, in mm
    # The posed 468 vertices ARE the FaceMesh points: projected, they must fall on the detected ones.
    detected = np.load(face / "landmarks.npy")[:468, :2]
    error = np.linalg.norm(_projected(posed, k) - detected, axis=1).mean()
    assert error < OPEN_REPROJECTION_PX, error
    # The posed mesh is the neutral one moved rigidly plus the expression residual.
    residual = params["expression"].reshape(-1, 3)
    moved = (neutral + residual) @ rt[:3, :3].T + rt[:3, 3]
    np.testing.assert_allclose(posed, moved, atol=0.05)


def test_the_focal_comes_from_exif_when_the_photo_has_it(open_mesh_assetless: LocalMesh, tmp_path: Path) -> None:
    import skimage.data
    from PIL import Image

    from facefuse.models.focal import focal_px_from_35mm

    exif = Image.Exif()
    exif.get_ifd(0x8769)[0xA405] = 50  # FocalLengthIn35mmFilm
    photo = tmp_path / "astronaut_50mm.jpg"
    Image.fromarray(skimage.data.astronaut()).save(photo, quality=95, exif=exif)
    entry, face = _reconstruct(open_mesh_assetless.gateway_address, photo, tmp_path / "out")
    assert entry["focal_source"] == "exif" and entry["reprojection_error_px"] < OPEN_REPROJECTION_PX
    k = np.load(face / "params.npz")["camera_intrinsics"]
    assert k[0, 0] == pytest.approx(focal_px_from_35mm(50.0, 512, 512), rel=1e-5)


def test_neutral_only_skips_the_fit(open_mesh_assetless: LocalMesh, astronaut_png: Path, tmp_path: Path) -> None:
    entry, face = _reconstruct(open_mesh_assetless.gateway_address, astronaut_png, tmp_path / "out", "--neutral-only")
    assert "reprojection_error_px" not in entry
    assert not (face / "mesh_posed.obj").exists()
    assert "camera_intrinsics" not in np.load(face / "params.npz")


def test_flame_pack_fit_converges_to_the_landmarks(flame_mesh: LocalMesh, synthetic_assets_dir: Path,
                                                   astronaut_png: Path, tmp_path: Path) -> None:
    import torch

    from facefuse.face.landmarks68 import ibug68_from_facemesh
    from facefuse.models.fitting import yaw_degrees
    from facefuse.models.flame import barycentric_landmarks, dynamic_contour_row
    from facefuse.packs.flame import load_flame

    # Every visibility source that could down-weight a landmark is off, so all 68 count in the reported error.
    off = [arg for source in ("mask", "photometric", "hands", "pose") for arg in ("--no-visibility", source)]
    entry, face = _reconstruct(flame_mesh.gateway_address, astronaut_png, tmp_path / "out", *off)
    assert entry["topology"] == "flame2020"
    assert entry["reprojection_error_px"] < FLAME_REPROJECTION_PX, entry["reprojection_error_px"]
    params = np.load(face / "params.npz")
    assert params["expression"].shape == (50,) and params["jaw_pose"].shape == (3,)
    assert params["global_pose"].shape == (3,) and params["camera_intrinsics"].shape == (3, 3)
    meta = json.loads((face / "params.json").read_text())
    assert len(meta["expression"]) == 50 and meta["units"]["translation"] == "mm"
    posed, triangles = read_mesh(face / "mesh_posed.obj")
    neutral, neutral_triangles = read_mesh(face / "mesh.obj")
    assert posed.shape == neutral.shape
    np.testing.assert_array_equal(triangles, neutral_triangles)
    assert (posed[:, 2] > 0).all()  # in front of the camera
    assert (face / "mesh_posed.glb").is_file()
    # The reported error is what the files show: FLAME's 68 landmarks on the posed mesh (51 static + the
    # contour row of the written rotation's yaw), projected with the written camera, against the 68 points
    # read off the detected FaceMesh points (all seen here).
    flame = load_flame(synthetic_assets_dir)
    assert flame.landmarks is not None
    rotation = torch.from_numpy(params["camera_extrinsics"][None, :3, :3].astype(np.float64))
    row = int(dynamic_contour_row(yaw_degrees(rotation))[0])
    faces = np.concatenate([flame.landmarks.dynamic_lmk_faces_idx[row], flame.landmarks.static_lmk_faces_idx])
    bary = np.concatenate([flame.landmarks.dynamic_lmk_bary_coords[row], flame.landmarks.static_lmk_bary_coords])
    on_mesh = barycentric_landmarks(torch.from_numpy(posed.astype(np.float64))[None], torch.from_numpy(flame.faces),
                                    torch.from_numpy(faces), torch.from_numpy(bary.astype(np.float64)))[0].numpy()
    fitted = _projected(on_mesh, params["camera_intrinsics"])
    detected = ibug68_from_facemesh(np.load(face / "landmarks.npy"))[:, :2]
    error = float(np.linalg.norm(fitted - detected, axis=1).mean())
    assert error == pytest.approx(entry["reprojection_error_px"], abs=0.05)
