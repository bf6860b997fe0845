"""The open pack on a real photograph: metric FaceMesh mesh, GP completions, the open shape space.

skimage's astronaut (public domain) through the open front end (BlazeFace + FaceMesh + iris from the
model store). The occlusion test draws a flat patch over the mouth and marks the landmarks under it
as not visible.
"""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data

from facefuse.errors import InvalidInputError
from facefuse.face.types import Detection
from facefuse.fusion.strategies import FusionInputs, fuse
from facefuse.fusion.visibility import Visibility
from facefuse.geometry import umeyama
from facefuse.packs.base import ShapeResult
from facefuse.packs.open import (
    KPT7_INDICES,
    load_open_generative_backend,
    load_open_shape_backend,
    open_shape_space,
    vertex_visibility_from_mask,
)

PATCH_MARGIN_PX = 4
PATCH_COLOUR = (90, 90, 100)


def _face(front_end, image):
    (det,) = front_end.detect(image)
    det.iris = front_end.estimate_iris(image, det.landmarks).as_detection_iris()
    return front_end.align(image, det)


@pytest.fixture(scope="module")
def astronaut_face(front_end):
    return _face(front_end, skimage.data.astronaut())


@pytest.fixture(scope="module")
def shape_backend(store):
    return load_open_shape_backend("cpu", store)


@pytest.fixture(scope="module")
def generative_backend(store):
    return load_open_generative_backend("cpu", store)


@pytest.fixture(scope="module")
def gp_only_backend(store):
    return load_open_generative_backend("cpu", store, imputation=False)


@pytest.fixture(scope="module")
def space(store):
    return open_shape_space(store)


@pytest.fixture(scope="module")
def reference(shape_backend, astronaut_face) -> ShapeResult:
    (result,) = shape_backend.predict([astronaut_face])
    return result


def _mirror_asymmetry(vertices, mirror):
    return float(np.linalg.norm(vertices - vertices[mirror] * [-1, 1, 1], axis=1).mean())


def test_metric_scale_pose_and_outputs(shape_backend, astronaut_face, reference, space):
    iris = astronaut_face.detection.iris
    metric = shape_backend.reconstruct(astronaut_face)
    assert metric.scale_source == "iris"
    assert metric.iris is not None and metric.mm_per_px == pytest.approx(metric.iris.mm_per_px, rel=1e-9)
    # A nearly frontal face: the head-rotation correction is under 1 %.
    assert metric.mm_per_px == pytest.approx(11.7 / iris[:, 2].mean(), rel=0.01)
    v = reference.vertices_mm.astype(np.float64)
    assert reference.vertices_mm.shape == (468, 3) and reference.faces.shape == (898, 3)
    assert reference.faces.dtype == np.int32 and reference.topology == "mediapipe468"
    outer = np.linalg.norm(v[33] - v[263])
    assert 80.0 <= outer <= 110.0, outer  # adult outer canthal width is about 85-100 mm
    # Pose removed: mirrored vertices (canonical mirror map) land on each other. A residual 5 degree yaw
    # would already break the tolerance (checked below), so the tolerance is a real test of the pose fit.
    from facefuse.models.gpmm import mirror_map

    mirror = mirror_map(space.template_mm.astype(np.float64))
    asym = _mirror_asymmetry(v, mirror)
    assert asym < 2.0, asym
    yaw = np.deg2rad(5.0)
    rot = np.array([[np.cos(yaw), 0, np.sin(yaw)], [0, 1, 0], [-np.sin(yaw), 0, np.cos(yaw)]])
    centre = v.mean(0)
    assert _mirror_asymmetry((v - centre) @ rot.T + centre, mirror) > 2.0
    # kpt7: fixed FaceMesh vertices in NoW order (eye corners left to right in the image, nose, mouth corners).
    np.testing.assert_array_equal(reference.kpt7_mm, reference.vertices_mm[list(KPT7_INDICES)])
    k = reference.kpt7_mm
    assert k[0, 0] < k[1, 0] < k[2, 0] < k[3, 0] and k[5, 0] < k[6, 0]
    assert k[5, 1] < k[4, 1] < k[0, 1]  # mouth below the nose below the eyes (y up)
    # shape = displacement from the canonical face in mm, exactly representable in the open space.
    assert reference.shape.shape == (1404,)
    np.testing.assert_allclose(space.template_mm + reference.shape.reshape(468, 3), v, atol=1e-3)
    np.testing.assert_allclose(space.vertices_mm(reference.shape), v, atol=1e-3)
    np.testing.assert_allclose(space.project_mm(v), reference.shape, atol=1e-2)
    assert reference.uvs.shape == (468, 2)


