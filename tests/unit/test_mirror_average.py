"""Mirror averaging (facefuse.face.mirror) on skimage's astronaut with the real FaceMesh model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import skimage.data

from facefuse.assets.canonical_face import load_canonical_face
from facefuse.assets.store import ModelStore
from facefuse.face.facemesh import FaceMesh
from facefuse.face.frontend import FaceFrontEnd
from facefuse.face.mirror import mirror_averaged_face_landmarks, mirrored_landmarks
from facefuse.face.tflite import TFLiteModel
from facefuse.models.gpmm import mirror_map


@pytest.fixture(scope="module")
def setup():
    store = ModelStore()
    front_end = FaceFrontEnd.from_assets(None, store)
    image = skimage.data.astronaut()
    (det,) = front_end.detect(image)
    face = front_end.align(image, det)
    mesh = FaceMesh(TFLiteModel(store.path("face_landmark")))
    return image, face, mesh, mirror_map(load_canonical_face(store).vertices_mm)


def test_the_mirrored_run_of_a_mirrored_photo_is_the_ordinary_run(setup):
    """Mirroring twice gives back the photo, so the mirrored run on the flipped photo must be the ordinary
    FaceMesh run on the photo, flipped and re-indexed: this pins the flip, the ROI's eyes and the index map."""
    image, face, mesh, mirror = setup
    width = image.shape[1]
    box = np.asarray(face.detection.box, np.float64)
    eyes = np.asarray(face.detection.kps5, np.float64)[:2]

    def flip(point):
        return np.array([width - 1 - point[0], point[1]])

    flipped_box = np.array([width - 1 - box[2], box[1], width - 1 - box[0], box[3]])
    got = mirrored_landmarks(mesh, np.ascontiguousarray(image[:, ::-1]), flipped_box, flip(eyes[1]), flip(eyes[0]),
                             mirror)
    ordinary = np.asarray(mesh.from_detection(image, box, eyes[0], eyes[1]).landmarks, np.float64)
    expected = ordinary.copy()
    expected[:, 0] = width - 1 - expected[:, 0]
    np.testing.assert_allclose(got, expected[mirror], atol=1e-3)


def test_average_is_near_the_face_and_needs_the_crop(setup):
    _, face, mesh, mirror = setup
    averaged = mirror_averaged_face_landmarks(mesh, face, mirror)
    assert averaged is not None and averaged.shape == (468, 3)
    own = np.asarray(face.detection.landmarks, np.float64)[:, :2]
    offset = np.linalg.norm(averaged[:, :2] - own, axis=1)
    assert 0.05 < np.median(offset) < 2.0  # a second reading, not a copy, and of the same face
    no_crop = dataclasses.replace(face, crop_box224=np.zeros_like(face.crop_box224))
    assert mirror_averaged_face_landmarks(mesh, no_crop, mirror) is None
