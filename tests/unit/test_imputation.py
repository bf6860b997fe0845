"""Noise imputation of hidden pixels (facefuse.face.imputation), with a recording stand-in for FaceMesh.

The real FaceMesh run on a photo is in tests/unit/test_open_pack.py; here the geometry and the noise.
"""

from __future__ import annotations

import numpy as np
import pytest

from facefuse.face.align import box_crop_224, box_crop_to_image
from facefuse.face.facemesh import MeshResult, face_roi, project, roi_affine
from facefuse.face.imputation import hidden_pixel_mask, image_to_crop, noise_imputed_landmarks
from facefuse.face.types import AlignedFace, Detection


def test_box_crop_to_image_is_the_crops_own_geometry():
    # On a linear ramp, bilinear sampling is exact: crop pixel (u, v) must hold the ramp's value at the
    # image point the affine assigns to it.
    h, w = 300, 400
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    ramp = np.stack([xs / w, ys / h, 0.5 * (xs / w + ys / h)], axis=-1)
    box = np.array([120.0, 80.0, 220.0, 200.0])
    crop = box_crop_224(ramp, box)
    affine = box_crop_to_image(box)
    v, u = np.mgrid[20:200:37, 20:200:41]
    image_xy = np.c_[u.ravel(), v.ravel()] @ affine[:, :2].T + affine[:, 2]
    expected = np.stack([image_xy[:, 0] / w, image_xy[:, 1] / h, 0.5 * (image_xy[:, 0] / w + image_xy[:, 1] / h)], -1)
    np.testing.assert_allclose(crop[v.ravel(), u.ravel()], expected, atol=1e-5)
    np.testing.assert_allclose(image_to_crop(affine, image_xy), np.c_[u.ravel(), v.ravel()], atol=1e-9)


def test_hidden_pixel_mask_covers_only_wholly_hidden_triangles():
    points = np.array([[10, 10], [60, 10], [10, 60], [60, 60], [110, 10]], np.float64)
    triangles = np.array([[0, 1, 2], [1, 3, 2], [1, 4, 3]])
    hidden = np.array([True, True, True, False, False])
    mask = hidden_pixel_mask(points, triangles, hidden, (100, 130), dilation_px=0)
    assert mask[25, 25] and not mask[45, 45] and not mask[30, 90]  # triangle 0 only
    assert 1100 < mask.sum() < 1500  # about half of a 50 x 50 square
    grown = hidden_pixel_mask(points, triangles, hidden, (100, 130), dilation_px=2)
    assert grown.sum() > mask.sum() and grown[mask].all()
    assert not hidden_pixel_mask(points, triangles, np.zeros(5, bool), (100, 130)).any()


class RecordingMesh:
    """Stands in for FaceMesh: records what it is given and, like ``FaceMesh.run``, answers in the pixels of
    the image it was given (here the crop)."""

    def __init__(self, answer_in_crop: np.ndarray) -> None:
        self.answer = answer_in_crop
        self.calls: list[tuple[np.ndarray, np.ndarray, float, float]] = []

    def run(self, image, centre, side, angle):
        self.calls.append((image.copy(), np.asarray(centre), side, angle))
        return MeshResult(self.answer.astype(np.float32), 1.0, roi_affine(centre, side, angle, 192))


@pytest.fixture()
def face():
    rng = np.random.default_rng(0)
    box = np.array([200.0, 150.0, 300.0, 270.0], np.float32)
    landmarks = np.c_[rng.uniform([215, 165], [285, 255], size=(468, 2)), rng.normal(size=468)].astype(np.float32)
    kps5 = np.array([[230, 190], [270, 192], [250, 215], [235, 240], [265, 241]], np.float32)
    det = Detection(box, 0.9, kps5, landmarks, "blazeface-facemesh")
    crop = rng.uniform(0.2, 0.8, size=(224, 224, 3)).astype(np.float32)
    return AlignedFace(det, np.zeros((112, 112, 3), np.uint8), np.zeros((224, 224, 3), np.uint8), crop,
                       np.zeros((3, 112, 112), np.float32))


def test_noise_fills_the_hidden_pixels_only_and_points_come_back_in_image_pixels(face):
    affine = box_crop_to_image(face.detection.box)
    in_crop = image_to_crop(affine, face.detection.landmarks)
    answer = np.c_[in_crop, np.linspace(-5, 5, 468)]
    # Triangles over the landmarks: consecutive triples; the first 150 points are hidden.
    triangles = np.arange(465).reshape(155, 3)
    hidden = np.arange(468) < 150
    mesh = RecordingMesh(answer)
    draws = noise_imputed_landmarks(mesh, face, hidden, triangles, 3, np.random.default_rng(1))
    assert draws.shape == (3, 468, 3) and len(mesh.calls) == 3
    mask = hidden_pixel_mask(in_crop, triangles, hidden, (224, 224))
    clean = face.crop_box224 * 255
    for image, *_ in mesh.calls:
        np.testing.assert_array_equal(image[~mask], clean[~mask])
        filled = image[mask]
        assert np.array_equal(filled, np.rint(filled)) and filled.min() >= 0 and filled.max() <= 255
        assert abs(filled.mean() - 127.5) < 5  # uniform noise, not the photo
    assert not np.array_equal(mesh.calls[0][0][mask], mesh.calls[1][0][mask])
    # The ROI is the front end's, located in the crop; the points come back in image pixels.
    scale = float(np.sqrt(abs(np.linalg.det(affine[:, :2]))))
    centre_img, side_img, angle_img = face_roi(face.detection.box, face.detection.kps5[0], face.detection.kps5[1])
    _, centre, side, angle = mesh.calls[0]
    np.testing.assert_allclose(centre, image_to_crop(affine, centre_img[None])[0], atol=1e-6)
    assert side == pytest.approx(side_img / scale) and angle == pytest.approx(angle_img)
    np.testing.assert_allclose(draws[0][:, :2], face.detection.landmarks[:, :2], atol=1e-3)
    np.testing.assert_allclose(draws[0], project(answer, affine), atol=1e-3)
    # Seeded: the same generator state gives the same noise.
    again = RecordingMesh(answer)
    noise_imputed_landmarks(again, face, hidden, triangles, 3, np.random.default_rng(1))
    for (a, *_), (b, *_) in zip(mesh.calls, again.calls, strict=True):
        np.testing.assert_array_equal(a, b)