def test_fallback_scale_without_iris(shape_backend, astronaut_face, space):
    det = astronaut_face.detection
    bare = Detection(det.box, det.score, det.kps5, det.landmarks, det.detector)
    metric = shape_backend.reconstruct(bare)
    assert metric.scale_source == "default"
    canon = space.template_mm.astype(np.float64)
    ratio = np.linalg.norm(metric.vertices_mm[33] - metric.vertices_mm[263]) / np.linalg.norm(canon[33] - canon[263])
    assert 0.9 < ratio < 1.1  # mean adult size
    # An implausible iris reading (a quarter of the face's scale) falls back too.
    odd = Detection(det.box, det.score, det.kps5, det.landmarks, det.detector, iris=det.iris * [1, 1, 4])
    assert shape_backend.reconstruct(odd).scale_source == "default"


def test_refuses_faces_without_facemesh_points(shape_backend, astronaut_face):
    det = astronaut_face.detection
    scrfd = Detection(det.box, det.score, det.kps5, None, "scrfd")
    face = type(astronaut_face)(scrfd, astronaut_face.crop112, astronaut_face.crop224, astronaut_face.crop_box224,
                                astronaut_face.arcface_blob)
    with pytest.raises(InvalidInputError, match="468 FaceMesh landmarks"):
        shape_backend.predict([face])


def test_regions_follow_the_subjects_sides(space):
    t = space.template_mm
    for name in ("nose", "lips", "forehead", "left_eye_region", "right_eye_region", "eye_region", "face",
                 "left_cheek", "right_cheek"):
        assert space.regions[name].size > 0, name
    assert {13, 14, 61, 291} <= set(space.regions["lips"].tolist())
    assert 1 in space.regions["nose"] and 10 in space.regions["forehead"]
    assert 263 in space.regions["left_eye_region"] and 33 in space.regions["right_eye_region"]
    assert t[space.regions["left_eye_region"], 0].mean() > 20 and t[space.regions["right_cheek"], 0].mean() < -20


@pytest.mark.parametrize("imputation", [True, False], ids=["gp+imputation", "gp-only"])
def test_samples_seeded_agree_where_seen_and_spread_where_hidden(imputation, generative_backend, gp_only_backend,
                                                                  astronaut_face, reference):
    backend = generative_backend if imputation else gp_only_backend
    assert (backend.mesh is not None) == imputation
    v = reference.vertices_mm.astype(np.float64)
    hidden = v[:, 1] < v[2, 1]  # everything below the nose is hidden
    visibility = np.where(hidden, 0.0, 1.0)
    kwargs = dict(mode="ignored", steps=0, start_shape=reference.shape, start_t0=0, guide_shape=None,
                  guide_strength=0.0, visibility=visibility)
    a = backend.sample(astronaut_face, 40, seed=11, **kwargs)
    assert a.shape == (40, 1404) and a.dtype == np.float32
    np.testing.assert_array_equal(a, backend.sample(astronaut_face, 40, seed=11, **kwargs))
    assert np.abs(a - backend.sample(astronaut_face, 40, seed=12, **kwargs)).max() > 0.5
    verts = backend.canonical.vertices_mm + a.reshape(40, 468, 3)
    # Seen vertices: within the noise model (1 mm observation noise + the low-rank residual, per coordinate).
    sigma = np.sqrt(backend.noise_mm**2 + backend.gpmm.residual_variance)
    rms_seen = np.sqrt(((verts[:, ~hidden] - v[~hidden]) ** 2).sum(-1).mean())
    assert rms_seen < np.sqrt(3) * sigma * 1.5, (rms_seen, sigma)
    spread = verts.std(axis=0).sum(axis=1)
    # The GP alone knows nothing below the nose: 2.5x the spread. With imputation every draw also sees a
    # FaceMesh completion (imputed noise 1.5 mm vs 1 mm on seen vertices, plus the draws' own scatter);
    # measured ratio about 1.4, so 1.2 leaves room for rounding without letting an equal spread pass.
    ratio = spread[hidden].mean() / spread[~hidden].mean()
    assert ratio > (1.2 if imputation else 2.5), ratio
    if imputation:  # the hidden part follows the imputed completions, not the canonical face
        completions = backend.completions(astronaut_face, v, visibility, 8, np.random.default_rng(0))
        to_completion = np.linalg.norm(verts[:, hidden].mean(0) - completions.mean(0)[hidden], axis=1).mean()
        to_canonical = np.linalg.norm(verts[:, hidden].mean(0) - backend.canonical.vertices_mm[hidden], axis=1).mean()
        assert to_completion < 0.5 * to_canonical, (to_completion, to_canonical)


