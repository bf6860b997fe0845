"""FLAME's dynamic contour embedding and the optional MediaPipe dense embedding in the posed-face fit.

Known answers on the synthetic official-format FLAME ("small"): a face turned by ±25° of yaw is projected
through the embedding the real files define (51 static points + the contour row of its yaw; the 105
MediaPipe points), with 0.3 px noise. The synthetic contour moves ~20 mm across the face between 0° and
25°, like a silhouette, so a fit that ignores the yaw (the fixed 68-point embedding) is biased.
"""

from __future__ import annotations

import math
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from facefuse.assets.flame_file import (
    load_mediapipe_embedding,
    mediapipe_embedding_from_dict,
    validate_mediapipe_embedding,
)
from facefuse.assets.registry import check_asset, spec
from facefuse.assets.synthetic import synthesize
from facefuse.assets.synthetic.flame import FLAME_SIZES, mediapipe_embedding_dict, synthetic_flame_data
from facefuse.client import cli
from facefuse.errors import AssetError
from facefuse.face.landmarks68 import IBUG68_FROM_FACEMESH
from facefuse.models.camera import (
    axis_angle_to_rotation,
    flame_to_opencv,
    intrinsics,
    project,
    rotation_to_axis_angle,
)
from facefuse.models.fitting import (
    FitSettings,
    IdentityLandmarks,
    LandmarkFlame,
    dynamic_landmark_selector,
    fit_posed_face,
    flame_landmark_bank,
    flame_landmark_model,
    yaw_degrees,
)
from facefuse.models.flame import FlameLayer, dynamic_contour_row
from facefuse.models.focal import DEFAULT_FOCAL_35MM, focal_px_from_35mm
from facefuse.packs.base import PoseFitTarget
from facefuse.packs.posed import FlamePosedFitter

WIDTH, HEIGHT = 1024, 768
NOISE_PX = 0.3
NUM_EXPRESSION = 10
YAW_DEG = 25.0
f64 = torch.float64


@pytest.fixture(scope="module")
def mediapipe_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic MediaPipe embedding in a folder of its own: in the session's shared synthetic assets it
    would change what every flame-pack test fits (its FaceMesh correspondences are random)."""
    directory = tmp_path_factory.mktemp("mediapipe")
    written = synthesize(directory, size="small", seed=0, only={"mediapipe_embedding"})
    return written["FLAME2020/mediapipe_landmark_embedding.npz"]


@pytest.fixture(scope="module")
def flame() -> FlameLayer:
    return FlameLayer(synthetic_flame_data("small", torch.Generator().manual_seed(1))).double()


def _camera(batch: int) -> torch.Tensor:
    return intrinsics(torch.full((batch,), focal_px_from_35mm(DEFAULT_FOCAL_35MM, WIDTH, HEIGHT), dtype=f64),
                      WIDTH, HEIGHT)


def _pose(yaws_deg: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Model -> OpenCV rotations: a yaw about FLAME's y, a little pitch and roll; translations in mm."""
    rotations = []
    for yaw in yaws_deg:
        flame_frame = axis_angle_to_rotation(torch.tensor([[0.0, math.radians(yaw), 0.0]], dtype=f64))
        tilt = axis_angle_to_rotation(torch.tensor([[0.08, 0.0, 0.04]], dtype=f64))
        rotations.append(flame_to_opencv(1, f64) @ tilt @ flame_frame)
    translation = torch.tensor([[15.0, -10.0, 650.0], [-25.0, 10.0, 800.0]], dtype=f64)[: len(yaws_deg)]
    return torch.cat(rotations), translation


def test_contour_row_follows_the_public_code_layout() -> None:
    yaw = torch.tensor([0.0, 0.4, 25.0, 39.4, 50.0, -0.6, -1.0, -25.0, -39.0, -60.0], dtype=f64)
    assert dynamic_contour_row(yaw).tolist() == [0, 0, 25, 39, 39, 40, 40, 64, 78, 78]


