"""The posed-face pieces around the fit: EXIF focal, the FaceMesh->iBUG map, the open split, client checks."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from facefuse import wire
from facefuse.client.validate import InvalidResponseError, check_posed
from facefuse.face.landmarks68 import IBUG68_FROM_FACEMESH, ibug68_weights
from facefuse.io.images import exif_focal_35mm
from facefuse.models.flame import NOW7_FROM_LMK68
from facefuse.models.focal import DEFAULT_FOCAL_35MM, focal_px_from_35mm
from facefuse.packs.open import KPT7_INDICES
from facefuse.v1 import common_pb2

ASTRONAUT_468 = Path(__file__).resolve().parents[1] / "data" / "visibility_astronaut_landmarks468.npy"


def _jpeg(focal_35mm: int | None) -> bytes:
    exif = Image.Exif()
    if focal_35mm is not None:
        exif.get_ifd(0x8769)[0xA405] = focal_35mm
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48)).save(buffer, format="JPEG", exif=exif)
    return buffer.getvalue()


def test_exif_focal_is_read_and_broken_or_missing_is_none() -> None:
    assert exif_focal_35mm(_jpeg(26)) == 26.0
    assert exif_focal_35mm(_jpeg(None)) is None
    assert exif_focal_35mm(_jpeg(0)) is None  # 0 means "unknown" in EXIF
    assert exif_focal_35mm(b"not an image") is None


def test_the_68_point_map_agrees_with_the_now_points() -> None:
    assert len(IBUG68_FROM_FACEMESH) == 68 and len(set(IBUG68_FROM_FACEMESH)) == 68
    assert max(IBUG68_FROM_FACEMESH) < 468
    assert [IBUG68_FROM_FACEMESH[i] for i in NOW7_FROM_LMK68] == list(KPT7_INDICES)
    visibility = np.ones(468)
    visibility[IBUG68_FROM_FACEMESH[50]] = 0.0
    visibility[IBUG68_FROM_FACEMESH[30]] = np.nan  # in no region: seen
    weights = ibug68_weights(visibility)
    assert weights[50] == 0.0 and weights[30] == 1.0 and weights[0] < 1.0


def test_open_split_keeps_no_residual_where_hidden_and_poses_onto_the_points() -> None:
    from facefuse.assets.canonical_face import load_canonical_face
    from facefuse.packs.open import camera_points, metric_face
    from facefuse.packs.posed import OpenPosedFitter, PoseFitTarget

    canonical = load_canonical_face()
    points = np.load(ASTRONAUT_468)
    visibility = np.ones(468)
    visibility[:100] = 0.0
    target = PoseFitTarget(points, visibility, 512, 512, focal_px_from_35mm(DEFAULT_FOCAL_35MM, 512, 512), "default")
    fitter = OpenPosedFitter(canonical, camera_points)
    split = fitter.split(canonical.vertices_mm, target)
    assert split is not None
    residual, _weights, rotation = split
    assert np.all(residual[:100] == 0.0) and np.abs(residual[100:]).max() > 0.5  # expression where seen
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-9)
    result = fitter(metric_face(points, canonical).vertices_mm, target)
    assert result is not None and result.reprojection_error_px < 1.5  # measured 0.7 px on all points
    assert 300 < result.translation[2] < 3000
    hidden = PoseFitTarget(points, np.zeros(468), 512, 512, 600.0, "default")
    assert fitter(canonical.vertices_mm, hidden) is None  # nothing seen: no posed face, not an error


def _posed_message(**change: object) -> common_pb2.PosedFace:
    rt = np.eye(4, dtype=np.float32)
    rt[:3, :3] = np.diag([1.0, -1.0, -1.0])
    rt[:3, 3] = [0.0, 0.0, 800.0]
    k = np.array([[900, 0, 255.5], [0, 900, 255.5], [0, 0, 1]], np.float32)
    fields: dict[str, Any] = dict(
        expression=wire.from_numpy(np.zeros(50, np.float32)), jaw_pose=wire.from_numpy(np.zeros(3, np.float32)),
        global_pose=wire.from_numpy(np.array([np.pi, 0, 0], np.float32)),
        translation=wire.from_numpy(rt[:3, 3].copy()), camera_intrinsics=wire.from_numpy(k),
        camera_extrinsics=wire.from_numpy(rt), image_size=wire.from_numpy(np.array([512, 512], np.int32)),
        focal_source="default", reprojection_error_px=1.0,
        vertices=wire.from_numpy(np.ones((10, 3), np.float32)),
        landmarks_px=wire.from_numpy(np.ones((68, 2), np.float32)))
    fields.update(change)
    return common_pb2.PosedFace(**{k: v for k, v in fields.items() if v is not None})


def test_client_accepts_a_consistent_posed_face() -> None:
    from facefuse.client.validate import CheckedReconstruction, posed_mesh

    checked = check_posed(_posed_message(), "posed", 10)
    assert checked.vertices.shape == (10, 3) and checked.image_size.tolist() == [512, 512]
    triangles = np.array([[0, 1, 2]], np.int32)
    rec = CheckedReconstruction("fuse", "region", 1.0, "", faces=triangles, posed=checked)
    mesh = posed_mesh(rec)
    assert mesh is not None and mesh.image_size == (512, 512) and mesh.intrinsics[0, 0] == 900
    assert posed_mesh(CheckedReconstruction("fuse", "region", 1.0, "", faces=triangles)) is None


@pytest.mark.parametrize("change", [
    {"vertices": wire.from_numpy(np.ones((9, 3), np.float32))},
    {"camera_intrinsics": wire.from_numpy(np.eye(3, dtype=np.float32) * -1)},
    {"camera_extrinsics": wire.from_numpy(np.eye(4, dtype=np.float32) * 2)},
    {"translation": wire.from_numpy(np.array([0, 0, 1], np.float32))},
    {"image_size": wire.from_numpy(np.array([0, 512], np.int32))},
    {"focal_source": "../etc"},
    {"reprojection_error_px": float("nan")},
    {"jaw_pose": None},
    {"expression": wire.from_numpy(np.array([np.inf], np.float32))},
])
def test_client_refuses_an_inconsistent_posed_face(change: dict[str, object]) -> None:
    with pytest.raises(InvalidResponseError):
        check_posed(_posed_message(**change), "posed", 10)
    with pytest.raises(InvalidResponseError, match="without a mesh"):
        check_posed(_posed_message(), "posed", None)


def test_benchmark_runs_ask_for_the_neutral_shape_only() -> None:
    """NoW and the occlusion study evaluate the neutral shape: every image the bench sends skips the fit."""
    from types import SimpleNamespace

    from facefuse.client.bench.connection import GatewayJob, MeshConnection

    sent: list[Any] = []

    def process(chunks: Any, timeout: float | None = None) -> Any:  # stands in for the gateway stub
        sent.extend(chunks)
        return iter(())

    connection = MeshConnection(gateway="127.0.0.1:1")
    connection.client = SimpleNamespace(stub=SimpleNamespace(Process=process))
    jobs = [GatewayJob("a", _jpeg(None), box=(1.0, 1.0, 40.0, 40.0)), GatewayJob("b", _jpeg(None))]
    assert list(connection.process(jobs, "fuse", {})) == []
    first_chunks = [chunk for chunk in sent if chunk.HasField("options")]
    assert len(first_chunks) == 2 and all(chunk.options.neutral_only for chunk in first_chunks)


def test_a_hidden_region_gives_its_landmarks_zero_weight_in_the_service_request() -> None:
    """The fusion service turns the gateway's region visibility into per-landmark fit weights."""
    from facefuse.fusion.visibility import Visibility
    from facefuse.servers.fusion import pose_fit_target

    points = np.load(ASTRONAUT_468).astype(np.float32)
    message = common_pb2.PoseFitInput(landmarks=wire.from_numpy(points),
                                      image_size=wire.from_numpy(np.array([512, 512], np.int32)),
                                      focal_px=600.0, focal_source="default")
    regions = {name: 1.0 for name in ("forehead", "left_eye", "right_eye", "nose", "left_cheek", "right_cheek")}
    target = pose_fit_target(message, Visibility(regions={**regions, "lips": 0.0}))
    weights = ibug68_weights(target.visibility)
    assert np.all(weights[48:68] == 0.0)  # the mouth
    assert np.all(weights[36:48] == 1.0) and np.all(weights[27:36] == 1.0)  # eyes and nose still seen
    assert pose_fit_target(message, None).visibility is None