def test_facemesh_on_the_box_crop_reproduces_the_front_end(generative_backend, astronaut_face):
    """With nothing hidden the imputer's FaceMesh run on the 224 box crop lands where the front end's run
    on the photo did: checks the crop geometry with the real model (the astronaut's face is ~105 px wide)."""
    from facefuse.face.imputation import noise_imputed_landmarks

    (points,) = noise_imputed_landmarks(generative_backend.mesh, astronaut_face, np.zeros(468, bool),
                                        generative_backend.canonical.faces, 1, np.random.default_rng(0))
    gap = np.linalg.norm(points[:, :2] - astronaut_face.detection.landmarks[:, :2], axis=1)
    assert np.median(gap) < 0.5 and gap.max() < 1.5, (np.median(gap), gap.max())  # measured 0.23 / 0.57 px


def test_rank_is_order_independent_and_prefers_the_evidence(generative_backend, astronaut_face, reference):
    samples = generative_backend.sample(astronaut_face, 8, seed=3, start_shape=reference.shape)
    scores = generative_backend.rank(astronaut_face, samples)
    perm = np.random.default_rng(0).permutation(8)
    np.testing.assert_allclose(generative_backend.rank(astronaut_face, samples[perm]), scores[perm], rtol=1e-6)
    # The canonical face (shape 0) ignores the photo: it must score below every posterior sample.
    zero = generative_backend.rank(astronaut_face, np.zeros((1, 1404), np.float32))
    assert zero[0] < scores.min()
    with pytest.raises(InvalidInputError):
        generative_backend.rank(astronaut_face, samples[:, :100])


@pytest.mark.parametrize("colour,max_fused_mm,min_margin_mm", [((90, 90, 100), 5.25, 0.3), ((0, 0, 0), 5.5, 0.1)],
                         ids=["grey", "black"])