def test_yaw_sign_matches_flame_and_the_image() -> None:
    # A face turned by +θ about FLAME's y (its global pose (0, θ, 0)) has yaw +θ and its nose moves to image right.
    rotation, _ = _pose([YAW_DEG])
    untilted = flame_to_opencv(1, f64) @ axis_angle_to_rotation(torch.tensor([[0.0, math.radians(30.0), 0.0]],
                                                                             dtype=f64))
    assert yaw_degrees(untilted).item() == pytest.approx(30.0, abs=1e-6)
    assert yaw_degrees(rotation).item() == pytest.approx(YAW_DEG, abs=0.5)  # the small tilt barely changes it
    nose = torch.tensor([[[0.0, 0.0, 100.0]]], dtype=f64)  # 10 cm in front of the model origin
    camera = intrinsics(torch.tensor([1000.0], dtype=f64), 501, 501)
    u = project(nose @ untilted.transpose(1, 2) + torch.tensor([[[0.0, 0.0, 600.0]]], dtype=f64), camera)[0, 0, 0]
    assert u.item() > 250.0 + 50.0


def _dynamic_case(flame: FlameLayer, mediapipe: tuple[torch.Tensor, torch.Tensor] | None = None,
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """Two faces at yaw +25° and -25°: their landmarks through the contour row of their true yaw."""
    g = torch.Generator().manual_seed(seed)
    shape = torch.randn(2, 300, generator=g, dtype=f64) * 0.3
    expression = torch.randn(2, NUM_EXPRESSION, generator=g, dtype=f64) * 0.5
    jaw = torch.tensor([[0.1, 0.0, 0.0], [0.05, 0.01, 0.0]], dtype=f64)
    rotation, translation = _pose([YAW_DEG, -YAW_DEG])
    faces, bary = flame_landmark_bank(flame, *(mediapipe or (None, None)))
    bank = LandmarkFlame(flame, faces, bary)
    num_dense = 0 if mediapipe is None else mediapipe[0].shape[0]
    select = dynamic_landmark_selector(num_dense=num_dense)
    index = select(rotation)
    points = torch.gather(bank(shape, expression, jaw) * 1000.0, 1, index[..., None].expand(-1, -1, 3))
    clean = project(points @ rotation.transpose(1, 2) + translation[:, None], _camera(2))
    noisy = clean + torch.randn(clean.shape, generator=g, dtype=f64) * NOISE_PX
    return dict(shape=shape, expression=expression, jaw=jaw, rotation=rotation, translation=translation,
                clean=clean, noisy=noisy, bank=bank, index=index, num_dense=torch.tensor(num_dense))


def _angle_deg(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return np.degrees(rotation_to_axis_angle(a @ b.transpose(1, 2)).norm(dim=-1).numpy())


def test_the_synthetic_contour_moves_with_yaw(flame: FlameLayer) -> None:
    case = _dynamic_case(flame)
    assert case["index"][0, 0].item() == 51 + 25 * 17 and case["index"][1, 0].item() == 51 + 64 * 17
    frontal = case["bank"](case["shape"], case["expression"], case["jaw"])[:, 51:51 + 17] * 1000.0
    turned = torch.gather(case["bank"](case["shape"], case["expression"], case["jaw"]) * 1000.0, 1,
                          case["index"][:, :17, None].expand(-1, -1, 3))
    moved = (turned - frontal).norm(dim=-1).mean(dim=1)
    assert (moved > 10.0).all(), moved  # mm: the table differs between 0° and ±25°


def test_identity_landmarks_equal_the_landmark_layer(flame: FlameLayer) -> None:
    """The fit's model for a fixed identity (identity part once, K expression components, jaw-only skinning,
    only the selected points) gives the landmark layer's points in mm, to float rounding; so does the general
    skinning it falls back to for another kinematic chain."""
    case = _dynamic_case(flame)
    bank, shape, expression, jaw = case["bank"], case["shape"], case["expression"], case["jaw"] * 3.0
    exact = bank(shape, expression, jaw) * 1000.0
    model = flame_landmark_model(bank, shape)
    assert isinstance(model, IdentityLandmarks) and model.jaw_only
    torch.testing.assert_close(model(expression, jaw), exact, rtol=0, atol=1e-6)
    points = torch.tensor([3, 70, 51 + 25 * 17, 51 + 64 * 17 + 16])
    torch.testing.assert_close(model.restricted(points)(expression, jaw), exact[:, points], rtol=0, atol=1e-6)
    model.jaw_only = False  # the general chain (posed_landmarks) gives the same
    torch.testing.assert_close(model(expression, jaw), exact, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="components"):
        model(torch.zeros(2, 500, dtype=f64), jaw)


def test_fit_with_restricted_points_matches_the_fit_over_the_whole_bank(flame: FlameLayer) -> None:
    """Evaluating only the selected contour points changes float rounding, not the fit."""
    case = _dynamic_case(flame)
    model = flame_landmark_model(case["bank"], case["shape"])

    def whole_bank(expression: torch.Tensor, jaw: torch.Tensor) -> torch.Tensor:  # no ``restricted``
        return model(expression, jaw)

    settings = FitSettings(rigid_steps=30, full_steps=60, reselect_every=20)
    weights = torch.ones(2, 68, dtype=f64)
    quick = fit_posed_face(model, NUM_EXPRESSION, case["noisy"], weights, _camera(2),
                           select=dynamic_landmark_selector(), settings=settings)
    full = fit_posed_face(whole_bank, NUM_EXPRESSION, case["noisy"], weights, _camera(2),
                          select=dynamic_landmark_selector(), settings=settings)
    torch.testing.assert_close(quick.translation, full.translation, rtol=0, atol=1e-6)
    torch.testing.assert_close(quick.rotation, full.rotation, rtol=0, atol=1e-9)
    torch.testing.assert_close(quick.expression, full.expression, rtol=0, atol=1e-7)
    torch.testing.assert_close(quick.landmarks_px, full.landmarks_px, rtol=0, atol=1e-6)


def test_dynamic_contour_recovers_the_pose_a_static_contour_misses(flame: FlameLayer) -> None:
    case = _dynamic_case(flame)
    weights = torch.ones(2, 68, dtype=f64)
    dynamic = fit_posed_face(flame_landmark_model(case["bank"], case["shape"]), NUM_EXPRESSION, case["noisy"],
                             weights, _camera(2), select=dynamic_landmark_selector())
    static_flame = LandmarkFlame(flame, flame.full_lmk_faces_idx[0], flame.full_lmk_bary_coords[0])
    static = fit_posed_face(flame_landmark_model(static_flame, case["shape"]), NUM_EXPRESSION, case["noisy"],
                            weights, _camera(2))
    dynamic_error = _angle_deg(dynamic.rotation, case["rotation"])
    static_error = _angle_deg(static.rotation, case["rotation"])
    # Measured (seed 0): dynamic 0.83° / 1.01°, 1.09 / 0.42 px; static 4.3° / 5.7°, 7.5 / 4.7 px.
    # The table has one row per degree and its contour jumps ~1.4 px per row here, so a fit can settle one
    # row off (yaw 25.6° on row 26 instead of 24.8° on row 25: both self-consistent): tolerance 1.5°.
    assert (dynamic_error < 1.5).all(), dynamic_error
    assert (dynamic.reprojection_error_px < 1.5).all(), dynamic.reprojection_error_px
    assert (yaw_degrees(dynamic.rotation) - yaw_degrees(case["rotation"])).abs().max() < 1.5
    assert (static_error > 3.0).all() and (static_error > 3.0 * dynamic_error).all(), (static_error, dynamic_error)
    assert (static.reprojection_error_px > 3.0 * dynamic.reprojection_error_px).all()
    depth_error = (dynamic.translation[:, 2] - case["translation"][:, 2]).abs() / case["translation"][:, 2]
    assert (depth_error < 0.01).all(), depth_error


# ------------------------------------------------------------------ MediaPipe embedding


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    with path.open("wb") as handle:
        np.savez(handle, **arrays)
    return path


def test_mediapipe_embedding_reads_and_refuses_bad_files(mediapipe_path: Path, tmp_path: Path) -> None:
    path = mediapipe_path
    embedding = load_mediapipe_embedding(path, num_faces=FLAME_SIZES["small"].num_faces)
    assert embedding.lmk_face_idx.shape == (105,) and embedding.lmk_b_coords.shape == (105, 3)
    assert len(set(embedding.landmark_indices.tolist())) == 105 and embedding.landmark_indices.max() < 468
    assert "105 FaceMesh points" in validate_mediapipe_embedding(path)
    good = mediapipe_embedding_dict("small", torch.Generator().manual_seed(0))

    def bad(**changes: np.ndarray | None) -> dict[str, np.ndarray]:
        arrays = {**good, **changes}
        return {k: v for k, v in arrays.items() if v is not None}

    cases = {
        "missing key": (bad(landmark_indices=None), "missing key"),
        "short": (bad(lmk_face_idx=good["lmk_face_idx"][:100]), "lmk_face_idx has shape (100,)"),
        "bary shape": (bad(lmk_b_coords=good["lmk_b_coords"][:, :2]), "lmk_b_coords has shape"),
        "float faces": (bad(lmk_face_idx=good["lmk_face_idx"].astype(np.float64)), "expected integers"),
        "face range": (bad(lmk_face_idx=good["lmk_face_idx"] + 10**6), "outside [0, "),
        "facemesh range": (bad(landmark_indices=good["landmark_indices"] + 468), "FaceMesh indices outside"),
        "duplicate": (bad(landmark_indices=np.zeros(105, np.int64)), "twice"),
        "nan": (bad(lmk_b_coords=np.full((105, 3), np.nan)), "finite"),
    }
    for name, (arrays, message) in cases.items():
        with pytest.raises(AssetError, match=re.escape(message)):
            load_mediapipe_embedding(_write_npz(tmp_path / f"{name}.npz", arrays), num_faces=3976)
        with pytest.raises(AssetError, match=re.escape(message)):
            mediapipe_embedding_from_dict(arrays, source=name, num_faces=3976)
    (tmp_path / "garbage.npz").write_bytes(b"not a zip at all" * 10)
    np.save(tmp_path / "single.npy", np.zeros(3))
    with zipfile.ZipFile(tmp_path / "pickled.npz", "w") as archive:
        import io

        member = io.BytesIO()
        np.lib.format.write_array(member, np.array([{"x": 1}], dtype=object), allow_pickle=True)
        for key in good:
            archive.writestr(f"{key}.npy", member.getvalue())
    for name in ("garbage.npz", "single.npy", "pickled.npz"):
        with pytest.raises(AssetError, match="not a FLAME MediaPipe landmark embedding"):
            load_mediapipe_embedding(tmp_path / name)


def test_assets_check_lists_the_mediapipe_embedding_as_optional(mediapipe_path: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert spec("mediapipe_embedding").optional and not spec("landmark_embedding").optional
    status = check_asset(mediapipe_path.parents[1], spec("mediapipe_embedding"))
    assert status.found and status.valid and status.synthetic, status.message
    # Written only when asked for: by name (above) or with include_optional (`--with-optional`).
    from facefuse.assets.synthetic import _selected  # what synthesize(only=None) writes, without writing it

    assert "FLAME2020/mediapipe_landmark_embedding.npz" not in _selected(None)
    assert "FLAME2020/landmark_embedding.npy" in _selected(None)
    assert "FLAME2020/mediapipe_landmark_embedding.npz" in _selected(None, include_optional=True)
    assert cli.main(["assets", "check", "--dir", str(tmp_path)]) == 0  # missing: fine, it is optional
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("FLAME2020/mediapipe_landmark_embedding.npz"))
    assert "missing (optional)" in line
    bad = tmp_path / "FLAME2020" / "mediapipe_landmark_embedding.npz"
    bad.parent.mkdir()
    _write_npz(bad, {"lmk_face_idx": np.zeros(3, np.int64)})
    assert cli.main(["assets", "check", "--dir", str(tmp_path)]) == 1  # present but invalid: an error
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("FLAME2020/mediapipe"))
    assert "INVALID (optional)" in line and "missing key" in line


def test_flame_fitter_uses_the_mediapipe_points(flame: FlameLayer, mediapipe_path: Path) -> None:
    data = synthetic_flame_data("small", torch.Generator().manual_seed(1))
    mediapipe = load_mediapipe_embedding(mediapipe_path, num_faces=FLAME_SIZES["small"].num_faces)
    dense = (torch.from_numpy(mediapipe.lmk_face_idx), torch.from_numpy(mediapipe.lmk_b_coords).double())
    case = _dynamic_case(flame, mediapipe=dense, seed=2)
    # The 468 FaceMesh points a detector would give: iBUG 68 and the 105 dense ones where they are; a point
    # named by both sets is marked unseen (the synthetic embeddings put it at two different places).
    facemesh = np.random.default_rng(0).uniform(0, 700, size=(2, 468, 3))
    visibility = np.ones((2, 468))
    ibug, indices = np.array(IBUG68_FROM_FACEMESH), mediapipe.landmark_indices
    facemesh[:, indices, :2] = case["noisy"][:, 68:].numpy()
    facemesh[:, ibug, :2] = case["noisy"][:, :68].numpy()
    visibility[:, np.intersect1d(ibug, indices)] = 0.0
    fitter = FlamePosedFitter(data, num_expression=NUM_EXPRESSION, mediapipe=mediapipe)
    plain = FlamePosedFitter(data, num_expression=NUM_EXPRESSION)
    for face in range(2):
        target = PoseFitTarget(facemesh[face], visibility[face], WIDTH, HEIGHT,
                               float(_camera(1)[0, 0, 0]), "default")
        result = fitter(case["shape"][face].numpy(), target)
        assert result is not None and result.landmarks_px.shape == (68 + 105, 2)
        seen = visibility[face, indices] > 0
        dense_error = np.linalg.norm(result.landmarks_px[68:] - case["clean"][face, 68:].numpy(), axis=1)[seen]
        assert dense_error.mean() < 0.5, dense_error.mean()  # px, over the 105 (seen) dense points
        assert result.reprojection_error_px < 0.6, result.reprojection_error_px
        truth = case["rotation"][face:face + 1]
        fitted = axis_angle_to_rotation(torch.from_numpy(result.global_pose).double()[None])
        assert _angle_deg(fitted, truth)[0] < 1.0
        without = plain(case["shape"][face].numpy(), target)
        assert without is not None and without.landmarks_px.shape == (68, 2)


def test_flame_fusion_setup_takes_the_optional_file_when_present(tmp_path: Path) -> None:
    from facefuse.packs.loading import load_fusion_setup

    directory = tmp_path / "assets"
    synthesize(directory, size="small", seed=0, only={"flame2020", "landmark_embedding"})
    without = load_fusion_setup("flame", directory)
    assert without.status.ready and "MediaPipe" not in without.status.details["posed_fit"]
    synthesize(directory, size="small", seed=0, only={"mediapipe_embedding"})
    with_dense = load_fusion_setup("flame", directory)
    assert with_dense.status.ready, with_dense.status.message
    assert "dynamic contour" in with_dense.status.details["posed_fit"]
    assert "105 MediaPipe points" in with_dense.status.details["posed_fit"]
    # A malformed optional file is reported, not silently ignored.
    _write_npz(directory / "FLAME2020" / "mediapipe_landmark_embedding.npz", {"lmk_face_idx": np.zeros(105, np.int64)})
    broken = load_fusion_setup("flame", directory)
    assert not broken.status.ready and "missing key" in broken.status.message, broken.status.message
