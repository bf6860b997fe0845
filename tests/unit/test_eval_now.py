"""NoW protocol pieces with known answers: Procrustes, crop, alignment + refinement, the runner."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh
from scipy.optimize import least_squares

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from facefuse.errors import AssetError, InvalidInputError
from facefuse.eval.now import (
    NowEvalConfig,
    NowLayout,
    align_and_measure,
    crop_scan,
    read_pp_landmarks,
    read_prediction_landmarks,
    run_now_evaluation,
)
from facefuse.eval.procrustes import similarity_procrustes

from eval_fixtures import apply, head_mesh, make_now_dataset, mesh_landmarks, random_similarity

# ------------------------------------------------------------------------------------------------
# Procrustes


def test_procrustes_recovers_a_similarity_exactly() -> None:
    rng = np.random.default_rng(0)
    src = rng.normal(size=(7, 3)) * 30
    s, rot, t = random_similarity(rng)
    fit = similarity_procrustes(src, apply(src, s, rot, t))
    assert fit.transform.scale == pytest.approx(s, rel=1e-10)
    np.testing.assert_allclose(fit.transform.rotation, rot, atol=1e-10)
    np.testing.assert_allclose(fit.transform.translation, t, atol=1e-8)
    assert fit.rms < 1e-8


def test_procrustes_reflection_semantics() -> None:
    rng = np.random.default_rng(1)
    src = rng.normal(size=(7, 3))
    mirrored = src * np.array([-1.0, 1.0, 1.0])
    best = similarity_procrustes(src, mirrored, reflection="best")
    assert np.linalg.det(best.transform.rotation) == pytest.approx(-1.0)
    assert best.rms < 1e-10  # a reflection fits a mirror image exactly
    proper = similarity_procrustes(src, mirrored, reflection=False)
    assert np.linalg.det(proper.transform.rotation) == pytest.approx(1.0)
    assert proper.rms > 0.1
    forced = similarity_procrustes(src, src, reflection=True)
    assert np.linalg.det(forced.transform.rotation) == pytest.approx(-1.0)


def test_procrustes_fixed_scale_keeps_rotation_and_centres() -> None:
    rng = np.random.default_rng(2)
    src = rng.normal(size=(7, 3)) * 10
    s, rot, t = random_similarity(rng, scale=2.5)
    dst = apply(src, s, rot, t)
    fit = similarity_procrustes(src, dst, scale=1.0).transform
    assert fit.scale == 1.0
    np.testing.assert_allclose(fit.rotation, rot, atol=1e-10)
    # With the scale fixed, the optimal translation maps the source centroid onto the target's.
    np.testing.assert_allclose(fit.apply(src).mean(axis=0), dst.mean(axis=0), atol=1e-9)


# ------------------------------------------------------------------------------------------------
# Files


PP_TEXT = """<!DOCTYPE PickedPoints>
<PickedPoints>
 <DocumentData>
  <DateTime time="16:00:00" date="2019-01-01"/>
  <User name="annotator"/>
  <DataFileName name="natural_head_rotation.000001.obj"/>
  <templateName name=""/>
 </DocumentData>
{points}</PickedPoints>
"""


def test_read_pp_in_meshlab_format(tmp_path: Path) -> None:
    pts = np.arange(21, dtype=float).reshape(7, 3) * 1.5 - 4
    body = "".join(f' <point x="{x}" y="{y}" z="{z}" active="1" name="{i}"/>\n' for i, (x, y, z) in enumerate(pts))
    path = tmp_path / "a_picked_points.pp"
    path.write_text(PP_TEXT.format(points=body))
    np.testing.assert_array_equal(read_pp_landmarks(path), pts)
    path.write_text(PP_TEXT.format(points=body.split("\n", 1)[1]))
    with pytest.raises(InvalidInputError, match="expected 7 picked points"):
        read_pp_landmarks(path)


def test_read_prediction_landmarks(tmp_path: Path) -> None:
    pts = np.random.default_rng(3).normal(size=(7, 3))
    np.save(tmp_path / "a.npy", pts)
    np.savetxt(tmp_path / "b.txt", pts)
    np.testing.assert_array_equal(read_prediction_landmarks(tmp_path / "a.npy"), pts)
    np.testing.assert_allclose(read_prediction_landmarks(tmp_path / "b.txt"), pts, rtol=1e-12)
    np.save(tmp_path / "c.npy", pts[:5])
    with pytest.raises(InvalidInputError, match="7x3"):
        read_prediction_landmarks(tmp_path / "c.npy")


# ------------------------------------------------------------------------------------------------
# Crop


def test_crop_keeps_exactly_the_vertices_inside_the_protocol_radius() -> None:
    rng = np.random.default_rng(4)
    lmk = rng.normal(size=(7, 3)) * 30
    # The protocol, written out: centre 30% of the way from nose bottom to the inner-eye midpoint,
    # radius 1.4 * (outer-eye distance + nose length) / 2.
    bridge = (lmk[1] + lmk[2]) / 2
    centre = lmk[4] + 0.3 * (bridge - lmk[4])
    radius = 1.4 * (np.linalg.norm(lmk[0] - lmk[3]) + np.linalg.norm(bridge - lmk[4])) / 2
    dirs = rng.normal(size=(400, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    factors = np.concatenate(
        [rng.uniform(0, 0.999, 150), rng.uniform(1.001, 3, 150), 1 - 1e-9 * np.ones(50), 1 + 1e-9 * np.ones(50)]
    )
    pts = centre + dirs * (factors * radius)[:, None]
    kept = crop_scan(pts, lmk)
    np.testing.assert_array_equal(kept, np.nonzero(factors < 1)[0])


# ------------------------------------------------------------------------------------------------
# Alignment with known answers


@pytest.fixture(scope="module")
def head_case() -> dict:
    head = head_mesh(4)
    lmk = mesh_landmarks(head)
    sv, _sf = trimesh.remesh.subdivide(head.vertices, head.faces)
    return {"head": head, "lmk": lmk, "scan": np.asarray(sv)}


def test_non_metrical_scan_of_the_same_surface_in_any_pose_gives_zero(head_case: dict) -> None:
    rng = np.random.default_rng(5)
    s, rot, t = random_similarity(rng)
    scan = apply(head_case["scan"], s, rot, t)
    scan_lmk = apply(head_case["lmk"], s, rot, t)
    ps, prot, pt = random_similarity(rng, scale=0.001)  # prediction in metres, any pose
    pred = apply(head_case["head"].vertices, ps, prot, pt)
    noisy = apply(head_case["lmk"] + rng.normal(0, 4.0, (7, 3)), ps, prot, pt)  # landmarks off by ~4 mm
    points = scan[crop_scan(scan, scan_lmk)]
    res = align_and_measure(points, scan_lmk, pred, head_case["head"].faces, noisy)
    assert res.landmark_rms > 1.0  # Procrustes alone is off ...
    assert np.max(res.errors) < 1e-5  # ... the surface refinement makes it exact
    assert res.transform.scale == pytest.approx(s / ps, rel=1e-6)
    assert res.converged


def _sphere_case(rng: np.random.Generator, radius: float, pred_radius: float, subdivisions: int = 5):
    """A spherical cap 'scan' (exact points on the sphere) and an icosphere prediction in any pose."""
    dirs = trimesh.creation.icosphere(subdivisions=5).vertices
    cap = dirs[dirs[:, 2] > 0.2]
    scan = cap * radius
    lmk_dirs = np.array(
        [[-0.5, 0.3, 0], [-0.15, 0.3, 0], [0.15, 0.3, 0], [0.5, 0.3, 0], [0, -0.1, 0], [-0.3, -0.4, 0], [0.3, -0.4, 0]]
    )
    lmk_dirs[:, 2] = np.sqrt(1 - np.sum(lmk_dirs[:, :2] ** 2, axis=1))
    sphere = trimesh.creation.icosphere(subdivisions=subdivisions, radius=pred_radius)
    ps, prot, pt = random_similarity(rng, scale=1.0)
    return (
        scan,
        lmk_dirs * radius,
        apply(sphere.vertices, ps, prot, pt),
        sphere.faces,
        apply(lmk_dirs * pred_radius, ps, prot, pt),
    )


def test_metrical_wrong_scale_gives_the_expected_error() -> None:
    rng = np.random.default_rng(6)
    radius, pred_radius = 80.0, 88.0  # 10% too large
    scan, lmk, pred_v, pred_f, pred_lmk = _sphere_case(rng, radius, pred_radius)
    res = align_and_measure(scan, lmk, pred_v, pred_f, pred_lmk, metrical=True, unit="mm")
    assert res.transform.scale == 1.0
    # Independent answer: the best rigid placement of a sphere of radius 88 against the cap is a
    # translation of its centre; solve that on the analytic sphere distance.
    fit = least_squares(lambda c: np.linalg.norm(scan - c, axis=1) - pred_radius, x0=np.zeros(3))
    expected = np.abs(np.linalg.norm(scan - fit.x, axis=1) - pred_radius)
    assert np.median(expected) > 1.0
    # The icosphere's facets lie up to ~0.03 mm inside the analytic sphere.
    assert np.median(res.errors) == pytest.approx(np.median(expected), abs=0.05)
    assert np.mean(res.errors) == pytest.approx(np.mean(expected), abs=0.05)
    # The non-metrical variant forgives the scale.
    free = align_and_measure(scan, lmk, pred_v, pred_f, pred_lmk, metrical=False)
    assert np.median(free.errors) < 0.05
    assert free.transform.scale == pytest.approx(radius / pred_radius, rel=1e-3)


@pytest.mark.parametrize("unit,factor", [("cm", 0.1), ("m", 0.001)])
def test_metrical_unit_factor(unit: str, factor: float) -> None:
    rng = np.random.default_rng(7)
    scan, lmk, pred_v, pred_f, pred_lmk = _sphere_case(rng, 80.0, 80.0 * factor)
    res = align_and_measure(scan, lmk, pred_v, pred_f, pred_lmk, metrical=True, unit=unit)
    assert res.transform.scale == pytest.approx(1.0 / factor)
    assert np.median(res.errors) < 0.05


def test_mesh_displaced_along_normals_has_median_error_d() -> None:
    rng = np.random.default_rng(8)
    radii = np.array([70.0, 90.0, 80.0])
    d = 1.5
    coarse = trimesh.creation.icosphere(subdivisions=5)
    ellipsoid = trimesh.Trimesh(coarse.vertices * radii, coarse.faces, process=False)
    displaced = ellipsoid.vertices + d * ellipsoid.vertex_normals
    # The scan: points exactly on the analytic ellipsoid, all of it (a closed surface, no crop).
    scan = trimesh.creation.icosphere(subdivisions=5).vertices * radii
    lmk = mesh_landmarks(ellipsoid)
    s, rot, t = random_similarity(rng, scale=1.0)
    res = align_and_measure(
        scan, lmk, apply(displaced, s, rot, t), ellipsoid.faces, apply(lmk, s, rot, t), metrical=True, unit="mm"
    )
    assert np.median(res.errors) == pytest.approx(d, abs=0.05)
    assert np.percentile(res.errors, 95) == pytest.approx(d, abs=0.1)


def test_bad_unit_and_empty_crop_are_user_errors(head_case: dict) -> None:
    head = head_case["head"]
    with pytest.raises(InvalidInputError, match="unit"):
        align_and_measure(
            head.vertices, head_case["lmk"], head.vertices, head.faces, head_case["lmk"], metrical=True, unit="inch"
        )
    with pytest.raises(InvalidInputError, match="no points"):
        align_and_measure(np.zeros((0, 3)), head_case["lmk"], head.vertices, head.faces, head_case["lmk"])


# ------------------------------------------------------------------------------------------------
# Layout and runner


@pytest.fixture(scope="module")
def fixture_dataset(tmp_path_factory: pytest.TempPathFactory):
    return make_now_dataset(tmp_path_factory.mktemp("now"), n_subjects=2, missing=1)


def test_layout_discovery_accepts_both_arrangements(tmp_path: Path, fixture_dataset) -> None:
    layout = NowLayout.discover(fixture_dataset.root, "val")
    assert layout.image_list.name == "imagepathsvalidation.txt"
    items = layout.images()
    assert [i.key for i in items] == fixture_dataset.images
    assert {i.challenge for i in layout.images("selfie")} == {"selfie"}
    flat = make_now_dataset(tmp_path, n_subjects=1, missing=0, layout="flat")
    flat_layout = NowLayout.discover(flat.root, "val")
    assert flat_layout.scans == flat.root / "scans"
    with pytest.raises(AssetError, match=r"imagepathstest\.txt"):
        NowLayout.discover(flat.root, "test")
    with pytest.raises(InvalidInputError, match="does not exist"):
        NowLayout.discover(tmp_path / "nowhere", "val")


def _read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_runner_reports_missing_failed_and_aggregates(tmp_path: Path, fixture_dataset) -> None:
    fx = fixture_dataset
    # Make one prediction 5% too large (a real error in the metrical variant) and corrupt another.
    subject, challenge, name = fx.images[0].split("/")
    big = fx.predictions / subject / challenge / name.replace(".jpg", ".obj")
    mesh = trimesh.load(big, process=False)
    trimesh.Trimesh(mesh.vertices * 1.05, mesh.faces, process=False).export(big)
    subject, challenge, name = fx.images[1].split("/")
    (fx.predictions / subject / challenge / name.replace(".jpg", ".obj")).write_text("v 1 2\nf 1 2 x\n")

    out = tmp_path / "out"
    summary = run_now_evaluation(
        NowEvalConfig(fx.root, fx.predictions, out, metrical=True, unit="mm", workers=1, progress=False)
    )
    rows = _read_csv(out / "now_per_image.csv")
    assert (out / "now_cumulative_error.png").stat().st_size > 1000
    assert json.loads((out / "now_summary.json").read_text()) == {k: v for k, v in summary.items() if k != "files"} | {
        "files": {"per_image_csv": "now_per_image.csv", "cumulative_error_png": "now_cumulative_error.png"}
    }
    status = {f"{r['subject']}/{r['challenge']}/{r['image']}": r["status"] for r in rows}
    assert status[fx.missing[0]] == "missing"
    assert status[fx.images[1]] == "failed"
    assert summary["n_missing"] == 1 and summary["n_failed"] == 1 and summary["complete"] is False
    assert summary["n_images_evaluated"] == len(fx.images) - 2
    assert any(fx.missing[0] in m for m in summary["missing"])
    ok = [r for r in rows if r["status"] == "ok"]
    # Aggregation, recomputed from the per-image rows: the pooled mean weights images by point count.
    n = np.array([int(r["n_points"]) for r in ok])
    means = np.array([float(r["mean_mm"]) for r in ok])
    assert summary["overall"]["n_points"] == n.sum()
    assert summary["overall"]["mean_mm"] == pytest.approx(float((n * means).sum() / n.sum()), rel=1e-5)
    scaled = next(r for r in ok if f"{r['subject']}/{r['challenge']}/{r['image']}" == fx.images[0])
    assert float(scaled["mean_mm"]) > 0.3
    assert all(float(r["median_mm"]) < 1e-3 for r in ok if r is not scaled)
    assert set(summary["per_challenge"]) == {"neutral", "expression", "occlusion", "selfie"}


def test_runner_single_challenge_and_nothing_to_evaluate(tmp_path: Path, fixture_dataset) -> None:
    fx = fixture_dataset
    summary = run_now_evaluation(
        NowEvalConfig(fx.root, fx.predictions, tmp_path / "o", challenge="neutral", workers=1, progress=False)
    )
    assert set(summary["per_challenge"]) == {"neutral"}
    assert summary["n_images_listed"] == sum("/multiview_neutral/" in i for i in fx.images)
    empty = tmp_path / "empty_preds"
    empty.mkdir()
    with pytest.raises(InvalidInputError, match="no image could be evaluated"):
        run_now_evaluation(NowEvalConfig(fx.root, empty, tmp_path / "o2", workers=1, progress=False))