def test_mouth_occlusion_completion(colour, max_fused_mm, min_margin_mm, front_end, shape_backend, generative_backend,
                                    space, astronaut_face, reference):
    """Mouth covered by a flat patch: imputed GP completion (hidden) + deterministic (seen), fused by 'region'.

    Errors: mean distance (mm) over the hidden vertices to the unoccluded reconstruction, after a
    similarity fit on the seen vertices (so the global scale change the occluder causes through the iris
    reading does not count). Measured on the 2-core CPU with seed 0 (seeds 0-11 in brackets): grey patch
    fused 4.61 (4.19-4.75) vs deterministic alone 6.04; black patch 4.67 (4.15-5.00) vs 5.15; canonical
    face 8.6-9.0. With mirror-averaged FaceMesh points (the default since issue 16; the reference is
    then mirror-averaged too): grey fused 4.22 vs deterministic 5.22, black 4.29 vs 4.48 (the deterministic
    mesh gained more under the black patch than the completion did, hence the smaller margin asked there).
    21 occluded faces in benchmarks/study_open_occlusion.py (docs/open-pack.md).
    """
    image = skimage.data.astronaut()
    pts = astronaut_face.detection.landmarks[space.regions["lips"], :2]
    x0, y0 = (pts.min(0) - PATCH_MARGIN_PX).astype(int)
    x1, y1 = (pts.max(0) + PATCH_MARGIN_PX).astype(int)
    occluded = image.copy()
    occluded[y0:y1, x0:x1] = colour
    mask = np.zeros(image.shape[:2], bool)
    mask[y0:y1, x0:x1] = True
    face = _face(front_end, occluded)
    visibility = vertex_visibility_from_mask(mask, face.detection.landmarks)
    hidden = visibility < 0.5
    assert 60 < hidden.sum() < 250 and hidden[[13, 14, 61, 291]].all() and not hidden[[1, 33, 263]].any()
    (deterministic,) = shape_backend.predict([face])
    samples = generative_backend.sample(face, 10, mode="", steps=0, seed=0, start_shape=deterministic.shape, start_t0=0,
                                        guide_shape=None, guide_strength=0.0, visibility=visibility)
    scores = generative_backend.rank(face, samples, visibility=visibility)
    fused = fuse("region", FusionInputs(deterministic.shape, samples, scores, Visibility({}, visibility)), space)
    truth = reference.vertices_mm.astype(np.float64)

    def error(vertices):
        aligned = umeyama(vertices, truth, (~hidden).astype(float)).apply(vertices)
        return float(np.linalg.norm(aligned[hidden] - truth[hidden], axis=1).mean())

    e_fused, e_det = error(fused.vertices_mm), error(deterministic.vertices_mm)
    e_canon = error(space.template_mm)
    print(f"hidden {hidden.sum()}: fused {e_fused:.2f} mm, deterministic {e_det:.2f} mm, canonical {e_canon:.2f} mm")
    assert e_fused < max_fused_mm  # the stated distance
    assert e_fused < e_det - min_margin_mm  # closer than the deterministic backend alone (margins 1.0 and 0.19 mm)
    assert e_fused < e_canon - 3.0  # and far better than the mean face
    # Seen vertices come from the deterministic mesh (region fusion, visibility smoothed at the border).
    far = visibility >= 1.0
    core = far & (np.linalg.norm(truth[:, None] - truth[hidden][None], axis=2).min(axis=1) > 20)
    gap = np.abs(fused.vertices_mm[core] - deterministic.vertices_mm[core]).max(axis=1)
    assert np.median(gap) < 1e-3 and gap.max() < 0.25


def test_sampling_and_ranking_stop_when_the_stop_check_raises(generative_backend, astronaut_face, reference):
    """The ofer service passes its call's Deadline.check: the open pack must call it before every FaceMesh
    completion, end the work with its exception, and give the same samples when it does not raise."""
    from facefuse.errors import CancelledError

    v = reference.vertices_mm.astype(np.float64)
    visibility = np.where(v[:, 1] < v[2, 1], 0.0, 1.0)
    kwargs = {"mode": "", "steps": 0, "start_shape": reference.shape, "start_t0": 0, "guide_shape": None,
              "guide_strength": 0.0, "visibility": visibility}
    checks: list[int] = []

    def counting() -> None:
        checks.append(1)

    plain = generative_backend.sample(astronaut_face, 6, seed=3, **kwargs)
    assert np.array_equal(plain, generative_backend.sample(astronaut_face, 6, seed=3, stop_check=counting, **kwargs))
    assert len(checks) >= 6, "one check per FaceMesh completion at least"

    def cancel_at_third() -> None:
        checks.append(1)
        if len(checks) == 3:
            raise CancelledError("gone")

    checks.clear()
    with pytest.raises(CancelledError):
        generative_backend.sample(astronaut_face, 1000, seed=3, stop_check=cancel_at_third, **kwargs)
    assert len(checks) == 3
    checks.clear()
    with pytest.raises(CancelledError):
        generative_backend.rank(astronaut_face, np.zeros((2, 1404), np.float32), visibility=visibility,
                                stop_check=cancel_at_third)
