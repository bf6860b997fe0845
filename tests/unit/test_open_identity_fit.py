"""The open pack's model fit (OpenShapeBackend shape_fit 'model' / 'model+detail') on a real photo.

skimage's astronaut through the open front end. What is asserted is what the fit promises: the fitted
mesh reproduces FaceMesh's 2-D evidence (the image positions of the landmarks) after the head pose is
put back, keeps the metric scale, and ignores landmarks whose visibility is zero. Whether it makes
people more distinct is measured by benchmarks/study_open_real.py (it does not: see docs/open-pack.md).
"""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data

from facefuse.assets.store import ModelStore
from facefuse.errors import InvalidInputError
from facefuse.face.frontend import FaceFrontEnd
from facefuse.packs.open import (
    DEFAULT_SHAPE_FIT,
    OpenShapeBackend,
    camera_points,
    load_open_shape_backend,
)


@pytest.fixture(scope="module")
def store():
    return ModelStore()


@pytest.fixture(scope="module")
def astronaut_face(store):
    front_end = FaceFrontEnd.from_assets(None, store)
    image = skimage.data.astronaut()
    (det,) = front_end.detect(image)
    assert det.landmarks is not None
    det.iris = front_end.estimate_iris(image, det.landmarks).as_detection_iris()
    return front_end.align(image, det)


def _image_residual_mm(metric, face) -> np.ndarray:
    """(468,) distance in the image plane (mm) between the mesh put back in the camera frame and FaceMesh's x, y."""
    observed = camera_points(face.detection.landmarks) * metric.mm_per_px
    camera = metric.vertices_mm @ metric.rotation  # rotation maps camera -> canonical, so this is R⁻¹
    camera += (observed - camera).mean(axis=0)
    return np.linalg.norm(camera[:, :2] - observed[:, :2], axis=1)


def test_model_fit_reproduces_the_landmarks_and_keeps_scale(store, astronaut_face):
    plain = load_open_shape_backend("cpu", store)
    assert plain.shape_fit == DEFAULT_SHAPE_FIT
    facemesh = load_open_shape_backend("cpu", store, shape_fit="facemesh").reconstruct(astronaut_face)
    model = load_open_shape_backend("cpu", store, shape_fit="model").reconstruct(astronaut_face)
    detail = load_open_shape_backend("cpu", store, shape_fit="model+detail").reconstruct(astronaut_face)
    assert model.mm_per_px == facemesh.mm_per_px and model.scale_source == facemesh.scale_source
    residual = _image_residual_mm(model, astronaut_face)
    assert np.median(residual) < 1.0 and np.percentile(residual, 95) < 2.5 and residual.max() < 8.0  # a smooth model
    assert np.median(_image_residual_mm(detail, astronaut_face)) < 0.5 * np.median(residual)
    eyes = [np.linalg.norm(m.vertices_mm[33] - m.vertices_mm[263]) for m in (facemesh, model, detail)]
    assert max(eyes) - min(eyes) < 2.0
    # the fit is not the input: FaceMesh's z is only a weak prior, so depth moves by a few mm at most
    depth_change = np.abs(model.vertices_mm[:, 2] - facemesh.vertices_mm[:, 2])
    assert 0.05 < np.median(depth_change) < 3.0


def test_model_fit_ignores_landmarks_marked_hidden(store, astronaut_face):
    backend = load_open_shape_backend("cpu", store, shape_fit="model")
    visibility = np.ones(468)
    lower = astronaut_face.detection.landmarks[:, 1] > astronaut_face.detection.landmarks[2, 1]  # below the nose
    visibility[lower] = 0.0
    moved = astronaut_face.detection.landmarks.copy()
    moved[lower, :2] += np.array([12.0, 20.0])  # an occluder dragging the hidden landmarks away
    reference = backend.reconstruct(astronaut_face, visibility=visibility)
    shifted = backend.reconstruct(astronaut_face.detection.__class__(**{**vars(astronaut_face.detection),
                                                                        "landmarks": moved}), visibility=visibility)
    np.testing.assert_allclose(shifted.vertices_mm, reference.vertices_mm, atol=1e-6)


def test_unknown_shape_fit_is_refused(store):
    with pytest.raises(InvalidInputError, match="shape fit"):
        OpenShapeBackend(load_open_shape_backend("cpu", store).canonical, shape_fit="nonsense")
